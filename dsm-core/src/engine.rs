//! The fault engine: one thread that owns the coherence state and reacts
//! to local page faults (read from the userfaultfd by a reader thread),
//! messages from other ranks, API commands (barrier, stop) and timers.
//! It serves other ranks' requests at all times, whatever the application
//! threads are doing.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::coherence::{Action, Migratory};
use crate::config::PAGE_SIZE;
use crate::dsm::DsmError;
use crate::fault::{Fault, FaultHandler};
use crate::proto::Msg;
use crate::stats::Stats;
use crate::{Message, Rank, Transport};

pub(crate) enum Input {
    Fault(Fault),
    FaultReaderFailed(String),
    Barrier(Sender<Result<(), DsmError>>),
    Stop,
}

pub(crate) struct Engine {
    pub rank: Rank,
    pub size: usize,
    pub transport: Arc<dyn Transport>,
    pub faults: Arc<FaultHandler>,
    pub node: Migratory,
    pub stats: Arc<Stats>,
    fetch_started: HashMap<usize, Instant>,
    barrier_epoch: u64,
    barrier_waiter: Option<Sender<Result<(), DsmError>>>,
    barrier_arrivals: HashMap<u64, usize>,
    page_buf: Box<[u8; PAGE_SIZE]>,
    zero_page: Box<[u8; PAGE_SIZE]>,
}

impl Engine {
    pub fn new(
        rank: Rank,
        size: usize,
        transport: Arc<dyn Transport>,
        faults: Arc<FaultHandler>,
        node: Migratory,
        stats: Arc<Stats>,
    ) -> Engine {
        Engine {
            rank,
            size,
            transport,
            faults,
            node,
            stats,
            fetch_started: HashMap::new(),
            barrier_epoch: 0,
            barrier_waiter: None,
            barrier_arrivals: HashMap::new(),
            page_buf: Box::new([0u8; PAGE_SIZE]),
            zero_page: Box::new([0u8; PAGE_SIZE]),
        }
    }

    /// Runs until `Stop`; an error is fatal for the job (a peer is gone, a
    /// protocol violation, the kernel refused an operation).
    pub fn run(mut self, inputs: Receiver<Input>) -> Result<(), DsmError> {
        let inbox = self.transport.inbox();
        loop {
            let timeout = self
                .node
                .next_deadline()
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(3600));
            select! {
                recv(inbox) -> incoming => match incoming {
                    Ok(Ok(msg)) => self.on_message(msg)?,
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => return Err(DsmError::Stopped),
                },
                recv(inputs) -> input => match input {
                    Ok(Input::Fault(f)) => self.on_fault(f)?,
                    Ok(Input::FaultReaderFailed(why)) => return Err(DsmError::FaultReader(why)),
                    Ok(Input::Barrier(reply)) => self.start_barrier(reply)?,
                    Ok(Input::Stop) | Err(_) => return Ok(()),
                },
                default(timeout) => {}
            }
            if self
                .node
                .next_deadline()
                .is_some_and(|t| t <= Instant::now())
            {
                let actions = self.node.on_tick(Instant::now())?;
                self.apply(actions, None)?;
            }
        }
    }

    fn on_fault(&mut self, fault: Fault) -> Result<(), DsmError> {
        let counter = if fault.write {
            &self.stats.write_faults
        } else {
            &self.stats.read_faults
        };
        Stats::add(counter, 1);
        let actions = self.node.on_fault(fault.page)?;
        if actions.iter().any(|a| matches!(a, Action::Send { .. })) {
            self.fetch_started.insert(fault.page, Instant::now());
        }
        self.apply(actions, None)
    }

    fn on_message(&mut self, message: Message) -> Result<(), DsmError> {
        let from = message.from;
        let msg = Msg::decode(&message.payload)
            .map_err(|e| DsmError::Protocol(format!("from rank {from}: {e}")))?;
        match msg {
            Msg::PageRequest {
                page, requester, ..
            } => {
                let before = self.node.counters;
                let actions =
                    self.node
                        .on_request(page as usize, requester as usize, Instant::now())?;
                let after = self.node.counters;
                Stats::add(
                    &self.stats.requests_forwarded,
                    after.forwarded - before.forwarded,
                );
                Stats::add(
                    &self.stats.requests_deferred,
                    after.deferred - before.deferred,
                );
                self.apply(actions, None)
            }
            Msg::PageGrant { page, data } => {
                let page = page as usize;
                let actions = self.node.on_grant(page, from, Instant::now())?;
                Stats::add(&self.stats.pages_received, 1);
                Stats::add(&self.stats.bytes_received, message.payload.len() as u64);
                if let Some(start) = self.fetch_started.remove(&page) {
                    self.stats.record_latency(start.elapsed());
                }
                self.apply(actions, Some(data.as_deref()))
            }
            Msg::BarrierEnter { epoch } => {
                if self.rank != 0 {
                    return Err(DsmError::Protocol(format!(
                        "rank {from} sent a barrier entry to rank {}",
                        self.rank
                    )));
                }
                let arrived = self.barrier_arrivals.entry(epoch).or_insert(0);
                *arrived += 1;
                if *arrived == self.size {
                    self.barrier_arrivals.remove(&epoch);
                    let release = Msg::BarrierRelease { epoch }.header();
                    for rank in 0..self.size {
                        self.transport.send(rank, &release)?;
                    }
                }
                Ok(())
            }
            Msg::BarrierRelease { epoch } => {
                if epoch == self.barrier_epoch {
                    if let Some(waiter) = self.barrier_waiter.take() {
                        let _ = waiter.send(Ok(()));
                    }
                }
                Ok(())
            }
        }
    }

    fn start_barrier(&mut self, reply: Sender<Result<(), DsmError>>) -> Result<(), DsmError> {
        self.barrier_epoch += 1;
        self.barrier_waiter = Some(reply);
        self.transport.send(
            0,
            &Msg::BarrierEnter {
                epoch: self.barrier_epoch,
            }
            .header(),
        )?;
        Ok(())
    }

    /// Carries out the state machine's actions. `granted` is the page data
    /// of the grant being handled (`Some(None)`: a zero page).
    fn apply(
        &mut self,
        actions: Vec<Action>,
        granted: Option<Option<&[u8; PAGE_SIZE]>>,
    ) -> Result<(), DsmError> {
        for action in actions {
            match action {
                Action::Send { to, msg } => self.transport.send(to, &msg.header())?,
                Action::GivePage { to, page, present } => {
                    if present {
                        self.faults.take(page, &mut self.page_buf)?;
                        self.transport.send_parts(
                            to,
                            &[&Msg::grant_header(page, true), &self.page_buf[..]],
                        )?;
                        Stats::add(&self.stats.bytes_sent, PAGE_SIZE as u64);
                    } else {
                        self.transport.send(to, &Msg::grant_header(page, false))?;
                    }
                    Stats::add(&self.stats.pages_sent, 1);
                }
                Action::InstallGranted { page } => {
                    let data = granted
                        .ok_or_else(|| {
                            DsmError::Protocol(format!("install of page {page} without a grant"))
                        })?
                        .unwrap_or(&self.zero_page);
                    self.faults.install(page, data)?;
                }
                Action::InstallZero { page } => {
                    self.faults.install(page, &self.zero_page)?;
                }
                Action::Wake { page } => self.faults.wake(page)?,
            }
        }
        Ok(())
    }
}

/// Reads fault events until `stop` becomes readable (or is closed).
pub(crate) fn read_faults(faults: Arc<FaultHandler>, stop: OwnedFd, events: Sender<Input>) {
    loop {
        let mut fds = [
            PollFd::new(faults.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                let _ = events.send(Input::FaultReaderFailed(format!("poll: {e}")));
                return;
            }
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return;
        }
        loop {
            match faults.next_fault() {
                Ok(Some(fault)) => {
                    if events.send(Input::Fault(fault)).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = events.send(Input::FaultReaderFailed(e.to_string()));
                    return;
                }
            }
        }
    }
}

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

use crate::coherence::{Action, Migratory, Mrsw, ProtocolCounters};
use crate::config::PAGE_SIZE;
use crate::dsm::DsmError;
use crate::fault::{Fault, FaultHandler};
use crate::proto::{Msg, Payload};
use crate::stats::Stats;
use crate::{Message, Rank, Transport};

pub(crate) enum Input {
    Fault(Fault),
    FaultReaderFailed(String),
    Barrier(Sender<Result<(), DsmError>>),
    Stop,
}

/// The coherence state machine of the configured protocol.
pub(crate) enum Node {
    Migratory(Migratory),
    Mrsw(Mrsw),
}

impl Node {
    fn counters(&self) -> ProtocolCounters {
        match self {
            Node::Migratory(n) => n.counters,
            Node::Mrsw(n) => n.counters,
        }
    }
}

pub(crate) struct Engine {
    pub rank: Rank,
    pub size: usize,
    pub transport: Arc<dyn Transport>,
    pub faults: Arc<FaultHandler>,
    pub node: Node,
    pub stats: Arc<Stats>,
    /// Origin of the multi-reader protocol's clock.
    started: Instant,
    /// The home's copy of pages no writer holds (multi-reader protocol);
    /// a page absent here is all zeros.
    backing: HashMap<usize, Box<[u8; PAGE_SIZE]>>,
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
        node: Node,
        stats: Arc<Stats>,
    ) -> Engine {
        Engine {
            rank,
            size,
            transport,
            faults,
            node,
            stats,
            started: Instant::now(),
            backing: HashMap::new(),
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
            if self.next_deadline().is_some_and(|t| t <= Instant::now()) {
                let now = self.now();
                let actions = match &mut self.node {
                    Node::Migratory(n) => n.on_tick(Instant::now())?,
                    Node::Mrsw(n) => n.on_tick(now)?,
                };
                self.apply(actions, None)?;
            }
        }
    }

    /// The multi-reader protocol's clock.
    fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn next_deadline(&self) -> Option<Instant> {
        match &self.node {
            Node::Migratory(n) => n.next_deadline(),
            Node::Mrsw(n) => n
                .next_deadline()
                .map(|t| self.started + Duration::from_nanos(t)),
        }
    }

    /// Runs `f` on the state machine and records the change of its counters.
    fn counted<T>(&mut self, f: impl FnOnce(&mut Node) -> T) -> T {
        let before = self.node.counters();
        let result = f(&mut self.node);
        let after = self.node.counters();
        Stats::add(
            &self.stats.requests_forwarded,
            after.forwarded - before.forwarded,
        );
        Stats::add(
            &self.stats.requests_deferred,
            after.deferred - before.deferred,
        );
        result
    }

    fn on_fault(&mut self, fault: Fault) -> Result<(), DsmError> {
        let counter = if fault.write {
            &self.stats.write_faults
        } else {
            &self.stats.read_faults
        };
        Stats::add(counter, 1);
        let actions = match &mut self.node {
            Node::Migratory(n) => n.on_fault(fault.page)?,
            Node::Mrsw(n) => n.on_fault(fault.page, fault.write)?,
        };
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
            Msg::BarrierEnter { .. } | Msg::BarrierRelease { .. } => {
                self.on_barrier_message(from, msg)
            }
            Msg::PageRequest {
                page, requester, ..
            } => {
                let now = Instant::now();
                let actions = self.counted(|node| match node {
                    Node::Migratory(n) => n.on_request(page as usize, requester as usize, now),
                    Node::Mrsw(_) => Ok(Vec::new()),
                })?;
                self.apply(actions, None)
            }
            Msg::PageGrant { page, .. } => {
                let page = page as usize;
                let actions = match &mut self.node {
                    Node::Migratory(n) => n.on_grant(page, from, Instant::now())?,
                    Node::Mrsw(_) => Vec::new(),
                };
                self.received_page(page, message.payload.len());
                self.apply(actions, Some(&msg))
            }
            msg => {
                let now = self.now();
                let actions = self.counted(|node| match node {
                    Node::Mrsw(n) => n.on_message(from, &msg, now),
                    Node::Migratory(_) => Ok(Vec::new()),
                })?;
                if let Msg::Grant { page, .. } = msg {
                    self.received_page(page as usize, message.payload.len());
                }
                self.apply(actions, Some(&msg))
            }
        }
    }

    fn received_page(&mut self, page: usize, bytes: usize) {
        Stats::add(&self.stats.pages_received, 1);
        Stats::add(&self.stats.bytes_received, bytes as u64);
        if let Some(start) = self.fetch_started.remove(&page) {
            self.stats.record_latency(start.elapsed());
        }
    }

    fn on_barrier_message(&mut self, from: Rank, msg: Msg) -> Result<(), DsmError> {
        match msg {
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
            other => Err(DsmError::Protocol(format!(
                "from rank {from}: unexpected {other:?}"
            ))),
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

    /// Carries out the state machine's actions. `current` is the message
    /// being handled: its page bytes are what `Install*` maps and what
    /// `StoreBacking` keeps.
    fn apply(&mut self, actions: Vec<Action>, current: Option<&Msg>) -> Result<(), DsmError> {
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
                Action::InstallGranted { page }
                | Action::Install {
                    page,
                    writable: true,
                } => {
                    let data = self.carried_page(current, page)?;
                    self.faults.install(page, data)?;
                }
                Action::Install {
                    page,
                    writable: false,
                } => {
                    let data = self.carried_page(current, page)?;
                    self.faults.install_readonly(page, data)?;
                }
                Action::InstallZero { page } => {
                    self.faults.install(page, &self.zero_page)?;
                }
                Action::MakeWritable { page } => self.faults.make_writable(page)?,
                Action::DropPage { page } => self.faults.drop_page(page)?,
                Action::WriteBack {
                    to,
                    page,
                    keep_shared,
                } => {
                    if keep_shared {
                        self.faults.downgrade(page, &mut self.page_buf)?;
                    } else {
                        self.faults.take(page, &mut self.page_buf)?;
                    }
                    self.transport
                        .send_parts(to, &[&Msg::write_back_header(page), &self.page_buf[..]])?;
                    Stats::add(&self.stats.pages_sent, 1);
                    Stats::add(&self.stats.bytes_sent, PAGE_SIZE as u64);
                }
                Action::StoreBacking { page } => {
                    let data = match current {
                        Some(Msg::WriteBack { data, .. }) => data.clone(),
                        _ => {
                            return Err(DsmError::Protocol(format!(
                                "store of page {page} without a write-back"
                            )))
                        }
                    };
                    self.backing.insert(page, data);
                }
                Action::GrantFromBacking { to, page, write } => {
                    // A writer's copy supersedes the home's: hand it over.
                    let data = if write {
                        self.backing.remove(&page)
                    } else {
                        self.backing.get(&page).cloned()
                    };
                    match data {
                        Some(data) => {
                            self.transport.send_parts(
                                to,
                                &[&Msg::grant_data_header(page, write), &data[..]],
                            )?;
                            Stats::add(&self.stats.bytes_sent, PAGE_SIZE as u64);
                        }
                        None => {
                            let msg = Msg::Grant {
                                page: page as u64,
                                write,
                                payload: Payload::Zero,
                            };
                            self.transport.send(to, &msg.header())?;
                        }
                    }
                    Stats::add(&self.stats.pages_sent, 1);
                }
                Action::Wake { page } => self.faults.wake(page)?,
            }
        }
        Ok(())
    }

    /// The page bytes carried by `current` (zeros for a zero grant).
    fn carried_page<'a>(
        &'a self,
        current: Option<&'a Msg>,
        page: usize,
    ) -> Result<&'a [u8; PAGE_SIZE], DsmError> {
        match current {
            Some(Msg::PageGrant { data, .. }) => Ok(data.as_deref().unwrap_or(&self.zero_page)),
            Some(Msg::Grant {
                payload: Payload::Data(data),
                ..
            }) => Ok(data),
            Some(Msg::Grant {
                payload: Payload::Zero,
                ..
            }) => Ok(&self.zero_page),
            _ => Err(DsmError::Protocol(format!(
                "install of page {page} without a grant"
            ))),
        }
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

//! How events reach the engine's state, and their first steps. The threads
//! that carry them: a faulting thread's SIGBUS handler
//! ([`signal_fault_server`]) or the fault thread ([`read_faults`]) through
//! [`serve_here`], the transport's receive threads through
//! [`inline_delivery`] and [`payload_placement`], the engine thread's own
//! loop (`Engine::run`). Then a fault ([`Engine::on_fault`]: first touch,
//! a direct read, which a faulting thread carries out between
//! [`Engine::begin_fault`] and [`Engine::end_fault`] without the lock, or
//! the protocol and read-ahead) or a message ([`Engine::on_payload`]: a
//! batch's parts in order, read grants to `landing`, a message about a
//! segment not known yet parked, the rest to `Engine::handle`).
//!
//! A remote read fault, top to bottom: `signal_fault_server` ->
//! `serve_here` -> `Engine::on_fault` (here) -> `Engine::apply`
//! (`protocol.rs`) -> `send_queued` (`send.rs`); at the home,
//! `inline_delivery` -> `on_payload` -> `handle` -> `apply`, the grant
//! queued and sent; back here, `on_payload` -> `on_read_grant_run`
//! (`landing.rs`), which maps the page and wakes the thread
//! ([`crate::sigbus::Waiters`]).

use super::direct::{DirectRead, DIRECT_RUN_MAX};
use super::landing::{RunBytes, RunOp};
use super::protocol::{filled_page, Carried};
use super::segments::Parked;
use super::send::send_queued;
use super::{lock, page_of, Engine, Input, Node};
use crate::coherence::Action;
use crate::error::DsmError;
use crate::fault::{Fault, FaultHandler};
use crate::hang::{WaitFor, Waiting};
use crate::proto::Msg;
use crate::sigbus::PagePoll;
use crate::stats::Stats;
use crate::transport::{Incoming, InlineDelivery, PayloadPlacement, Transport};
use crate::{proto, Message, Rank};
use crossbeam_channel::{Receiver, Sender};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Runs `work` (a fault, an API call) on the engine's state in the calling
/// thread, then flushes its messages. A timer the work set is announced to
/// the engine thread, whose wait was computed without it.
pub(crate) fn serve_here<T>(
    engine: &Mutex<Engine>,
    events: &Sender<Input>,
    work: impl FnOnce(&mut Engine) -> Result<T, DsmError>,
) -> Result<T, DsmError> {
    serve_here_then(engine, events, work, |_| true)
}

/// [`serve_here`], flushing the messages only if `send_now` says so of what
/// `work` returned (they are otherwise left to the caller's next call).
fn serve_here_then<T>(
    engine: &Mutex<Engine>,
    events: &Sender<Input>,
    work: impl FnOnce(&mut Engine) -> Result<T, DsmError>,
    send_now: impl FnOnce(&T) -> bool,
) -> Result<T, DsmError> {
    let (done, timer_set) = {
        let mut this = lock(engine);
        let before = this.next_deadline();
        let free_stalled_before = this.free_stalled();
        let done = work(&mut this)?;
        let evict_behind = this.bound_memory()?;
        let after = this.next_deadline();
        // A free left waiting on this rank's requests needs the engine
        // thread to look again (`FREE_POLL`), which it may be asleep for.
        let free_stalled = this.free_stalled() && !free_stalled_before;
        let timer_set = evict_behind || free_stalled || (after.is_some() && after != before);
        // With nothing to send, nothing is: a message a receive thread left
        // part-written is the engine thread's to finish (woken for it).
        if !this.out.is_empty() && send_now(&done) {
            send_queued(engine, this)?;
        }
        (done, timer_set)
    };
    if timer_set {
        events.send(Input::Wake).map_err(|_| DsmError::Stopped)?;
    }
    Ok(done)
}

/// The engine's handler for messages in the transport's receive threads
/// ([`Transport::deliver_inline`]): a message is handled there when the
/// engine's lock is free and nothing received earlier is still queued
/// (order per sender is kept: a sender's earlier message was either handled
/// the same way or is still in the queue). A grant is then installed, and
/// its faulting thread woken, with no hand-off to the engine thread. What
/// the handling produces leaves from there only if the transport takes it
/// without waiting (a receive thread blocked sending could deadlock two
/// ranks); the engine thread is woken to send the rest. Otherwise the
/// message is queued as usual.
pub(crate) fn inline_delivery(
    engine: Weak<Mutex<Engine>>,
    inbox: Receiver<Incoming>,
    events: Sender<Input>,
) -> InlineDelivery {
    Box::new(move |message: Message| {
        let Some(engine) = engine.upgrade() else {
            return Some(message);
        };
        let Ok(mut this) = engine.try_lock() else {
            return Some(message);
        };
        // During a direct read, messages wait for the engine thread (which
        // waits for the read to end).
        if !this.serving || !inbox.is_empty() || this.reading_directly() {
            return Some(message);
        }
        let before = this.next_deadline();
        let free_stalled_before = this.free_stalled();
        let from = message.from;
        this.sends_deferred = true;
        // A panic here would otherwise end this receive thread silently,
        // with sends left deferred: the job is ended instead.
        let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let handled = this.on_message(message).and_then(|()| this.bound_memory());
            this.sends_deferred = false;
            // What it produced leaves from here if the transport takes it
            // at once (no hand-off to the engine thread on the way of a
            // fault); the rest is left to the engine thread.
            handled.and_then(|evict_behind| Ok(this.try_flush()? || evict_behind))
        }))
        .unwrap_or_else(|_| {
            Err(DsmError::Protocol(format!(
                "handling a message from rank {from} panicked"
            )))
        });
        this.sends_deferred = false;
        Stats::add(&this.stats.messages_inline, 1);
        let wake = !matches!(handled, Ok(false))
            || this.next_deadline() != before
            || (this.free_stalled() && !free_stalled_before);
        let handled = handled.map(|_| ());
        drop(this);
        match handled {
            Err(e) => {
                let _ = events.send(Input::Failed(e));
            }
            Ok(()) if wake => {
                let _ = events.send(Input::Wake);
            }
            Ok(()) => {}
        }
        None
    })
}

/// Lets the transport's receive threads land runs of read grants straight
/// in their pages' frames ([`Transport::place_payloads`]), when the engine
/// is free to check that this rank waits for exactly those grants
/// (`Engine::land_read_grant_run`). It never waits for the engine: a
/// receive thread blocked on it could deadlock two ranks, as for
/// [`inline_delivery`].
pub(crate) fn payload_placement(
    engine: Weak<Mutex<Engine>>,
    events: Sender<Input>,
) -> PayloadPlacement {
    PayloadPlacement {
        head_len: proto::READ_GRANT_RUN_HEAD,
        place: Box::new(move |from, head, len| {
            let (first, count) = proto::read_grant_run_head(head, len)?;
            let engine = engine.upgrade()?;
            let mut this = engine.try_lock().ok()?;
            // As in `inline_delivery`: a panic ends the job, not silently
            // this receive thread.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                this.land_read_grant_run(from, first, count)
            }))
            .unwrap_or_else(|_| {
                let _ = events.send(Input::Failed(DsmError::Protocol(format!(
                    "placing a run of pages from rank {from} panicked"
                ))));
                None
            })
        }),
    }
}

/// How long a thread parked in the SIGBUS handler sleeps before it retries
/// its access anyway (an install it was not woken for: a page of another
/// bucket, say); the retry faults again if the page is still missing.
const SIGNAL_WAIT: Duration = Duration::from_millis(50);

/// The fault path run in the faulting thread's SIGBUS handler
/// (`DSM_FAULTS=sigbus`): serves the fault on the engine's state (a page
/// homed here is installed at once; otherwise the request leaves from this
/// thread), then sleeps until a page of its bucket is installed; while it
/// polls first, it takes the answers that reach it through shared memory
/// itself ([`Transport::poll_answers`]). Errors go
/// to the engine thread, which ends the job; this thread then waits for
/// that end rather than retrying an access that can no longer be served.
pub(crate) fn signal_fault_server(
    engine: Arc<Mutex<Engine>>,
    transport: Arc<dyn Transport>,
    faults: Arc<FaultHandler>,
    events: Sender<Input>,
    page_poll: PagePoll,
    waiting: Arc<Waiting>,
) -> crate::sigbus::Server {
    // Threads of this rank serving a fault now: one alone reads directly
    // under the engine's lock, which saves taking it twice.
    let serving = AtomicUsize::new(0);
    Box::new(move |page, write| {
        let Some(waiters) = faults.waiters() else {
            return;
        };
        // Registered for hang reports: a thread still waiting for its page
        // re-enters here at each retry, so the wait stays on record.
        waiting.enter(WaitFor::Page { page, write });
        let spin = waiters.poll_for(page_poll);
        // Timed only for an adaptive poll, the one reader of the average.
        let asked = matches!(page_poll, PagePoll::Adaptive { .. }).then(Instant::now);
        let ticket = waiters.prepare(page, spin);
        // Before the request leaves: its answer must find the poll.
        let mut answers = if ticket.polls() {
            transport.poll_answers()
        } else {
            None
        };
        let fault = Fault {
            page,
            write,
            write_protect: false,
        };
        // With other threads faulting, a direct read copies and maps
        // without the engine's lock: their faults copy meanwhile.
        // What the first step queued to send leaves at the read's end (or
        // with another thread's output), not from this thread during it.
        let others = serving.fetch_add(1, Relaxed) > 0;
        let begin = |this: &mut Engine| this.begin_fault(fault, others);
        let served =
            serve_here_then(&engine, &events, begin, Option::is_none).and_then(|pending| {
                match pending {
                    None => Ok(()),
                    Some(mut pending) => {
                        pending.read.carry_out(&faults);
                        serve_here(&engine, &events, |this| this.end_fault(pending))
                    }
                }
            });
        serving.fetch_sub(1, Relaxed);
        if let Err(e) = served {
            let _ = events.send(Input::Failed(e));
            drop(answers);
            loop {
                std::thread::park();
            }
        }
        // Timed out or not, the access is retried (and faults again if the
        // page is still missing). A wait an install ended is over: a thread
        // faulting again later on a busy page starts a new one.
        // The poll of the rings ends with the polling: a thread asleep must
        // not hold back the receive threads' wake-ups.
        let poll = move |spin, done: &dyn Fn() -> bool| {
            crate::sched::poll_with_answers(&mut answers, spin, done);
        };
        if waiters.wait(ticket, spin, SIGNAL_WAIT, poll) {
            if let Some(asked) = asked {
                waiters.waited(asked.elapsed());
            }
            waiting.leave();
        } else {
            waiting.pause();
        }
    })
}

/// The fault thread: reads fault events until `stop` becomes readable (or
/// is closed) and serves each at once, on the engine's state, so a fault
/// needs no hand-off to the engine thread (on this kind of machine a thread
/// wake-up costs more than the fault itself). Errors go to the engine
/// thread, which ends the job.
pub(crate) fn read_faults(
    engine: Arc<Mutex<Engine>>,
    faults: Arc<FaultHandler>,
    stop: OwnedFd,
    events: Sender<Input>,
    spin: Duration,
) {
    let serve = |fault: Fault| serve_here(&engine, &events, |this| this.on_fault(fault));
    loop {
        // Poll the userfaultfd for a while first (DSM_SPIN_US): a fault
        // found this way costs no wake-up of this thread.
        let until = Instant::now() + spin;
        while !spin.is_zero() && Instant::now() < until {
            match faults.next_fault() {
                Ok(Some(fault)) => {
                    if let Err(e) = serve(fault) {
                        let _ = events.send(Input::Failed(e));
                        return;
                    }
                }
                Ok(None) => std::hint::spin_loop(),
                Err(e) => {
                    let _ = events.send(Input::Failed(e.into()));
                    return;
                }
            }
        }
        let mut fds = [
            PollFd::new(faults.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                let _ = events.send(Input::Failed(DsmError::FaultReader(format!("poll: {e}"))));
                return;
            }
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return;
        }
        loop {
            match faults.next_fault() {
                Ok(Some(fault)) => {
                    if let Err(e) = serve(fault) {
                        let _ = events.send(Input::Failed(e));
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = events.send(Input::Failed(e.into()));
                    return;
                }
            }
        }
    }
}

/// A fault whose direct read is under way, to carry out without the
/// engine's lock (`DirectRead::carry_out`), then to end with
/// [`Engine::end_fault`].
pub(super) struct PendingFault {
    fault: Fault,
    pub(super) read: DirectRead,
    /// The read-ahead window this fault's stream computed.
    ahead: Range<usize>,
    /// How far the stream had asked before this fault.
    requested_before: usize,
}

impl Engine {
    /// A fault served whole under the engine's lock (the fault thread's,
    /// one replayed after its segment became known).
    pub(super) fn on_fault(&mut self, fault: Fault) -> Result<(), DsmError> {
        let pending = self.begin_fault(fault, false)?;
        debug_assert!(
            pending.is_none(),
            "a direct read carried out under the lock"
        );
        Ok(())
    }

    /// A fault's first step: served (first touch, a copy held here, a
    /// direct read done under the lock) or asked for (`None`), or, when
    /// `unlock` and the engine thread does not wait to handle messages, a
    /// direct read left to the caller to carry out without the lock.
    pub(super) fn begin_fault(
        &mut self,
        fault: Fault,
        unlock: bool,
    ) -> Result<Option<PendingFault>, DsmError> {
        if self.segment_unknown(fault.page) {
            self.park(fault.page, Parked::Fault(fault));
            return Ok(None);
        }
        if fault.write && self.lift_readers_protection(fault.page)? {
            return Ok(None);
        }
        if fault.write && self.protected_ahead.remove(fault.page) {
            // Still ours and writable: only the protection taken ahead of
            // a downgrade stopped the store (which will now protect it again).
            debug_assert!(!self.home_copy_is_mapped(fault.page), "a writable page");
            self.faults.make_writable(fault.page)?;
            return Ok(None);
        }
        let counter = if fault.write {
            &self.stats.write_faults
        } else {
            &self.stats.read_faults
        };
        Stats::add(counter, 1);
        if self.first_touch(fault.page)? {
            return Ok(None);
        }
        let rc = self.rc.contains(fault.page);
        let requested_before = self.stream.requested_to;
        let ahead = if fault.write {
            0..0
        } else {
            self.stream.on_read_fault(fault.page)
        };
        // A stream copies a run of pages directly, as read-ahead would; one
        // whose pages alternate between other homes (round-robin over more
        // than two ranks) is left to read-ahead, which asks each home for
        // all its pages of the window at once, where a direct run would
        // stop at every page.
        let streaming = self.stream.streaming();
        let homes_alternate = |this: &Self| {
            let next_home = this.home_of(fault.page + 1);
            next_home != this.home_of(fault.page) && next_home != Some(this.rank)
        };
        let direct = !fault.write && !rc && (!streaming || !homes_alternate(self));
        if direct {
            let run = if streaming { DIRECT_RUN_MAX } else { 1 };
            if let Some(read) = self.plan_direct_read(fault.page, run)? {
                let mut pending = PendingFault {
                    fault,
                    read,
                    ahead,
                    requested_before,
                };
                if unlock && self.direct_read_may_unlock() {
                    return Ok(Some(pending));
                }
                pending.read.carry_out(&self.faults);
                self.end_fault(pending)?;
                return Ok(None);
            }
        }
        self.ask_for(fault, rc, ahead)?;
        Ok(None)
    }

    /// A fault's last step after its direct read: the read ended; if it did
    /// not serve the fault, the page is asked for.
    pub(super) fn end_fault(&mut self, pending: PendingFault) -> Result<(), DsmError> {
        let PendingFault {
            fault,
            read,
            ahead,
            requested_before,
        } = pending;
        if let Some(end) = self.end_direct_read(read)? {
            // The window computed for this fault was not asked for: a
            // stream goes on from before it, a new one from this page.
            let base = if self.stream.run == 0 {
                fault.page + 1
            } else {
                requested_before
            };
            self.stream.requested_to = base.max(end);
            return Ok(());
        }
        self.ask_for(fault, false, ahead)
    }

    /// A fault on a page neither held here nor read directly: asked for
    /// (with the pages lost with it, and the stream's read-ahead window).
    fn ask_for(&mut self, fault: Fault, rc: bool, ahead: Range<usize>) -> Result<(), DsmError> {
        let actions = match &mut self.node {
            _ if rc => self.release.on_fault(fault.page, fault.write)?,
            Node::Migratory(n) => n.on_fault(fault.page)?,
            Node::Mrsw(n) => n.on_fault(fault.page, fault.write)?,
        };
        if actions.iter().any(|a| matches!(a, Action::Send { .. })) {
            self.fetch_started.insert(fault.page, Instant::now());
        }
        let regaining = matches!(&self.node, Node::Mrsw(n) if n.lost(fault.page).is_some());
        // A page homed here: its request goes to this rank itself and is
        // answered as it is applied (the grant ends the loss), so the pages
        // lost with it are asked for first (a home's boundary row after a
        // push recalled it: one fault instead of one a page).
        let home_here = matches!(&self.node, Node::Mrsw(n) if n.home_of(fault.page) == self.rank);
        let regained_here = if home_here && regaining {
            // The run and the page made writable (or mapped) again in one
            // system call: the first page's change is staged after the
            // others', ahead of their run.
            Some(self.in_runs(|this| {
                let regained = this.regain_after(fault.page, fault.write)?;
                this.apply(actions, Carried::Nothing)?;
                Ok(regained)
            })?)
        } else {
            self.apply(actions, Carried::Nothing)?;
            None
        };
        if !ahead.is_empty() || regaining {
            // The demand request leaves alone, ahead of the batch asked for
            // with it. Otherwise it leaves when the lock is let go
            // (`serve_here`), with other threads' requests queued meanwhile.
            self.flush()?;
        }
        let regained = match regained_here {
            Some(regained) => regained,
            None => self.regain_after(fault.page, fault.write)?,
        };
        if !fault.write {
            self.prefetch(ahead)?;
            if regained > 0 {
                // Already asked for: a read stream that reaches them goes on.
                self.stream.requested(fault.page + 1 + regained);
            }
        }
        Ok(())
    }

    /// A first touch of a page homed here (or private) that was never
    /// touched: maps it and the untouched pages after it, up to
    /// `DSM_POPULATE` pages within its segment, zeros and writable, in one
    /// system call (`Mrsw::populate_ahead`) instead of one fault and one
    /// install per page. True when it served the fault.
    pub(super) fn first_touch(&mut self, page: usize) -> Result<bool, DsmError> {
        let end = self.populate_end(page);
        if end <= page {
            return Ok(false);
        }
        let now = self.now();
        let Node::Mrsw(node) = &mut self.node else {
            return Ok(false);
        };
        let actions = node.populate_ahead(page, end, now)?;
        if actions.is_empty() {
            return Ok(false);
        }
        let mut populated = page..page;
        for action in &actions {
            if let Action::InstallZeros { first, count } = action {
                Stats::add(&self.stats.pages_populated, *count as u64 - 1);
                // New memory, as a grant's page is (`check_memory`).
                self.pages_since_memory_check += count;
                populated = *first..first + count;
            }
        }
        self.apply(actions, Carried::Nothing)?;
        // Co-located ranks may read them directly once the hold is over.
        for page in populated {
            self.publish_direct(page);
        }
        Ok(true)
    }

    /// Where a first touch of `page` stops taking pages (exclusive): the
    /// end of its segment (of the fixed space below the heap), at most
    /// `populate` pages on, and before the first page whose home's copy
    /// holds bytes (a file segment's contents, which the state machine
    /// does not see). `page` itself when no first touch applies here: the
    /// page is homed elsewhere (no lookup of the home's copies then).
    pub(super) fn populate_end(&self, page: usize) -> usize {
        let Node::Mrsw(node) = &self.node else {
            return page;
        };
        if self.populate == 0 || self.rc.contains(page) {
            return page;
        }
        let segment = self.registry.find(page);
        let private = segment.is_some_and(|s| s.kind == 3);
        if !private && node.home_of(page) != self.rank {
            return page;
        }
        let limit = match segment {
            Some(s) => (s.first_page + s.pages) as usize,
            None if !self.registry.in_heap(page) => self.registry.heap_start,
            None => return page,
        };
        let limit = limit
            .min(page.saturating_add(self.populate))
            .min(node.pages());
        (page..limit)
            .find(|p| self.backing.get(*p).is_some())
            .unwrap_or(limit)
    }

    pub(super) fn on_message(&mut self, message: Message) -> Result<(), DsmError> {
        self.on_payload(message.from, &message.payload)?;
        self.transport.recycle(message.payload);
        Ok(())
    }

    /// Handles one message's bytes: a batch part by part, in order.
    pub(super) fn on_payload(&mut self, from: Rank, payload: &[u8]) -> Result<(), DsmError> {
        if payload.first() == Some(&proto::BATCH) {
            let parts = proto::batch_parts(payload)
                .map_err(|e| DsmError::Protocol(format!("from rank {from}: {e}")))?;
            self.batch_clock = Some(self.now());
            let handled = self.protect_ahead_of_reads(&parts).and_then(|()| {
                parts
                    .into_iter()
                    .try_for_each(|part| self.on_payload(from, part))
            });
            self.batch_clock = None;
            handled?;
            return self.run_staged();
        }
        if let Some((first, pages)) = proto::read_grant_run(payload)
            .map_err(|e| DsmError::Protocol(format!("from rank {from}: {e}")))?
        {
            return self.on_read_grant_run(from, first, RunBytes::Received(pages));
        }
        if let Some((page, bytes)) = proto::read_grant(payload) {
            // A lone grant (a round-robin window's pages from one home are
            // not consecutive) is mapped straight from the received bytes,
            // as a run of one, unless it extends the install staged before
            // it: no copy into a page buffer and then into the staged run.
            let staged = &self.staged;
            let extends_staged = staged.count > 0
                && staged.op == RunOp::InstallReadOnly
                && staged.first + staged.count == page;
            if !extends_staged && !self.segment_unknown(page) {
                // Its header too: the bytes received are the message's.
                let header = payload.len() - bytes.len();
                Stats::add(&self.stats.bytes_received, header as u64);
                return self.on_read_grant_run(from, page, RunBytes::Received(bytes));
            }
        }
        if let Some(token) = proto::placed_read_run(payload) {
            if self.batch_clock.is_some() {
                return Err(DsmError::Protocol(format!(
                    "from rank {from}: a notice of pages landed in their frames inside a batch (such notices never travel between ranks)"
                )));
            }
            return self.on_landed_run(from, token);
        }
        let spares = &mut self.spare_pages;
        let msg = Msg::decode_with(payload, &mut |bytes| filled_page(spares, bytes))
            .map_err(|e| DsmError::Protocol(format!("from rank {from}: {e}")))?;
        if let Some(page) = page_of(&msg) {
            if self.segment_unknown(page) {
                let message = Message {
                    from,
                    payload: payload.to_vec(),
                };
                self.park(page, Parked::Message(message));
                return Ok(());
            }
        }
        // Once handled, a page nobody kept (an installed grant) is spare.
        let carried = msg.page_data().cloned();
        self.handle(from, msg, payload.len())?;
        if let Some(buffer) = carried {
            self.recycle(buffer);
        }
        Ok(())
    }
}

//! Sending the outbox: who holds the send turn, and how messages leave in
//! the order they were produced whichever thread sends them (the engine
//! thread, a faulting thread after letting go of the engine's lock, a
//! receive thread only what goes without waiting).

use super::{lock, Engine};
use crate::error::DsmError;
use crate::outbox::Outbox;
use crate::stats::Stats;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};

/// The send turn (`Engine::send_turn`), taken under the engine's lock.
pub(super) fn take_turn(turn: &Mutex<()>) -> MutexGuard<'_, ()> {
    turn.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes the send turn for output queued under the engine's lock, or leaves
/// that output to the thread holding the turn (a sender without the lock,
/// see [`send_queued`]). The mark `left` is set before the turn is tried:
/// a sender that lets the turn go and then finds the mark unset knows that
/// no output was left to it, and does not take the engine's lock again
/// (which the receive threads landing pages would then miss).
fn claim_turn<'t>(turn: &'t Mutex<()>, left: &AtomicBool) -> Option<MutexGuard<'t, ()>> {
    left.store(true, SeqCst);
    let held = turn.try_lock().ok()?;
    // Everything queued is this thread's to send now.
    left.store(false, SeqCst);
    Some(held)
}

/// Sends the outbox from a thread that may wait (a faulting thread, an
/// API call), holding the engine's lock on entry. The turn is taken under
/// that lock, so what is queued now leaves before what is queued after;
/// requests then leave without the lock, as a send can take long (loopback
/// delivery, preemption) and receive threads landing pages need the lock
/// meanwhile. What other threads queue during the send (they find the turn
/// taken and leave their output, see [`claim_turn`]) goes out next in one
/// batch, until nothing was left.
pub(super) fn send_queued<'a>(
    engine: &'a Mutex<Engine>,
    mut this: MutexGuard<'a, Engine>,
) -> Result<(), DsmError> {
    loop {
        this.handle_own_messages()?;
        if this.out.is_empty() {
            return Ok(());
        }
        let turn = Arc::clone(&this.send_turn);
        let left = Arc::clone(&this.output_left);
        let Some(held) = claim_turn(&turn, &left) else {
            return Ok(()); // the holder sends it
        };
        let Some(mut output) = this.detach_output() else {
            // Grants read from the mapping: sent under the engine's lock.
            return this.flush_in_turn();
        };
        let (transport, faults, stats) = (
            Arc::clone(&this.transport),
            Arc::clone(&this.faults),
            Arc::clone(&this.stats),
        );
        drop(this);
        transport.finish_sends()?;
        output.flush(&*transport, &faults)?;
        Stats::add(&stats.batches_sent, output.batches);
        drop(held);
        if !left.load(SeqCst) {
            return Ok(());
        }
        this = lock(engine);
    }
}

impl Engine {
    /// Sends the messages the handling of the last events produced.
    pub(super) fn flush(&mut self) -> Result<(), DsmError> {
        if self.sends_deferred {
            return Ok(());
        }
        self.handle_own_messages()?;
        if self.out.is_empty() {
            // Only a message a receive thread left part-written may be
            // waiting; a thread holding the turn finishes it first anyway,
            // so this one does not wait for the turn under the lock.
            if let Ok(_turn) = self.send_turn.try_lock() {
                self.transport.finish_sends()?;
            }
            return Ok(());
        }
        let turn = Arc::clone(&self.send_turn);
        let Some(_turn) = claim_turn(&turn, &self.output_left) else {
            return Ok(()); // the holder sends it
        };
        self.flush_in_turn()
    }

    /// Handles the messages this rank queued to itself, in order, and those
    /// their handling queues to itself, before anything is sent: no trip
    /// through the transport and the engine thread (which cost an empty
    /// barrier at rank 0 a wake-up of that thread and a fight for this
    /// lock). Any delivery order is one the network could have chosen: the
    /// only order kept is per sender, and this sender's messages stay in
    /// order (see [`Outbox::take_plain_to`]).
    pub(super) fn handle_own_messages(&mut self) -> Result<(), DsmError> {
        if self.handling_own {
            return Ok(());
        }
        self.handling_own = true;
        let handled = loop {
            self.out.take_plain_to(self.rank, &mut self.own_messages);
            let Some(payload) = self.own_messages.pop_front() else {
                break Ok(());
            };
            if let Err(e) = self.on_payload(self.rank, &payload) {
                break Err(e);
            }
        };
        self.handling_own = false;
        handled
    }

    /// [`Engine::flush`] for a thread holding the send turn.
    pub(super) fn flush_in_turn(&mut self) -> Result<(), DsmError> {
        // Grants read from the mapping only while it holds the home's copy.
        debug_assert!(self
            .out
            .mapped_pages()
            .all(|page| self.home_copy_is_mapped(page)));
        // Messages a receive thread left part-written go first.
        self.transport.finish_sends()?;
        let batches = self.out.batches;
        self.out.flush(&*self.transport, &self.faults)?;
        Stats::add(&self.stats.batches_sent, self.out.batches - batches);
        Ok(())
    }

    /// The queued messages, for a thread holding the send turn to send
    /// after letting go of the engine's lock: only when none reads a page
    /// from the mapping (which may change once the lock is free).
    pub(super) fn detach_output(&mut self) -> Option<Outbox> {
        if self.sends_deferred || self.out.is_empty() || self.out.mapped_pages().next().is_some() {
            return None;
        }
        Some(self.out.detach())
    }

    /// In a receive thread, after handling a message: sends what the
    /// transport takes without waiting. True when the engine thread must
    /// send the rest (messages left queued, or one left part-written).
    pub(super) fn try_flush(&mut self) -> Result<bool, DsmError> {
        self.handle_own_messages()?;
        let turn = Arc::clone(&self.send_turn);
        let held = if self.out.is_empty() {
            // Only a message left part-written may wait: the engine
            // thread's (woken for it) unless the turn is free now.
            turn.try_lock().ok()
        } else {
            claim_turn(&turn, &self.output_left)
        };
        let Some(_turn) = held else {
            return Ok(false); // the holder sends it
        };
        debug_assert!(self
            .out
            .mapped_pages()
            .all(|page| self.home_copy_is_mapped(page)));
        let batches = self.out.batches;
        let started = self.out.try_flush(&*self.transport, &self.faults)?;
        Stats::add(&self.stats.batches_sent, self.out.batches - batches);
        Ok(started || !self.out.is_empty())
    }
}

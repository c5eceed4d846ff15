//! Messages the engine produced while handling one event, sent when it is
//! done. Several messages to one rank leave as one batch
//! ([`crate::proto::BATCH`]): a sequential scan's sixteen read requests cost
//! the home one receive and one wake-up instead of sixteen, and their
//! sixteen grants travel back the same way.
//!
//! Order is kept per destination (the only order the transport promises),
//! and the receiver handles a batch's messages in order, so batching changes
//! when messages leave, never what the protocol sees.

use crate::config::PAGE_SIZE;
use crate::fault::FaultHandler;
use crate::proto::{batch_pieces, read_grant_run_header, Msg, PageData, BATCH_MAX_BYTES};
use crate::transport::TrySent;
use crate::{Rank, Transport, TransportError};
use std::collections::VecDeque;

/// Most pages in one run of read grants: a run with its length prefix fits
/// in a batch.
const RUN_MAX_PAGES: usize = (BATCH_MAX_BYTES - 64) / PAGE_SIZE;

enum Outgoing {
    Plain(Vec<u8>),
    /// A message carrying a page: a single one goes through `send_page`, so
    /// a transport with one-sided writes can place the bytes itself.
    Page {
        header: Vec<u8>,
        page: usize,
        data: PageData,
    },
    /// A read grant: grants of consecutive pages to one rank leave as one
    /// run ([`read_grant_run_header`]), their bytes back to back.
    ReadGrant {
        page: usize,
        data: PageSource,
    },
}

/// Where a read grant's bytes are.
pub(crate) enum PageSource {
    Bytes(PageData),
    /// The home's own read-only copy in its mapping, read when the grant
    /// leaves: the engine copies it out first (`copied_out`) if the mapping
    /// of the page changes before.
    Mapped,
}

impl Outgoing {
    /// The page a message carries (empty for a plain message).
    fn page_bytes<'a>(&'a self, faults: &'a FaultHandler) -> &'a [u8] {
        match self {
            Outgoing::Plain(_) => &[],
            Outgoing::Page { data, .. }
            | Outgoing::ReadGrant {
                data: PageSource::Bytes(data),
                ..
            } => &data[..],
            Outgoing::ReadGrant {
                page,
                data: PageSource::Mapped,
            } => faults.mapped_page(*page),
        }
    }

    fn len(&self) -> usize {
        match self {
            Outgoing::Plain(bytes) => bytes.len(),
            Outgoing::Page { header, .. } => header.len() + PAGE_SIZE,
            Outgoing::ReadGrant { .. } => 9 + PAGE_SIZE,
        }
    }

    /// The page of a read grant that can follow `prev` in a run.
    fn extends_run(&self, prev: &Outgoing) -> bool {
        matches!(
            (prev, self),
            (Outgoing::ReadGrant { page: a, .. }, Outgoing::ReadGrant { page: b, .. }) if a + 1 == *b
        )
    }
}

/// One message on the wire: `count` queued messages from `start` (several
/// only for a run of read grants), `len` bytes.
struct Unit {
    start: usize,
    count: usize,
    len: usize,
}

#[derive(Default)]
pub(crate) struct Outbox {
    queued: Vec<(Rank, Outgoing)>,
    /// Batches sent (statistics).
    pub batches: u64,
}

impl Outbox {
    pub fn send(&mut self, to: Rank, message: Vec<u8>) {
        self.queued.push((to, Outgoing::Plain(message)));
    }

    pub fn send_page(&mut self, to: Rank, header: Vec<u8>, page: usize, data: PageData) {
        self.queued
            .push((to, Outgoing::Page { header, page, data }));
    }

    /// A multi-reader read grant carrying `data`.
    pub fn send_read_grant(&mut self, to: Rank, page: usize, data: PageSource) {
        self.queued.push((to, Outgoing::ReadGrant { page, data }));
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// The queued messages, in a new outbox of their own (sent from
    /// elsewhere); this one is left empty, with room for as many (one
    /// allocation instead of the queue growing again from nothing).
    pub fn detach(&mut self) -> Outbox {
        let room = self.queued.len();
        Outbox {
            queued: std::mem::replace(&mut self.queued, Vec::with_capacity(room)),
            batches: 0,
        }
    }

    /// Moves the plain messages queued to `rank` onto the end of `into`, in
    /// order, up to the first message to `rank` carrying a page (that one
    /// and those after it stay queued, so `rank` still gets them in order).
    pub fn take_plain_to(&mut self, rank: Rank, into: &mut VecDeque<Vec<u8>>) {
        if !self.queued.iter().any(|(to, _)| *to == rank) {
            return;
        }
        let mut blocked = false;
        let mut kept = Vec::with_capacity(self.queued.len());
        for (to, message) in self.queued.drain(..) {
            match message {
                Outgoing::Plain(bytes) if to == rank && !blocked => into.push_back(bytes),
                other => {
                    blocked |= to == rank;
                    kept.push((to, other));
                }
            }
        }
        self.queued = kept;
    }

    /// Pages of queued grants sent from the mapping.
    pub fn mapped_pages(&self) -> impl Iterator<Item = usize> + '_ {
        self.queued.iter().filter_map(|(_, message)| match message {
            Outgoing::ReadGrant {
                page,
                data: PageSource::Mapped,
            } => Some(*page),
            _ => None,
        })
    }

    /// True when a queued grant of `page` is to be read from the mapping.
    pub fn reads_mapping(&self, page: usize) -> bool {
        self.queued.iter().any(|(_, message)| {
            matches!(
                message,
                Outgoing::ReadGrant {
                    page: p,
                    data: PageSource::Mapped,
                } if *p == page
            )
        })
    }

    /// The home's copy of `page` was copied out of its mapping into `data`
    /// (the mapping is about to change): queued grants read `data` instead.
    pub fn copied_out(&mut self, page: usize, data: &PageData) {
        for (_, message) in &mut self.queued {
            if let Outgoing::ReadGrant {
                page: p,
                data: source @ PageSource::Mapped,
            } = message
            {
                if *p == page {
                    *source = PageSource::Bytes(data.clone());
                }
            }
        }
    }

    /// Sends everything queued: per destination, in the order queued; one
    /// message alone as itself, several as batches of at most
    /// [`BATCH_MAX_BYTES`].
    /// `faults` reads grants of pages sent from the mapping.
    pub fn flush(
        &mut self,
        transport: &dyn Transport,
        faults: &FaultHandler,
    ) -> Result<(), TransportError> {
        self.flush_as(transport, faults, Sending::Wait).map(|_| ())
    }

    /// [`Outbox::flush`] for a thread that must never wait on the network
    /// (a receive thread): sends, per destination, what the transport takes
    /// at once ([`Transport::try_send_parts`]), up to the first message that
    /// would wait; that one and those after it stay queued, in order.
    /// Returns whether a message was left part-written (see
    /// [`Transport::finish_sends`]).
    pub fn try_flush(
        &mut self,
        transport: &dyn Transport,
        faults: &FaultHandler,
    ) -> Result<bool, TransportError> {
        self.flush_as(transport, faults, Sending::NoWait)
    }

    fn flush_as(
        &mut self,
        transport: &dyn Transport,
        faults: &FaultHandler,
        sending: Sending,
    ) -> Result<bool, TransportError> {
        if self.queued.is_empty() {
            return Ok(false);
        }
        // The queue keeps its capacity for the next event: growing it again
        // from nothing costs several reallocations per event.
        let mut queued = std::mem::take(&mut self.queued);
        let mut left = Vec::new();
        let sent = self.send_queued(&queued, transport, faults, sending, &mut left);
        if left.is_empty() {
            queued.clear();
        } else {
            let mut index = 0;
            queued.retain(|_| {
                index += 1;
                left.binary_search(&(index - 1)).is_ok()
            });
        }
        self.queued = queued;
        sent
    }

    /// Sends `queued` (with `Sending::NoWait`, adds to `left` the indices of
    /// the messages not sent, in order); returns whether a message was left
    /// part-written.
    fn send_queued(
        &mut self,
        queued: &[(Rank, Outgoing)],
        transport: &dyn Transport,
        faults: &FaultHandler,
        sending: Sending,
        left: &mut Vec<usize>,
    ) -> Result<bool, TransportError> {
        let mut destinations: Vec<Rank> = Vec::new();
        for (to, _) in queued {
            if !destinations.contains(to) {
                destinations.push(*to);
            }
        }
        let mut lengths = Vec::new();
        let mut started = false;
        for to in destinations {
            let at: Vec<usize> = (0..queued.len()).filter(|&i| queued[i].0 == to).collect();
            let mine: Vec<&Outgoing> = at.iter().map(|&i| &queued[i].1).collect();
            let units = units_of(&mine);
            // The headers the units' pieces borrow: a run's, or a lone read
            // grant's.
            let headers: Vec<[u8; 9]> = units
                .iter()
                .map(|u| match mine[u.start] {
                    Outgoing::ReadGrant { page, .. } if u.count > 1 => read_grant_run_header(*page),
                    Outgoing::ReadGrant { page, .. } => Msg::grant_data_header_bytes(*page, false),
                    _ => [0; 9],
                })
                .collect();
            let pieces_of = |i: usize| -> Vec<&[u8]> {
                let unit = &units[i];
                let messages = &mine[unit.start..unit.start + unit.count];
                match messages {
                    [Outgoing::Plain(bytes)] => vec![bytes],
                    [Outgoing::Page { header, data, .. }] => vec![header, &data[..]],
                    _ => std::iter::once(&headers[i][..])
                        .chain(messages.iter().map(|m| m.page_bytes(faults)))
                        .collect(),
                }
            };
            let mut start = 0;
            while start < units.len() {
                let mut end = start + 1;
                let mut bytes = units[start].len;
                while end < units.len() && bytes + units[end].len + 4 <= BATCH_MAX_BYTES {
                    bytes += units[end].len + 4;
                    end += 1;
                }
                let outcome = if end == start + 1 {
                    // Alone: a message with one page goes through
                    // `send_page` (a transport may place the bytes itself).
                    let unit = &units[start];
                    match &mine[unit.start..unit.start + unit.count] {
                        [Outgoing::Page { header, page, data }] => {
                            sending.page(transport, to, header, *page, &data[..])?
                        }
                        [grant @ Outgoing::ReadGrant { page, .. }] => sending.page(
                            transport,
                            to,
                            &headers[start],
                            *page,
                            grant.page_bytes(faults),
                        )?,
                        _ => sending.parts(transport, to, &pieces_of(start))?,
                    }
                } else {
                    let parts: Vec<Vec<&[u8]>> = (start..end).map(pieces_of).collect();
                    let refs: Vec<&[&[u8]]> = parts.iter().map(|p| &p[..]).collect();
                    sending.parts(transport, to, &batch_pieces(&refs, &mut lengths))?
                };
                match outcome {
                    TrySent::WouldWait => {
                        left.extend_from_slice(&at[units[start].start..]);
                        break;
                    }
                    TrySent::Started => started = true,
                    TrySent::Sent => {}
                }
                if end > start + 1 {
                    self.batches += 1;
                }
                start = end;
            }
        }
        left.sort_unstable();
        Ok(started)
    }
}

/// Whether flushing may wait for the network.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sending {
    Wait,
    /// Only what the transport takes at once.
    NoWait,
}

impl Sending {
    /// One message made of `parts`, sent this way.
    fn parts(
        self,
        transport: &dyn Transport,
        to: Rank,
        parts: &[&[u8]],
    ) -> Result<TrySent, TransportError> {
        match self {
            Sending::Wait => transport.send_parts(to, parts).map(|()| TrySent::Sent),
            Sending::NoWait => transport.try_send_parts(to, parts),
        }
    }

    /// `header` and page `page`'s bytes, sent this way.
    fn page(
        self,
        transport: &dyn Transport,
        to: Rank,
        header: &[u8],
        page: usize,
        data: &[u8],
    ) -> Result<TrySent, TransportError> {
        match self {
            Sending::Wait => transport
                .send_page(to, header, page, data)
                .map(|()| TrySent::Sent),
            Sending::NoWait => transport.try_send_page(to, header, page, data),
        }
    }
}

/// The messages for one rank as wire messages: each alone, except read
/// grants of consecutive pages, which become runs of at most
/// [`RUN_MAX_PAGES`].
fn units_of(mine: &[&Outgoing]) -> Vec<Unit> {
    let mut units: Vec<Unit> = Vec::with_capacity(mine.len());
    for (i, message) in mine.iter().enumerate() {
        if let Some(run) = units.last_mut() {
            let last = mine[run.start + run.count - 1];
            if message.extends_run(last) && run.count < RUN_MAX_PAGES {
                run.count += 1;
                run.len += PAGE_SIZE;
                continue;
            }
        }
        units.push(Unit {
            start: i,
            count: 1,
            len: message.len(),
        });
    }
    units
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_messages_to_a_rank_are_taken_in_order_up_to_its_first_page() {
        let mut out = Outbox::default();
        out.send(0, vec![1]);
        out.send(1, vec![2]);
        out.send(0, vec![3]);
        out.send_page(0, vec![4], 7, std::sync::Arc::new([0; PAGE_SIZE]));
        out.send(0, vec![5]);
        out.send(1, vec![6]);
        let mut taken = VecDeque::from([vec![0]]);
        out.take_plain_to(0, &mut taken);
        assert_eq!(taken, [vec![0], vec![1], vec![3]], "appended, in order");
        let left: Vec<(Rank, bool)> = out
            .queued
            .iter()
            .map(|(to, m)| (*to, matches!(m, Outgoing::Plain(_))))
            .collect();
        assert_eq!(
            left,
            [(1, true), (0, false), (0, true), (1, true)],
            "the page to rank 0 and what follows it to rank 0 stay queued, in order"
        );
        out.take_plain_to(2, &mut taken);
        assert_eq!(taken.len(), 3, "nothing queued to rank 2");
    }
}

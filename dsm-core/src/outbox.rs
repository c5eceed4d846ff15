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
use crate::proto::{batch_pieces, PageData, BATCH_MAX_BYTES};
use crate::{Rank, Transport, TransportError};

enum Outgoing {
    Plain(Vec<u8>),
    /// A message carrying a page: a single one goes through `send_page`, so
    /// a transport with one-sided writes can place the bytes itself.
    Page {
        header: Vec<u8>,
        page: usize,
        data: PageData,
    },
}

impl Outgoing {
    /// The message's bytes in two pieces (the second empty for a plain
    /// message): no allocation per message of a batch.
    fn parts(&self) -> [&[u8]; 2] {
        match self {
            Outgoing::Plain(bytes) => [bytes, &[]],
            Outgoing::Page { header, data, .. } => [header, &data[..]],
        }
    }

    fn len(&self) -> usize {
        match self {
            Outgoing::Plain(bytes) => bytes.len(),
            Outgoing::Page { header, .. } => header.len() + PAGE_SIZE,
        }
    }
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

    /// Sends everything queued: per destination, in the order queued; one
    /// message alone as itself, several as batches of at most
    /// [`BATCH_MAX_BYTES`].
    pub fn flush(&mut self, transport: &dyn Transport) -> Result<(), TransportError> {
        if self.queued.is_empty() {
            return Ok(());
        }
        // The queue keeps its capacity for the next event: growing it again
        // from nothing costs several reallocations per event.
        let mut queued = std::mem::take(&mut self.queued);
        let sent = self.send_queued(&queued, transport);
        queued.clear();
        self.queued = queued;
        sent
    }

    fn send_queued(
        &mut self,
        queued: &[(Rank, Outgoing)],
        transport: &dyn Transport,
    ) -> Result<(), TransportError> {
        let mut destinations: Vec<Rank> = Vec::new();
        for (to, _) in queued {
            if !destinations.contains(to) {
                destinations.push(*to);
            }
        }
        let mut lengths = Vec::new();
        for to in destinations {
            let mine: Vec<&Outgoing> = queued
                .iter()
                .filter(|(dest, _)| *dest == to)
                .map(|(_, m)| m)
                .collect();
            let mut start = 0;
            while start < mine.len() {
                let mut end = start + 1;
                let mut bytes = mine[start].len();
                while end < mine.len() && bytes + mine[end].len() + 4 <= BATCH_MAX_BYTES {
                    bytes += mine[end].len() + 4;
                    end += 1;
                }
                match &mine[start..end] {
                    [Outgoing::Plain(bytes)] => transport.send(to, bytes)?,
                    [Outgoing::Page { header, page, data }] => {
                        transport.send_page(to, header, *page, &data[..])?
                    }
                    several => {
                        let parts: Vec<[&[u8]; 2]> = several.iter().map(|m| m.parts()).collect();
                        let refs: Vec<&[&[u8]]> = parts.iter().map(|p| &p[..]).collect();
                        transport.send_parts(to, &batch_pieces(&refs, &mut lengths))?;
                        self.batches += 1;
                    }
                }
                start = end;
            }
        }
        Ok(())
    }
}

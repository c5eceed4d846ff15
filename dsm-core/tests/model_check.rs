//! Exhaustive model checking of the multi-reader coherence state machine
//! (the production code in `coherence::mrsw`), without sockets or kernel.
//!
//! A world of N ranks runs small programs of reads and writes on P pages.
//! Every reachable state is explored (breadth first, states deduplicated):
//! any order of message deliveries between different pairs of ranks
//! (in order within a pair, as the transports guarantee), of program steps
//! of hold-timer expiries, and of synchronization points that end a rank's
//! holds early (`Mrsw::end_holds`, a barrier entry or an unlock), taken
//! while a command waits for a hold. Checked in every state:
//! * at most one writer per page, and no reader while there is a writer;
//! * every read returns the value of the last completed write;
//! * the state machine never reports a protocol error;
//! * no deadlock and no lost request: a state with nothing left to do has
//!   every program finished, every rank quiescent and no message in flight.
//!
//! A fault takes the path the engine's does: a first touch of a page
//! homed at the faulting rank that no rank ever asked for takes it, and the
//! following pages in the same state, at once (`Mrsw::populate_ahead`,
//! zeros, writable); any other fault asks the page's home, and asks back
//! the pages after it lost with it (`Mrsw::regain_ahead`). With `populate`
//! off (`DSM_POPULATE=0`), every fault asks the home.
//!
//! With `evictions`, any rank may also evict any copy it holds of a page
//! homed elsewhere at any moment the state machine allows it (a bounded
//! cache under pressure), interleaved with everything else.
//!
//! With `pushes`, a home may also push a read-only copy of any of its pages
//! to any rank that holds none (`Mrsw::push`, what the engine does at
//! barrier entries) at any moment, crossing that rank's own requests,
//! evictions and frees.
//!
//! A program may free the pages (`Free`: the collective free of a segment
//! spanning them, as the engine runs it): each rank gives up its copies
//! and tells every rank (`Freed`); a home that heard from every rank and
//! has no transaction left resets its pages and tells every rank
//! (`Reset`); a rank that heard from every home forgets the pages and goes
//! on. Operations after a free use the pages anew: they start at zero, and
//! no state of before may leak into them.

// A test reports failure by panicking: unwrap is its assertion.
#![allow(clippy::unwrap_used)]

use std::collections::{HashSet, VecDeque};

use dsm_core::board::word;
use dsm_core::coherence::mrsw::{Copy, Mrsw};
use dsm_core::coherence::{Action, ProtocolCounters};
use dsm_core::proto::{Msg, Payload};
use dsm_core::PAGE_SIZE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Op {
    Read(usize),
    Write(usize),
    /// The collective free of all the pages (at most one per program).
    Free,
}

/// A message in flight, with the page value it carries (the model of its bytes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum M {
    ReadReq(usize),
    WriteReq(usize),
    Invalidate(usize),
    InvalidateAck(usize),
    Recall(usize, bool),
    WriteBack(usize, u64),
    Evicted(usize),
    EvictedWriteBack(usize, u64),
    /// page, write, value (`None`: an upgrade, no bytes)
    Grant(usize, bool, Option<u64>),
    /// Free, first step: the sender gave up its copies.
    Freed,
    /// Free, second step: the sender reset the pages it is home of.
    Reset,
}

impl M {
    /// The page a protocol message is about (`None` for the free's notices).
    fn page(&self) -> Option<usize> {
        match *self {
            M::ReadReq(p)
            | M::WriteReq(p)
            | M::Invalidate(p)
            | M::InvalidateAck(p)
            | M::Recall(p, _)
            | M::WriteBack(p, _)
            | M::Evicted(p)
            | M::EvictedWriteBack(p, _)
            | M::Grant(p, _, _) => Some(p),
            M::Freed | M::Reset => None,
        }
    }

    fn from_msg(msg: &Msg, value: Option<u64>) -> M {
        match msg {
            Msg::ReadReq { page } => M::ReadReq(*page as usize),
            Msg::WriteReq { page } => M::WriteReq(*page as usize),
            Msg::Invalidate { page } => M::Invalidate(*page as usize),
            Msg::InvalidateAck { page } => M::InvalidateAck(*page as usize),
            Msg::Recall { page, keep_shared } => M::Recall(*page as usize, *keep_shared),
            Msg::Evicted { page } => M::Evicted(*page as usize),
            Msg::Grant {
                page,
                write,
                payload,
            } => M::Grant(
                *page as usize,
                *write,
                (!matches!(payload, Payload::Upgrade)).then(|| value.expect("grant value")),
            ),
            other => panic!("unexpected message in the model: {other:?}"),
        }
    }

    /// The state machine's message and its value (`None` for the free's
    /// steps, which the engine handles itself).
    fn to_msg(&self) -> Option<(Msg, Option<u64>)> {
        Some(match *self {
            M::Freed | M::Reset => return None,
            M::ReadReq(p) => (Msg::ReadReq { page: p as u64 }, None),
            M::WriteReq(p) => (Msg::WriteReq { page: p as u64 }, None),
            M::Invalidate(p) => (Msg::Invalidate { page: p as u64 }, None),
            M::InvalidateAck(p) => (Msg::InvalidateAck { page: p as u64 }, None),
            M::Recall(p, k) => (
                Msg::Recall {
                    page: p as u64,
                    keep_shared: k,
                },
                None,
            ),
            M::WriteBack(p, v) => (
                Msg::WriteBack {
                    page: p as u64,
                    data: std::sync::Arc::new([0u8; PAGE_SIZE]),
                },
                Some(v),
            ),
            M::Evicted(p) => (Msg::Evicted { page: p as u64 }, None),
            M::EvictedWriteBack(p, v) => (
                Msg::EvictedWriteBack {
                    page: p as u64,
                    data: std::sync::Arc::new([0u8; PAGE_SIZE]),
                },
                Some(v),
            ),
            M::Grant(p, w, v) => (
                Msg::Grant {
                    page: p as u64,
                    write: w,
                    payload: if v.is_some() {
                        Payload::Zero
                    } else {
                        Payload::Upgrade
                    },
                },
                v,
            ),
        })
    }
}

/// Where a rank is in the collective free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Freeing {
    /// It gave up its copies and sent `Freed`.
    released: bool,
    /// `Freed` notices received (as a home).
    freed_heard: usize,
    /// It reset the pages it is home of and sent `Reset`.
    reset: bool,
    /// `Reset` notices received.
    resets_heard: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct World {
    nodes: Vec<Mrsw>,
    /// Index `from * n + to`.
    links: Vec<VecDeque<M>>,
    /// What each rank has mapped for each page.
    mem: Vec<Vec<Option<u64>>>,
    /// The homes' copies.
    backing: Vec<u64>,
    pc: Vec<usize>,
    time: Vec<u64>,
    last_write: Vec<u64>,
    /// Evictions still allowed (bounds the state space: each eviction
    /// can be followed by a refetch, and so on).
    evictions_left: usize,
    /// Pushes still allowed (`Mrsw::push`, bounded as evictions are).
    pushes_left: usize,
    freeing: Vec<Freeing>,
    /// Each page's word on its home's board (`dsm_core::board::word`).
    board: Vec<u64>,
    /// A rank's direct read under way: the page and the word it joined
    /// (its engine's lock is held: nothing else happens at that rank).
    direct: Vec<Option<(usize, u64)>>,
    /// A rank's direct read of a page its home holds writable, from its
    /// look at the word until it joins: the page, the word it saw, and
    /// whether it write-protected the home's mapping yet (the engine's
    /// lock is held).
    stealing: Vec<Option<(usize, u64, bool)>>,
    /// The home's mapping of each page write-protected by a reader (its
    /// stores fault until the home lifts it).
    protected: Vec<bool>,
}

struct Model {
    n: usize,
    pages: usize,
    programs: Vec<Vec<Op>>,
    /// Every page homed at this rank (a localized segment) instead of
    /// spread round-robin.
    home: Option<usize>,
    /// Evictions of copies of pages homed elsewhere, by any rank at any
    /// time, in one run.
    evictions: usize,
    /// Pushes of read-only copies by homes to ranks that did not ask, at
    /// any time, in one run.
    pushes: usize,
    /// First touches populate ahead, as the engine does by default.
    populate: bool,
    /// Every rank is co-located with every home: a read fault copies a
    /// page its home publishes from the home's frame (`dsm_core::board`).
    direct: bool,
    /// Direct reads that installed their copy, and that gave up, in any
    /// state explored.
    direct_outcomes: std::cell::Cell<(usize, usize)>,
    /// Direct reads of pages the home held writable that installed their
    /// copy, in any state explored.
    steals: std::cell::Cell<usize>,
    /// A reader's look at the word and its protection of the home's
    /// mapping are two steps, so that the home may act in between (else
    /// one, which keeps the other scenarios' state spaces small).
    protect_apart: bool,
    /// The longest run of pages a first touch took in any state explored.
    longest_populated: std::cell::Cell<usize>,
}

impl Model {
    fn initial(&self, hold: u64) -> World {
        World {
            nodes: (0..self.n)
                .map(|r| {
                    let mut node = Mrsw::new(r, self.n, self.pages, hold);
                    if let Some(home) = self.home {
                        node.set_home(0..self.pages, home);
                    }
                    node
                })
                .collect(),
            links: vec![VecDeque::new(); self.n * self.n],
            mem: vec![vec![None; self.pages]; self.n],
            backing: vec![0; self.pages],
            pc: vec![0; self.n],
            time: vec![0; self.n],
            last_write: vec![0; self.pages],
            evictions_left: self.evictions,
            pushes_left: self.pushes,
            freeing: vec![
                Freeing {
                    released: false,
                    freed_heard: 0,
                    reset: false,
                    resets_heard: 0,
                };
                self.n
            ],
            board: vec![0; self.pages],
            direct: vec![None; self.n],
            stealing: vec![None; self.n],
            protected: vec![false; self.pages],
        }
    }

    /// Before a step of `page`'s home on it: the board retracted, the
    /// readers that joined counted.
    fn retract(&self, s: &mut World, page: usize) -> Result<(), String> {
        if !self.direct {
            return Ok(());
        }
        let joiners = word::joiners(s.board[page]);
        s.board[page] = word::retracted(s.board[page]);
        let ranks: Vec<usize> = (0..self.n).filter(|r| joiners & (1 << r) != 0).collect();
        let home = s.nodes[0].home_of(page);
        let converted = s.nodes[home]
            .add_direct_readers(page, &ranks)
            .map_err(|e| {
                format!("home {home} adding direct readers {ranks:?} of page {page}: {e}")
            })?;
        if converted {
            // The home's mapping, read-only now, is its copy (as the engine).
            s.backing[page] = s.mem[home][page].ok_or("a converted page not mapped")?;
        }
        Ok(())
    }

    /// After a step of `page`'s home on it: published again if the state
    /// allows (the home's copy mapped, read-only and current, or writable
    /// and the only one).
    fn publish(&self, s: &mut World, page: usize) {
        if !self.direct || word::readable(s.board[page]) {
            return;
        }
        let home = s.nodes[0].home_of(page);
        if s.mem[home][page].is_none() {
            return;
        }
        if s.nodes[home].direct_writable(page).is_some() {
            s.board[page] = word::published(s.board[page], 0, true);
        } else if let Some(readers) = s.nodes[home].direct_readable(page) {
            let members = readers.iter().fold(0u64, |m, r| m | 1 << r);
            s.board[page] = word::published(s.board[page], members, false);
        }
    }

    /// The end of `rank`'s join of a page its home holds writable, which it
    /// write-protected after seeing `seen`: joined if the home still
    /// publishes that very publication, else given up (the fault will ask).
    fn steal_join(&self, w: &World, rank: usize, page: usize, seen: u64) -> Result<World, String> {
        let mut s = w.clone();
        s.stealing[rank] = None;
        let now = s.board[page];
        if let Some(joined) = word::joined(now, rank).filter(|_| word::same_publication(now, seen))
        {
            s.board[page] = joined;
            s.direct[rank] = Some((page, joined));
        } else {
            s.nodes[rank]
                .direct_read_skipped(page)
                .map_err(|e| e.to_string())?;
        }
        Ok(s)
    }

    /// The end of `rank`'s direct read of `page` (joined at `joined`): the
    /// copy from the home's frame installed, or, if the home retracted the
    /// page meanwhile, given up (the home counts the rank).
    fn direct_finish(
        &self,
        w: &World,
        rank: usize,
        page: usize,
        joined: u64,
    ) -> Result<World, String> {
        let mut s = w.clone();
        s.direct[rank] = None;
        let now = s.time[rank];
        let home = s.nodes[rank].home_of(page);
        if word::still(s.board[page], joined) {
            let value = s.mem[home][page].ok_or(format!(
                "rank {rank} reads page {page} from home {home}'s frame, which does not map it"
            ))?;
            s.nodes[rank]
                .took_direct_copy(page, now)
                .map_err(|e| e.to_string())?;
            if s.mem[rank][page].is_some() {
                return Err(format!(
                    "rank {rank} copies page {page} over a present copy"
                ));
            }
            s.mem[rank][page] = Some(value);
            self.apply(&mut s, rank, Vec::new(), None)?;
            if word::writable(joined) {
                self.steals.set(self.steals.get() + 1);
            }
            let (copied, failed) = self.direct_outcomes.get();
            self.direct_outcomes.set((copied + 1, failed));
        } else {
            let actions = s.nodes[rank]
                .direct_read_failed(page, now)
                .map_err(|e| e.to_string())?;
            self.apply(&mut s, rank, actions, None)?;
            let (copied, failed) = self.direct_outcomes.get();
            self.direct_outcomes.set((copied, failed + 1));
        }
        Ok(s)
    }

    /// Carries out `actions` of `rank`; `value` is the page value of the
    /// message being handled.
    fn apply(
        &self,
        w: &mut World,
        rank: usize,
        actions: Vec<Action>,
        value: Option<u64>,
    ) -> Result<(), String> {
        for action in actions {
            // The home's mapping of the page changes: a reader's protection
            // goes with it (the engine's install, upgrade or drop).
            if let Action::Install { page, .. }
            | Action::MakeWritable { page }
            | Action::DropPage { page } = action
            {
                if w.nodes[0].home_of(page) == rank {
                    w.protected[page] = false;
                }
            }
            match action {
                Action::Send { to, msg } => {
                    w.links[rank * self.n + to].push_back(M::from_msg(&msg, value))
                }
                Action::Install { page, .. } => {
                    if w.mem[rank][page].is_some() {
                        return Err(format!(
                            "rank {rank} installs page {page} over a present copy"
                        ));
                    }
                    w.mem[rank][page] = Some(value.ok_or("install without a value")?);
                }
                Action::InstallZeros { first, count } => {
                    self.longest_populated
                        .set(self.longest_populated.get().max(count));
                    for page in first..first + count {
                        w.protected[page] = false;
                        if w.mem[rank][page].is_some() {
                            return Err(format!(
                                "rank {rank} populates page {page} over a present copy"
                            ));
                        }
                        w.mem[rank][page] = Some(0);
                    }
                }
                Action::MakeWritable { page } => {
                    if w.mem[rank][page].is_none() {
                        return Err(format!("rank {rank} upgrades page {page} it does not hold"));
                    }
                }
                Action::DropPage { page } => w.mem[rank][page] = None,
                Action::WriteBack {
                    to,
                    page,
                    keep_shared,
                } => {
                    let v = w.mem[rank][page].ok_or(format!(
                        "rank {rank} writes back page {page} it does not hold"
                    ))?;
                    if !keep_shared {
                        w.mem[rank][page] = None;
                    }
                    w.links[rank * self.n + to].push_back(M::WriteBack(page, v));
                }
                Action::EvictWriteBack { to, page } => {
                    let v = w.mem[rank][page]
                        .take()
                        .ok_or(format!("rank {rank} evicts page {page} it does not hold"))?;
                    w.links[rank * self.n + to].push_back(M::EvictedWriteBack(page, v));
                }
                Action::StoreBacking { page } => {
                    w.backing[page] = value.ok_or("write-back without a value")?
                }
                Action::GrantFromBacking { to, page, write } => {
                    let v = w.backing[page];
                    w.links[rank * self.n + to].push_back(M::Grant(page, write, Some(v)));
                }
                Action::Wake { .. } => {}
                other => return Err(format!("multi-reader protocol emitted {other:?}")),
            }
        }
        // Counters only grow and change nothing, and only time differences
        // matter: keep both out of the state.
        for (node, time) in w.nodes.iter_mut().zip(&mut w.time) {
            node.counters = ProtocolCounters::default();
            node.rebase_clock(*time);
            *time = 0;
        }
        Ok(())
    }

    fn check(&self, w: &World) -> Result<(), String> {
        for page in 0..self.pages {
            // A home's writable copy that a reader write-protected is read
            // only until the home's next store faults.
            let copies: Vec<Copy> = w
                .nodes
                .iter()
                .enumerate()
                .map(|(r, n)| match n.copy_of(page).unwrap() {
                    Copy::Modified if w.protected[page] && n.home_of(page) == r => Copy::Shared,
                    copy => copy,
                })
                .collect();
            let writers = copies.iter().filter(|c| **c == Copy::Modified).count();
            let readers = copies.iter().filter(|c| **c == Copy::Shared).count();
            if writers > 1 || (writers == 1 && readers > 0) {
                return Err(format!(
                    "page {page}: {writers} writers and {readers} readers: {copies:?}"
                ));
            }
        }
        Ok(())
    }

    /// Every successor of `w`, or the first error found.
    fn successors(&self, w: &World) -> Result<Vec<World>, String> {
        let mut next = Vec::new();
        for rank in 0..self.n {
            if let Some((page, joined)) = w.direct[rank] {
                next.push(self.direct_finish(w, rank, page, joined)?);
                continue;
            }
            match w.stealing[rank] {
                Some((page, seen, false)) => {
                    // The protection lands, whatever the home did since.
                    let mut s = w.clone();
                    s.protected[page] = true;
                    s.stealing[rank] = Some((page, seen, true));
                    next.push(s);
                    continue;
                }
                Some((page, seen, true)) => {
                    next.push(self.steal_join(w, rank, page, seen)?);
                    continue;
                }
                None => {}
            }
            // A program step: perform the op if the copy allows it, else fault.
            let op = self.programs[rank].get(w.pc[rank]).copied();
            if op == Some(Op::Free) {
                if let Some(s) = self.release_for_free(w, rank)? {
                    next.push(s);
                }
            } else if let Some(op) = op {
                let mut s = w.clone();
                let (page, write) = match op {
                    Op::Read(p) => (p, false),
                    Op::Write(p) => (p, true),
                    Op::Free => unreachable!("handled above"),
                };
                let copy = s.nodes[rank].copy_of(page).unwrap();
                let home = s.nodes[rank].home_of(page);
                let protected = home == rank && s.protected[page];
                let allowed = if write {
                    copy == Copy::Modified && !protected
                } else {
                    copy != Copy::Invalid
                };
                let mut lifted = false;
                if write && copy == Copy::Modified && protected {
                    // As the engine: the home's store faults on the
                    // readers' protection; retracted, and made writable
                    // again if no reader joined (else an upgrade follows).
                    self.retract(&mut s, page)?;
                    if s.nodes[rank].copy_of(page) == Some(Copy::Modified) {
                        s.protected[page] = false;
                        self.publish(&mut s, page);
                        lifted = true;
                    }
                }
                if lifted {
                    next.push(s);
                } else if allowed {
                    let current = s.mem[rank][page].ok_or("a valid copy is not mapped")?;
                    if write {
                        let v = (rank as u64 + 1) * 100 + s.pc[rank] as u64;
                        s.mem[rank][page] = Some(v);
                        s.last_write[page] = v;
                    } else if current != s.last_write[page] {
                        return Err(format!(
                            "rank {rank} read {current} from page {page}, but the last write was {}",
                            s.last_write[page]
                        ));
                    }
                    s.pc[rank] += 1;
                    next.push(s);
                } else if let Some(joined) =
                    (self.direct && !write && s.nodes[rank].may_read_directly(page))
                        .then(|| word::joined(s.board[page], rank))
                        .flatten()
                {
                    // As the engine: the page counts as asked for until
                    // the read ends.
                    s.nodes[rank]
                        .begin_direct_read(page)
                        .map_err(|e| e.to_string())?;
                    if word::writable(s.board[page]) {
                        // A page the home holds writable: its mapping
                        // write-protected first, then the publication seen
                        // joined (the next steps).
                        let apart = self.protect_apart;
                        s.protected[page] |= !apart;
                        s.stealing[rank] = Some((page, s.board[page], !apart));
                    } else {
                        // As the engine does: a page its home publishes is
                        // copied from the home's frame (joined, copied,
                        // checked).
                        s.board[page] = joined;
                        s.direct[rank] = Some((page, joined));
                    }
                    next.push(s);
                } else {
                    // As the engine does: a first touch takes the page, and
                    // the untouched pages after it in its segment (all the
                    // pages here), at once.
                    let now = s.time[rank];
                    let mut actions = if self.populate {
                        s.nodes[rank]
                            .populate_ahead(page, self.pages, now)
                            .map_err(|e| e.to_string())?
                    } else {
                        Vec::new()
                    };
                    let populated = !actions.is_empty();
                    if actions.is_empty() {
                        actions = s.nodes[rank]
                            .on_fault(page, write)
                            .map_err(|e| e.to_string())?;
                        // Ask back the pages after it lost with it.
                        let regained = s.nodes[rank]
                            .regain_ahead(page, write, self.pages)
                            .map_err(|e| e.to_string())?;
                        actions.extend(regained);
                    }
                    if !actions.is_empty() {
                        self.apply(&mut s, rank, actions, None)?;
                        // As the engine: the pages a first touch took are
                        // published (writable) for co-located readers.
                        for p in 0..self.pages {
                            if populated && s.nodes[rank].home_of(p) == rank {
                                self.publish(&mut s, p);
                            }
                        }
                        next.push(s);
                    }
                }
            }
            // An eviction (a cache under pressure).
            for page in (0..self.pages).filter(|_| w.evictions_left > 0) {
                let now = w.time[rank];
                if !w.nodes[rank].evictable(page, now) {
                    continue;
                }
                let mut s = w.clone();
                s.evictions_left -= 1;
                // A copy taken directly that the home has not counted yet:
                // the joiner bit taken back, nothing said (as the engine).
                let joiner = 1u64 << rank;
                let unseen = self.direct
                    && s.nodes[rank].copy_of(page) == Some(Copy::Shared)
                    && word::joiners(s.board[page]) & joiner != 0;
                if unseen {
                    s.board[page] &= !joiner;
                }
                // Where homes push, a reader's drop is a consumer's drop
                // of a copy a push served: lost, to be asked back in a run.
                let actions = if unseen {
                    s.nodes[rank].evict_unseen(page, now)
                } else if self.pushes > 0 {
                    s.nodes[rank].evict_served_push(page, now)
                } else {
                    s.nodes[rank].evict(page, now)
                }
                .map_err(|e| e.to_string())?;
                if actions.is_empty() {
                    return Err(format!(
                        "rank {rank}: page {page} evictable but not evicted"
                    ));
                }
                self.apply(&mut s, rank, actions, None)?;
                next.push(s);
            }
            // A home hands a read-only copy to a rank that did not ask.
            // (The engine pushes no page of a segment it is freeing.)
            let may_push = w.pushes_left > 0 && !w.freeing[rank].released;
            for page in (0..self.pages).filter(|_| may_push) {
                for to in (0..self.n).filter(|to| *to != rank) {
                    let mut s = w.clone();
                    self.retract(&mut s, page)?;
                    let actions = s.nodes[rank].push(page, to).map_err(|e| e.to_string())?;
                    if actions.is_empty() {
                        continue;
                    }
                    s.pushes_left -= 1;
                    self.apply(&mut s, rank, actions, None)?;
                    self.publish(&mut s, page);
                    next.push(s);
                }
            }
            // A home resets its pages once every rank has freed them.
            if let Some(s) = self.reset_homes(w, rank)? {
                next.push(s);
            }
            // A hold timer expires, or the rank reaches a synchronization
            // point first, which ends its holds.
            if let Some(deadline) = w.nodes[rank].next_deadline() {
                let mut s = w.clone();
                let now = s.time[rank];
                let actions = s.nodes[rank].end_holds(now).map_err(|e| e.to_string())?;
                self.apply(&mut s, rank, actions, None)?;
                next.push(s);
                let mut s = w.clone();
                s.time[rank] = s.time[rank].max(deadline);
                let now = s.time[rank];
                let actions = s.nodes[rank].on_tick(now).map_err(|e| e.to_string())?;
                self.apply(&mut s, rank, actions, None)?;
                next.push(s);
            }
        }
        // A delivery on any pair of ranks (in order within the pair).
        for link in 0..w.links.len() {
            if w.links[link].is_empty() {
                continue;
            }
            let (from, to) = (link / self.n, link % self.n);
            if w.direct[to].is_some() || w.stealing[to].is_some() {
                continue;
            }
            let mut s = w.clone();
            let m = s.links[link].pop_front().ok_or("empty link")?;
            let Some((msg, value)) = m.to_msg() else {
                self.free_notice(&mut s, from, to, &m)?;
                next.push(s);
                continue;
            };
            let now = s.time[to];
            // A step of the page's home: retracted first, published after.
            let home_step = m.page().filter(|p| s.nodes[to].home_of(*p) == to);
            if let Some(page) = home_step {
                self.retract(&mut s, page)?;
            }
            let actions = s.nodes[to]
                .on_message(from, &msg, now)
                .map_err(|e| format!("rank {to} handling {m:?} from rank {from}: {e}"))?;
            self.apply(&mut s, to, actions, value)?;
            if let Some(page) = home_step {
                self.publish(&mut s, page);
            }
            next.push(s);
        }
        Ok(next)
    }

    /// Free, first step at `rank` (its program is at `Free`): once
    /// nothing is in flight for its pages, it gives up its copies and tells
    /// every rank. `None` while it cannot, or once it did.
    fn release_for_free(&self, w: &World, rank: usize) -> Result<Option<World>, String> {
        let node = &w.nodes[rank];
        if w.freeing[rank].released || !(0..self.pages).all(|p| node.free_ready(p)) {
            return Ok(None);
        }
        let mut s = w.clone();
        for page in 0..self.pages {
            let actions = s.nodes[rank]
                .release_for_free(page)
                .map_err(|e| e.to_string())?;
            self.apply(&mut s, rank, actions, None)?;
            if s.nodes[rank].home_of(page) != rank && s.mem[rank][page].is_some() {
                return Err(format!(
                    "rank {rank} still maps page {page} after releasing it"
                ));
            }
        }
        s.freeing[rank].released = true;
        for to in 0..self.n {
            s.links[rank * self.n + to].push_back(M::Freed);
        }
        Ok(Some(s))
    }

    /// Free, second step at `rank`: once every rank freed the pages and no
    /// transaction is left on those it is home of, it resets them (they
    /// read as zeros again) and tells every rank.
    fn reset_homes(&self, w: &World, rank: usize) -> Result<Option<World>, String> {
        let f = w.freeing[rank];
        let homed: Vec<usize> = (0..self.pages)
            .filter(|p| w.nodes[rank].home_of(*p) == rank)
            .collect();
        if f.reset || f.freed_heard < self.n {
            return Ok(None);
        }
        let mut s = w.clone();
        for &page in &homed {
            self.retract(&mut s, page)?;
        }
        if !homed.iter().all(|p| s.nodes[rank].home_idle(*p)) {
            return Ok(None);
        }
        for page in homed {
            for other in (0..self.n).filter(|r| *r != rank) {
                if s.mem[other][page].is_some() {
                    return Err(format!(
                        "rank {rank} resets page {page} while rank {other} maps it"
                    ));
                }
            }
            let actions = s.nodes[rank]
                .reset_home_page(page)
                .map_err(|e| e.to_string())?;
            self.apply(&mut s, rank, actions, None)?;
            if s.mem[rank][page].is_some() {
                return Err(format!(
                    "home {rank} still maps page {page} after its reset"
                ));
            }
            s.backing[page] = 0;
            s.last_write[page] = 0;
        }
        s.freeing[rank].reset = true;
        for to in 0..self.n {
            s.links[rank * self.n + to].push_back(M::Reset);
        }
        Ok(Some(s))
    }

    /// A free's notice `m` from `from` reaches `to`.
    fn free_notice(&self, s: &mut World, from: usize, to: usize, m: &M) -> Result<(), String> {
        match m {
            M::Freed => s.freeing[to].freed_heard += 1,
            M::Reset => {
                let node = &mut s.nodes[to];
                for page in 0..self.pages {
                    if from != to && node.home_of(page) == from {
                        node.forget_page(page, from)
                            .map_err(|e| format!("rank {to} forgetting page {page}: {e}"))?;
                    }
                }
                let f = &mut s.freeing[to];
                f.resets_heard += 1;
                if f.resets_heard == self.n {
                    if !(f.released && f.freed_heard == self.n) {
                        return Err(format!("rank {to} heard every reset before its own free"));
                    }
                    s.pc[to] += 1;
                }
            }
            other => return Err(format!("{other:?} is no free notice")),
        }
        Ok(())
    }

    /// Only the equality of board versions matters: numbered afresh, the
    /// board's own first, so that equivalent states are one.
    fn number_versions(&self, w: &mut World) {
        for page in 0..self.pages {
            // The versions readers hold, other than the board's, numbered
            // in order, then the board's above them all: the board's next
            // version is new, as in the engine.
            let board = word::version(w.board[page]);
            let mut held: Vec<u64> = Vec::new();
            let stealing = w.stealing.iter().flatten().map(|e| (e.0, e.1));
            let entries = w.direct.iter().flatten().copied().chain(stealing);
            for (_, v) in entries.filter(|e| e.0 == page) {
                let v = word::version(v);
                if v != board && !held.contains(&v) {
                    held.push(v);
                }
            }
            let number = |v: u64| {
                held.iter()
                    .position(|h| *h == v)
                    .map_or(held.len() as u64, |at| at as u64)
            };
            w.board[page] = word::with_version(w.board[page], number(board));
            for e in w.direct.iter_mut().flatten().filter(|e| e.0 == page) {
                e.1 = word::with_version(e.1, number(word::version(e.1)));
            }
            for e in w.stealing.iter_mut().flatten().filter(|e| e.0 == page) {
                e.1 = word::with_version(e.1, number(word::version(e.1)));
            }
        }
    }

    fn explore(&self, hold: u64) -> usize {
        let start = self.initial(hold);
        let mut seen: HashSet<World> = HashSet::from([start.clone()]);
        let mut frontier = VecDeque::from([start]);
        while let Some(w) = frontier.pop_front() {
            if let Err(e) = self.check(&w) {
                panic!("invariant violated: {e}\nstate: {w:#?}");
            }
            let next = self
                .successors(&w)
                .unwrap_or_else(|e| panic!("{e}\nstate: {w:#?}"));
            if next.is_empty() {
                let done = (0..self.n).all(|r| w.pc[r] == self.programs[r].len());
                let quiet =
                    w.nodes.iter().all(Mrsw::quiescent) && w.links.iter().all(VecDeque::is_empty);
                assert!(done && quiet, "deadlock or lost request: {w:#?}");
            }
            for mut s in next {
                self.number_versions(&mut s);
                if seen.insert(s.clone()) {
                    frontier.push_back(s);
                }
            }
            assert!(seen.len() < 5_000_000, "state space too large for the test");
        }
        seen.len()
    }
}

fn check_programs(programs: Vec<Vec<Op>>, pages: usize) {
    check_model(Model {
        n: programs.len(),
        pages,
        programs,
        home: None,
        evictions: 0,
        pushes: 0,
        populate: true,
        direct: false,
        direct_outcomes: Default::default(),
        steals: Default::default(),
        protect_apart: false,
        longest_populated: Default::default(),
    });
}

/// Up to `evictions` evictions anywhere in every run.
fn check_programs_evicting(
    programs: Vec<Vec<Op>>,
    pages: usize,
    home: Option<usize>,
    evictions: usize,
) {
    check_model(Model {
        n: programs.len(),
        pages,
        programs,
        home,
        evictions,
        pushes: 0,
        populate: true,
        direct: false,
        direct_outcomes: Default::default(),
        steals: Default::default(),
        protect_apart: false,
        longest_populated: Default::default(),
    });
}

/// Up to `pushes` pushes by homes (and `evictions` evictions) anywhere in
/// every run.
fn check_programs_pushing(
    programs: Vec<Vec<Op>>,
    pages: usize,
    home: Option<usize>,
    evictions: usize,
    pushes: usize,
) {
    check_model(Model {
        n: programs.len(),
        pages,
        programs,
        home,
        evictions,
        pushes,
        populate: true,
        direct: false,
        direct_outcomes: Default::default(),
        steals: Default::default(),
        protect_apart: false,
        longest_populated: Default::default(),
    });
}

fn check_model(model: Model) {
    check_model_populating(&model);
}

/// Explores `model`; returns the longest run of pages a first touch took.
fn check_model_populating(model: &Model) -> usize {
    let pages = model.pages;
    for hold in [0, 1] {
        let states = model.explore(hold);
        eprintln!(
            "{} ranks, {pages} pages, hold {hold}, populate {}: {states} states explored, longest run populated {}",
            model.n,
            if model.populate { "on" } else { "off" },
            model.longest_populated.get()
        );
    }
    model.longest_populated.get()
}

use Op::{Free, Read, Write};

#[test]
fn three_ranks_two_pages_writers_and_readers_cross() {
    check_programs(
        vec![
            vec![Write(0), Read(1)],
            vec![Write(1), Read(0)],
            vec![Read(0), Write(0), Read(1)],
        ],
        2,
    );
}

#[test]
fn three_ranks_two_pages_writers_and_readers_cross_every_fault_asking_the_home() {
    // DSM_POPULATE=0: a first touch asks the home (itself, here) too.
    let programs = vec![
        vec![Write(0), Read(1)],
        vec![Write(1), Read(0)],
        vec![Read(0), Write(0), Read(1)],
    ];
    check_model(Model {
        n: programs.len(),
        pages: 2,
        programs,
        home: None,
        evictions: 0,
        pushes: 0,
        populate: false,
        direct: false,
        direct_outcomes: Default::default(),
        steals: Default::default(),
        protect_apart: false,
        longest_populated: Default::default(),
    });
}

#[test]
fn three_ranks_writing_the_same_page() {
    check_programs(
        vec![
            vec![Write(0), Write(1)],
            vec![Write(0), Read(1)],
            vec![Write(0), Read(0)],
        ],
        2,
    );
}

#[test]
fn concurrent_upgrades_of_shared_copies() {
    // Every rank first reads (becomes a sharer), then writes: upgrades race.
    check_programs(
        vec![
            vec![Read(0), Write(0)],
            vec![Read(0), Write(0)],
            vec![Read(0), Write(0), Read(1)],
        ],
        2,
    );
}

#[test]
fn four_ranks_readers_and_writers_on_two_pages() {
    check_programs(
        vec![
            vec![Write(0), Read(1)],
            vec![Write(1), Read(0)],
            vec![Read(0), Read(1)],
            vec![Read(1), Write(0)],
        ],
        2,
    );
}

#[test]
fn runs_lost_together_are_asked_back_together() {
    // Rank 0 reads, then writes both pages it is home of after rank 1
    // read them (a write regain of page 1); rank 1 reads both again after
    // losing them (a read regain of page 1); rank 2 reads page 1 across it all.
    let programs = vec![
        vec![Write(0), Write(1), Read(0), Write(0), Write(1)],
        vec![Read(0), Read(1), Read(0), Read(1)],
        vec![Read(1)],
    ];
    check_model(Model {
        n: programs.len(),
        pages: 2,
        programs,
        home: Some(0),
        evictions: 0,
        pushes: 0,
        populate: true,
        direct: false,
        direct_outcomes: Default::default(),
        steals: Default::default(),
        protect_apart: false,
        longest_populated: Default::default(),
    });
}

#[test]
fn evictions_among_writers_and_readers() {
    check_programs_evicting(
        vec![
            vec![Write(0), Read(1)],
            vec![Write(1), Read(0)],
            vec![Read(0), Write(0), Read(1)],
        ],
        2,
        None,
        1,
    );
}

#[test]
fn evictions_cross_invalidations_and_upgrades() {
    // Readers of a page homed at rank 0 evict while others upgrade and
    // the home invalidates them.
    check_programs_evicting(
        vec![
            vec![Read(0), Write(1)],
            vec![Read(0), Write(0), Read(1)],
            vec![Read(0), Read(1), Write(0)],
        ],
        2,
        Some(0),
        1,
    );
}

#[test]
fn evicted_writable_copies_cross_recalls() {
    // Writers of pages homed at rank 0 give them back while others' reads
    // and writes recall them.
    check_programs_evicting(
        vec![
            vec![Read(1)],
            vec![Write(0), Write(1), Read(0)],
            vec![Write(1), Read(0), Write(0)],
        ],
        2,
        Some(0),
        1,
    );
}

#[test]
fn a_free_crosses_reads_writes_and_evictions_and_the_pages_start_anew() {
    // Every rank uses the pages, frees them, and uses them again: reads
    // after the free see zeros or writes made after it, never a value of
    // before; invalidations, recalls and evictions cross the releases.
    check_programs_evicting(
        vec![
            vec![Write(0), Read(1), Free, Read(0)],
            vec![Read(0), Write(1), Free, Write(0)],
            vec![Read(1), Free, Read(1)],
        ],
        2,
        None,
        1,
    );
}

#[test]
fn a_free_of_pages_homed_at_one_rank_crosses_its_transactions() {
    // Pages homed at rank 0; others hold writable and read copies when the
    // free begins, and write again after it.
    let programs = vec![
        vec![Read(0), Free, Read(1)],
        vec![Write(0), Write(1), Free, Write(1)],
        vec![Read(1), Read(0), Free, Read(0)],
    ];
    check_model(Model {
        n: programs.len(),
        pages: 2,
        programs,
        home: Some(0),
        evictions: 0,
        pushes: 0,
        populate: true,
        direct: false,
        direct_outcomes: Default::default(),
        steals: Default::default(),
        protect_apart: false,
        longest_populated: Default::default(),
    });
}

#[test]
fn a_home_first_touching_its_pages_while_others_write_and_read_them() {
    // Pages homed at rank 0, which writes page 0 first (taking page 1 with
    // it if nobody asked for it yet), then reads and writes page 1; the
    // others read and write both meanwhile, before, during and after.
    let programs = vec![
        vec![Write(0), Read(1), Write(1)],
        vec![Read(1), Write(0)],
        vec![Write(1), Read(0)],
    ];
    let longest = check_model_populating(&Model {
        n: programs.len(),
        pages: 2,
        programs,
        home: Some(0),
        evictions: 0,
        pushes: 0,
        populate: true,
        direct: false,
        direct_outcomes: Default::default(),
        steals: Default::default(),
        protect_apart: false,
        longest_populated: Default::default(),
    });
    assert_eq!(longest, 2, "a first touch takes both pages in some run");
}

#[test]
fn a_home_first_reading_its_pages_while_others_write_and_read_them() {
    // A read first touch takes the pages writable: a later store of the
    // home's costs nothing, another rank's read or write recalls them.
    let programs = vec![
        vec![Read(0), Write(1), Read(1), Write(0)],
        vec![Write(0), Read(1)],
        vec![Read(1), Write(0)],
    ];
    let longest = check_model_populating(&Model {
        n: programs.len(),
        pages: 2,
        programs,
        home: Some(0),
        evictions: 1,
        pushes: 0,
        populate: true,
        direct: false,
        direct_outcomes: Default::default(),
        steals: Default::default(),
        protect_apart: false,
        longest_populated: Default::default(),
    });
    assert_eq!(longest, 2, "a first touch takes both pages in some run");
}

#[test]
fn a_home_first_touches_its_pages_again_after_a_free() {
    // After the free the pages are untouched again: the home's next touch
    // populates them anew, never with a value of before.
    let programs = vec![
        vec![Write(1), Free, Read(0), Write(1)],
        vec![Read(1), Write(0), Free, Read(1)],
        vec![Free, Write(0)],
    ];
    let longest = check_model_populating(&Model {
        n: programs.len(),
        pages: 2,
        programs,
        home: Some(0),
        evictions: 0,
        pushes: 0,
        populate: true,
        direct: false,
        direct_outcomes: Default::default(),
        steals: Default::default(),
        protect_apart: false,
        longest_populated: Default::default(),
    });
    assert_eq!(longest, 2, "a first touch takes both pages in some run");
}

#[test]
fn pushed_copies_cross_the_readers_own_requests_and_writes() {
    // The home pushes its page to readers that are asking for it, writing
    // it, or holding nothing, while the home writes it again: every read
    // still returns the last write.
    check_programs_pushing(
        vec![
            vec![Write(0), Write(0)],
            vec![Read(0), Write(0), Read(0)],
            vec![Read(0), Read(0)],
        ],
        1,
        Some(0),
        0,
        2,
    );
}

#[test]
fn pushed_copies_of_a_producer_s_pages_and_a_consumer_s_writes() {
    // Pages spread round-robin: each rank produces one and consumes the
    // other's, as a stencil's boundary rows; homes push while the copies
    // move, and a pushed copy may be evicted.
    check_programs_pushing(
        vec![
            vec![Write(0), Read(1), Write(0), Read(1)],
            vec![Write(1), Read(0), Write(1), Read(0)],
        ],
        2,
        None,
        1,
        3,
    );
}

#[test]
fn pushed_copies_a_consumer_dropped_are_asked_back_in_a_run() {
    // Both pages homed at rank 0, which writes them in turn while it
    // pushes them; the consumer reads them in turn, and a copy it drops
    // counts as lost: its next fault asks back the page after it too.
    check_programs_pushing(
        vec![
            vec![Write(0), Write(1), Write(0), Write(1)],
            vec![Read(0), Read(1), Read(0), Read(1)],
        ],
        2,
        Some(0),
        1,
        2,
    );
}

#[test]
fn pushed_copies_cross_a_free() {
    // A push may reach a rank freeing the pages: the pages still start
    // anew after the free.
    check_programs_pushing(
        vec![
            vec![Write(0), Free, Read(0)],
            vec![Read(0), Free, Write(0)],
            vec![Free, Read(0)],
        ],
        1,
        Some(0),
        0,
        2,
    );
}

/// Every rank co-located with every home: read faults copy published
/// pages from the home's frame (with `evictions` and `pushes` anywhere).
fn check_programs_reading_directly(
    programs: Vec<Vec<Op>>,
    pages: usize,
    home: Option<usize>,
    evictions: usize,
    pushes: usize,
    protect_apart: bool,
) -> usize {
    let model = Model {
        n: programs.len(),
        pages,
        programs,
        home,
        evictions,
        pushes,
        populate: true,
        direct: true,
        direct_outcomes: Default::default(),
        steals: Default::default(),
        protect_apart,
        longest_populated: Default::default(),
    };
    check_model_populating(&model);
    let (copied, failed) = model.direct_outcomes.get();
    let steals = model.steals.get();
    eprintln!("direct reads: {copied} copied ({steals} of pages the home held writable), {failed} given up");
    assert!(
        copied > 0 && failed > 0,
        "both outcomes of a direct read are explored"
    );
    steals
}

#[test]
fn direct_reads_cross_the_home_s_writes_and_evictions() {
    // Rank 1's read downgrades the home's copy, which the home then
    // publishes; the others copy it from the home's frame while the home
    // writes it again, and evict what they copied.
    check_programs_reading_directly(
        vec![
            vec![Write(0), Read(0), Write(0)],
            vec![Read(0), Read(0), Write(0)],
            vec![Read(0), Read(0)],
        ],
        1,
        Some(0),
        2,
        0,
        false,
    );
}

#[test]
fn direct_reads_among_writers_and_readers_of_two_pages() {
    check_programs_reading_directly(
        vec![
            vec![Write(0), Read(1)],
            vec![Write(1), Read(0), Read(1)],
            vec![Read(0), Write(0), Read(1)],
        ],
        2,
        None,
        1,
        0,
        false,
    );
}

#[test]
fn direct_reads_cross_pushes() {
    // A home pushes a copy to a rank that may be copying the page itself.
    check_programs_reading_directly(
        vec![
            vec![Write(0), Read(0), Write(0)],
            vec![Read(0), Read(0)],
            vec![Read(0), Read(0)],
        ],
        1,
        Some(0),
        1,
        2,
        false,
    );
}

#[test]
fn direct_reads_cross_a_free() {
    check_programs_reading_directly(
        vec![
            vec![Write(0), Read(0), Free, Read(0)],
            vec![Read(0), Free, Write(0)],
            vec![Read(0), Read(0), Free, Read(0)],
        ],
        1,
        Some(0),
        1,
        0,
        false,
    );
}

#[test]
fn direct_reads_of_copies_evicted_again_and_again() {
    // Two readers copy, evict and copy again a page the home rewrites:
    // each eviction notice must reach the home before the copy after it
    // counts.
    check_programs_reading_directly(
        vec![
            vec![Write(0), Read(0), Write(0)],
            vec![Read(0), Read(0), Read(0)],
            vec![Read(0), Read(0)],
        ],
        1,
        Some(0),
        3,
        0,
        false,
    );
}

#[test]
fn direct_reads_after_a_writable_copy_given_back_across_a_recall() {
    // Rank 1 writes the page and gives its writable copy back while the
    // home's read recalls it: the recall may still be on its way when the
    // home publishes the page again, so rank 1 copies it by message first.
    check_programs_reading_directly(
        vec![
            vec![Read(0), Write(0), Read(0)],
            vec![Write(0), Read(0), Read(0)],
        ],
        1,
        Some(0),
        2,
        1,
        false,
    );
}

#[test]
fn direct_reads_of_pages_the_home_holds_writable() {
    // The home writes its page again and again; the readers write-protect
    // it in the home's mapping and copy it, at any point of the home's
    // stores, upgrades and lifts of their protection.
    let steals = check_programs_reading_directly(
        vec![
            vec![Write(0), Write(0), Read(0), Write(0)],
            vec![Read(0), Read(0), Read(0)],
            vec![Read(0), Write(0)],
        ],
        1,
        Some(0),
        1,
        0,
        true,
    );
    assert!(
        steals > 0,
        "pages the home holds writable are read directly"
    );
}

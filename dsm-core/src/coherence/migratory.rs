//! Migratory: the seed's protocol, after IVY's dynamic distributed manager.
//!
//! One owner per page; the page moves to whoever touches it. Each rank keeps
//! a probable-owner hint per page (initially the page's home, `page mod N`).
//!
//! * Local fault on a page we do not own: send a request to the hint (once;
//!   further faults on the same page wait for the same answer).
//! * Request for a page we own: give it (the engine copies it out and drops
//!   it), and point the hint at the requester.
//! * Request for a page we neither own nor are fetching: forward it to the
//!   hint and point the hint at the requester (path compression: the
//!   requester is about to own it).
//! * Request for a page we are fetching ourselves: defer it until our own
//!   request is served (Li and Hudak's per-page lock). Following hints then
//!   always leads to the owner, so every request is answered exactly once.
//! * A page that arrives for a local fault is held at least `min_hold`
//!   before deferred requests take it away, so the faulting thread gets to
//!   use it: without that, two writers can steal a page back and forth
//!   forever without either completing its store.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::{Action, CoherenceError, ProtocolCounters};
use crate::proto::Msg;
use crate::Rank;

#[derive(Debug, Clone)]
struct PageState {
    hint: Rank,
    owned: bool,
    /// Mapped in this process (as opposed to owned but never touched).
    present: bool,
    /// Our own request is in flight.
    fetching: bool,
    held_until: Option<Instant>,
    deferred: VecDeque<Rank>,
}

/// One rank's migratory state machine: ownership and probable-owner hint
/// of every page.
pub struct Migratory {
    rank: Rank,
    size: usize,
    pages: Vec<PageState>,
    min_hold: Duration,
    /// Pages with deferred requests (checked on timer ticks).
    waiting: BTreeSet<usize>,
    /// Requests forwarded along hints and requests deferred.
    pub counters: ProtocolCounters,
}

impl Migratory {
    /// Rank `rank` of a job of `size` ranks over `pages` pages: each page
    /// starts owned, untouched, by its home (`page mod size`); a page that
    /// arrives for a local fault is held at least `min_hold`.
    pub fn new(rank: Rank, size: usize, pages: usize, min_hold: Duration) -> Self {
        let pages = (0..pages)
            .map(|page| {
                let home = page % size;
                PageState {
                    hint: home,
                    owned: home == rank,
                    present: false,
                    fetching: false,
                    held_until: None,
                    deferred: VecDeque::new(),
                }
            })
            .collect();
        Migratory {
            rank,
            size,
            pages,
            min_hold,
            waiting: BTreeSet::new(),
            counters: ProtocolCounters::default(),
        }
    }

    fn page(&mut self, page: usize) -> Result<&mut PageState, CoherenceError> {
        let pages = self.pages.len();
        self.pages
            .get_mut(page)
            .ok_or(CoherenceError::NoSuchPage { page, pages })
    }

    /// Whether this rank owns `page` now (false for a page outside the space).
    pub fn owns(&self, page: usize) -> bool {
        self.pages.get(page).is_some_and(|p| p.owned)
    }

    /// A thread of this process faulted on `page`.
    pub fn on_fault(&mut self, page: usize) -> Result<Vec<Action>, CoherenceError> {
        let me = self.rank;
        let st = self.page(page)?;
        if st.owned {
            if st.present {
                return Ok(vec![Action::Wake { page }]);
            }
            st.present = true;
            return Ok(vec![Action::InstallZero { page }]);
        }
        if st.fetching {
            return Ok(Vec::new());
        }
        st.fetching = true;
        Ok(vec![Action::Send {
            to: st.hint,
            msg: Msg::request(page, me, true),
        }])
    }

    /// `requester` asks for `page`.
    pub fn on_request(
        &mut self,
        page: usize,
        requester: Rank,
        now: Instant,
    ) -> Result<Vec<Action>, CoherenceError> {
        if requester >= self.size {
            return Err(CoherenceError::BadRequester { page, requester });
        }
        let me = self.rank;
        let st = self.page(page)?;
        let held = st.held_until.is_some_and(|t| now < t);
        if (st.owned && held) || st.fetching {
            st.deferred.push_back(requester);
            self.counters.deferred += 1;
            self.waiting.insert(page);
            return Ok(Vec::new());
        }
        if st.owned {
            st.owned = false;
            st.hint = requester;
            let present = std::mem::replace(&mut st.present, false);
            st.held_until = None;
            return Ok(vec![Action::GivePage {
                to: requester,
                page,
                present,
            }]);
        }
        let to = st.hint;
        st.hint = requester;
        self.counters.forwarded += 1;
        debug_assert_ne!(
            to, me,
            "a rank that does not own a page never hints at itself"
        );
        Ok(vec![Action::Send {
            to,
            msg: Msg::request(page, requester, true),
        }])
    }

    /// The page we asked for arrived from `from`.
    pub fn on_grant(
        &mut self,
        page: usize,
        from: Rank,
        now: Instant,
    ) -> Result<Vec<Action>, CoherenceError> {
        let me = self.rank;
        let hold = self.min_hold;
        let st = self.page(page)?;
        if !st.fetching || st.owned {
            return Err(CoherenceError::UnexpectedGrant { page, from });
        }
        st.fetching = false;
        st.owned = true;
        st.present = true;
        st.hint = me;
        st.held_until = Some(now + hold);
        Ok(vec![Action::InstallGranted { page }])
    }

    /// When the next deferred request becomes due, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting
            .iter()
            .filter_map(|p| {
                let st = &self.pages[*p];
                (!st.fetching).then_some(st.held_until)
            })
            .map(|t| t.unwrap_or_else(Instant::now))
            .min()
    }

    /// Serves deferred requests whose page is no longer held.
    pub fn on_tick(&mut self, now: Instant) -> Result<Vec<Action>, CoherenceError> {
        let due: Vec<usize> = self
            .waiting
            .iter()
            .copied()
            .filter(|p| {
                let st = &self.pages[*p];
                !st.fetching && st.held_until.is_none_or(|t| t <= now)
            })
            .collect();
        let mut actions = Vec::new();
        for page in due {
            self.waiting.remove(&page);
            let deferred = std::mem::take(&mut self.pages[page].deferred);
            self.pages[page].held_until = None;
            for requester in deferred {
                actions.extend(self.on_request(page, requester, now)?);
            }
        }
        Ok(actions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A whole job of state machines exchanging messages through per-pair
    /// queues, delivered in a pseudo-random order (FIFO per pair, like the
    /// transport). Page contents are modelled as a version number carried
    /// with the page, to check that no update is lost.
    struct Sim {
        nodes: Vec<Migratory>,
        /// (from, to) -> queue of (message, carried version)
        links: Vec<VecDeque<(Msg, u64)>>,
        /// Version of each page held by each rank (when present/owned).
        held: Vec<Vec<Option<u64>>>,
        now: Instant,
        n: usize,
        rng: u64,
    }

    impl Sim {
        fn new(n: usize, pages: usize, hold: Duration) -> Sim {
            Sim {
                nodes: (0..n).map(|r| Migratory::new(r, n, pages, hold)).collect(),
                links: (0..n * n).map(|_| VecDeque::new()).collect(),
                held: (0..n)
                    .map(|r| (0..pages).map(|p| (p % n == r).then_some(0)).collect())
                    .collect(),
                now: Instant::now(),
                n,
                rng: 0x9E3779B97F4A7C15,
            }
        }

        fn next_rand(&mut self) -> u64 {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng
        }

        fn apply(&mut self, rank: Rank, actions: Vec<Action>, grant_version: Option<u64>) {
            for a in actions {
                match a {
                    Action::Send { to, msg } => self.links[rank * self.n + to].push_back((msg, 0)),
                    Action::GivePage { to, page, .. } => {
                        let version = self.held[rank][page].take().expect("giving a page we hold");
                        self.links[rank * self.n + to].push_back((
                            Msg::PageGrant {
                                page: page as u64,
                                data: None,
                            },
                            version,
                        ));
                    }
                    Action::InstallGranted { page } => {
                        assert!(self.held[rank][page].is_none());
                        self.held[rank][page] = grant_version;
                    }
                    Action::InstallZero { .. } | Action::Wake { .. } => {}
                    other => panic!("the migratory protocol emitted {other:?}"),
                }
            }
        }

        /// Delivers one message from a random non-empty link; false if none.
        fn deliver_one(&mut self) -> bool {
            let busy: Vec<usize> = (0..self.links.len())
                .filter(|i| !self.links[*i].is_empty())
                .collect();
            if busy.is_empty() {
                return false;
            }
            let link = busy[(self.next_rand() % busy.len() as u64) as usize];
            let (from, to) = (link / self.n, link % self.n);
            let (msg, version) = self.links[link].pop_front().unwrap();
            let now = self.now;
            let actions = match msg {
                Msg::PageRequest {
                    page, requester, ..
                } => self.nodes[to]
                    .on_request(page as usize, requester as usize, now)
                    .unwrap(),
                Msg::PageGrant { page, .. } => {
                    self.nodes[to].on_grant(page as usize, from, now).unwrap()
                }
                _ => unreachable!(),
            };
            self.apply(to, actions, Some(version));
            true
        }

        fn tick(&mut self) {
            self.now += Duration::from_millis(1);
            for r in 0..self.n {
                let now = self.now;
                let actions = self.nodes[r].on_tick(now).unwrap();
                self.apply(r, actions, None);
            }
        }
    }

    #[test]
    #[allow(clippy::needless_range_loop)] // ranks and pages index several tables
    fn a_write_by_every_rank_to_every_page_loses_nothing() {
        // Each rank increments each page's version once, all at the same
        // time; at the end the owner of each page holds version n.
        let (n, pages) = (4, 3);
        let mut sim = Sim::new(n, pages, Duration::from_micros(500));
        let mut done = vec![vec![false; pages]; n];
        let mut steps = 0;
        loop {
            // Ranks whose fault is satisfied do their increment, then fault on the next page.
            for r in 0..n {
                for p in 0..pages {
                    if done[r][p] {
                        continue;
                    }
                    if let Some(v) = sim.held[r][p].as_mut() {
                        *v += 1;
                        done[r][p] = true;
                    } else {
                        let actions = sim.nodes[r].on_fault(p).unwrap();
                        sim.apply(r, actions, None);
                    }
                }
            }
            if done.iter().all(|d| d.iter().all(|x| *x)) {
                break;
            }
            if !sim.deliver_one() {
                sim.tick();
            }
            steps += 1;
            assert!(steps < 100_000, "no progress");
        }
        // Drain in-flight traffic, then every page has exactly one holder with version n.
        while sim.deliver_one() || sim.nodes.iter().any(|node| node.next_deadline().is_some()) {
            sim.tick();
        }
        for p in 0..pages {
            let holders: Vec<u64> = (0..n).filter_map(|r| sim.held[r][p]).collect();
            assert_eq!(holders, [n as u64], "page {p}");
            assert_eq!((0..n).filter(|r| sim.nodes[*r].owns(p)).count(), 1);
        }
    }

    #[test]
    fn stale_hints_are_forwarded_to_the_owner() {
        let mut a = Migratory::new(0, 3, 1, Duration::ZERO);
        // Rank 0 owns page 0; rank 1 asks; rank 2 later asks rank 0 (stale).
        let now = Instant::now();
        assert_eq!(
            a.on_request(0, 1, now).unwrap(),
            [Action::GivePage {
                to: 1,
                page: 0,
                present: false
            }]
        );
        assert_eq!(
            a.on_request(0, 2, now).unwrap(),
            [Action::Send {
                to: 1,
                msg: Msg::request(0, 2, true)
            }]
        );
        assert_eq!(a.counters.forwarded, 1);
    }

    #[test]
    fn requests_during_our_own_fetch_wait_until_the_hold_ends() {
        let hold = Duration::from_millis(1);
        let mut b = Migratory::new(1, 2, 1, hold);
        let t0 = Instant::now();
        assert_eq!(
            b.on_fault(0).unwrap(),
            [Action::Send {
                to: 0,
                msg: Msg::request(0, 1, true)
            }]
        );
        assert_eq!(b.on_fault(0).unwrap(), []); // second thread, same page
        assert_eq!(b.on_request(0, 0, t0).unwrap(), []); // deferred: we are fetching
        assert_eq!(
            b.on_grant(0, 0, t0).unwrap(),
            [Action::InstallGranted { page: 0 }]
        );
        assert_eq!(b.on_tick(t0).unwrap(), []); // still held
        assert_eq!(b.next_deadline(), Some(t0 + hold));
        assert_eq!(
            b.on_tick(t0 + hold).unwrap(),
            [Action::GivePage {
                to: 0,
                page: 0,
                present: true
            }]
        );
        assert_eq!(b.next_deadline(), None);
    }

    #[test]
    fn malformed_input_is_an_error() {
        let mut a = Migratory::new(0, 2, 1, Duration::ZERO);
        assert!(a.on_fault(5).is_err());
        assert!(a.on_request(0, 9, Instant::now()).is_err());
        assert!(a.on_grant(0, 1, Instant::now()).is_err());
    }
}

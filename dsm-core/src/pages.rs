//! Per-page tables indexed by page number. The engine and the protocol look
//! a page up several times per message; on a cold scan the home handles
//! thousands of messages per megabyte, and an index costs far less there
//! than hashing or walking a tree. Each table is sized to the space's pages
//! and never grows: a page beyond them (only a faulty peer could name one)
//! has nothing to keep, so setting it does nothing.

/// A value per page, most pages having none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageMap<T> {
    slots: Vec<Option<T>>,
}

impl<T> PageMap<T> {
    pub fn new(pages: usize) -> Self {
        PageMap {
            slots: std::iter::repeat_with(|| None).take(pages).collect(),
        }
    }

    pub fn get(&self, page: usize) -> Option<&T> {
        self.slots.get(page)?.as_ref()
    }

    /// Sets `page`'s value; returns the one it replaces. Nothing happens
    /// for a page beyond the table.
    pub fn insert(&mut self, page: usize, value: T) -> Option<T> {
        self.slots.get_mut(page)?.replace(value)
    }

    pub fn remove(&mut self, page: usize) -> Option<T> {
        self.slots.get_mut(page)?.take()
    }

    /// `page`'s value, made first if it has none. `page` must be within
    /// the table (checked by the caller against the space's pages).
    pub fn get_or_insert_with(&mut self, page: usize, make: impl FnOnce() -> T) -> &mut T {
        self.slots[page].get_or_insert_with(make)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().flatten()
    }
}

/// A set of pages: one bit each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
}

impl PageSet {
    pub fn new(pages: usize) -> Self {
        PageSet {
            words: vec![0; pages.div_ceil(64)],
        }
    }

    pub fn contains(&self, page: usize) -> bool {
        self.words
            .get(page / 64)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Adds `page`; true if it was not in. Nothing happens for a page
    /// beyond the set's words (false).
    pub fn insert(&mut self, page: usize) -> bool {
        let Some(word) = self.words.get_mut(page / 64) else {
            return false;
        };
        let bit = 1 << (page % 64);
        let new = *word & bit == 0;
        *word |= bit;
        new
    }

    pub fn extend(&mut self, pages: std::ops::Range<usize>) {
        for page in pages {
            self.insert(page);
        }
    }

    /// Empties the set; returns its pages as maximal runs, in order.
    pub fn take_runs(&mut self) -> Vec<std::ops::Range<usize>> {
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for (i, word) in self.words.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let page = i * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                match runs.last_mut() {
                    Some(run) if run.end == page => run.end += 1,
                    _ => runs.push(page..page + 1),
                }
            }
        }
        runs
    }

    /// Takes `page` out; true if it was in.
    pub fn remove(&mut self, page: usize) -> bool {
        let Some(word) = self.words.get_mut(page / 64) else {
            return false;
        };
        let bit = 1 << (page % 64);
        let was = *word & bit != 0;
        *word &= !bit;
        was
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_map_holds_a_value_per_page() {
        let mut map = PageMap::new(10);
        assert_eq!(map.insert(3, "a"), None);
        assert_eq!(map.insert(3, "b"), Some("a"));
        assert_eq!(map.get(3), Some(&"b"));
        assert_eq!(map.get(4), None);
        assert_eq!(map.get(1000), None, "beyond the pages: nothing");
        assert_eq!(map.insert(12, "c"), None, "beyond the pages: not kept");
        assert_eq!(map.get(12), None);
        assert_eq!(*map.get_or_insert_with(5, || "d"), "d");
        assert_eq!(*map.get_or_insert_with(5, || "e"), "d");
        assert_eq!(map.values().copied().collect::<Vec<_>>(), ["b", "d"]);
        assert_eq!(map.remove(3), Some("b"));
        assert_eq!(map.remove(3), None);
        assert_eq!(map.remove(1000), None);
    }

    #[test]
    fn a_page_set_holds_pages() {
        let mut set = PageSet::new(100);
        set.extend(62..66);
        set.insert(99);
        set.insert(130);
        assert!(set.contains(62) && set.contains(65) && set.contains(99));
        assert!(!set.contains(61) && !set.contains(66) && !set.contains(5000));
        assert!(!set.contains(130), "beyond the words: not kept");
        assert!(set.remove(63));
        assert!(!set.remove(63));
        assert!(!set.remove(5000));
        assert!(!set.contains(63));
        assert!(set.insert(63) && !set.insert(63), "added once");
        assert!(!set.insert(130), "beyond the words: not kept");
        set.insert(64);
        set.remove(62);
        assert_eq!(set.take_runs(), vec![63..66usize, 99..100]);
        assert!(set.take_runs().is_empty(), "emptied");
        assert!(!set.contains(63));
    }
}

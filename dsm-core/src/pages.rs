//! Per-page tables indexed by page number. The engine and the protocol look
//! a page up several times per message; on a cold scan the home handles
//! thousands of messages per megabyte, and an index costs far less there
//! than hashing or walking a tree.
//!
//! The space may be far larger than any node's memory (a 64 TiB space has
//! 2^34 pages), so no table costs memory up front: each is split into
//! chunks of [`CHUNK_PAGES`] pages, allocated on the first write to one of
//! their pages. Pages of a chunk never written hold the table's default.
//! Only the chunk index is sized by the space (one pointer per 16 MiB of
//! space, allocated zeroed, so untouched parts of it stay unbacked). A page
//! beyond the table (only a faulty peer could name one) has nothing to
//! keep: reading it gives nothing, setting it does nothing.

/// Pages per chunk of a table: 16 MiB of space.
pub const CHUNK_PAGES: usize = 4096;

/// A value per page, the default for pages never written: chunks are
/// allocated on first write.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageTable<T> {
    chunks: Vec<Option<Box<[T]>>>,
    pages: usize,
    default: T,
}

impl<T: Clone> PageTable<T> {
    /// A table of `pages` pages, all holding `default`; allocates only the
    /// chunk index.
    pub fn new(pages: usize, default: T) -> Self {
        PageTable {
            // `vec![None; n]` of boxes is one zeroed allocation: the index
            // of a huge space stays unbacked where nothing was touched.
            chunks: vec![None; pages.div_ceil(CHUNK_PAGES)],
            pages,
            default,
        }
    }

    /// Pages the table covers.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// `page`'s value (the default if never written); `None` beyond the table.
    pub fn get(&self, page: usize) -> Option<&T> {
        if page >= self.pages {
            return None;
        }
        Some(match &self.chunks[page / CHUNK_PAGES] {
            Some(chunk) => &chunk[page % CHUNK_PAGES],
            None => &self.default,
        })
    }

    /// `page`'s value to change, its chunk allocated if need be; `None`
    /// beyond the table.
    pub fn get_mut(&mut self, page: usize) -> Option<&mut T> {
        if page >= self.pages {
            return None;
        }
        let default = &self.default;
        let first = page / CHUNK_PAGES * CHUNK_PAGES;
        // The last chunk covers only the pages left (a small table, such as
        // the model checker's, costs only its pages).
        let len = CHUNK_PAGES.min(self.pages - first);
        let chunk = self.chunks[page / CHUNK_PAGES]
            .get_or_insert_with(|| vec![default.clone(); len].into_boxed_slice());
        Some(&mut chunk[page % CHUNK_PAGES])
    }

    /// Every value of the allocated chunks, with its page (pages never
    /// written hold the default and may be left out).
    pub fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.chunks
            .iter()
            .enumerate()
            .filter_map(|(c, chunk)| Some((c, chunk.as_ref()?)))
            .flat_map(|(c, chunk)| {
                chunk
                    .iter()
                    .enumerate()
                    .map(move |(i, v)| (c * CHUNK_PAGES + i, v))
            })
            .filter(|(page, _)| *page < self.pages)
    }

    /// [`PageTable::iter`], to change the values.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.chunks.iter_mut().flatten().flat_map(|c| c.iter_mut())
    }

    /// Chunks allocated so far (what the table costs: each holds
    /// [`CHUNK_PAGES`] values).
    #[cfg(test)]
    pub fn chunks_allocated(&self) -> usize {
        self.chunks.iter().filter(|c| c.is_some()).count()
    }
}

/// A value per page, most pages having none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageMap<T> {
    table: PageTable<Option<T>>,
}

impl<T: Clone> PageMap<T> {
    /// An empty map over `pages` pages.
    pub fn new(pages: usize) -> Self {
        PageMap {
            table: PageTable::new(pages, None),
        }
    }

    /// `page`'s value; `None` if it has none or is beyond the table.
    pub fn get(&self, page: usize) -> Option<&T> {
        self.table.get(page)?.as_ref()
    }

    /// Sets `page`'s value; returns the one it replaces. Nothing happens
    /// for a page beyond the table.
    pub fn insert(&mut self, page: usize, value: T) -> Option<T> {
        self.table.get_mut(page)?.replace(value)
    }

    /// Takes `page`'s value out, if it has one; allocates nothing.
    pub fn remove(&mut self, page: usize) -> Option<T> {
        if self.table.get(page)?.is_none() {
            return None; // no chunk allocated for nothing
        }
        self.table.get_mut(page)?.take()
    }

    /// `page`'s value, made first if it has none. `page` must be within
    /// the table (checked by the caller against the space's pages).
    pub fn get_or_insert_with(&mut self, page: usize, make: impl FnOnce() -> T) -> &mut T {
        let pages = self.table.pages();
        self.table
            .get_mut(page)
            .unwrap_or_else(|| panic!("page {page} beyond a table of {pages} pages"))
            .get_or_insert_with(make)
    }

    /// The values of the pages that have one, in page order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.table.iter().filter_map(|(_, v)| v.as_ref())
    }
}

/// Pages per chunk of a [`PageSet`], in 64-bit words.
const SET_CHUNK_WORDS: usize = CHUNK_PAGES / 64;

/// A set of pages: one bit each, in chunks allocated on first insert.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageSet {
    chunks: Vec<Option<Box<[u64; SET_CHUNK_WORDS]>>>,
    pages: usize,
}

impl PageSet {
    /// An empty set over `pages` pages.
    pub fn new(pages: usize) -> Self {
        PageSet {
            chunks: vec![None; pages.div_ceil(CHUNK_PAGES)],
            pages,
        }
    }

    fn word(&self, page: usize) -> Option<u64> {
        if page >= self.pages {
            return None;
        }
        let chunk = self.chunks[page / CHUNK_PAGES].as_ref()?;
        Some(chunk[page % CHUNK_PAGES / 64])
    }

    fn word_mut(&mut self, page: usize, allocate: bool) -> Option<&mut u64> {
        if page >= self.pages {
            return None;
        }
        let slot = &mut self.chunks[page / CHUNK_PAGES];
        if slot.is_none() && !allocate {
            return None;
        }
        let chunk = slot.get_or_insert_with(|| Box::new([0; SET_CHUNK_WORDS]));
        Some(&mut chunk[page % CHUNK_PAGES / 64])
    }

    /// Whether `page` is in (false beyond the set).
    pub fn contains(&self, page: usize) -> bool {
        self.word(page).is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Adds `page`; true if it was not in. Nothing happens for a page
    /// beyond the set (false).
    pub fn insert(&mut self, page: usize) -> bool {
        let Some(word) = self.word_mut(page, true) else {
            return false;
        };
        let bit = 1 << (page % 64);
        let new = *word & bit == 0;
        *word |= bit;
        new
    }

    /// Adds every page of `pages`; those beyond the set are ignored.
    pub fn extend(&mut self, pages: std::ops::Range<usize>) {
        for page in pages {
            self.insert(page);
        }
    }

    /// Empties the set; returns its pages as maximal runs, in order.
    pub fn take_runs(&mut self) -> Vec<std::ops::Range<usize>> {
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for (c, slot) in self.chunks.iter_mut().enumerate() {
            let Some(chunk) = slot.take() else {
                continue;
            };
            for (i, word) in chunk.iter().enumerate() {
                let mut bits = *word;
                while bits != 0 {
                    let page = c * CHUNK_PAGES + i * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    match runs.last_mut() {
                        Some(run) if run.end == page => run.end += 1,
                        _ => runs.push(page..page + 1),
                    }
                }
            }
        }
        runs
    }

    /// Takes `page` out; true if it was in.
    pub fn remove(&mut self, page: usize) -> bool {
        let Some(word) = self.word_mut(page, false) else {
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

    #[test]
    fn tables_of_a_huge_space_cost_only_the_chunks_used() {
        // 64 TiB of 4 KiB pages: nothing allocated per page up front.
        let pages = 1usize << 34;
        let mut table = PageTable::new(pages, 7u8);
        assert_eq!(table.get(pages - 1), Some(&7));
        assert_eq!(table.chunks_allocated(), 0, "a read allocates nothing");
        *table.get_mut(pages - 1).unwrap() = 9;
        *table.get_mut(5).unwrap() = 3;
        assert_eq!(table.chunks_allocated(), 2);
        assert_eq!(
            (table.get(5), table.get(6), table.get(pages - 1)),
            (Some(&3), Some(&7), Some(&9))
        );
        assert_eq!(table.get(pages), None);
        assert!(table.get_mut(pages).is_none());
        let written: Vec<_> = table.iter().filter(|(_, v)| **v != 7).collect();
        assert_eq!(written, vec![(5, &3), (pages - 1, &9)]);

        let mut set = PageSet::new(pages);
        assert!(!set.remove(1 << 33), "removing allocates nothing");
        assert!(set.insert(1 << 33) && set.insert((1 << 33) + 1));
        assert_eq!(set.take_runs(), vec![(1 << 33)..(1 << 33) + 2]);
    }
}

//! Twins and diffs for the release-consistent protocol ([`super::release`]):
//! a page's words kept as they were when it became writable, the runs of
//! words that changed since, and those runs written into the home's copy.
//!
//! A writer's copy is read in place while write-protected (its twin is a
//! copy of its bytes; its diff compares 64-byte blocks with the twin's,
//! then the words of the blocks that differ). The home's copy is written
//! and read as 8-byte atomic words (`Relaxed`): a home applies a diff while
//! its own threads may write other words of the page, and a word is never
//! torn, so two ranks racing on one word leave one of their two values,
//! never a mix of their bytes.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::config::{PAGE_SIZE, PAGE_WORDS};
use crate::proto::DiffRuns;

/// A page's words as they were when it was made writable.
pub type Twin = Box<[u64; PAGE_WORDS]>;

/// Why a diff cannot be applied to a page.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiffError {
    /// The words given are not one page.
    #[error("a page has {PAGE_WORDS} words, not {0}")]
    NotAPage(usize),
    /// A run reaches past the page's last word.
    #[error("a diff run of {len} words from word {first} goes past the page's {PAGE_WORDS}")]
    BeyondPage {
        /// The run's first word.
        first: usize,
        /// Its length in words.
        len: usize,
    },
}

fn check_page(page: &[AtomicU64]) -> Result<(), DiffError> {
    if page.len() == PAGE_WORDS {
        Ok(())
    } else {
        Err(DiffError::NotAPage(page.len()))
    }
}

/// Words compared at once by [`diff`] (a cache line): a block equal to its
/// twin's is skipped with one `memcmp`, vectorised by the C library.
const BLOCK_WORDS: usize = 8;

fn check_bytes(page: &[u8]) -> Result<(), DiffError> {
    if page.len() == PAGE_SIZE {
        Ok(())
    } else {
        Err(DiffError::NotAPage(page.len() / 8))
    }
}

/// The twin of `page`, the bytes of a write-protected copy (nothing
/// stores to it meanwhile), in `spare` if given (a twin done with: a page
/// allocation per write fault costs more than the copy).
pub fn take_twin(page: &[u8], spare: Option<Twin>) -> Result<Twin, DiffError> {
    check_bytes(page)?;
    let mut twin = spare.unwrap_or_else(|| Box::new([0u64; PAGE_WORDS]));
    bytemuck::cast_slice_mut::<u64, u8>(&mut twin[..]).copy_from_slice(page);
    Ok(twin)
}

/// The runs of words of `page` that differ from `twin`, in order. `page`
/// is the bytes of the copy, write-protected for the comparison (a store
/// meanwhile would fault, and wait).
pub fn diff(page: &[u8], twin: &[u64; PAGE_WORDS]) -> Result<DiffRuns, DiffError> {
    check_bytes(page)?;
    let then: &[u8] = bytemuck::cast_slice(&twin[..]);
    let block = 8 * BLOCK_WORDS;
    let mut runs = DiffRuns::new();
    for (b, (now, old)) in page
        .chunks_exact(block)
        .zip(then.chunks_exact(block))
        .enumerate()
    {
        if now == old {
            continue;
        }
        for (k, word) in now.chunks_exact(8).enumerate() {
            let i = b * BLOCK_WORDS + k;
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(word);
            let value = u64::from_ne_bytes(bytes);
            if value != twin[i] {
                runs.push(i, value);
            }
        }
    }
    Ok(runs)
}

/// Writes the runs' words into `page` (the home's copy); the other words
/// are left as they are.
pub fn apply(page: &[AtomicU64], runs: &DiffRuns) -> Result<(), DiffError> {
    check_page(page)?;
    for (first, words) in runs.runs() {
        let target = page
            .get(first..first + words.len())
            .ok_or(DiffError::BeyondPage {
                first,
                len: words.len(),
            })?;
        for (w, v) in target.iter().zip(words) {
            w.store(*v, Relaxed);
        }
    }
    Ok(())
}

/// The diffs merged into one, applied in the order given (a word in two
/// takes the later's value): what a page's copy takes in one step.
pub fn merge<'a>(diffs: impl IntoIterator<Item = &'a DiffRuns>) -> Result<DiffRuns, DiffError> {
    let mut words = [0u64; PAGE_WORDS];
    let mut changed = [false; PAGE_WORDS];
    for diff in diffs {
        for (first, run) in diff.runs() {
            let end = first + run.len();
            let beyond = DiffError::BeyondPage {
                first,
                len: run.len(),
            };
            words
                .get_mut(first..end)
                .ok_or(beyond)?
                .copy_from_slice(run);
            changed[first..end].fill(true);
        }
    }
    let mut merged = DiffRuns::new();
    for (index, _) in changed.iter().enumerate().filter(|(_, c)| **c) {
        merged.push(index, words[index]);
    }
    Ok(merged)
}

/// Writes a barrier's merged diff into a twinned `page` and its `twin`,
/// but for the words this rank changed since the twin was taken (still
/// changing: the application's threads may store meanwhile): those are
/// later than any word of the barrier (written after this rank's entry,
/// under a lock taken after the barrier's writers let it go, or racing
/// with them), and the next diff sends them. Each word is replaced only if
/// it still holds its twin's value, atomically.
pub fn apply_unless_changed(
    page: &[AtomicU64],
    twin: &mut [u64; PAGE_WORDS],
    runs: &DiffRuns,
) -> Result<(), DiffError> {
    check_page(page)?;
    for (first, words) in runs.runs() {
        let beyond = DiffError::BeyondPage {
            first,
            len: words.len(),
        };
        let end = first + words.len();
        let (Some(target), Some(old)) = (page.get(first..end), twin.get_mut(first..end)) else {
            return Err(beyond);
        };
        for ((word, old), &new) in target.iter().zip(old).zip(words) {
            if word.compare_exchange(*old, new, Relaxed, Relaxed).is_ok() {
                *old = new;
            }
        }
    }
    Ok(())
}

/// Copies `page`'s words into `out`, each whole (a home's master copy
/// granted while its own threads may write it).
pub fn copy_words(page: &[AtomicU64], out: &mut [u8; PAGE_SIZE]) -> Result<(), DiffError> {
    check_page(page)?;
    for (bytes, w) in out.chunks_exact_mut(8).zip(page) {
        bytes.copy_from_slice(&w.load(Relaxed).to_ne_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn merged_diffs_keep_the_later_value_of_a_word_in_page_order() {
        let diff = |words: &[(usize, u64)]| {
            let mut runs = DiffRuns::new();
            for &(i, v) in words {
                runs.push(i, v);
            }
            runs
        };
        let home = diff(&[(0, 1), (1, 1), (511, 1)]);
        let writer = diff(&[(1, 2), (2, 2)]);
        let merged = merge([&home, &writer]).unwrap();
        assert_eq!(merged, diff(&[(0, 1), (1, 2), (2, 2), (511, 1)]));
        assert_eq!(merged.runs().count(), 2);
        assert!(merge([]).unwrap().is_empty());
    }
    use crate::proto::Msg;
    use proptest::prelude::*;

    fn page_of(words: &[u64]) -> Vec<AtomicU64> {
        words.iter().map(|w| AtomicU64::new(*w)).collect()
    }

    /// The page's bytes, as a write-protected copy is read.
    fn bytes(page: &[AtomicU64]) -> Vec<u8> {
        page.iter()
            .flat_map(|w| w.load(Relaxed).to_ne_bytes())
            .collect()
    }

    #[test]
    fn an_unchanged_page_has_an_empty_diff() {
        let page = page_of(&[7; PAGE_WORDS]);
        let twin = take_twin(&bytes(&page), None).unwrap();
        assert!(diff(&bytes(&page), &twin).unwrap().is_empty());
    }

    #[test]
    fn adjacent_changed_words_make_one_run() {
        let page = page_of(&[0; PAGE_WORDS]);
        let twin = take_twin(&bytes(&page), None).unwrap();
        for (i, v) in [(3, 1), (4, 2), (5, 3), (9, 4), (PAGE_WORDS - 1, 5)] {
            page[i].store(v, Relaxed);
        }
        let runs = diff(&bytes(&page), &twin).unwrap();
        let shape: Vec<(usize, Vec<u64>)> = runs.runs().map(|(i, w)| (i, w.to_vec())).collect();
        assert_eq!(
            shape,
            vec![(3, vec![1, 2, 3]), (9, vec![4]), (PAGE_WORDS - 1, vec![5])]
        );
    }

    #[test]
    fn a_run_past_the_page_or_a_short_page_is_refused() {
        let page = page_of(&[0; PAGE_WORDS]);
        // Made by hand: `DiffRuns::push` and the decoder never make one.
        let mut run = DiffRuns::new();
        run.push(PAGE_WORDS - 1, 1);
        run.push(PAGE_WORDS, 2);
        assert!(matches!(
            apply(&page, &run),
            Err(DiffError::BeyondPage { .. })
        ));
        assert_eq!(
            take_twin(&bytes(&page[1..]), None).unwrap_err(),
            DiffError::NotAPage(PAGE_WORDS - 1)
        );
    }

    proptest! {
        /// Two writers change disjoint words of one page: both diffs applied
        /// to the home's copy, in either order, give every write, and a
        /// diff survives the wire.
        #[test]
        fn disjoint_writers_diffs_merge_at_the_home(
            base in proptest::collection::vec(any::<u64>(), PAGE_WORDS),
            writes in proptest::collection::vec((0..PAGE_WORDS, any::<u64>(), any::<bool>()), 0..64),
            first_a in any::<bool>(),
        ) {
            let (a, b) = (page_of(&base), page_of(&base));
            let (twin_a, twin_b) = (take_twin(&bytes(&a), None).unwrap(), take_twin(&bytes(&b), None).unwrap());
            let mut expected = base.clone();
            for (i, v, by_a) in &writes {
                // Word i belongs to writer a if even, b if odd: no race.
                let mine = (*i % 2 == 0) == *by_a;
                if !mine {
                    continue;
                }
                if *by_a { a[*i].store(*v, Relaxed) } else { b[*i].store(*v, Relaxed) }
                expected[*i] = *v;
            }
            let diff_a = diff(&bytes(&a), &twin_a).unwrap();
            let diff_b = diff(&bytes(&b), &twin_b).unwrap();
            let sent = Msg::Diff { page: 1, runs: diff_a.clone() };
            prop_assert_eq!(Msg::decode(&sent.encode()).unwrap(), sent);
            let home = page_of(&base);
            if first_a {
                apply(&home, &diff_a).unwrap();
                apply(&home, &diff_b).unwrap();
            } else {
                apply(&home, &diff_b).unwrap();
                apply(&home, &diff_a).unwrap();
            }
            let merged: Vec<u64> = home.iter().map(|w| w.load(Relaxed)).collect();
            prop_assert_eq!(merged, expected);
        }
    }
}

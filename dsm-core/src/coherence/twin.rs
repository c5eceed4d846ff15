//! Twins and diffs for the release-consistent protocol ([`super::release`]):
//! a page's words kept as they were when it became writable, the runs of
//! words that changed since, and those runs written into the home's copy.
//!
//! Pages are read and written as 8-byte atomic words (`Relaxed`): a home
//! applies a diff while its own threads may write other words of the page,
//! and a word is never torn, so two ranks racing on one word leave one of
//! their two values, never a mix of their bytes.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::config::{PAGE_SIZE, PAGE_WORDS};
use crate::proto::DiffRun;

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

/// The twin of `page` (its words now).
pub fn take_twin(page: &[AtomicU64]) -> Result<Twin, DiffError> {
    check_page(page)?;
    let mut twin = Box::new([0u64; PAGE_WORDS]);
    for (t, w) in twin.iter_mut().zip(page) {
        *t = w.load(Relaxed);
    }
    Ok(twin)
}

/// The runs of words of `page` that differ from `twin`, in order. The page
/// should be write-protected meanwhile: a store during the comparison may
/// or may not be in the diff.
pub fn diff(page: &[AtomicU64], twin: &[u64; PAGE_WORDS]) -> Result<Vec<DiffRun>, DiffError> {
    check_page(page)?;
    let mut runs: Vec<DiffRun> = Vec::new();
    for (i, (w, t)) in page.iter().zip(twin.iter()).enumerate() {
        let now = w.load(Relaxed);
        if now == *t {
            continue;
        }
        match runs.last_mut() {
            // The last run ends right before this word: it grows.
            Some(run) if run.first_word as usize + run.words.len() == i => run.words.push(now),
            _ => runs.push(DiffRun {
                first_word: i as u16,
                words: vec![now],
            }),
        }
    }
    Ok(runs)
}

/// Writes the runs' words into `page` (the home's copy); the other words
/// are left as they are.
pub fn apply(page: &[AtomicU64], runs: &[DiffRun]) -> Result<(), DiffError> {
    check_page(page)?;
    for run in runs {
        let first = run.first_word as usize;
        let target = page
            .get(first..first + run.words.len())
            .ok_or(DiffError::BeyondPage {
                first,
                len: run.words.len(),
            })?;
        for (w, v) in target.iter().zip(&run.words) {
            w.store(*v, Relaxed);
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
    use crate::proto::Msg;
    use proptest::prelude::*;

    fn page_of(words: &[u64]) -> Vec<AtomicU64> {
        words.iter().map(|w| AtomicU64::new(*w)).collect()
    }

    #[test]
    fn an_unchanged_page_has_an_empty_diff() {
        let page = page_of(&[7; PAGE_WORDS]);
        let twin = take_twin(&page).unwrap();
        assert_eq!(diff(&page, &twin).unwrap(), Vec::new());
    }

    #[test]
    fn adjacent_changed_words_make_one_run() {
        let page = page_of(&[0; PAGE_WORDS]);
        let twin = take_twin(&page).unwrap();
        for (i, v) in [(3, 1), (4, 2), (5, 3), (9, 4), (PAGE_WORDS - 1, 5)] {
            page[i].store(v, Relaxed);
        }
        let runs = diff(&page, &twin).unwrap();
        let shape: Vec<(u16, Vec<u64>)> =
            runs.into_iter().map(|r| (r.first_word, r.words)).collect();
        assert_eq!(
            shape,
            vec![
                (3, vec![1, 2, 3]),
                (9, vec![4]),
                (PAGE_WORDS as u16 - 1, vec![5])
            ]
        );
    }

    #[test]
    fn a_run_past_the_page_or_a_short_page_is_refused() {
        let page = page_of(&[0; PAGE_WORDS]);
        let run = DiffRun {
            first_word: PAGE_WORDS as u16 - 1,
            words: vec![1, 2],
        };
        assert!(matches!(
            apply(&page, &[run]),
            Err(DiffError::BeyondPage { .. })
        ));
        assert_eq!(
            take_twin(&page[1..]).unwrap_err(),
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
            let (twin_a, twin_b) = (take_twin(&a).unwrap(), take_twin(&b).unwrap());
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
            let diff_a = diff(&a, &twin_a).unwrap();
            let diff_b = diff(&b, &twin_b).unwrap();
            let wire = Msg::Diff { page: 1, runs: diff_a.clone() }.encode();
            prop_assert_eq!(Msg::decode(&wire).unwrap(), Msg::Diff { page: 1, runs: diff_a.clone() });
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

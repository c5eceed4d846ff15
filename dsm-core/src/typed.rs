//! Typed arrays of plain data in the shared space, read and written as
//! ordinary slices between synchronization points.
//!
//! A [`SharedArray<T>`] is a handle (address, length, segment) to `T`
//! values in a segment, for any `T: `[`Pod`] (`f64`, integers, arrays of
//! them, `#[derive(Pod, Zeroable)] #[repr(C)]` structs without padding:
//! types every bit pattern of which is a valid value). It is `Copy`, `Send`
//! and `Sync`, and gives no access by itself. Access goes through an
//! [`Epoch`], which holds the [`Dsm`] mutably borrowed, so it is the only
//! way into the space in this process while it lives (the atomic views
//! [`Dsm::words`] and [`Dsm::bytes`] cannot be used meanwhile):
//!
//! * [`Epoch::read`] borrows the epoch shared and gives `&[T]`; many at once.
//! * [`Epoch::write`] borrows it mutably and gives `&mut [T]` of a range.
//! * [`Epoch::split_write`] gives `&mut [T]` of a range and a [`Reads`]
//!   that reads anything else ([`Reads::read`] panics on a range
//!   overlapping the written one), like `slice::split_at_mut`.
//! * [`Epoch::barrier`] and [`Epoch::lock`] borrow it mutably: no slice
//!   lives across a synchronization point, so after it every value is read
//!   again from memory. A lock's [`Locked`] guard reads and writes like
//!   the epoch until it is released.
//!
//! So within this process the borrow checker rules out a `&mut [T]` and
//! another slice of the same memory at the same time, and every slice is
//! valid, aligned memory for its whole life. Refused, for instance:
//!
//! ```compile_fail
//! # fn f(epoch: &mut dsm_core::Epoch, grid: &dsm_core::SharedArray<f64>) -> Result<(), dsm_core::DsmError> {
//! let old = epoch.read(grid, ..);
//! epoch.barrier()?; // error: `*epoch` is borrowed by `old`
//! let x = old[0];
//! # Ok(()) }
//! ```
//!
//! ```compile_fail
//! # fn f(epoch: &mut dsm_core::Epoch, grid: &dsm_core::SharedArray<f64>) {
//! let all = epoch.read(grid, ..);
//! let mine = epoch.write(grid, 0..8); // error: `*epoch` is also borrowed by `all`
//! mine[0] = all[8];
//! # }
//! ```
//!
//! # Data races between ranks
//!
//! Loads and stores are sequentially consistent across ranks, so a
//! *data-race-free* program sees SC: between two synchronization points no
//! rank writes what another rank reads or writes (each rank writes its own
//! part of the data, reads what others wrote before the last barrier, or
//! under the same lock). That is the program's duty: the compiler cannot
//! check what other processes do.
//!
//! A program that breaks it has a data race, but not undefined behaviour
//! in this process: other ranks' writes reach it only by page replacement
//! (a page is taken away, and the access that next faults on it maps a
//! newer copy), never by a store of another thread of this process into a
//! page it has mapped. What such a program may see:
//!
//! * a read may return a stale value (the compiler may keep, for as long
//!   as the slice lives, any value it read through it), or a torn one
//!   (bytes from different writes: an element straddling a page boundary
//!   read from pages of different ages, or the fields of a struct read at
//!   different times);
//! * another rank's write to a range this rank holds as `&mut [T]` may be
//!   lost, even to elements this rank's code never stores to (the compiler
//!   may write back what it read);
//! * since `T: Pod`, every such value is a valid `T`: no invalid value,
//!   no memory unsafety.
//!
//! In a release-consistent segment ([`crate::Consistency::Release`],
//! `DSM_PROTOCOL=release`) data-race-free programs still see SC, with one
//! more way for other ranks' writes to arrive: the page's home writes the
//! words other ranks changed into its own copy in place, as the engine
//! receives them (8-byte atomic stores, between this rank's
//! synchronizations). Only words those ranks wrote are stored, so a
//! program whose slices cover what this rank reads or writes in the epoch
//! (its own elements, e.g. `epoch.write(&a, i..i + 1)` for interleaved
//! counters) never holds a slice over them; a slice over words another
//! rank writes in the same epoch is a data race, as above.
//!
//! A store to a sealed replicated segment ends the job with an error
//! naming the segment, as it does through any other access.
//!
//! # Example
//!
//! Two grids of `f64` rows split across ranks (each rank's rows in one
//! segment at it), one step reading one grid and writing the other:
//!
//! ```no_run
//! use dsm_core::typed::{Epoch, SharedArray};
//! use dsm_core::{Dsm, DsmError, Placement};
//!
//! fn step(dsm: &mut Dsm, n: usize) -> Result<f64, DsmError> {
//!     let (rank, size) = (dsm.rank(), dsm.size());
//!     // Collective: every rank makes the same calls, so every rank holds
//!     // every block's handle. Block r (n values) lives at rank r.
//!     let old: Vec<SharedArray<f64>> = (0..size)
//!         .map(|r| SharedArray::coalloc(dsm, n, Placement::Localized(r)))
//!         .collect::<Result<_, _>>()?;
//!     let new: Vec<SharedArray<f64>> = (0..size)
//!         .map(|r| SharedArray::coalloc(dsm, n, Placement::Localized(r)))
//!         .collect::<Result<_, _>>()?;
//!     let mut epoch = Epoch::new(dsm);
//!     epoch.write(&old[rank], ..).fill(rank as f64); // this rank's block
//!     epoch.barrier()?; // every block written
//!     {
//!         let (mine, reads) = epoch.split_write(&new[rank], ..);
//!         let right = reads.read(&old[(rank + 1) % size], ..);
//!         for (out, r) in mine.iter_mut().zip(right) {
//!             *out = 0.5 * r;
//!         }
//!     } // the slices end here: the barrier needs the epoch
//!     epoch.barrier()?;
//!     Ok(epoch.read(&new[0], ..).iter().sum())
//! }
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::mem::{align_of, size_of, ManuallyDrop};
use std::ops::{Bound, Deref, DerefMut, Range, RangeBounds};

pub use bytemuck::{self, Pod, Zeroable};

use crate::config::PAGE_SIZE;
use crate::{Consistency, Dsm, DsmError, Placement, Rank, Segment};

/// A typed handle to `len` values of `T` at the start of a segment: the
/// same address on every rank. Read and write it through an [`Epoch`].
///
/// It is only an address: each access checks that it lies in the epoch's
/// space, so a handle whose segment is gone still reaches only mapped
/// shared memory. After [`Dsm::free`] an access to it ends the job with
/// an error, or reaches the segment allocated there since.
pub struct SharedArray<T> {
    segment: Segment,
    len: usize,
    /// Holds no `T`: the handle is an address, `Send` and `Sync` whatever `T`.
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for SharedArray<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SharedArray<T> {}

impl<T> fmt::Debug for SharedArray<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedArray")
            .field("type", &std::any::type_name::<T>())
            .field("addr", &self.segment.addr())
            .field("len", &self.len)
            .field("segment", &self.segment.id())
            .finish()
    }
}

impl<T: Pod> SharedArray<T> {
    /// Allocates `len` values collectively ([`Dsm::coalloc`]): every rank
    /// calls it, in the same order and with the same arguments, and gets
    /// the same array.
    pub fn coalloc(dsm: &Dsm, len: usize, placement: Placement) -> Result<Self, DsmError> {
        Self::from_segment(&dsm.coalloc(Self::bytes(len)?, placement)?)
    }

    /// [`SharedArray::coalloc`] with the array's consistency chosen
    /// ([`Dsm::coalloc_with`]): e.g. [`Consistency::Release`] for values
    /// every rank writes interleaved (false sharing), whatever the job's
    /// protocol.
    pub fn coalloc_with(
        dsm: &Dsm,
        len: usize,
        placement: Placement,
        consistency: Consistency,
    ) -> Result<Self, DsmError> {
        Self::from_segment(&dsm.coalloc_with(Self::bytes(len)?, placement, consistency)?)
    }

    /// Allocates `len` values for this rank alone ([`Dsm::alloc`]); other
    /// ranks know it only by its address. With [`Placement::File`] the
    /// array covers the file if it is longer.
    pub fn alloc(dsm: &Dsm, len: usize, placement: Placement) -> Result<Self, DsmError> {
        Self::from_segment(&dsm.alloc(Self::bytes(len)?, placement)?)
    }

    /// The segment's memory as an array of as many whole `T` as it holds:
    /// a segment allocated untyped, or one another rank allocated and
    /// handed over (its address, through [`Dsm::segment_at`]). Refused for
    /// a zero-sized `T` or one aligned beyond a page.
    pub fn from_segment(segment: &Segment) -> Result<Self, DsmError> {
        Self::bytes(0)?;
        Ok(SharedArray {
            segment: *segment,
            len: segment.len() / size_of::<T>(),
            _type: PhantomData,
        })
    }

    /// Bytes of `len` values, or why such an array cannot be.
    fn bytes(len: usize) -> Result<usize, DsmError> {
        let name = std::any::type_name::<T>();
        if size_of::<T>() == 0 {
            return Err(DsmError::Segment(format!(
                "a shared array of {name} (zero-sized) holds nothing"
            )));
        }
        if align_of::<T>() > PAGE_SIZE {
            return Err(DsmError::Segment(format!(
                "{name} is aligned to {} bytes, beyond a page ({PAGE_SIZE}): segments are page-aligned",
                align_of::<T>()
            )));
        }
        len.checked_mul(size_of::<T>()).ok_or_else(|| {
            DsmError::Segment(format!("{len} values of {name} overflow the address space"))
        })
    }
}

impl<T> SharedArray<T> {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of the first value, the same on every rank.
    pub fn addr(&self) -> *mut T {
        self.segment.addr().cast()
    }

    /// The segment it lies in (to [`Dsm::seal`] or [`Dsm::sync`] it).
    pub fn segment(&self) -> &Segment {
        &self.segment
    }
}

/// Where in the space an access goes: the values' addresses, checked.
struct Span {
    addr: usize,
    len: usize,
}

impl Span {
    /// `range` of `array` (panics like slice indexing when out of bounds),
    /// checked to lie inside the space `[base, base + size)`.
    fn of<T: Pod>(
        array: &SharedArray<T>,
        range: impl RangeBounds<usize>,
        space: Range<usize>,
    ) -> Span {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => array.len,
        };
        assert!(
            start <= end && end <= array.len,
            "range {start}..{end} out of a shared array of {} values",
            array.len
        );
        let addr = array.segment.addr() as usize + start * size_of::<T>();
        let len = end - start;
        // A handle from a finalized Dsm, or from another process's space,
        // must not reach memory this Dsm does not map.
        assert!(
            addr >= space.start && len * size_of::<T>() <= space.end.saturating_sub(addr),
            "shared array at {addr:#x} ({len} values) outside this Dsm's space {:#x}-{:#x}",
            space.start,
            space.end
        );
        assert!(
            (addr as *const T).is_aligned(),
            "shared array at {addr:#x} misaligned for {}",
            std::any::type_name::<T>()
        );
        Span { addr, len }
    }

    fn bytes<T>(&self) -> Range<usize> {
        self.addr..self.addr + self.len * size_of::<T>()
    }
}

/// Whether two byte ranges share a byte.
fn overlap(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end && !a.is_empty() && !b.is_empty()
}

fn space_of(dsm: &Dsm) -> Range<usize> {
    let base = dsm.base() as usize;
    base..base + dsm.len()
}

/// The stretch of program between two synchronization points, as seen by
/// this process: the only way to read and write [`SharedArray`]s. It holds
/// the [`Dsm`] mutably borrowed; end it (drop it) to use the `Dsm` again,
/// or reach it through [`Epoch::dsm`].
pub struct Epoch<'d> {
    dsm: &'d mut Dsm,
}

impl<'d> Epoch<'d> {
    /// Starts reading and writing arrays through `dsm`. Its own barrier
    /// and locks are [`Epoch::barrier`] and [`Epoch::lock`] from now on.
    pub fn new(dsm: &'d mut Dsm) -> Epoch<'d> {
        Epoch { dsm }
    }

    /// This process's rank.
    pub fn rank(&self) -> Rank {
        self.dsm.rank()
    }

    /// Number of ranks in the job.
    pub fn size(&self) -> usize {
        self.dsm.size()
    }

    /// The values of `range` (`..` for all) to read; as many at a time as
    /// needed. Panics if the range is out of the array.
    pub fn read<T: Pod>(&self, array: &SharedArray<T>, range: impl RangeBounds<usize>) -> &[T] {
        let span = Span::of(array, range, space_of(self.dsm));
        // SAFETY: the span lies in the space the Dsm maps (checked by
        // Span::of), which stays mapped while the Dsm is borrowed (for the
        // slice's life); it is aligned (page-aligned segment, alignment at
        // most a page, whole elements from its start) and initialized (a
        // mapped page of the space always holds bytes), and every bit
        // pattern is a valid T (Pod). No `&mut` to it exists in this
        // process: the space is reached only through the Dsm, borrowed
        // mutably by this epoch, and mutable slices borrow the epoch
        // mutably (split_write's reads are checked against its write).
        // Other ranks' writes land only by page replacement between
        // faults (see the module documentation).
        unsafe { std::slice::from_raw_parts(span.addr as *const T, span.len) }
    }

    /// The values of `range` to write (and read), this rank's alone until
    /// the next synchronization point. Panics if out of the array.
    pub fn write<T: Pod>(
        &mut self,
        array: &SharedArray<T>,
        range: impl RangeBounds<usize>,
    ) -> &mut [T] {
        let span = Span::of(array, range, space_of(self.dsm));
        // SAFETY: as in `read` (mapped, aligned, initialized, any bit
        // pattern valid); the epoch is borrowed mutably for the slice's
        // life, so no other slice of the space exists in this process.
        unsafe { std::slice::from_raw_parts_mut(span.addr as *mut T, span.len) }
    }

    /// The values of `range` to write, and a reader of everything else
    /// (a [`Reads::read`] of memory overlapping `range` panics). Panics if
    /// `range` is out of the array.
    pub fn split_write<T: Pod>(
        &mut self,
        array: &SharedArray<T>,
        range: impl RangeBounds<usize>,
    ) -> (&mut [T], Reads<'_>) {
        let space = space_of(self.dsm);
        let span = Span::of(array, range, space.clone());
        let written = span.bytes::<T>();
        let reads = Reads {
            space: (space.start, space.end),
            written: (written.start, written.end),
            _epoch: PhantomData,
        };
        // SAFETY: as in `write`; the only other slices that can exist
        // while the epoch is borrowed come from `reads`, which refuses any
        // overlapping this span.
        let values = unsafe { std::slice::from_raw_parts_mut(span.addr as *mut T, span.len) };
        (values, reads)
    }

    /// Waits for every rank ([`Dsm::barrier`]). What other ranks wrote
    /// before theirs is read after it.
    pub fn barrier(&mut self) -> Result<(), DsmError> {
        self.dsm.barrier()
    }

    /// Takes distributed lock `id` ([`Dsm::lock`]); the guard reads and
    /// writes arrays like the epoch, and releases the lock when dropped.
    pub fn lock(&mut self, id: u64) -> Result<Locked<'_, 'd>, DsmError> {
        let ticket = self.dsm.lock(id)?.into_ticket();
        Ok(Locked {
            epoch: self,
            id,
            ticket,
        })
    }

    /// The `Dsm` itself (to allocate, seal, read statistics...), while no
    /// slice of this epoch lives.
    pub fn dsm(&mut self) -> &Dsm {
        self.dsm
    }
}

/// What a [`Epoch::split_write`] leaves readable: every array except the
/// range being written.
#[derive(Clone, Copy)]
pub struct Reads<'e> {
    /// The space's bytes, start and end (a `Range` is not `Copy`).
    space: (usize, usize),
    /// Bytes of the written range, start and end.
    written: (usize, usize),
    _epoch: PhantomData<&'e ()>,
}

impl<'e> Reads<'e> {
    /// The values of `range` (`..` for all) to read. Panics if the range
    /// is out of the array, or overlaps the range being written.
    pub fn read<T: Pod>(&self, array: &SharedArray<T>, range: impl RangeBounds<usize>) -> &'e [T] {
        let span = Span::of(array, range, self.space.0..self.space.1);
        let (bytes, written) = (span.bytes::<T>(), self.written.0..self.written.1);
        assert!(
            !overlap(&bytes, &written),
            "reading {:#x}-{:#x}, which overlaps {:#x}-{:#x} being written",
            bytes.start,
            bytes.end,
            written.start,
            written.end
        );
        // SAFETY: as in `Epoch::read`; the epoch stays mutably borrowed
        // for 'e, and the only mutable slice of it (split_write's) does not
        // overlap this one (checked above).
        unsafe { std::slice::from_raw_parts(span.addr as *const T, span.len) }
    }
}

/// A distributed lock held within an [`Epoch`]: reads and writes arrays
/// as the epoch does (it dereferences to it). Dropping it, or
/// [`Locked::unlock`], releases the lock, after every slice taken from it
/// has ended.
pub struct Locked<'e, 'd> {
    epoch: &'e mut Epoch<'d>,
    id: u64,
    ticket: u64,
}

impl Locked<'_, '_> {
    /// The lock's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Releases the lock, reporting a stopped engine.
    pub fn unlock(self) -> Result<(), DsmError> {
        let this = ManuallyDrop::new(self);
        this.epoch.dsm.unlock_ticket(this.id, this.ticket)
    }
}

impl<'d> Deref for Locked<'_, 'd> {
    type Target = Epoch<'d>;

    fn deref(&self) -> &Epoch<'d> {
        self.epoch
    }
}

impl<'d> DerefMut for Locked<'_, 'd> {
    fn deref_mut(&mut self) -> &mut Epoch<'d> {
        self.epoch
    }
}

impl Drop for Locked<'_, '_> {
    fn drop(&mut self) {
        let _ = self.epoch.dsm.unlock_ticket(self.id, self.ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::SegmentInfo;

    fn segment(first_page: u64, len: usize) -> Segment {
        Segment {
            info: SegmentInfo {
                id: 1,
                first_page,
                pages: len.div_ceil(PAGE_SIZE) as u64,
                kind: 0,
                rank: 0,
                release: false,
            },
            base: 0x1000_0000,
            len,
        }
    }

    #[test]
    fn arrays_hold_whole_values_and_refuse_what_cannot_be() {
        let seg = segment(2, 100);
        let a = SharedArray::<f64>::from_segment(&seg).unwrap();
        assert_eq!((a.len(), a.addr() as usize), (12, 0x1000_2000));
        assert!(SharedArray::<()>::from_segment(&seg).is_err());
        #[derive(Clone, Copy, Zeroable, Pod)]
        #[repr(C, align(8192))]
        struct Huge([[u8; 4096]; 2]);
        assert!(SharedArray::<Huge>::from_segment(&seg).is_err());
        assert!(SharedArray::<u64>::bytes(usize::MAX / 4).is_err());
    }

    #[test]
    fn spans_are_checked_against_the_array_and_the_space() {
        let a = SharedArray::<u32>::from_segment(&segment(1, 64)).unwrap();
        let space = 0x1000_0000..0x1000_4000;
        let s = Span::of(&a, 2..5, space.clone());
        assert_eq!((s.addr, s.len), (0x1000_1008, 3));
        assert_eq!(s.bytes::<u32>(), 0x1000_1008..0x1000_1014);
        assert_eq!(Span::of(&a, .., space.clone()).len, 16);
        assert_eq!(Span::of(&a, 3..=3, space.clone()).len, 1);
        let out_of_array = std::panic::catch_unwind(|| Span::of(&a, 10..17, 0..usize::MAX));
        assert!(out_of_array.is_err());
        let beyond_space = std::panic::catch_unwind(|| Span::of(&a, .., 0x1000_0000..0x1000_1010));
        assert!(beyond_space.is_err());
    }

    #[test]
    fn only_shared_bytes_overlap() {
        assert!(overlap(&(8..16), &(15..20)) && overlap(&(15..20), &(8..16)));
        assert!(overlap(&(8..16), &(10..11)) && overlap(&(10..11), &(8..16)));
        assert!(!overlap(&(8..16), &(16..20)) && !overlap(&(16..20), &(8..16)));
        assert!(!overlap(&(8..16), &(12..12)) && !overlap(&(12..12), &(8..16)));
    }

    #[test]
    fn reads_refuse_the_written_bytes() {
        let a = SharedArray::<u64>::from_segment(&segment(1, 80)).unwrap();
        let b = SharedArray::<u8>::from_segment(&segment(1, 80)).unwrap();
        let reads = Reads {
            space: (0x1000_0000, 0x1000_4000),
            written: (0x1000_1010, 0x1000_1020), // a[2..4]
            _epoch: PhantomData,
        };
        // Refused before any slice is made (nothing is mapped here).
        assert!(std::panic::catch_unwind(|| reads.read(&a, 3..5).len()).is_err());
        assert!(std::panic::catch_unwind(|| reads.read(&b, 31..33).len()).is_err());
        assert!(std::panic::catch_unwind(|| reads.read(&b, 16..17).len()).is_err());
    }
}

//! Application kernels on the shared space, each checked against a serial
//! run of the same code (on rank 0, after the parallel run). Jacobi and
//! matmul work on plain `f64` slices through the typed API
//! (`SharedArray`, `Epoch`); the histogram's counters are atomics.
//!
//! * `kernels jacobi [N [ITERATIONS]]` (default 2048, 50): 2-D Jacobi
//!   relaxation on N x N doubles, rows split across ranks (each rank's rows
//!   in a segment localized at it), one barrier per iteration; the
//!   checksum must equal the serial one bit for bit.
//! * `kernels matmul [N]` (default 256): C = A x B; A and B are written by
//!   rank 0 in replicated segments and sealed, each rank computes its rows of
//!   C; every element must equal the serial product bit for bit.
//! * `kernels histogram [VALUES]` (default 200000 per rank): every rank
//!   adds its values into 256 shared buckets with atomic `fetch_add`; the
//!   buckets must equal the serial histogram of all ranks' values. The
//!   buckets are a sequentially consistent segment whatever `DSM_PROTOCOL`
//!   says (atomics need one writer at a time).
//!
//! * `kernels falseshare [INCREMENTS [COUNTERS]]` (default 100000, 512):
//!   every rank increments its own COUNTERS 8-byte counters, INCREMENTS
//!   times in all, in one shared array where all ranks' counters
//!   interleave (counter i of rank r at index i x ranks + r, so every page
//!   holds every rank's counters), with a barrier every 10 000 increments;
//!   every counter must hold its exact count. False sharing: under the
//!   default protocol the pages move at every turn, under
//!   `DSM_PROTOCOL=release` each rank writes its copy and the words it
//!   changed reach the homes at the barriers.
//!
//! Each prints the parallel time beside the serial time of the same code
//! (Jacobi also the time rank 0 took to initialize its rows: their first
//! touch).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use dsm::{Consistency, Dsm, Epoch, Placement, SharedArray};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() {
    if let Err(e) = run() {
        eprintln!("{}: {e}", env!("CARGO_BIN_NAME"));
        std::process::exit(1);
    }
}

fn arg(args: &[String], i: usize, default: usize) -> Result<usize> {
    Ok(args
        .get(i)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(default))
}

/// Rows `[first, end)` of `n` for `rank` of `size`.
fn rows_of(rank: usize, size: usize, n: usize) -> (usize, usize) {
    (rank * n / size, (rank + 1) * n / size)
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut dsm = dsm::init_from_env()?;
    let line = match args.first().map(String::as_str).unwrap_or("jacobi") {
        "jacobi" => jacobi(&mut dsm, arg(&args, 1, 2048)?, arg(&args, 2, 50)?)?,
        "matmul" => matmul(&mut dsm, arg(&args, 1, 256)?)?,
        "histogram" => histogram(&dsm, arg(&args, 1, 200_000)?)?,
        "falseshare" => falseshare(&mut dsm, arg(&args, 1, 100_000)?, arg(&args, 2, 512)?)?,
        other => return Err(format!("unknown kernel {other}").into()),
    };
    let rank = dsm.rank();
    dsm.finalize()?;
    if let Some(line) = line {
        println!("rank {rank}: {line}");
    }
    Ok(())
}

fn initial(i: usize, j: usize, n: usize) -> f64 {
    if i == 0 || j == 0 || i == n - 1 || j == n - 1 {
        ((i * 31 + j * 17) % 100) as f64 // fixed boundary
    } else {
        0.0
    }
}

/// One Jacobi sweep of rows `[first, end)` from the rows of `src` into
/// `dst`, which holds rows `first..end` (each row `n` values). The parallel
/// run (rows in the shared space) and the serial run (rows in private
/// memory) run this same code on the same element type.
fn sweep<'a>(
    src: impl Fn(usize) -> &'a [f64],
    dst: &mut [f64],
    n: usize,
    first: usize,
    end: usize,
) {
    for i in first.max(1)..end.min(n - 1) {
        relax_row(
            &src(i - 1)[..n],
            &src(i)[..n],
            &src(i + 1)[..n],
            &mut dst[(i - first) * n..][..n],
        );
    }
}

/// One row of a sweep: `out[j]` from its four neighbours. Never inlined,
/// so that the parallel and the serial run execute the very same machine
/// code: inlined into each caller, the two copies were compiled
/// differently (one kept two bounds checks in the loop) and the shared-space
/// one ran up to 1.4x slower on the same memory.
#[inline(never)]
fn relax_row(up: &[f64], mid: &[f64], down: &[f64], out: &mut [f64]) {
    if mid.len() < 3 {
        return; // no inner point
    }
    let inner = 1..mid.len() - 1;
    // Zipped slices: no bounds check in the loop.
    let neighbours = up[inner.clone()]
        .iter()
        .zip(&down[inner.clone()])
        .zip(mid.iter().zip(&mid[2..]));
    for (o, ((u, d), (left, right))) in out[inner].iter_mut().zip(neighbours) {
        *o = 0.25 * (u + d + left + right);
    }
}

fn checksum(value: impl Fn(usize, usize) -> f64, n: usize) -> f64 {
    (0..n)
        .map(|i| (0..n).map(|j| value(i, j)).sum::<f64>())
        .sum()
}

fn jacobi(dsm: &mut Dsm, n: usize, iterations: usize) -> Result<Option<String>> {
    let (rank, size) = (dsm.rank(), dsm.size());
    // Every rank's rows of each grid are an array localized at it,
    // allocated collectively (every rank gets every rank's handles).
    let mut grids: [Vec<SharedArray<f64>>; 2] = Default::default();
    for grid in &mut grids {
        for r in 0..size {
            let (first, end) = rows_of(r, size, n);
            let rows = (end - first).max(1);
            grid.push(SharedArray::coalloc(
                dsm,
                rows * n,
                Placement::Localized(r),
            )?);
        }
    }
    let (first, end) = rows_of(rank, size, n);
    // Row i: its rank's array and the index of its first value there.
    let row_at: Vec<(usize, usize)> = (0..n)
        .map(|i| {
            let r = (0..size).find(|r| i < rows_of(*r, size, n).1).unwrap_or(0);
            (r, (i - rows_of(r, size, n).0) * n)
        })
        .collect();
    let mut epoch = Epoch::new(dsm);
    // This rank's first touch of its rows (pages homed here, never touched).
    let touch = Instant::now();
    for grid in &grids {
        let mine = epoch.write(&grid[rank], ..(end - first) * n);
        for (k, value) in mine.iter_mut().enumerate() {
            *value = initial(first + k / n, k % n, n);
        }
    }
    let first_touch = touch.elapsed();
    epoch.barrier()?;
    let start = Instant::now();
    let mut waiting = std::time::Duration::ZERO;
    for it in 0..iterations {
        let (from, to) = (it % 2, 1 - it % 2);
        {
            let (mine, reads) = epoch.split_write(&grids[to][rank], ..(end - first) * n);
            let src: Vec<&[f64]> = grids[from].iter().map(|a| reads.read(a, ..)).collect();
            sweep(|i| &src[row_at[i].0][row_at[i].1..], mine, n, first, end);
        }
        let arrived = Instant::now();
        epoch.barrier()?;
        waiting += arrived.elapsed();
    }
    let parallel = start.elapsed();
    if rank != 0 {
        return Ok(None);
    }
    let result: Vec<&[f64]> = grids[iterations % 2]
        .iter()
        .map(|a| epoch.read(a, ..))
        .collect();
    let sum = checksum(|i, j| result[row_at[i].0][row_at[i].1 + j], n);

    // The same code, serially, in private memory (initialized, like the
    // shared grids, before the clock starts).
    let mut grids = [0, 1].map(|_| {
        (0..n * n)
            .map(|k| initial(k / n, k % n, n))
            .collect::<Vec<f64>>()
    });
    let start = Instant::now();
    for it in 0..iterations {
        let [g0, g1] = &mut grids;
        let (src, dst) = if it % 2 == 0 { (g0, g1) } else { (g1, g0) };
        sweep(|i| &src[i * n..], dst, n, 0, n);
    }
    let serial = start.elapsed();
    let expected = checksum(|i, j| grids[iterations % 2][i * n + j], n);
    if sum.to_bits() != expected.to_bits() {
        return Err(format!("jacobi checksum {sum} differs from the serial {expected}").into());
    }
    Ok(Some(format!(
        "jacobi {n}x{n}, {iterations} iterations, {size} ranks: checksum {sum:.6} equals the serial run; parallel {:.3} s (rank 0 waited {:.3} s in barriers), serial {:.3} s; rank 0's first touch of its rows {:.1} ms",
        parallel.as_secs_f64(),
        waiting.as_secs_f64(),
        serial.as_secs_f64(),
        first_touch.as_secs_f64() * 1e3
    )))
}

fn matrix(seed: u64, i: usize, j: usize) -> f64 {
    ((i as u64 * 131 + j as u64 * 7 + seed) % 19) as f64 - 9.0
}

fn matmul(dsm: &mut Dsm, n: usize) -> Result<Option<String>> {
    let (rank, size) = (dsm.rank(), dsm.size());
    // Collective: rank 0 is the creator of the replicated A and B.
    let a = SharedArray::<f64>::coalloc(dsm, n * n, Placement::Replicated)?;
    let b = SharedArray::<f64>::coalloc(dsm, n * n, Placement::Replicated)?;
    let c = SharedArray::<f64>::coalloc(dsm, n * n, Placement::Distributed)?;
    let mut epoch = Epoch::new(dsm);
    if rank == 0 {
        for (m, seed) in [(&a, 1), (&b, 2)] {
            for (k, value) in epoch.write(m, ..).iter_mut().enumerate() {
                *value = matrix(seed, k / n, k % n);
            }
            epoch.dsm().seal(m.segment())?;
        }
    }
    epoch.barrier()?;
    let (first, end) = rows_of(rank, size, n);
    let start = Instant::now();
    {
        let (rows, reads) = epoch.split_write(&c, first * n..end * n);
        let (a, b) = (reads.read(&a, ..), reads.read(&b, ..));
        for i in first..end {
            for j in 0..n {
                let mut acc = 0.0;
                for k in 0..n {
                    acc += a[i * n + k] * b[k * n + j];
                }
                rows[(i - first) * n + j] = acc;
            }
        }
    }
    epoch.barrier()?;
    let parallel = start.elapsed();
    if rank != 0 {
        return Ok(None);
    }
    let start = Instant::now();
    let (sa, sb): (Vec<f64>, Vec<f64>) = (
        (0..n * n).map(|k| matrix(1, k / n, k % n)).collect(),
        (0..n * n).map(|k| matrix(2, k / n, k % n)).collect(),
    );
    let mut sc = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            let mut acc = 0.0;
            for k in 0..n {
                acc += sa[i * n + k] * sb[k * n + j];
            }
            sc[i * n + j] = acc;
        }
    }
    let serial = start.elapsed();
    for (k, (got, expected)) in epoch.read(&c, ..).iter().zip(&sc).enumerate() {
        if got.to_bits() != expected.to_bits() {
            return Err(format!("C[{}][{}] = {got}, serial {expected}", k / n, k % n).into());
        }
    }
    Ok(Some(format!(
        "matmul {n}x{n}, {size} ranks: every element equals the serial product; parallel {:.3} s, serial {:.3} s",
        parallel.as_secs_f64(),
        serial.as_secs_f64()
    )))
}

fn value_stream(rank: usize) -> impl Iterator<Item = u64> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (rank as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    std::iter::repeat_with(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    })
}

fn histogram(dsm: &Dsm, values: usize) -> Result<Option<String>> {
    const BUCKETS: usize = 256;
    let (rank, size) = (dsm.rank(), dsm.size());
    let raw = dsm.words();
    if rank == 0 {
        // Atomic read-modify-writes by several ranks need a single writer
        // at a time: sequentially consistent, also under DSM_PROTOCOL=release.
        let seg = dsm.alloc_with(BUCKETS * 8, Placement::Distributed, Consistency::Sequential)?;
        raw[90].store(seg.addr() as u64, Relaxed);
    }
    dsm.barrier()?;
    let buckets = (raw[90].load(Relaxed) as usize - dsm.base() as usize) / 8;
    let bucket = |k: usize| &raw[buckets + k];
    let start = Instant::now();
    for v in value_stream(rank).take(values) {
        bucket((v % BUCKETS as u64) as usize).fetch_add(1, Relaxed);
    }
    dsm.barrier()?;
    let parallel = start.elapsed();
    if rank != 0 {
        return Ok(None);
    }
    let start = Instant::now();
    let mut expected = [0u64; BUCKETS];
    for r in 0..size {
        for v in value_stream(r).take(values) {
            expected[(v % BUCKETS as u64) as usize] += 1;
        }
    }
    let serial = start.elapsed();
    for (k, want) in expected.iter().enumerate() {
        let got = bucket(k).load(Relaxed);
        if got != *want {
            return Err(format!("bucket {k} = {got}, serial {want}").into());
        }
    }
    Ok(Some(format!(
        "histogram of {} values in {BUCKETS} buckets, {size} ranks: equals the serial histogram; parallel {:.3} s, serial {:.3} s",
        values * size,
        parallel.as_secs_f64(),
        serial.as_secs_f64()
    )))
}

fn falseshare(dsm: &mut Dsm, increments: usize, counters: usize) -> Result<Option<String>> {
    const BARRIER_EVERY: usize = 10_000;
    if counters == 0 {
        return Err("falseshare needs at least one counter per rank".into());
    }
    let (rank, size) = (dsm.rank(), dsm.size());
    let array = SharedArray::<u64>::coalloc(dsm, counters * size, Placement::Distributed)?;
    let mut epoch = Epoch::new(dsm);
    epoch.barrier()?;
    let start = Instant::now();
    for k in 0..increments {
        let i = (k % counters) * size + rank;
        epoch.write(&array, i..i + 1)[0] += 1;
        if (k + 1) % BARRIER_EVERY == 0 {
            epoch.barrier()?;
        }
    }
    epoch.barrier()?;
    let parallel = start.elapsed();
    if rank != 0 {
        return Ok(None);
    }
    for (index, got) in epoch.read(&array, ..).iter().enumerate() {
        let counter = index / size;
        let want = (increments / counters + usize::from(counter < increments % counters)) as u64;
        if *got != want {
            return Err(format!(
                "counter {counter} of rank {} = {got}, expected {want}",
                index % size
            )
            .into());
        }
    }
    let pages = (counters * size * 8).div_ceil(dsm::PAGE_SIZE);
    Ok(Some(format!(
        "falseshare: {size} ranks x {increments} increments of their own {counters} counters, interleaved in {pages} pages, a barrier every {BARRIER_EVERY}: every counter exact; parallel {:.3} s ({:.0} increments/s per rank)",
        parallel.as_secs_f64(),
        increments as f64 / parallel.as_secs_f64()
    )))
}

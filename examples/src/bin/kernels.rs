//! Application kernels on the shared space, each checked against a serial
//! run of the same code (on rank 0, after the parallel run):
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
//!   buckets must equal the serial histogram of all ranks' values.
//!
//! Each prints the parallel time beside the serial time of the same code.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use dsm::{Dsm, Placement};

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
    let dsm = dsm::init_from_env()?;
    let line = match args.first().map(String::as_str).unwrap_or("jacobi") {
        "jacobi" => jacobi(&dsm, arg(&args, 1, 2048)?, arg(&args, 2, 50)?)?,
        "matmul" => matmul(&dsm, arg(&args, 1, 256)?)?,
        "histogram" => histogram(&dsm, arg(&args, 1, 200_000)?)?,
        other => return Err(format!("unknown kernel {other}").into()),
    };
    let rank = dsm.rank();
    dsm.finalize()?;
    if let Some(line) = line {
        println!("rank {rank}: {line}");
    }
    Ok(())
}

/// A view of f64 values stored in shared atomics.
fn get(w: &AtomicU64) -> f64 {
    f64::from_bits(w.load(Relaxed))
}

fn set(w: &AtomicU64, v: f64) {
    w.store(v.to_bits(), Relaxed)
}

fn initial(i: usize, j: usize, n: usize) -> f64 {
    if i == 0 || j == 0 || i == n - 1 || j == n - 1 {
        ((i * 31 + j * 17) % 100) as f64 // fixed boundary
    } else {
        0.0
    }
}

/// One Jacobi sweep of rows `[first, end)` from the rows of `src` into
/// the rows of `dst` (each row `n` values). The parallel run (rows in the
/// shared space) and the serial run (rows in private memory) run this same
/// code on the same element type.
fn sweep<'a>(
    src: impl Fn(usize) -> &'a [AtomicU64],
    dst: impl Fn(usize) -> &'a [AtomicU64],
    n: usize,
    first: usize,
    end: usize,
) {
    for i in first.max(1)..end.min(n - 1) {
        relax_row(
            &src(i - 1)[..n],
            &src(i)[..n],
            &src(i + 1)[..n],
            &dst(i)[..n],
        );
    }
}

/// One row of a sweep: `out[j]` from its four neighbours. Never inlined,
/// so that the parallel and the serial run execute the very same machine
/// code: inlined into each caller, the two copies were compiled
/// differently (one kept two bounds checks in the loop) and the shared-space
/// one ran up to 1.4x slower on the same memory.
#[inline(never)]
fn relax_row(up: &[AtomicU64], mid: &[AtomicU64], down: &[AtomicU64], out: &[AtomicU64]) {
    if mid.len() < 3 {
        return; // no inner point
    }
    let inner = 1..mid.len() - 1;
    // Zipped slices: no bounds check in the loop.
    let neighbours = up[inner.clone()]
        .iter()
        .zip(&down[inner.clone()])
        .zip(mid.iter().zip(&mid[2..]));
    for (o, ((u, d), (left, right))) in out[inner].iter().zip(neighbours) {
        set(o, 0.25 * (get(u) + get(d) + get(left) + get(right)));
    }
}

fn checksum(value: impl Fn(usize, usize) -> f64, n: usize) -> f64 {
    (0..n)
        .map(|i| (0..n).map(|j| value(i, j)).sum::<f64>())
        .sum()
}

fn jacobi(dsm: &Dsm, n: usize, iterations: usize) -> Result<Option<String>> {
    let (rank, size) = (dsm.rank(), dsm.size());
    // Each rank allocates its rows of both grids, at itself, and publishes
    // the addresses at raw words 64 + 2 * rank (+1).
    let (first, end) = rows_of(rank, size, n);
    let rows = end - first;
    let a = dsm.alloc(rows.max(1) * n * 8, Placement::Localized(rank))?;
    let b = dsm.alloc(rows.max(1) * n * 8, Placement::Localized(rank))?;
    let raw = dsm.words();
    raw[64 + 2 * rank].store(a.addr() as u64, Relaxed);
    raw[65 + 2 * rank].store(b.addr() as u64, Relaxed);
    dsm.barrier()?;
    let base = dsm.base() as usize;
    let blocks: Vec<[usize; 2]> = (0..size)
        .map(|r| [0, 1].map(|g| (raw[64 + 2 * r + g].load(Relaxed) as usize - base) / 8))
        .collect();
    // Word index of the start of row i of each grid.
    let row_start: Vec<[usize; 2]> = (0..n)
        .map(|i| {
            let r = (0..size).find(|r| i < rows_of(*r, size, n).1).unwrap_or(0);
            blocks[r].map(|block| block + (i - rows_of(r, size, n).0) * n)
        })
        .collect();
    let row = |grid: usize, i: usize| -> &[AtomicU64] { &raw[row_start[i][grid]..][..n] };
    let cell = |grid: usize, i: usize, j: usize| -> &AtomicU64 { &row(grid, i)[j] };
    for i in first..end {
        for j in 0..n {
            set(cell(0, i, j), initial(i, j, n));
            set(cell(1, i, j), initial(i, j, n));
        }
    }
    dsm.barrier()?;
    let start = Instant::now();
    let mut waiting = std::time::Duration::ZERO;
    for it in 0..iterations {
        let (from, to) = (it % 2, 1 - it % 2);
        sweep(|i| row(from, i), |i| row(to, i), n, first, end);
        let arrived = Instant::now();
        dsm.barrier()?;
        waiting += arrived.elapsed();
    }
    let parallel = start.elapsed();
    if rank != 0 {
        return Ok(None);
    }
    let result = iterations % 2;
    let sum = checksum(|i, j| get(cell(result, i, j)), n);

    // The same code, serially, in private memory (initialized, like the
    // shared grids, before the clock starts).
    let grids = [0, 1].map(|_| {
        (0..n * n)
            .map(|k| AtomicU64::new(initial(k / n, k % n, n).to_bits()))
            .collect::<Vec<AtomicU64>>()
    });
    let private_row = |grid: usize, i: usize| -> &[AtomicU64] { &grids[grid][i * n..][..n] };
    let start = Instant::now();
    for it in 0..iterations {
        let (from, to) = (it % 2, 1 - it % 2);
        sweep(|i| private_row(from, i), |i| private_row(to, i), n, 0, n);
    }
    let serial = start.elapsed();
    let expected = checksum(|i, j| get(&private_row(result, i)[j]), n);
    if sum.to_bits() != expected.to_bits() {
        return Err(format!("jacobi checksum {sum} differs from the serial {expected}").into());
    }
    Ok(Some(format!(
        "jacobi {n}x{n}, {iterations} iterations, {size} ranks: checksum {sum:.6} equals the serial run; parallel {:.3} s (rank 0 waited {:.3} s in barriers), serial {:.3} s",
        parallel.as_secs_f64(),
        waiting.as_secs_f64(),
        serial.as_secs_f64()
    )))
}

fn matrix(seed: u64, i: usize, j: usize) -> f64 {
    ((i as u64 * 131 + j as u64 * 7 + seed) % 19) as f64 - 9.0
}

fn matmul(dsm: &Dsm, n: usize) -> Result<Option<String>> {
    let (rank, size) = (dsm.rank(), dsm.size());
    let raw = dsm.words();
    if rank == 0 {
        let a = dsm.alloc(n * n * 8, Placement::Replicated)?;
        let b = dsm.alloc(n * n * 8, Placement::Replicated)?;
        let c = dsm.alloc(n * n * 8, Placement::Distributed)?;
        for (seg, seed) in [(&a, 1), (&b, 2)] {
            let w = dsm.segment_words(seg);
            for i in 0..n {
                for j in 0..n {
                    set(&w[i * n + j], matrix(seed, i, j));
                }
            }
            dsm.seal(seg)?;
        }
        for (k, seg) in [a, b, c].iter().enumerate() {
            raw[80 + k].store(seg.addr() as u64, Relaxed);
        }
    }
    dsm.barrier()?;
    let base = dsm.base() as usize;
    let [a, b, c] = [0, 1, 2].map(|k| (raw[80 + k].load(Relaxed) as usize - base) / 8);
    let (first, end) = rows_of(rank, size, n);
    let start = Instant::now();
    for i in first..end {
        for j in 0..n {
            let mut acc = 0.0;
            for k in 0..n {
                acc += get(&raw[a + i * n + k]) * get(&raw[b + k * n + j]);
            }
            set(&raw[c + i * n + j], acc);
        }
    }
    dsm.barrier()?;
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
    for (k, expected) in sc.iter().enumerate() {
        let got = get(&raw[c + k]);
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
        let seg = dsm.alloc(BUCKETS * 8, Placement::Distributed)?;
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

#!/usr/bin/env bash
# The Jacobi kernel through the DSM beside plain MPI (issue 27): the same
# C kernel (bench/c/jacobi.h) on MPI (halo rows by MPI_Sendrecv) and on
# dsm.h (rows in segments localized at their ranks, a barrier per sweep),
# plus the Rust kernel `kernels jacobi`, alternated, same sizes, same
# checksum. See bench/README.md, "Jacobi against MPI".
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bench/jacobi-vs-mpi.sh [OPTIONS] [N [SWEEPS]]

Runs Jacobi on an N x N grid of doubles (default 2048), SWEEPS sweeps
(default 50), on RANKS local processes, ROUNDS times in turn:
  mpi    mpirun -np RANKS --mca btl self,vader jacobi_mpi N SWEEPS
  dsm-c  dsmexec -n RANKS --bind-to core jacobi_dsm N SWEEPS
  rust   dsmexec -n RANKS --bind-to core kernels jacobi N SWEEPS
(--bind-to core where RANKS <= the CPUs, as mpirun binds ranks to cores
then; with more ranks neither is bound)
then the median time of each and the medians of the per-round ratios
dsm-c/mpi, rust/dsm-c and rust/mpi. Fails (exit 1) if a run fails or if
the checksums differ: MPI and DSM C bit for bit (%.17g), Rust (which prints
6 decimals) to its 6 decimals.

Options:
  --ranks P         processes per job (default 2)
  --rounds K        alternated rounds (default 3)
  --bin-dir DIR     use dsmexec, kernels and libdsm.so already built in DIR
                    (default: cargo build --release, then the release dir)
  --no-rust         leave out the Rust kernel
  --skip-missing    exit 0, not 2, when mpicc/mpirun (or mpi.h) are missing
  -h, --help        this text

Environment: DSM_SPACE_SIZE defaults to what the grids need; other DSM_*
variables reach the DSM ranks. Exit status: 0 done, 1 a run failed or the
checksums differ, 2 bad arguments or a missing tool.
EOF
}

ranks=2 rounds=3 bin_dir= rust=1 skip_missing=0
positional=()
while (($#)); do
  case "$1" in
  --ranks) ranks="${2:?--ranks needs a value}"; shift 2 ;;
  --rounds) rounds="${2:?--rounds needs a value}"; shift 2 ;;
  --bin-dir) bin_dir="${2:?--bin-dir needs a value}"; shift 2 ;;
  --no-rust) rust=0; shift ;;
  --skip-missing) skip_missing=1; shift ;;
  -h | --help) usage; exit 0 ;;
  -*) echo "jacobi-vs-mpi: unknown option $1 (see --help)" >&2; exit 2 ;;
  *) positional+=("$1"); shift ;;
  esac
done
n="${positional[0]:-2048}"
sweeps="${positional[1]:-50}"
if ((${#positional[@]} > 2)); then
  echo "jacobi-vs-mpi: too many arguments (see --help)" >&2
  exit 2
fi
for v in "$n" "$sweeps" "$ranks" "$rounds"; do
  if ! [[ "$v" =~ ^[0-9]+$ ]] || ((v < 1)); then
    echo "jacobi-vs-mpi: not a positive count: $v (see --help)" >&2
    exit 2
  fi
done
if ((n < ranks)); then
  echo "jacobi-vs-mpi: N ($n) must be at least the number of ranks ($ranks)" >&2
  exit 2
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/jacobi-vs-mpi.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT

missing() {
  if ((skip_missing)); then
    echo "SKIPPED: jacobi-vs-mpi: $1"
    exit 0
  fi
  echo "jacobi-vs-mpi: $1 (--skip-missing to skip instead)" >&2
  exit 2
}
for tool in mpicc mpirun gcc; do
  command -v "$tool" >/dev/null || missing "$tool is not installed (Debian: apt-get install openmpi-bin libopenmpi-dev gcc)"
done

# Both C programs with the same compiler flags; no fused multiply-add, so
# that the sums are the ones the Rust kernel computes.
cflags=(-O3 -ffp-contract=off -Wall -Wextra -I "$root/bench/c")
if ! mpicc "${cflags[@]}" "$root/bench/c/jacobi_mpi.c" -o "$scratch/jacobi_mpi" 2>"$scratch/mpicc.err"; then
  if grep -q 'mpi\.h' "$scratch/mpicc.err"; then
    missing "mpicc cannot find mpi.h (Debian: apt-get install libopenmpi-dev)"
  fi
  cat "$scratch/mpicc.err" >&2
  echo "jacobi-vs-mpi: compiling jacobi_mpi.c failed" >&2
  exit 1
fi

if [[ -z "$bin_dir" ]]; then
  (cd "$root" && cargo build --release --quiet -p dsm -p dsm-launcher -p dsm-examples)
  target="$(cd "$root" && cargo metadata --format-version 1 --no-deps |
    grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)"
  bin_dir="$target/release"
fi
bin_dir="$(cd "$bin_dir" && pwd)"
for f in dsmexec libdsm.so; do
  [[ -e "$bin_dir/$f" ]] || { echo "jacobi-vs-mpi: $bin_dir/$f is missing" >&2; exit 2; }
done
if ((rust)) && [[ ! -e "$bin_dir/kernels" ]]; then
  echo "jacobi-vs-mpi: $bin_dir/kernels is missing (or --no-rust)" >&2
  exit 2
fi
gcc "${cflags[@]}" -I "$root/include" "$root/bench/c/jacobi_dsm.c" \
  -L "$bin_dir" -ldsm -Wl,-rpath,"$bin_dir" -o "$scratch/jacobi_dsm"

# The shared heap is half the space; the grids take 16 N^2 bytes, and each
# rank's block of each grid is rounded up to whole pages.
if [[ -z "${DSM_SPACE_SIZE:-}" ]]; then
  export DSM_SPACE_SIZE="$(((2 * 16 * n * n + 64 * ranks * 4096) / 1048576 + 64))M"
fi

mpirun_args=(-np "$ranks" --oversubscribe --mca btl self,vader)
# mpirun binds each rank to a core when they fit: the DSM ranks too.
dsmexec_args=(-n "$ranks")
if ((ranks <= $(nproc))); then
  dsmexec_args+=(--bind-to core)
fi
if ((EUID == 0)); then
  mpirun_args+=(--allow-run-as-root) # Open MPI refuses root without it
fi
# A Slurm allocation around the script would make mpirun use it.
unset "${!SLURM_@}" 2>/dev/null || true

run_limit=600
# run NAME COMMAND...: runs one job into $scratch/NAME.out; fails loudly.
run() {
  local name="$1"
  shift
  if ! timeout -k 10 "$run_limit" "$@" >"$scratch/$name.out" 2>&1; then
    cat "$scratch/$name.out" >&2
    echo "jacobi-vs-mpi: FAILED: $name: $*" >&2
    exit 1
  fi
}
# field FILE NAME: the value of NAME=... on the jacobi line of FILE.
field() {
  { grep -o "jacobi n=.*" "$1" || true; } | head -n1 | tr ' ' '\n' | sed -n "s/^$2=//p"
}
mismatch() {
  echo "jacobi-vs-mpi: CHECKSUMS DIFFER: $1" >&2
  exit 1
}

echo "jacobi ${n}x${n}, $sweeps sweeps, $ranks ranks, $rounds rounds; DSM_SPACE_SIZE=$DSM_SPACE_SIZE; dsmexec ${dsmexec_args[*]}; binaries from $bin_dir"
mpi_t=() dsm_t=() rust_t=() checksum=
for ((round = 1; round <= rounds; round++)); do
  run mpi mpirun "${mpirun_args[@]}" "$scratch/jacobi_mpi" "$n" "$sweeps"
  run dsm "$bin_dir/dsmexec" "${dsmexec_args[@]}" "$scratch/jacobi_dsm" "$n" "$sweeps"
  echo "round $round mpi:   $(grep -o 'jacobi n=.*' "$scratch/mpi.out")"
  echo "round $round dsm-c: $(grep -o 'jacobi n=.*' "$scratch/dsm.out")"
  mpi_sum="$(field "$scratch/mpi.out" checksum)"
  dsm_sum="$(field "$scratch/dsm.out" checksum)"
  [[ -n "$mpi_sum" ]] || mismatch "no checksum from MPI: $(cat "$scratch/mpi.out")"
  [[ "$mpi_sum" == "$dsm_sum" ]] || mismatch "MPI $mpi_sum, DSM C $dsm_sum"
  [[ -z "$checksum" || "$checksum" == "$mpi_sum" ]] || mismatch "round $round $mpi_sum, before $checksum"
  checksum="$mpi_sum"
  mpi_t+=("$(field "$scratch/mpi.out" seconds)")
  dsm_t+=("$(field "$scratch/dsm.out" seconds)")
  if ((rust)); then
    run rust "$bin_dir/dsmexec" "${dsmexec_args[@]}" "$bin_dir/kernels" jacobi "$n" "$sweeps"
    line="$(grep -o 'rank 0: jacobi .*' "$scratch/rust.out")"
    echo "round $round rust:  $line"
    rust_sum="$(sed -n 's/.*checksum \([0-9.eE+-]*\) .*/\1/p' <<<"$line")"
    c_sum6="$(LC_ALL=C printf '%.6f' "$checksum")"
    [[ "$rust_sum" == "$c_sum6" ]] || mismatch "Rust $rust_sum, C $checksum ($c_sum6)"
    rust_t+=("$(sed -n 's/.*parallel \([0-9.]*\) s.*/\1/p' <<<"$line")")
  fi
done

# median VALUES...
median() {
  printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {
    if (NR % 2) print v[(NR + 1) / 2]; else printf "%.6g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# ratios A[] B[]: the per-round ratios A/B.
ratios() {
  local -n a="$1" b="$2"
  for ((i = 0; i < ${#a[@]}; i++)); do
    awk -v x="${a[i]}" -v y="${b[i]}" 'BEGIN { if (y > 0) printf "%.3f\n", x / y; else print "inf" }'
  done
}
echo "checksums equal: $checksum"
summary="median seconds: mpi $(median "${mpi_t[@]}"), dsm-c $(median "${dsm_t[@]}")"
ratio="median ratio dsm-c/mpi $(median $(ratios dsm_t mpi_t))"
if ((rust)); then
  summary+=", rust $(median "${rust_t[@]}")"
  ratio+=", rust/dsm-c $(median $(ratios rust_t dsm_t)), rust/mpi $(median $(ratios rust_t mpi_t))"
fi
echo "$summary"
echo "$ratio"

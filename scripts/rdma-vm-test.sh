#!/usr/bin/env bash
# rdma-vm-test.sh -- build transport-rdma's test binaries on the host and run them
# inside a QEMU VM that has a real soft-RoCE device (rxe0), with
# DSM_TEST_REQUIRE_RDMA=1 so a missing device is a failure, not a skip.
#
#   usage: scripts/rdma-vm-test.sh [--bench]
#     --bench  also run the 4 KiB RDMA READ latency example and, in the same VM
#              session, `ib_read_lat -s 4096` as the baseline
#
# Must run as root (the VM runner installs QEMU and builds a cached image in
# ~/.cache/rxe-vm, see scripts/run-in-rxe-vm.sh). All test binaries run in ONE VM
# boot. Exit status: 0 when every binary passed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BENCH=0
for a in "$@"; do
  case $a in
    --bench) BENCH=1 ;;
    *) echo "usage: $0 [--bench]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "rdma-vm-test: must run as root (QEMU, apt-get)" >&2; exit 2; }

# Build dependencies of rdma-sys (bindgen + rdma-core headers).
need=()
for p in libclang-dev libibverbs-dev librdmacm-dev pkg-config; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "rdma-vm-test: apt-get install ${need[*]}"
  apt-get update >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
fi

t0=$(date +%s)
build_log=$(mktemp)
trap 'rm -f "$build_log"' EXIT
cargo test -p transport-rdma --no-run 2>&1 | tee "$build_log" >&2
mapfile -t bins < <(sed -n 's/^ *Executable .*(\(.*\))$/\1/p' "$build_log")
[ ${#bins[@]} -gt 0 ] || { echo "rdma-vm-test: no test binaries found" >&2; exit 1; }
# cargo prints paths relative to the workspace; the guest runs them from the crate dir.
for i in "${!bins[@]}"; do
  case ${bins[$i]} in /*) ;; *) bins[$i]="$ROOT/${bins[$i]}" ;; esac
done
bench_bin=
if [ "$BENCH" = 1 ]; then
  cargo build --release -p transport-rdma --example read_lat --quiet
  bench_bin="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/read_lat"
fi
t1=$(date +%s)

# The guest script: every test binary (cwd = crate dir, like cargo test), then the
# optional measurement. Runs as root inside the VM, output streamed here.
guest='
rc=0
for b in "$@"; do
  [ "$b" = "--" ] && break
  echo "=== $b"
  (cd "$RDMA_CRATE_DIR" && "$b" --test-threads=1) || rc=1
done
if [ -n "$RDMA_BENCH_BIN" ]; then
  echo "=== 4 KiB RDMA READ latency (same VM session)"
  "$RDMA_BENCH_BIN" 2000 || rc=1
  echo "(completion threads polling 500 us before sleeping: DSM_RDMA_SPIN_US=500)"
  DSM_RDMA_SPIN_US=500 "$RDMA_BENCH_BIN" 2000 || rc=1
  echo "=== baseline: ib_read_lat -x 1 -s 4096 -n 2000"
  timeout 60 ib_read_lat -x 1 -s 4096 -n 2000 >/tmp/srv.log 2>&1 &
  sleep 1
  timeout 60 ib_read_lat -x 1 -s 4096 -n 2000 "$RXE_ADDR" || rc=1
  wait
fi
exit $rc
'
export DSM_TEST_REQUIRE_RDMA=1 RDMA_CRATE_DIR="$ROOT/transport-rdma" RDMA_BENCH_BIN="$bench_bin"
export RXE_ENV="${RXE_ENV:-} DSM_TEST_REQUIRE_RDMA RDMA_CRATE_DIR RDMA_BENCH_BIN"
set +e
RXE_SHARE="${RXE_SHARE:-$ROOT}" "$ROOT/scripts/run-in-rxe-vm.sh" sh -c "$guest" sh "${bins[@]}"
rc=$?
set -e
t2=$(date +%s)
echo "rdma-vm-test: build $((t1 - t0))s, VM run $((t2 - t1))s, status $rc"
exit $rc

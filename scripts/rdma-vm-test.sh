#!/usr/bin/env bash
# rdma-vm-test.sh -- build on the host, then run inside ONE boot of a QEMU VM that has
# a real soft-RoCE device (rxe0):
#   1. transport-rdma's test binaries, with DSM_TEST_REQUIRE_RDMA=1 so a missing
#      device is a failure, not a skip;
#   2. DSM jobs through dsmexec with DSM_TRANSPORT=rdma: the seed example (2 ranks),
#      roundrobin (4 ranks) and contention (4 ranks, 4 threads, 10000 increments),
#      checking exit statuses, the expected lines, and that every rank logged
#      "transport rdma" with pages moving by RDMA WRITE into its landing arena
#      (DSM_LOG=info); contention once more with DSM_RDMA_PAGES=send (pages in
#      SEND messages, the other path). A job that fails only by losing a peer
#      at shutdown over the co-located rings (a known intermittent race of the
#      bootstrap goodbyes, after the final barrier) runs once more, with a
#      WARNING line saying so;
#   3. the fault_latency benchmark (bench/benches/fault_latency.rs) with
#      DSM_TRANSPORT=rdma, once per page path (DSM_RDMA_PAGES=write, then send),
#      the write_fault benchmark (write fault, upgrades) and, with --bench, the
#      localized 2-rank cold scan of the scan benchmark, beside
#      `ib_read_lat`, `ib_send_lat` and `ib_write_bw` (4 KiB) of the same VM run,
#      with a summary of the ratios at the end.
#      Default: a quick smoke run (debug build, ~1 s per figure; its figures are
#      indicative only). --bench: the release build with criterion's full settings,
#      plus transport-rdma's read_lat example and faultlat (the fault an
#      application sees: over the adapter, the same with waits polled
#      (DSM_WAIT_SPIN_US=1000000), and over shared memory, what co-located
#      ranks use by default).
#
#   usage: scripts/rdma-vm-test.sh [--bench]
#
# Binaries come from the host's cargo target dir (CARGO_TARGET_DIR or ./target)
# and run unchanged in the VM (it sees the host's / read-only, the repo read-write).
# Must run as root (the VM runner installs QEMU and builds a cached image in
# ~/.cache/rxe-vm, see scripts/run-in-rxe-vm.sh). Exit status: 0 when everything
# passed; failures are listed at the end.
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
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET in /*) ;; *) TARGET="$ROOT/$TARGET" ;; esac
build_log=$(mktemp)
trap 'rm -f "$build_log"' EXIT
cargo test -p transport-rdma --no-run 2>&1 | tee "$build_log" >&2
mapfile -t bins < <(sed -n 's/^ *Executable .*(\(.*\))$/\1/p' "$build_log")
[ ${#bins[@]} -gt 0 ] || { echo "rdma-vm-test: no test binaries found" >&2; exit 1; }
# cargo prints paths relative to the workspace; the guest runs them from the crate dir.
for i in "${!bins[@]}"; do
  case ${bins[$i]} in /*) ;; *) bins[$i]="$ROOT/${bins[$i]}" ;; esac
done
# dsmexec, dsmwrap and the examples (scripts/test.sh has built them already).
cargo build --workspace --lib --bins --quiet
for b in dsmexec dsmwrap exemple roundrobin contention; do
  [ -x "$TARGET/debug/$b" ] || { echo "rdma-vm-test: $TARGET/debug/$b was not built" >&2; exit 1; }
done
bench_bin=
faultlat_dir=
if [ "$BENCH" = 1 ]; then
  cargo build --release -p transport-rdma --example read_lat --quiet
  bench_bin="$TARGET/release/examples/read_lat"
  # faultlat (examples/src/bin/faultlat.rs): the fault seen by an application.
  cargo build --release -p dsm-launcher -p dsm-examples --quiet
  faultlat_dir="$TARGET/release"
  cargo bench -p dsm-bench --bench fault_latency --bench write_fault --bench scan --no-run 2>&1 | tee "$build_log" >&2
  fault_args="--bench --noplot"
  ib_iters=5000
else
  # Smoke: the dev profile reuses the debug build of the dependencies.
  cargo bench --profile dev -p dsm-bench --bench fault_latency --bench write_fault --no-run 2>&1 | tee "$build_log" >&2
  fault_args="--bench --noplot --warm-up-time 0.3 --measurement-time 1 --sample-size 10"
  ib_iters=1000
fi
# bench_binary NAME: the path of bench NAME's executable in the build log.
bench_binary() {
  local path
  path=$(sed -n "s/^ *Executable benches\/$1\.rs (\(.*\))\$/\1/p" "$build_log" | tail -1)
  case $path in /*) ;; ?*) path="$ROOT/$path" ;; esac
  [ -x "$path" ] || { echo "rdma-vm-test: $1 bench binary not found" >&2; exit 1; }
  echo "$path"
}
fault_bin=$(bench_binary fault_latency)
write_bin=$(bench_binary write_fault)
scan_bin=
[ "$BENCH" = 1 ] && scan_bin=$(bench_binary scan)
t1=$(date +%s)

# The guest script: every test binary (cwd = crate dir, like cargo test), the DSM jobs,
# then the measurements. Runs as root inside the VM, output streamed here.
guest='
failed=
fail() { echo "rdma-vm-test: FAIL: $*"; failed="$failed
  $*"; }
for b in "$@"; do
  [ "$b" = "--" ] && break
  echo "=== $b"
  (cd "$RDMA_CRATE_DIR" && "$b" --test-threads=1) || fail "test binary $b"
done

echo "=== kernel $(uname -r); userfaultfd: $(if [ -e /dev/userfaultfd ]; then echo /dev/userfaultfd present; else echo system call only; fi)"
# dsm_job NAME RANKS ARGS...: one DSM job over RDMA; output kept in /tmp/job-NAME.log
# (/tmp/job-NAME-send.log with PAGES=send: pages in SEND messages). Every pair
# over the adapter (DSM_RDMA_LOCAL=rdma), though the ranks share the VM.
dsm_job() {
  name=$1; n=$2; shift 2
  mode=${PAGES:-write}
  log=/tmp/job-$name.log
  [ "$mode" = write ] || log=/tmp/job-$name-$mode.log
  for attempt in 1 2; do
    echo "=== DSM_TRANSPORT=rdma DSM_RDMA_PAGES=$mode dsmexec -n $n $name $*"
    t=$(date +%s)
    DSM_TRANSPORT=rdma DSM_RDMA_PAGES=$mode DSM_RDMA_LOCAL=rdma DSM_LOG=info DSM_STATS=1 timeout 300 \
      "$DSM_BIN_DIR/dsmexec" -n "$n" "$DSM_BIN_DIR/$name" "$@" >"$log" 2>&1
    st=$?
    cat "$log"
    echo "--- $name: status $st, $(( $(date +%s) - t ))s"
    # A known intermittent failure of the shutdown over co-located rings
    # under the RDMA transport (a rank sees the bootstrap connection of a
    # peer end without its goodbye, after every rank passed the final barrier):
    # the job is run once more, and says so. Any other failure counts.
    if [ "$st" != 0 ] && [ "$attempt" = 1 ] && grep -q "send failed: the peer.s ring is closed" "$log"; then
      echo "rdma-vm-test: WARNING: $name: a peer was lost at shutdown (the known ring goodbye race); running it once more"
      continue
    fi
    break
  done
  [ "$st" = 0 ] || fail "$name: dsmexec exited with status $st"
  r=0
  while [ "$r" -lt "$n" ]; do
    grep -q "rank $r: transport rdma (device" "$log" ||
      fail "$name: rank $r did not log that it uses the RDMA transport"
    grep -q "rank $r: transport rdma (device.*messages over SEND/RECV, up to [1-9][0-9]* B inline" "$log" ||
      fail "$name: rank $r does not send small messages inline"
    if [ "$mode" = write ]; then
      grep -q "rank $r: transport rdma (device.*page data by RDMA WRITE into a landing arena of [1-9]" "$log" ||
        fail "$name: rank $r did not log a landing arena"
    fi
    r=$((r + 1))
  done
  # Pages moved, and by the path asked for.
  if [ "$mode" = write ]; then
    grep -Eq "transport rdma: [1-9][0-9]* pages sent by RDMA WRITE" "$log" ||
      fail "$name: no rank sent a page by RDMA WRITE"
  else
    grep -Eq "transport rdma: 0 pages sent by RDMA WRITE, [1-9][0-9]* by SEND" "$log" ||
      fail "$name ($mode): pages did not go by SEND"
    ! grep -Eq "transport rdma: [1-9][0-9]* pages sent by RDMA WRITE" "$log" ||
      fail "$name ($mode): a page went by RDMA WRITE"
  fi
}
expect() { grep -qF -- "$2" "/tmp/job-$1.log" || fail "$1: missing line \"$2\""; }
dsm_job exemple 2
expect exemple "[1] read 4242 from page 0"
dsm_job roundrobin 4
dsm_job contention 4 4 10000
PAGES=send
dsm_job contention 4 4 10000
PAGES=write
for r in 0 1 2 3; do
  expect roundrobin "rank $r: 4 rounds over 100 pages verified"
  expect contention "rank $r: all 16 counters are exactly 10000"
  expect contention-send "rank $r: all 16 counters are exactly 10000"
done

# Two hosts of two ranks (a fake ssh runs the second host here, named
# 127.0.0.2): each host pair talks through shared memory, the other pairs
# over RDMA, in one job (the default DSM_RDMA_LOCAL=shm).
echo "=== DSM_TRANSPORT=rdma dsmexec machines (localhost slots=2, 127.0.0.2 slots=2) roundrobin: rings within a host, RDMA across"
mixdir=$(mktemp -d)
printf "localhost slots=2\n127.0.0.2 slots=2\n" >"$mixdir/machines"
touch "$mixdir/go"
log=/tmp/job-mixed.log
DSM_TRANSPORT=rdma DSM_LOG=info DSM_STATS=1 timeout 300 "$DSM_BIN_DIR/dsmexec" \
  --ssh "$DSM_BIN_DIR/fakessh $mixdir" "$mixdir/machines" "$DSM_BIN_DIR/roundrobin" >"$log" 2>&1
st=$?
cat "$log"
[ "$st" = 0 ] || fail "mixed: dsmexec exited with status $st"
for r in 0 1 2 3; do
  expect mixed "rank $r: 4 rounds over 100 pages verified"
done
expect mixed "rank 0: transport rdma (device"
grep -q "rank 0: transport rdma (device.*co-located rank(s) 1 through shared memory" "$log" ||
  fail "mixed: rank 0 did not log rank 1 as co-located"
grep -q "rank 3: transport rdma (device.*co-located rank(s) 2 through shared memory" "$log" ||
  fail "mixed: rank 3 did not log rank 2 as co-located"
grep -Eq "transport rdma: [1-9][0-9]* pages sent by RDMA WRITE" "$log" ||
  fail "mixed: no page crossed hosts by RDMA WRITE"

# faultlat MODE ENV...: rank 0 of 2 reads 500 pages of rank 1 once each,
# median fault in /tmp/faultlat-MODE.txt. Run before the criterion suites:
# after them (the 64 MiB scans above all) the polled figure came out 965 us
# in one boot, against 575-624 us in a fresh guest (cause not traced).
faultlat() {
  mode=$1
  shift
  echo "=== faultlat 500, $*"
  env DSM_TRANSPORT=rdma DSM_PREFETCH=0 DSM_SPACE_SIZE=64M "$@" timeout 300 \
    "$FAULTLAT_DIR/dsmexec" -n 2 "$FAULTLAT_DIR/faultlat" 500 >/tmp/faultlat.log 2>&1 ||
    fail "faultlat ($*)"
  grep "remote read fault" /tmp/faultlat.log
  sed -n "s/.*remote read fault .* median \([0-9.]*\) us.*/\1/p" /tmp/faultlat.log >"/tmp/faultlat-$mode.txt"
}
if [ -n "$FAULTLAT_DIR" ]; then
  faultlat adapter DSM_RDMA_LOCAL=rdma
  faultlat polled DSM_RDMA_LOCAL=rdma DSM_WAIT_SPIN_US=1000000
  faultlat shm
fi

for mode in write send; do
  echo "=== fault_latency bench, DSM_TRANSPORT=rdma DSM_RDMA_PAGES=$mode ($FAULT_ARGS)"
  DSM_TRANSPORT=rdma DSM_RDMA_PAGES=$mode CRITERION_HOME=/tmp/criterion-$mode "$FAULT_BIN" $FAULT_ARGS \
    >/tmp/fault-$mode.log 2>&1
  st=$?
  cat /tmp/fault-$mode.log
  [ "$st" = 0 ] || fail "fault_latency bench (DSM_RDMA_PAGES=$mode)"
done
echo "=== write_fault bench, DSM_TRANSPORT=rdma ($FAULT_ARGS)"
DSM_TRANSPORT=rdma CRITERION_HOME=/tmp/criterion-write "$WRITE_BIN" $FAULT_ARGS >/tmp/write.log 2>&1
st=$?
cat /tmp/write.log
[ "$st" = 0 ] || fail "write_fault bench"
if [ -n "$SCAN_BIN" ]; then
  # The localized 2-rank scan only: the other jobs set up but measure nothing.
  echo "=== scan bench, DSM_TRANSPORT=rdma, scan_rdma_2_ranks"
  DSM_TRANSPORT=rdma CRITERION_HOME=/tmp/criterion-scan "$SCAN_BIN" $FAULT_ARGS \
    "scan_rdma_2_ranks/(raw_stream|dsm_cold_scan_64MiB\$)" >/tmp/scan.log 2>&1
  st=$?
  cat /tmp/scan.log
  [ "$st" = 0 ] || fail "scan bench"
fi
if [ -n "$RDMA_BENCH_BIN" ]; then
  echo "=== 4 KiB RDMA READ latency (same VM session)"
  "$RDMA_BENCH_BIN" 2000 || fail "read_lat"
  echo "(completion threads polling 500 us before sleeping: DSM_RDMA_SPIN_US=500)"
  DSM_RDMA_SPIN_US=500 "$RDMA_BENCH_BIN" 2000 || fail "read_lat (spin 500 us)"
fi
# perftest TOOL ARGS...: server and client of a perftest tool over rxe0,
# client output in /tmp/TOOL.log. perftest calibrates the CPU clock first;
# under emulation that sometimes fails (figures printed as "inf"): try
# again, up to 3 times.
perftest() {
  tool=$1
  shift
  echo "=== baseline: $tool $* (same VM run)"
  try=1
  while :; do
    timeout 60 "$tool" "$@" >/tmp/srv.log 2>&1 &
    sleep 1
    timeout 60 "$tool" "$@" "$RXE_ADDR" >"/tmp/$tool.log" 2>&1
    st=$?
    wait
    cat "/tmp/$tool.log"
    [ "$st" = 0 ] || { fail "$tool (status $st)"; break; }
    grep -q "^ *4096 .* inf " "/tmp/$tool.log" || break
    [ "$try" -lt 3 ] || { echo "$tool: no figures (clock calibration failed 3 times)"; break; }
    try=$((try + 1))
  done
}
perftest ib_read_lat -x 1 -s 4096 -n "$IB_ITERS"
perftest ib_send_lat -x 1 -s 4096 -n "$IB_ITERS"
perftest ib_write_bw -x 1 -s 4096 -n "$IB_ITERS"

# The DSM figures beside the verbs of this boot (issue 22 targets: read
# fault <= 1.5x ib_read_lat, write fault <= 2x; typical latencies, median
# fault times, average bandwidth).
figure() { sed -n "s/^$1: $2 *median *\([0-9.]*\) .*/\1/p" "$3" | tail -1; }
perf_column() { awk -v col="$2" '\''$1 == 4096 { v = $col } END { print v }'\'' "/tmp/$1.log"; }
read_lat=$(perf_column ib_read_lat 5)
send_lat=$(perf_column ib_send_lat 5)
write_bw=$(perf_column ib_write_bw 4)
echo "=== summary: DSM over RDMA beside ib_read_lat ${read_lat:-?} us, ib_send_lat ${send_lat:-?} us (typical, 4 KiB), ib_write_bw ${write_bw:-?} MB/s (average, 4 KiB)"
ratio_line() {
  if [ -n "$2" ] && [ -n "$3" ]; then
    awk -v n="$1" -v f="$2" -v b="$3" -v bn="$4" '\''BEGIN { printf "%s: %.1f us, %.2fx %s\n", n, f, f / b, bn }'\''
  else
    echo "$1: no figure"
  fi
}
ratio_line "read fault (SIGBUS, pages by WRITE)" "$(figure fault_latency_rdma dsm_remote_read_fault_4KiB_sigbus /tmp/fault-write.log)" "$read_lat" ib_read_lat
ratio_line "read fault (SIGBUS, pages by SEND)" "$(figure fault_latency_rdma dsm_remote_read_fault_4KiB_sigbus /tmp/fault-send.log)" "$read_lat" ib_read_lat
# ib_send_lat reports half a round trip.
send_rtt=$(awk -v x="${send_lat:-0}" '\''BEGIN { if (x > 0) print 2 * x }'\'')
ratio_line "raw SEND/RECV round trip 16 B / 4 KiB" "$(figure fault_latency_rdma raw_round_trip_16B_4KiB /tmp/fault-write.log)" "$send_rtt" "2 x ib_send_lat (a round trip)"
ratio_line "write fault" "$(figure write_fault_rdma_2_ranks dsm_remote_write_fault_4KiB /tmp/write.log)" "$read_lat" ib_read_lat
ratio_line "upgrade, 1 sharer" "$(figure write_fault_rdma_2_ranks dsm_upgrade_1_sharer /tmp/write.log)" "$read_lat" ib_read_lat
ratio_line "upgrade, 3 sharers" "$(figure write_fault_rdma_4_ranks dsm_upgrade_3_sharers /tmp/write.log)" "$read_lat" ib_read_lat
if [ -n "$FAULTLAT_DIR" ]; then
  ratio_line "faultlat read fault over the adapter" "$(cat /tmp/faultlat-adapter.txt)" "$read_lat" ib_read_lat
  ratio_line "the same, waits polled (DSM_WAIT_SPIN_US=1000000)" "$(cat /tmp/faultlat-polled.txt)" "$read_lat" ib_read_lat
  ratio_line "the same, default DSM_RDMA_LOCAL=shm (co-located ranks)" "$(cat /tmp/faultlat-shm.txt)" "$read_lat" ib_read_lat
fi
scan=$(sed -n "s/^scan_rdma_2_ranks: dsm_cold_scan_64MiB \([0-9.]*\) MB\/s.*/\1/p" /tmp/scan.log 2>/dev/null | tail -1)
if [ -n "$scan" ] && [ -n "$write_bw" ]; then
  awk -v s="$scan" -v b="$write_bw" '\''BEGIN { printf "cold scan of 64 MiB: %.1f MB/s, %.0f%% of ib_write_bw\n", s, 100 * s / b }'\''
else
  echo "cold scan of 64 MiB: not measured (--bench runs it)"
fi
if [ -n "$failed" ]; then
  echo "rdma-vm-test: FAILED:$failed"
  exit 1
fi
echo "rdma-vm-test: all passed"
'
export DSM_TEST_REQUIRE_RDMA=1 RDMA_CRATE_DIR="$ROOT/transport-rdma" RDMA_BENCH_BIN="$bench_bin" FAULTLAT_DIR="$faultlat_dir" \
  DSM_BIN_DIR="$TARGET/debug" FAULT_BIN="$fault_bin" WRITE_BIN="$write_bin" SCAN_BIN="$scan_bin" FAULT_ARGS="$fault_args" IB_ITERS="$ib_iters"
export RXE_ENV="${RXE_ENV:-} DSM_TEST_REQUIRE_RDMA RDMA_CRATE_DIR RDMA_BENCH_BIN FAULTLAT_DIR DSM_BIN_DIR FAULT_BIN WRITE_BIN SCAN_BIN FAULT_ARGS IB_ITERS"
set +e
RXE_SHARE="${RXE_SHARE:-$ROOT}" "$ROOT/scripts/run-in-rxe-vm.sh" sh -c "$guest" sh "${bins[@]}"
rc=$?
set -e
t2=$(date +%s)
echo "rdma-vm-test: build $((t1 - t0))s, VM run $((t2 - t1))s, status $rc"
exit $rc

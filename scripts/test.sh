#!/usr/bin/env bash
# The project's test command (README, CI): installs system packages, builds
# every binary (and libdsm for the C example) the multi-process tests use,
# then runs the whole test suite.
# Tests that need root (the network-namespace SSH cluster, Slurm and Open
# MPI, the RDMA VM) run
# when this is run as root and are required then; otherwise they say they
# were skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --for-tests
# The compilers install-deps just installed: the install tests need them.
export DSM_TEST_REQUIRE_TOOLCHAINS=1
if [ "$(id -u)" -eq 0 ]; then
  export DSM_TEST_REQUIRE_NETNS=1
  # A one-node Slurm cluster and Open MPI for the scheduler tests.
  scripts/slurm-cluster.sh install
  export DSM_TEST_REQUIRE_SLURM=1
fi
cargo build --workspace --lib --bins --quiet
cargo test --workspace --quiet "$@"
# Benchmarks are never timed tests: each criterion benchmark runs once.
cargo bench -p dsm-bench --quiet -- --test
# Real RDMA verbs: the transport's tests inside a QEMU VM with soft-RoCE
# (this kernel has no RDMA); needs root for QEMU.
if [ "$(id -u)" -eq 0 ]; then
  scripts/rdma-vm-test.sh
fi

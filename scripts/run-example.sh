#!/usr/bin/env bash
# The README's "main job": installs system packages, builds in release mode
# and runs an example job on N local processes (default 4) through dsmexec.
#   scripts/run-example.sh [N] [EXAMPLE [ARGS...]]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
n="${1:-4}"
example="${2:-alltoall}"
shift $(( $# > 2 ? 2 : $# ))
cargo build --release --workspace --bins --quiet
exec target/release/dsmexec -n "$n" "target/release/$example" "$@"

#!/usr/bin/env bash
# The README's "main job": installs system packages, builds in release mode
# and runs a DSM program on N local processes (default 4) through dsmexec.
# The default program is `contention`: every thread of every rank increments
# its own counter in pages all ranks fight over, and every rank checks the
# exact totals; DSM_STATS=1 prints each rank's fault statistics.
#   scripts/run-example.sh [N] [EXAMPLE [ARGS...]]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
n="${1:-4}"
example="${2:-contention}"
shift $(( $# > 2 ? 2 : $# ))
cargo build --release --workspace --bins --quiet
export DSM_STATS="${DSM_STATS:-1}"
exec target/release/dsmexec -n "$n" "target/release/$example" "$@"

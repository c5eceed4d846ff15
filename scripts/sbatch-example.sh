#!/usr/bin/env bash
# sbatch-example.sh - run a dsm program as a Slurm batch job.
#
#   sbatch scripts/sbatch-example.sh [PROGRAM [ARGS...]]
#
# PROGRAM defaults to target/release/roundrobin under the directory sbatch
# was called from. The batch script itself is not a rank: `srun` starts the
# ranks (one per task), and they meet through rank 0 (docs/LAUNCHING.md):
# DSM_RENDEZVOUS_DIR must be a directory on a file system every node sees;
# the default, $HOME/.dsm/rendezvous, usually is.
#
# Change the resources below (or override them on the sbatch command line,
# e.g. `sbatch -N 2 --ntasks-per-node=8 scripts/sbatch-example.sh ...`).
#SBATCH --job-name=dsm-example
#SBATCH --ntasks=4
#SBATCH --time=00:10:00
#SBATCH --output=dsm-example-%j.out
set -euo pipefail

program="${1:-${SLURM_SUBMIT_DIR:-.}/target/release/roundrobin}"
shift || true

# dsm settings (docs/ARCHITECTURE.md) reach every task: srun exports the
# batch environment by default.
export DSM_RENDEZVOUS_DIR="${DSM_RENDEZVOUS_DIR:-$HOME/.dsm/rendezvous}"
export DSM_RENDEZVOUS_TIMEOUT="${DSM_RENDEZVOUS_TIMEOUT:-120}"

echo "job ${SLURM_JOB_ID}: ${SLURM_NTASKS} tasks on ${SLURM_JOB_NODELIST}: $program $*"
# --kill-on-bad-exit: one task failing ends the whole step at once (the
# others would otherwise notice the loss themselves and exit with 70).
srun --kill-on-bad-exit=1 "$program" "$@"

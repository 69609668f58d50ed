#!/usr/bin/env bash
# Debian's SLURM for the launch tests (tests/test_launch_slurm.py starts a localhost cluster from it).
# Needs root; the tests skip with the reason when the binaries are missing.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends slurm-wlm

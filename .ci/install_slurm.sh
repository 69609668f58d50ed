#!/usr/bin/env bash
# Debian's SLURM, for the launch tests' localhost cluster (one slurmctld, two slurmd; tests start and stop it).
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_slurm: not root; the SLURM tests will be skipped" >&2
    exit 0
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm >/dev/null
# The package starts nothing we use: the tests run their own daemons on loopback ports.

"""What the benchmarks share: running one ``healer VERB`` in its own process, as a user would on this machine,
and reading this process's memory counters.

``run_verb`` is shared by the benchmarks that drive whole stages (``heal_quality.py``, ``streamline.py``): a clean
environment (CPU DeepSpeed, no hub traffic, no distributed variables leaking in from a parent launcher),
a finished stage skipped by its manifest, the wall time returned, and a failure stopping the benchmark
with the end of the verb's output. ``status_kib`` serves the memory benchmarks (``kd_memory.py``,
``elastic_memory.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

# set by a launcher around the benchmark, they would make the verb join that job
_DISTRIBUTED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_verb(verb: str, config: Path, out_dir: Path, *overrides: str, log: Path | None = None) -> float | None:
    """Run ``healer VERB --config CONFIG [OVERRIDES]``; its wall time in seconds, or None when ``out_dir``
    already holds a finished result from an earlier run of the benchmark (its manifest).

    ``log``: append the verb's output there (else it is captured and shown only on failure).
    """
    if (out_dir / "manifest.json").is_file():
        return None
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for key in _DISTRIBUTED:
        env.pop(key, None)
    cmd = [sys.executable, "-m", "healer", verb, "--config", str(config), *overrides]
    t0 = time.perf_counter()
    if log is not None:
        with log.open("a") as fh:
            done = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True)
        tail = log.read_text()[-3000:]
    else:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        tail = done.stderr[-4000:]
    if done.returncode != 0:
        sys.exit(f"healer {verb} {' '.join(overrides)} failed ({done.returncode})"
                 + (f"; see {log}" if log else "") + f":\n{tail}")
    return time.perf_counter() - t0


def status_kib(key: str) -> int:
    """A counter of this process's ``/proc/self/status`` in KiB (``VmHWM``, ``RssAnon``, ...)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")

"""Run a node's torchrun and turn a preemption warning into a checkpoint instead of a kill.

torchrun treats SIGUSR1 as fatal (default action) and answers SIGTERM by killing its ranks 30 s later,
which may cut a checkpoint of a large model in half. So the supervisor starts torchrun with SIGUSR1
ignored, catches SIGUSR1/SIGTERM itself and passes SIGUSR1 to the ranks (torchrun's children): the
trainer saves at its next step boundary and exits with ``PREEMPTED_EXIT_CODE``. torchrun reports any
rank failure as exit code 1, so the supervisor, which knows it relayed a preemption, reports the
preemption code itself; the SLURM script requeues on it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil

try:
    from healer.train.signals import PREEMPTED_EXIT_CODE
except ImportError:  # the trainer's module defines it; the value is sysexits' EX_TEMPFAIL
    PREEMPTED_EXIT_CODE = 75


def _ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def supervise(cmd: list[str], env: dict[str, str], grace_s: float = 0.0) -> int:
    """Run ``cmd`` (a torchrun command) to the end; return 0, PREEMPTED_EXIT_CODE or its failure code."""
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_ignore_usr1)
    state = {"preempted": False, "terms": 0}

    def relay(signum, frame) -> None:
        first = not state["preempted"]
        state["preempted"] = True
        if signum == signal.SIGTERM:
            state["terms"] += 1
        if first:
            print(f"healer launch: got {signal.Signals(signum).name}; asking the ranks to checkpoint and stop",
                  file=sys.stderr, flush=True)
            _signal_ranks(proc.pid, signal.SIGUSR1)
        elif state["terms"] >= 2 and proc.poll() is None:
            # A second SIGTERM means "stop now": torchrun stops its ranks.
            proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, relay) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    # Ctrl-C reaches torchrun through the terminal's process group; torchrun stops the ranks.
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except InterruptedError:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if rc == 0:
        return 0
    if state["preempted"]:
        return PREEMPTED_EXIT_CODE
    return rc if rc > 0 else 128 - rc  # killed by a signal: the shell's 128+N convention


def _signal_ranks(launcher_pid: int, sig: int) -> None:
    """Send ``sig`` to the launcher's direct children (the ranks), not to their helpers (data loaders)."""
    try:
        children = psutil.Process(launcher_pid).children(recursive=False)
    except psutil.NoSuchProcess:
        return
    if not children:  # torchrun not started its ranks yet: give it a moment
        time.sleep(1.0)
        try:
            children = psutil.Process(launcher_pid).children(recursive=False)
        except psutil.NoSuchProcess:
            return
    for child in children:
        try:
            child.send_signal(sig)
        except psutil.NoSuchProcess:
            pass

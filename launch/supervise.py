"""Run a node's torchrun and turn a preemption warning into a checkpoint instead of a kill.

torchrun treats SIGUSR1 as fatal (default action) and answers SIGTERM by killing its ranks 30 s later,
which may cut a checkpoint of a large model in half. So the supervisor starts torchrun with SIGUSR1
ignored, catches SIGUSR1/SIGTERM itself and passes SIGUSR1 to the ranks (torchrun's children): the
trainer saves at its next step boundary and exits with ``PREEMPTED_EXIT_CODE``. torchrun reports any
rank failure as exit code 1, so the supervisor, which knows it relayed a preemption, reports the
preemption code itself; the SLURM script requeues on it.

A warning that arrives while the ranks are still loading (before the trainer listens) is not lost:
the ranks inherit SIGUSR1 as ignored, and the supervisor repeats it every ``repeat_s`` seconds until
they exit. The trainer's handler only sets a flag, so repeats are harmless.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil

from healer.train.signals import PREEMPTED_EXIT_CODE


def _child_signals() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited by the ranks until the trainer listens
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def supervise(cmd: list[str], env: dict[str, str], repeat_s: float = 2.0) -> int:
    """Run ``cmd`` (a torchrun command) to the end; return 0, PREEMPTED_EXIT_CODE or its failure code."""
    state = {"preempted": False, "terms": 0, "proc": None}

    def relay(signum, frame) -> None:
        first = not state["preempted"]
        state["preempted"] = True
        if signum == signal.SIGTERM:
            state["terms"] += 1
        proc = state["proc"]
        if proc is None:
            return
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
    proc = state["proc"] = subprocess.Popen(cmd, env=env, preexec_fn=_child_signals)
    try:
        while True:
            try:
                rc = proc.wait(timeout=repeat_s)
                break
            except subprocess.TimeoutExpired:
                if state["preempted"]:
                    _signal_ranks(proc.pid, signal.SIGUSR1)
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
    for child in children:
        try:
            child.send_signal(sig)
        except psutil.NoSuchProcess:
            pass

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

When a rank fails, torchrun adds its own report to the rank's one-line error: an agent log line, a
Python traceback of torchrun itself and a ChildFailedError box. None of it says more than the rank did,
and it buries that line, so the supervisor reads torchrun's stderr line by line, passes the ranks' lines
(``[default0]:...``) and torchrun's notices through, and moves the failure report into a file
(``report``), naming it and returning the failed rank's exit code instead of torchrun's 1.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from healer.train.signals import PREEMPTED_EXIT_CODE


def _child_signals() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited by the ranks until the trainer listens
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# Where torchrun's own failure report starts: its agent's error log line, or its traceback.
_REPORT_START = re.compile(r"^(E\d{4} .*torch/distributed/elastic/|Traceback \(most recent call last\):)")
_RANK_LINE = re.compile(r"^\[[A-Za-z_]+\d+\]:")  # --tee's prefix: [default0]:, [rank3]: ...
_ROOT_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)")


def _relay_stderr(stream, report: Path | None, found: dict) -> None:
    """Copy torchrun's stderr to ours, except its failure report, which goes to ``report``."""
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    captured: list[str] = []
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        in_report = bool(captured) or (report is not None and _REPORT_START.match(line) is not None)
        if in_report and not _RANK_LINE.match(line):
            captured.append(line)
            continue
        if out is not None:
            out.write(raw)
            out.flush()
        else:
            sys.stderr.write(line)
    stream.close()
    if captured:  # only collected when there is a report file to put it in
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("".join(captured), encoding="utf-8")
        codes = _ROOT_EXIT.findall("".join(captured))
        found["exit"] = int(codes[0]) if codes else None
        found["report"] = report


def supervise(cmd: list[str], env: dict[str, str], repeat_s: float = 2.0, report: Path | None = None) -> int:
    """Run ``cmd`` (a torchrun command) to the end; return 0, PREEMPTED_EXIT_CODE or its failure code.

    ``report``: where torchrun's failure report goes instead of the console (None: it stays on stderr)."""
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
    proc = state["proc"] = subprocess.Popen(cmd, env=env, preexec_fn=_child_signals,
                                            stderr=subprocess.PIPE if report is not None else None)
    found: dict = {}
    relay_thread = None
    if report is not None:
        relay_thread = threading.Thread(target=_relay_stderr, args=(proc.stderr, report, found), daemon=True)
        relay_thread.start()
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
        if relay_thread is not None:
            relay_thread.join(timeout=10)
    if rc == 0:
        return 0
    if state["preempted"]:
        return PREEMPTED_EXIT_CODE
    if found.get("report") is not None:
        print(f"healer launch: torchrun's failure report: {found['report']}", file=sys.stderr, flush=True)
        if rc == 1 and found.get("exit"):  # torchrun says 1 for any failure; the rank's own code says which
            code = found["exit"]
            return code if code > 0 else 128 - code
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

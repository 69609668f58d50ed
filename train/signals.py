"""Preemption: SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary and a clean exit.

SLURM sends the warning signal (``--signal=USR1@120``) before the time limit; torchrun and the DeepSpeed
launcher forward SIGTERM to their workers. The handler only sets a flag: the trainer checks it once per
optimizer step (all ranks agree through the step's metrics all-reduce), saves, and exits with
:data:`PREEMPTED_EXIT_CODE`, on which the launch scripts requeue the job.
"""

from __future__ import annotations

import signal
import sys

# sysexits.h EX_TEMPFAIL: "try again later". Distinct from a crash (1), a bad recipe (2) and a kill (137/143).
PREEMPTED_EXIT_CODE = 75

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    """Installs the handlers on creation; ``requested`` turns True once a preemption signal arrived."""

    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.requested = False
        self.signal_name: str | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
            print(f"healer: got {self.signal_name}; saving a checkpoint at the next step boundary, then exiting "
                  f"with code {PREEMPTED_EXIT_CODE}", file=sys.stderr, flush=True)
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

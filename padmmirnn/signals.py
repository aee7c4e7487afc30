"""Why a run ends early: stop signals (Slurm ``--signal``), the walltime and the
training budget (docs/design.md, section 7).

Signals only set a flag; the run loop acts on it at the next iteration boundary,
once every rank agrees (a max-reduction in synchronous runs, the RMA window in
asynchronous ones), then writes a checkpoint and exits 0.
"""

from __future__ import annotations

import signal
import threading
from enum import IntEnum

from padmmirnn.config import Config


class StopSignals:
    """SIGTERM/SIGUSR1 set :attr:`received` while the context is entered (main thread
    only; elsewhere the handlers are left alone)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int = 0
        self._old = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Stop(IntEnum):
    """Reasons to end a run, ordered by precedence (ranks agree on the largest): a
    signal and the walltime end with a checkpoint, the budget is a normal end."""

    NONE = 0
    BUDGET = 1
    WALLTIME = 2
    SIGNAL = 3


STOP_TEXT = {Stop.SIGNAL: "signal", Stop.WALLTIME: "--max-walltime"}


def stop_reason(cfg: Config, elapsed: float, job_elapsed: float,
                signum: int) -> tuple[Stop, str | None]:
    """(reason, text) to end the run with signal ``signum`` received (0: none), after
    ``elapsed`` seconds of training in all (a resumed run counts those before its
    checkpoint: the budget) and ``job_elapsed`` in this job (the walltime: a
    resubmitted job gets its own); the text names what stopped a run that
    checkpoints."""
    if signum:
        return Stop.SIGNAL, signal.Signals(int(signum)).name
    wall = cfg.checkpoint.max_walltime
    if wall and job_elapsed >= wall:
        return Stop.WALLTIME, f"--max-walltime {wall:g} s"
    if cfg.train.budget_seconds and elapsed >= cfg.train.budget_seconds:
        return Stop.BUDGET, None
    return Stop.NONE, None

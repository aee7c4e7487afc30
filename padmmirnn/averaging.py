"""The average of a trainer's iterates: the weights a run evaluates and saves
(``admm.average`` for the mini-batch ADMM, ``optim.average`` for the synchronous
gradient methods; docs/design.md, section 5).

After step ``t`` (a block step or an optimizer step; ``t = 1, 2, ...`` over the whole
run) the average is

    theta_bar_t = d_t theta_bar_{t-1} + (1 - d_t) theta_t,   d_t = min(decay, (1 + t) / (10 + t)),

an exponential moving average (Polyak-Ruppert averaging with a finite window) whose
window grows with the steps taken, about ``t / 9`` steps early in a run, and is at
most ``1 / (1 - decay)`` steps (100 at the default 0.99). The iterate itself is
unchanged: the steps go on from ``theta_t``; the average only filters the noise of the
last steps' mini-batch directions out of the model that is evaluated and exported.

Token inputs with the active-column step move only the first layer's columns ``j`` of
the batch's tokens. Those columns of ``U`` are averaged lazily: a column unchanged
since step ``tau`` at the value ``theta_j`` has ``theta_bar_j(t) = theta_j +
(theta_bar_j(tau) - theta_j) prod_{tau < s <= t} d_s``, the product kept as a running
sum of ``log d_s``. A step then costs O(the batch's tokens), not O(vocabulary); every
column is brought up to date at the end of each pass, so the state at a pass boundary
does not depend on when columns were last touched (a resumed run equals an
uninterrupted one bit for bit).
"""

from __future__ import annotations

import math

import numpy as np

from padmmirnn.nn import Params

RAMP = 9.0  # d_t = (1 + t) / (1 + RAMP + t) before the cap


class IterateAverage:
    """The running average of ``params`` (their shapes and names) with decay cap
    ``decay`` in (0, 1); ``lazy``: the name of the weight whose columns are averaged
    lazily (token inputs' ``U``; None: every array densely)."""

    def __init__(self, decay: float, params: Params, lazy: str | None = None):
        self.decay = decay
        self.lazy = lazy
        self.steps = 0
        self.log_prod = 0.0  # sum of log d_s over the steps taken
        self.mean = params.copy()
        self.synced = None if lazy is None else np.zeros(getattr(params, lazy).shape[1])

    def _sync(self, params: Params, cols: np.ndarray | slice) -> None:
        """Bring the lazy weight's columns ``cols`` up to the last step, with their
        values unchanged since they were last averaged (their current ones)."""
        theta = getattr(params, self.lazy)[:, cols]
        mean = getattr(self.mean, self.lazy)
        factor = np.exp(self.log_prod - self.synced[cols])
        mean[:, cols] = theta + (mean[:, cols] - theta) * factor
        self.synced[cols] = self.log_prod

    def before(self, params: Params, cols: np.ndarray | None) -> None:
        """Before a step that moves the lazy weight's columns ``cols`` (None: all)."""
        if self.lazy is not None:
            self._sync(params, slice(None) if cols is None else cols)

    def after(self, params: Params, cols: np.ndarray | None) -> None:
        """After the step: average the new ``params`` in (the lazy weight's columns
        ``cols`` only; the others are unchanged and wait)."""
        self.steps += 1
        d = min(self.decay, (1.0 + self.steps) / (1.0 + RAMP + self.steps))
        for name, theta in params.arrays().items():
            mean = getattr(self.mean, name)
            if name == self.lazy and cols is not None:
                mean[:, cols] *= d
                mean[:, cols] += (1.0 - d) * theta[:, cols]
            else:
                mean *= d
                mean += (1.0 - d) * theta
        self.log_prod += math.log(d)
        if self.lazy is not None:
            if cols is None:
                self.synced[:] = self.log_prod
            else:
                self.synced[cols] = self.log_prod

    def finish(self, params: Params) -> None:
        """Bring every column up to date (at the end of a pass, before the average is
        read or saved)."""
        if self.lazy is not None:
            self._sync(params, slice(None))

    def state(self) -> dict[str, np.ndarray]:
        """Checkpoint arrays (after :meth:`finish`)."""
        out = {f"average.{k}": v for k, v in self.mean.arrays().items()}
        out["average.steps"] = np.int64(self.steps)
        out["average.log_prod"] = np.float64(self.log_prod)
        return out

    def load(self, arrays: dict, params: Params) -> None:
        """Restore :meth:`state` from checkpoint arrays; from those of a run without the
        average, start it again at ``params``."""
        if "average.steps" not in arrays:
            self.mean, self.steps, self.log_prod = params.copy(), 0, 0.0
            if self.synced is not None:
                self.synced[:] = 0.0
            return
        for name in self.mean.names():
            setattr(self.mean, name, np.array(arrays[f"average.{name}"], np.float64))
        self.steps = int(arrays["average.steps"])
        self.log_prod = float(arrays["average.log_prod"])
        if self.synced is not None:
            self.synced[:] = self.log_prod

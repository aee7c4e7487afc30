"""What the run loop asks of a training algorithm, and when it evaluates, checkpoints
and logs.

A :class:`Trainer` (the ADMM engine, the gradient trainer) is the whole contract
between an algorithm and the loop, in the manner of an optimizer's ``step`` /
``state_dict`` / ``load_state_dict``: the loop calls :meth:`Trainer.step` once per
iteration (ADMM) or epoch (gradient methods), evaluates :attr:`Trainer.model`, and
saves and restores the algorithm through :meth:`Trainer.state_dict` and
:meth:`Trainer.load_state_dict`. The weights themselves are not part of the state
dict: the checkpoint stores them once, and a trainer is built from them.

A :class:`Schedule` says after which iterations the loop evaluates and writes a
checkpoint; a run control (synchronous or asynchronous) gives, before each
iteration, the :class:`Decision` every rank agreed on; :class:`BestSoFar` keeps the
best evaluation on the validation split and decides early stopping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from padmmirnn.config import Config
from padmmirnn.nn import Params

TrainerState = dict  # {"iteration": int, "arrays": {name: array}, "per_sample": {name: array}}


class Trainer(Protocol):
    """One training algorithm on one rank's samples.

    ``unit`` names a step ("iteration" or "epoch"); ``iteration`` counts the steps
    taken; ``bytes_per_step`` is what one step reduces over the ranks (bytes per rank).
    """

    unit: str
    iteration: int
    bytes_per_step: int

    @property
    def params(self) -> Params:
        """The iterate: what the next step continues from, and what a checkpoint stores
        as the weights."""

    @property
    def model(self) -> Params:
        """The weights the loop evaluates and saves as the trained model: the iterate,
        or (mini-batch ADMM, ``admm.average``) the average of the iterates, which the
        trainer's state dict then carries."""

    def step(self, evaluate: bool) -> None:
        """One iteration or epoch; ``evaluate``: the loop evaluates after it (a trainer
        may then keep sums for :meth:`evaluation_terms`)."""

    def evaluation_terms(self) -> tuple[list[np.ndarray] | None, list[np.ndarray] | None]:
        """``(extra, train_sums)`` for the evaluation after a step: per-part vectors to
        reduce together with the evaluation (or None), and per-part ``[loss, correct,
        rows]`` of the current weights on the training samples when the trainer already
        holds them (or None: the evaluation runs a forward pass)."""

    def describe(self, reduced: np.ndarray | None) -> dict:
        """Metrics of the last step, from the reduced ``extra`` of
        :meth:`evaluation_terms` (None when there was none)."""

    def state_dict(self) -> TrainerState:
        """What resumes the algorithm: ``iteration``, ``arrays`` (whole-model state:
        scalars, optimizer moments) and ``per_sample`` (this rank's per-sample state,
        sample-major ``[n_local, ...]`` in global sample order; empty if none)."""

    def load_state_dict(self, state: TrainerState) -> None:
        """Restore :meth:`state_dict` (``per_sample`` holding this rank's samples)."""


@dataclass(frozen=True)
class Decision:
    """What the ranks agreed before an iteration: ``end`` the run normally now (the
    budget is spent), ``stopped`` it now with a checkpoint (the text says what
    stopped it), or run it as the ``last`` one."""

    end: bool = False
    stopped: str | None = None
    last: bool = False


@dataclass(frozen=True)
class Every:
    """Due at every multiple of ``period`` (never when ``period`` is 0)."""

    period: int

    def due(self, k: int) -> bool:
        return self.period > 0 and k % self.period == 0


@dataclass(frozen=True)
class Schedule:
    """When the loop evaluates and writes checkpoints.

    Synchronous runs evaluate every ``train.eval_every`` iterations (0: every one) and
    after the last; asynchronous runs only every ``train.eval_every`` (0: at the end,
    which follows the loop): their ranks reach an iteration at different times."""

    evaluate: Every
    checkpoint: Every
    asynchronous: bool

    @classmethod
    def from_config(cls, cfg: Config, asynchronous: bool) -> Schedule:
        every = cfg.train.eval_every if asynchronous else max(cfg.train.eval_every, 1)
        return cls(Every(every), Every(cfg.checkpoint.every), asynchronous)

    def evaluate_at(self, k: int, last: bool) -> bool:
        """Evaluate after iteration ``k`` (``last``: the loop ends after it)?"""
        return self.evaluate.due(k) or (last and not self.asynchronous)


class BestSoFar:
    """The best evaluation so far by a validation metric, and early stopping.

    After each scheduled evaluation :meth:`update` compares ``metrics[monitor]``
    (``val_loss``: lower is better; ``val_accuracy``: higher) with the best so far: a
    strict improvement makes this evaluation the best (its iteration, all its metrics
    and a copy of the weights are kept) and resets the count of evaluations since the
    best; anything else, ties included, adds one to it. With ``patience`` p > 0 the run
    stops once p evaluations in a row brought no improvement (:meth:`exhausted`). The
    metrics are reduced before this sees them, so every rank decides alike. The whole
    state (:meth:`state`) goes into checkpoints, so that a resumed run picks the same
    best and stops at the same evaluation as an uninterrupted one.
    """

    def __init__(self, monitor: str, patience: int):
        self.monitor, self.patience = monitor, patience
        self.lower = monitor.endswith("loss")
        self.value: float | None = None  # the best monitored value
        self.iteration: int | None = None  # the iteration of the best evaluation
        self.metrics: dict = {}  # that evaluation's metrics
        self.params: Params | None = None  # and its weights
        self.since = 0  # evaluations since the best

    def update(self, iteration: int, metrics: dict, params: Params) -> bool:
        """Take one evaluation into account; True when it is the new best."""
        value = metrics[self.monitor]
        improved = value == value and (self.value is None or (
            value < self.value if self.lower else value > self.value))
        if improved:
            self.value, self.iteration, self.since = float(value), iteration, 0
            self.metrics, self.params = dict(metrics), params.copy()
        else:
            self.since += 1
        return improved

    def exhausted(self) -> bool:
        """Early stopping: ``patience`` evaluations in a row without an improvement."""
        return self.patience > 0 and self.since >= self.patience

    def state(self) -> tuple[Params | None, dict]:
        """The weights of the best evaluation (None before any) and the rest as plain
        attributes (for :func:`padmmirnn.checkpoint.write_checkpoint`)."""
        attrs = {"monitor": self.monitor, "since": self.since}
        if self.iteration is not None:
            attrs.update({"value": self.value, "iteration": self.iteration,
                          "metrics": json.dumps(self.metrics)})
        return self.params, attrs

    def load(self, params: Params | None, attrs: dict) -> None:
        """Restore :meth:`state`."""
        self.since = int(attrs.get("since", 0))
        if params is not None and "iteration" in attrs:
            self.params, self.value = params, float(attrs["value"])
            self.iteration = int(attrs["iteration"])
            self.metrics = json.loads(attrs["metrics"])

"""Gradient baselines (docs/design.md, section 6): BPTT gradients, optimizers,
learning-rate schedules, clipping and CELGC.

No MPI here. Data-parallel training averages gradients through an ``average``
callable ``Params -> Params`` passed in by the caller (serial default: identity)
and clips the averaged gradient; CELGC (Liu et al., NeurIPS 2022) takes local
clipped steps ``x <- x - min(eta, gamma / ||g||) g`` and averages the weights
through the same kind of callable every I steps.

Optimizers update :class:`~padmmirnn.model.Params` in place. Their state
(``state_dict``) is a flat ``{name: ndarray | int | float}`` dict, moment buffers
named ``"<buffer>.<param>"`` (e.g. ``"m.W"``), ready for a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from padmmirnn import kernels
from padmmirnn.model import (
    LOSSES,
    Params,
    adjoint_into,
    forward_into,
    input_rows,
    outputs,
    stacked_state,
    states_of,
)
from padmmirnn.samples import LocalData
from padmmirnn.stats import colsum, gram_steps

Average = Callable[[Params], Params]
Schedule = Callable[[int], float]
State = dict[str, np.ndarray | int | float]


def identity(params: Params) -> Params:
    """The serial ``average``: one worker's mean is itself."""
    return params


class Gradients(NamedTuple):
    """Mean loss L over the ``rows`` output rows of a batch, its gradient (float64
    :class:`Params`) and ``step_norms[t - 1]`` = mean over samples of ``||dL_i/da_t||``."""

    loss: float
    grads: Params
    step_norms: np.ndarray
    rows: int


def gradients(params: Params, batch: LocalData, activation: str, loss: str,
              dtype: np.dtype = np.float64) -> Gradients:
    """Mean loss of ``batch`` and its BPTT gradient with respect to every weight.

    L = 1/R sum over the R = n |O| output rows of l(o_t, y_t), computed in ``dtype``
    with the model's one forward pass and one adjoint recursion
    (:func:`~padmmirnn.model.adjoint_into` seeded with ``delta = dL/do``, giving
    ``e_t = dL/da_t``); the weight gradients are the sums over steps and samples

        [dU db dW] = sum_t e_t [x_t; 1; s_{t-1}]^T,   [dV dc] = sum_{t in O} delta_t [s_t; 1]^T

    (token inputs: dU is a segment sum of e_t per token). Returned in float64.
    ``step_norms`` shows vanishing (decay towards t = 1) or exploding gradients.
    """
    info = batch.info
    steps, n = batch.inputs.shape[:2]
    outs = batch.targets.shape[0]
    if outs not in (1, steps) or batch.targets.shape[1] != n:
        raise ValueError(f"targets shape {batch.targets.shape} does not fit inputs "
                         f"{batch.inputs.shape}")
    dtype = np.dtype(dtype)
    p = params.astype(dtype)
    h = p.W.shape[0]
    dz = input_rows(info)
    many = outs == steps and steps > 1
    Z = stacked_state(batch, h, dtype)
    work = np.empty((steps, h, n), dtype)  # pre-activations, then the adjoints e_t
    forward_into(p, batch, activation, work, Z)
    states = states_of(Z, dz, h)
    delta = outputs(p, states, many)
    rows = delta.shape[0] * delta.shape[1]
    total = kernels.output_delta(delta.reshape(rows, -1), batch.targets.reshape(-1),
                                 LOSSES[loss], 1.0 / rows)
    adjoint_into(p, states, delta, many, activation, work)
    G = gram_steps(work, Z[:steps, :dz + 1 + h])  # [h, dz + 1 + h]
    dU = (kernels.segment_sum_columns(batch.inputs, work, info.dim).T if dz == 0
          else G[:, :dz])
    s_out = states[1:] if many else states[-1:]
    dV = gram_steps(delta.transpose(0, 2, 1), s_out)
    dc = colsum(delta.reshape(rows, -1))
    norms = np.sqrt(np.einsum("thn,thn->tn", work, work)).sum(axis=1)
    grads = Params(np.ascontiguousarray(dU), G[:, dz + 1:].copy(), G[:, dz].copy(), dV, dc)
    return Gradients(total / rows, grads, norms, rows)


def _arrays(p: Params) -> list[np.ndarray]:
    return [getattr(p, k) for k in Params.NAMES]


def global_norm(grads: Params) -> float:
    """``||g||`` = the Euclidean norm of all gradient entries together."""
    return math.sqrt(sum(float(np.vdot(g, g)) for g in _arrays(grads)))


def clip_by_norm(grads: Params, max_norm: float) -> float:
    """Scale ``grads`` in place by ``min(1, max_norm / ||g||)``; return ``||g||``
    before clipping (a non-finite norm is returned and nothing is scaled)."""
    norm = global_norm(grads)
    if math.isfinite(norm) and norm > max_norm:
        for g in _arrays(grads):
            g *= max_norm / norm
    return norm


def clipped_step_size(eta: float, gamma: float, norm: float) -> float:
    """CELGC step size ``min(eta, gamma / ||g||)`` (eta when ``||g|| = 0``)."""
    return eta if norm <= 0.0 else min(eta, gamma / norm)


# -- learning-rate schedules: step k = 0, 1, ... -> learning rate ---------------------------


@dataclass(frozen=True)
class Constant:
    """``lr_k = lr``."""

    lr: float

    def __call__(self, step: int) -> float:
        return self.lr


@dataclass(frozen=True)
class StepDecay:
    """``lr_k = lr * factor ** floor(k / every)``."""

    lr: float
    factor: float
    every: int

    def __call__(self, step: int) -> float:
        return self.lr * self.factor ** (step // self.every)


@dataclass(frozen=True)
class Cosine:
    """``lr_k = lr / 2 * (1 + cos(pi * min(k, total) / total))``: lr at k = 0, 0 at total."""

    lr: float
    total: int

    def __call__(self, step: int) -> float:
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * min(step, self.total) / self.total))


def make_schedule(name: str, lr: float, *, total: int = 0, factor: float = 0.1,
                  every: int = 1) -> Schedule:
    """Schedule by name: ``"constant"``, ``"step"`` (``factor`` every ``every`` steps)
    or ``"cosine"`` (to 0 over ``total`` steps)."""
    if name == "constant":
        return Constant(lr)
    if name == "step":
        if every < 1:
            raise ValueError(f"step schedule needs every >= 1, got {every}")
        return StepDecay(lr, factor, every)
    if name == "cosine":
        if total < 1:
            raise ValueError(f"cosine schedule needs total >= 1 steps, got {total}")
        return Cosine(lr, total)
    raise ValueError(f"unknown schedule {name!r} (constant, step, cosine)")


# -- optimizers ------------------------------------------------------------------------------


class Optimizer:
    """Base: ``step(params, grads)`` updates ``params`` in place with learning rate
    ``lr(t)``, t = number of steps taken so far; subclasses keep named buffers."""

    buffers: tuple[str, ...] = ()

    def __init__(self, lr: float | Schedule) -> None:
        self.lr: Schedule = Constant(float(lr)) if isinstance(lr, int | float) else lr
        self.t = 0
        self.state: dict[str, Params] = {}

    def step(self, params: Params, grads: Params) -> None:
        for buf in self.buffers:
            if buf not in self.state:
                self.state[buf] = Params(*(np.zeros(a.shape) for a in _arrays(params)))
        lr = self.lr(self.t)
        self.t += 1
        for name in Params.NAMES:
            self._update(name, getattr(params, name), getattr(grads, name), lr)

    def _update(self, name: str, x: np.ndarray, g: np.ndarray, lr: float) -> None:
        raise NotImplementedError

    def state_dict(self) -> State:
        out: State = {"t": self.t}
        for buf, p in self.state.items():
            for k in Params.NAMES:
                out[f"{buf}.{k}"] = getattr(p, k).copy()
        return out

    def load_state_dict(self, state: State) -> None:
        self.t = int(state["t"])
        self.state = {}
        for buf in self.buffers:
            if f"{buf}.U" in state:
                self.state[buf] = Params(*(np.array(state[f"{buf}.{k}"], np.float64)
                                           for k in Params.NAMES))


class SGD(Optimizer):
    """``x <- x - lr g``."""

    def _update(self, name: str, x: np.ndarray, g: np.ndarray, lr: float) -> None:
        x -= lr * g


class Momentum(Optimizer):
    """Heavy ball: ``v <- mu v + g``, ``x <- x - lr v``."""

    buffers = ("v",)

    def __init__(self, lr: float | Schedule, mu: float = 0.9) -> None:
        super().__init__(lr)
        self.mu = mu

    def _update(self, name: str, x: np.ndarray, g: np.ndarray, lr: float) -> None:
        v = getattr(self.state["v"], name)
        v *= self.mu
        v += g
        x -= lr * v


class Adam(Optimizer):
    """Kingma & Ba: ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
    ``x <- x - lr m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / (1 - b1^t)``,
    ``v_hat = v / (1 - b2^t)`` (t counted from 1). The first step is
    ``-lr g / (|g| + eps)``, i.e. ``-lr sign(g)`` up to eps."""

    buffers = ("m", "v")

    def __init__(self, lr: float | Schedule = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        super().__init__(lr)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    def _update(self, name: str, x: np.ndarray, g: np.ndarray, lr: float) -> None:
        m = getattr(self.state["m"], name)
        v = getattr(self.state["v"], name)
        m *= self.beta1
        m += (1.0 - self.beta1) * g
        v *= self.beta2
        v += (1.0 - self.beta2) * g * g
        m_hat = m / (1.0 - self.beta1 ** self.t)
        v_hat = v / (1.0 - self.beta2 ** self.t)
        x -= lr * m_hat / (np.sqrt(v_hat) + self.eps)


class RMSProp(Optimizer):
    """``v <- alpha v + (1 - alpha) g^2``, ``x <- x - lr g / (sqrt(v) + eps)``."""

    buffers = ("v",)

    def __init__(self, lr: float | Schedule = 1e-3, alpha: float = 0.99,
                 eps: float = 1e-8) -> None:
        super().__init__(lr)
        self.alpha, self.eps = alpha, eps

    def _update(self, name: str, x: np.ndarray, g: np.ndarray, lr: float) -> None:
        v = getattr(self.state["v"], name)
        v *= self.alpha
        v += (1.0 - self.alpha) * g * g
        x -= lr * g / (np.sqrt(v) + self.eps)


class Adagrad(Optimizer):
    """``G <- G + g^2``, ``x <- x - lr g / (sqrt(G) + eps)``."""

    buffers = ("G",)

    def __init__(self, lr: float | Schedule = 1e-2, eps: float = 1e-10) -> None:
        super().__init__(lr)
        self.eps = eps

    def _update(self, name: str, x: np.ndarray, g: np.ndarray, lr: float) -> None:
        G = getattr(self.state["G"], name)
        G += g * g
        x -= lr * g / (np.sqrt(G) + self.eps)


class CELGC(Optimizer):
    """Communication-efficient local gradient clipping (Liu et al., NeurIPS 2022).

    Each worker steps on its own gradient, ``x <- x - min(eta, gamma / ||g||) g``,
    and every ``period`` (I) steps the weights are replaced, in place, by
    ``average(x)`` (the mean over workers; identity when serial). Gradients passed
    to :meth:`step` are the local ones, not averaged.
    """

    def __init__(self, lr: float | Schedule, gamma: float, period: int = 1,
                 average: Average = identity) -> None:
        super().__init__(lr)
        if period < 1:
            raise ValueError(f"CELGC period must be >= 1, got {period}")
        self.gamma, self.period, self.average = gamma, period, average

    def step(self, params: Params, grads: Params) -> None:
        eta = clipped_step_size(self.lr(self.t), self.gamma, global_norm(grads))
        self.t += 1
        for x, g in zip(_arrays(params), _arrays(grads), strict=True):
            x -= eta * g
        if self.t % self.period == 0:
            mean = self.average(params)
            for k in Params.NAMES:
                getattr(params, k)[...] = getattr(mean, k)


OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD, "momentum": Momentum, "adam": Adam, "rmsprop": RMSProp, "adagrad": Adagrad,
    "celgc": CELGC,
}

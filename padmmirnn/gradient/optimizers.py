"""Gradient baselines (docs/design.md, section 6): optimizers, learning-rate
schedules, clipping and CELGC. The BPTT gradients are the network's
(:meth:`padmmirnn.nn.Network.gradients`).

No MPI here. Data-parallel training averages gradients through an ``average``
callable ``Params -> Params`` passed in by the caller (serial default: identity)
and clips the averaged gradient; CELGC (Liu et al., NeurIPS 2022) takes local
clipped steps ``x <- x - min(eta, gamma / ||g||) g`` and averages the weights
through the same kind of callable every I steps.

Optimizers update :class:`~padmmirnn.nn.Params` in place. Their state
(``state_dict``) is a flat ``{name: ndarray | int | float}`` dict, moment buffers
named ``"<buffer>.<param>"`` (e.g. ``"m.W"``), ready for a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from padmmirnn.nn import Params

Average = Callable[[Params], Params]
Schedule = Callable[[int], float]
State = dict[str, np.ndarray | int | float]


def identity(params: Params) -> Params:
    """The serial ``average``: one worker's mean is itself."""
    return params


def _arrays(p: Params) -> list[np.ndarray]:
    return list(p.arrays().values())


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

    def step(self, params: Params, grads: Params,
             columns: Mapping[str, np.ndarray] | None = None) -> None:
        """One update of every weight. ``columns`` names weights whose gradient holds
        only some columns (``{name: sorted column ids}``, the gradient ``[rows,
        len(ids)]``: a token input's ``U`` at the batch's tokens). Those weights and
        their buffers change at these columns only, the others are left as they are:
        exact for SGD and Adagrad (a zero gradient changes nothing), the lazy variant
        of Momentum, RMSProp and Adam (the untouched columns' buffers do not decay
        until their token comes back; torch's ``SparseAdam``, TensorFlow's
        ``LazyAdam``), with t and the learning rate counted per step as in the dense
        update."""
        for buf in self.buffers:
            if buf not in self.state:
                self.state[buf] = params.zeros_like()
        lr = self.lr(self.t)
        self.t += 1
        for name in params.names():
            x, g = getattr(params, name), getattr(grads, name)
            bufs = [getattr(self.state[b], name) for b in self.buffers]
            cols = (columns or {}).get(name)
            if cols is None:
                self._update(x, g, lr, *bufs)
                continue
            xs, bs = x[:, cols], [b[:, cols] for b in bufs]
            self._update(xs, g, lr, *bs)
            x[:, cols] = xs
            for b, v in zip(bufs, bs, strict=True):
                b[:, cols] = v

    def _update(self, x: np.ndarray, g: np.ndarray, lr: float, *bufs: np.ndarray) -> None:
        """Update ``x`` and the buffers (in :attr:`buffers` order) in place."""
        raise NotImplementedError

    def state_dict(self) -> State:
        out: State = {"t": self.t}
        for buf, p in self.state.items():
            for k, v in p.arrays().items():
                out[f"{buf}.{k}"] = v.copy()
        return out

    def load_state_dict(self, state: State) -> None:
        self.t = int(state["t"])
        self.state = {}
        for buf in self.buffers:
            names = [k[len(buf) + 1:] for k in state if k.startswith(f"{buf}.")]
            if names:
                self.state[buf] = Params({k: np.array(state[f"{buf}.{k}"], np.float64)
                                          for k in names})


class SGD(Optimizer):
    """``x <- x - lr g``."""

    def _update(self, x: np.ndarray, g: np.ndarray, lr: float, *bufs: np.ndarray) -> None:
        x -= lr * g


class Momentum(Optimizer):
    """Heavy ball: ``v <- mu v + g``, ``x <- x - lr v``."""

    buffers = ("v",)

    def __init__(self, lr: float | Schedule, mu: float = 0.9) -> None:
        super().__init__(lr)
        self.mu = mu

    def _update(self, x: np.ndarray, g: np.ndarray, lr: float, *bufs: np.ndarray) -> None:
        (v,) = bufs
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

    def _update(self, x: np.ndarray, g: np.ndarray, lr: float, *bufs: np.ndarray) -> None:
        m, v = bufs
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

    def _update(self, x: np.ndarray, g: np.ndarray, lr: float, *bufs: np.ndarray) -> None:
        (v,) = bufs
        v *= self.alpha
        v += (1.0 - self.alpha) * g * g
        x -= lr * g / (np.sqrt(v) + self.eps)


class Adagrad(Optimizer):
    """``G <- G + g^2``, ``x <- x - lr g / (sqrt(G) + eps)``."""

    buffers = ("G",)

    def __init__(self, lr: float | Schedule = 1e-2, eps: float = 1e-10) -> None:
        super().__init__(lr)
        self.eps = eps

    def _update(self, x: np.ndarray, g: np.ndarray, lr: float, *bufs: np.ndarray) -> None:
        (G,) = bufs
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
            for k in params.names():
                getattr(params, k)[...] = getattr(mean, k)


OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD, "momentum": Momentum, "adam": Adam, "rmsprop": RMSProp, "adagrad": Adagrad,
    "celgc": CELGC,
}

"""The vanilla (Elman) RNN of DESIGN.md section 2 and its true forward pass.

    a_t = U x_t + W s_{t-1} + b,   s_t = f(a_t),   o_t = V s_t + c   (t in O),

with s_0 = 0, f = tanh or ReLU, O = {T} (many-to-one) or {1..T} (many-to-many).
Arrays are time-major and in row form: a state block is ``[N, h]``, so
``a_t = x_t U^T + s_{t-1} W^T + b``. Reported metrics always come from
:func:`forward` with the current weights, never from ADMM auxiliaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from padmmirnn import kernels
from padmmirnn.data import LocalData

ACTIVATIONS = {"tanh": kernels.ACT_TANH, "relu": kernels.ACT_RELU}
LOSSES = {"ce": kernels.LOSS_CE, "mse": kernels.LOSS_MSE}


@dataclass
class Params:
    """RNN weights: U ``[h, d]``, W ``[h, h]``, b ``[h]``, V ``[K, h]``, c ``[K]``."""

    U: np.ndarray
    W: np.ndarray
    b: np.ndarray
    V: np.ndarray
    c: np.ndarray

    NAMES = ("U", "W", "b", "V", "c")

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.NAMES}

    def copy(self) -> Params:
        return Params(*(getattr(self, k).copy() for k in self.NAMES))

    def flat(self) -> np.ndarray:
        """All weights in one float64 vector (U, W, b, V, c), e.g. for one collective."""
        return np.concatenate([np.ravel(getattr(self, k)) for k in self.NAMES]).astype(
            np.float64, copy=False)

    @classmethod
    def from_flat(cls, buf: np.ndarray, like: Params) -> Params:
        """The inverse of :meth:`flat`, shaped like ``like`` (copies)."""
        arrays, lo = [], 0
        for k in cls.NAMES:
            a = getattr(like, k)
            arrays.append(np.array(buf[lo:lo + a.size]).reshape(a.shape))
            lo += a.size
        return cls(*arrays)

    def astype(self, dtype: np.dtype) -> Params:
        return Params(*(np.asarray(getattr(self, k), dtype=dtype) for k in self.NAMES))


def activate(a: np.ndarray, activation: str, out: np.ndarray | None = None) -> np.ndarray:
    if activation == "tanh":
        return np.tanh(a, out=out)
    return np.maximum(a, 0, out=out)


def init_params(d: int, h: int, k: int, seed: int, w_init: str, scale: float) -> Params:
    """Seeded initial weights (float64). U ~ N(0, 1/d), V ~ N(0, 1/h); W orthogonal
    or N(0, 1/h), times ``scale`` (its spectral radius for orthogonal W)."""
    rng = np.random.default_rng([seed, 0x5EED])
    U = rng.standard_normal((h, d)) / np.sqrt(d)
    if w_init == "orthogonal":
        q, r = np.linalg.qr(rng.standard_normal((h, h)))
        W = q * np.sign(np.diag(r))
    else:
        W = rng.standard_normal((h, h)) / np.sqrt(h)
    V = rng.standard_normal((k, h)) / np.sqrt(h)
    return Params(U, scale * W, np.zeros(h), V, np.zeros(k))


def input_projection(U: np.ndarray, b: np.ndarray | None, data: LocalData,
                     out: np.ndarray) -> np.ndarray:
    """``out[t] = x_t U^T + b`` for all t (``[T, n, h]``; without b when it is None);
    token inputs gather U columns."""
    steps, n = data.inputs.shape[:2]
    flat = out.reshape(steps * n, -1)
    if data.info.kind == "tokens":
        kernels.gather_columns(np.ascontiguousarray(U.T), data.inputs.reshape(-1), flat)
    else:
        np.matmul(data.inputs.reshape(steps * n, -1), U.T, out=flat)
    if b is not None:
        flat += b
    return out


def forward_into(p: Params, data: LocalData, activation: str, pre: np.ndarray,
                 states: np.ndarray) -> None:
    """The forward pass in place: ``pre[t] = U x_t + W s_{t-1} + b`` (``[T, n, h]``)
    and ``states[t + 1] = f(pre[t])`` (``[T + 1, n, h]``, ``states[0]`` = 0 is read,
    not written); ``p`` in the arrays' dtype. The input projection is one product
    for all t; the recurrent product and the bias are added in one pass per step."""
    input_projection(p.U, None, data, pre)
    pre[0] += p.b
    rec = np.empty_like(pre[0])
    WT = np.ascontiguousarray(p.W.T)
    for t in range(pre.shape[0]):
        if t:
            np.matmul(states[t], WT, out=rec)
            kernels.add_recurrent(pre[t], rec, p.b)
        activate(pre[t], activation, out=states[t + 1])


def forward(params: Params, data: LocalData, activation: str,
            dtype: np.dtype = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """True forward pass. Returns states ``[T + 1, n, h]`` (s_0 = 0) and the
    pre-activations ``[T, n, h]`` in ``dtype``."""
    p = params.astype(dtype)
    steps, n = data.inputs.shape[:2]
    h = p.W.shape[0]
    pre = np.empty((steps, n, h), dtype)
    states = np.zeros((steps + 1, n, h), dtype)
    forward_into(p, data, activation, pre, states)
    return states, pre


def outputs(params: Params, states: np.ndarray, many_to_many: bool) -> np.ndarray:
    """``o_t = s_t V^T + c`` for t in O: ``[|O|, n, K]``."""
    s_out = states[1:] if many_to_many else states[-1:]
    V = params.V.astype(states.dtype)
    return s_out @ V.T + params.c.astype(states.dtype)


def loss_sums(params: Params, data: LocalData, activation: str, loss: str,
              dtype: np.dtype = np.float64) -> np.ndarray:
    """Local sums ``[loss, correct, count]`` over this rank's output rows (float64),
    ready to be reduced; mean loss = loss / count, accuracy = correct / count."""
    states, _ = forward(params, data, activation, dtype)
    o = outputs(params, states, data.info.many_to_many)
    rows = o.shape[0] * o.shape[1]
    total, correct = kernels.loss_and_correct(
        o.reshape(rows, -1), data.targets.reshape(-1), LOSSES[loss]
    )
    return np.array([total, float(correct), float(rows)])

"""The vanilla (Elman) RNN (docs/design.md, section 2): its one forward pass and its
one adjoint (backward) recursion, shared by evaluation, the ADMM engine and BPTT.

    a_t = U x_t + W s_{t-1} + b,   s_t = f(a_t),   o_t = V s_t + c   (t in O),

with s_0 = 0, f = tanh or ReLU, O = {T} (many-to-one) or {1..T} (many-to-many).
Arrays are time-major and feature-major (column form): a state block is ``[h, N]``,
so ``a_t = U x_t + W s_{t-1} + b`` is a product on the left; outputs are rows
``[N, K]`` (the loss kernels work per row). Reported metrics always come from
:func:`forward` with the current weights, never from ADMM auxiliaries.

The adjoint recursion (:func:`adjoint_into`) runs backward in time,

    g_t = W^T e_{t+1} [t < T] + V^T delta_t [t in O],    e_t = f'(a_t) * g_t,

for output-side seeds ``delta_t``: with ``delta = dL/do`` it gives the BPTT adjoints
``e_t = dL/da_t`` (and the weight gradients are sums of ``e_t z_t^T``, the same
statistics the ADMM weight blocks use); with ``delta = -dl/do`` it gives the KKT
multipliers ``lambda1 = e``, ``lambda2 = g``. Measured at mini-batch shapes (64
samples, h = 64 and 128), the feature-major products run as fast as the row form
(docs/performance.md), so there is one layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from padmmirnn import kernels
from padmmirnn.samples import DatasetInfo, LocalData

ACTIVATIONS = {"tanh": kernels.ACT_TANH, "relu": kernels.ACT_RELU}
# An evaluation (:func:`loss_sums`) runs forward passes over blocks of at most this
# many samples, and at most EVAL_BYTES of states and pre-activations per block.
EVAL_BLOCK = 4096
EVAL_BYTES = 256 * 2 ** 20


def eval_block(info: DatasetInfo, h: int, itemsize: int) -> int:
    """Samples per forward pass of an evaluation: at most :data:`EVAL_BLOCK`, and at
    most :data:`EVAL_BYTES` of stacked state and pre-activations (long sequences)."""
    per_sample = ((info.steps + 1) * (input_rows(info) + 1 + h) + info.steps * h) * itemsize
    return max(1, min(EVAL_BLOCK, EVAL_BYTES // per_sample))
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


def input_rows(info: DatasetInfo) -> int:
    """Rows of x_t in the stacked state :func:`stacked_state` (0 for tokens: their
    U x_t is a gather of U's columns, not a product)."""
    return 0 if info.kind == "tokens" else info.dim


def stacked_state(data: LocalData, h: int, dtype: np.dtype, extra: int = 0,
                  rows_outer: bool = False) -> np.ndarray:
    """``Z`` ``[T + 1, dz + 1 + h + extra, n]``, feature-major: ``Z[t] = [x_t; 1; s_{t-1};
    e_t]`` (``dz`` = :func:`input_rows`) with the states zero (s_0 = 0), ``Z[T] = [0; 1;
    s_T; 0]`` and ``extra`` rows ``e_t`` for the caller (the ADMM engine keeps lambda1
    there). The states are the view :func:`states_of`. With this layout a_t = [U b W]
    Z[t, :dz + 1 + h] is ONE product per step, the sums of the weight blocks are products
    of Z with its own rows; and BLAS multiplies an ``[h, h]`` matrix into ``[h, n]``
    blocks faster than ``[n, h]`` blocks into an ``[h, h]`` one (measured: 86% against
    58% of the square-GEMM rate at h = 128). ``rows_outer``: the memory holds ``[dz + 1 + h
    + extra, T + 1, n]`` and Z is its transposed view, so that the steps of one row are
    side by side: sums over steps of products become one product of ``[rows, T n]``
    views (mini-batches)."""
    steps, n = data.inputs.shape[:2]
    dz = input_rows(data.info)
    rows = dz + 1 + h + extra
    if rows_outer:
        Z = np.zeros((rows, steps + 1, n), dtype).transpose(1, 0, 2)
    else:
        Z = np.zeros((steps + 1, rows, n), dtype)
    if dz:
        Z[:steps, :dz] = data.inputs.transpose(0, 2, 1)
    Z[:, dz] = 1.0
    return Z


def states_of(Z: np.ndarray, dz: int, h: int) -> np.ndarray:
    """The states ``s_t`` in ``Z`` (``dz`` rows of inputs): the view ``[T + 1, h, n]``."""
    return Z[:, dz + 1:dz + 1 + h]


def stacked_weights(p: Params, tokens: bool) -> np.ndarray:
    """``[U b W]`` (``[b W]`` for tokens), the matrix applied to ``Z[t, :dz + 1 + h]``."""
    cols = [p.b[:, None], p.W] if tokens else [p.U, p.b[:, None], p.W]
    return np.concatenate(cols, axis=1)


def input_projection(p: Params, data: LocalData, Z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[t] = U x_t + b`` for all t (``[T, h, n]``); token inputs gather U columns."""
    steps = out.shape[0]
    if data.info.kind == "tokens":
        out[...] = p.b[:, None]
        for t in range(steps):
            kernels.add_columns(p.U, data.inputs[t], out[t])
    else:
        dz = data.info.dim
        np.matmul(p.U, Z[:steps, :dz], out=out)
        out += p.b[:, None]
    return out


def forward_into(p: Params, data: LocalData, activation: str, pre: np.ndarray,
                 Z: np.ndarray) -> None:
    """The forward pass in place, feature-major: ``pre[t] = [U b W] [x_t; 1; s_{t-1}]``
    (``[T, h, n]``) and ``s_t = f(pre[t])`` written into the state rows of ``Z[t + 1]``
    (see :func:`stacked_state`; ``s_0`` = 0 is read, not written); ``p`` in the arrays'
    dtype. One product per step (the first without the zero state)."""
    tokens = data.info.kind == "tokens"
    h = p.W.shape[0]
    dz = input_rows(data.info)
    theta = stacked_weights(p, tokens)
    for t in range(pre.shape[0]):
        if t:
            np.matmul(theta, Z[t, :dz + 1 + h], out=pre[t])
        elif tokens:
            pre[0] = p.b[:, None]
        else:
            np.matmul(p.U, Z[0, :dz], out=pre[0])
            pre[0] += p.b[:, None]
        if tokens:
            kernels.add_columns(p.U, data.inputs[t], pre[t])
        activate(pre[t], activation, out=Z[t + 1, dz + 1:dz + 1 + h])


def forward(params: Params, data: LocalData, activation: str,
            dtype: np.dtype = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """True forward pass. Returns the states ``[T + 1, h, n]`` (s_0 = 0; a view of the
    stacked state) and the pre-activations ``[T, h, n]`` in ``dtype``, feature-major."""
    p = params.astype(dtype)
    steps, n = data.inputs.shape[:2]
    h = p.W.shape[0]
    pre = np.empty((steps, h, n), dtype)
    Z = stacked_state(data, h, dtype)
    forward_into(p, data, activation, pre, Z)
    return states_of(Z, input_rows(data.info), h), pre


def outputs(params: Params, states: np.ndarray, many_to_many: bool,
            out: np.ndarray | None = None) -> np.ndarray:
    """``o_t = V s_t + c`` for t in O, in rows ``[|O|, n, K]`` (``states`` feature-major
    ``[T + 1, h, n]``)."""
    s_out = states[1:] if many_to_many else states[-1:]
    V = params.V.astype(states.dtype)
    o = np.matmul(s_out.transpose(0, 2, 1), V.T, out=out)
    o += params.c.astype(states.dtype)
    return o


def loss_sums(params: Params, data: LocalData, activation: str, loss: str,
              dtype: np.dtype = np.float64) -> np.ndarray:
    """Local sums ``[loss, correct, count]`` over this rank's output rows (float64),
    ready to be reduced; mean loss = loss / count, accuracy = correct / count. Forward
    passes over blocks of :func:`eval_block` samples, so evaluating a large split never
    holds the states of all its samples."""
    n = data.inputs.shape[1]
    size = eval_block(data.info, params.W.shape[0], np.dtype(dtype).itemsize)
    out = np.zeros(3)
    for lo in range(0, n, size):
        block = data if n <= size else LocalData(
            data.info, data.inputs[:, lo:lo + size], data.targets[:, lo:lo + size], 0,
            min(n - lo, size))
        states, _ = forward(params, block, activation, dtype)
        o = outputs(params, states, data.info.many_to_many)
        rows = o.shape[0] * o.shape[1]
        total, correct = kernels.loss_and_correct(o.reshape(rows, -1),
                                                  block.targets.reshape(-1), LOSSES[loss])
        out += (total, float(correct), float(rows))
    return out


def adjoint_into(p: Params, states: np.ndarray, delta: np.ndarray, many_to_many: bool,
                 activation: str, out: np.ndarray, carry: np.ndarray | None = None,
                 pre: np.ndarray | None = None) -> None:
    """The backward recursion through time, in place (``p`` in the arrays' dtype):

        g_t = W^T out[t + 1] [t < T] + V^T delta_t [t in O],   out[t] = f'(a_t) * g_t,

    ``states`` ``[T + 1, h, n]`` (s_0 = 0), ``delta`` the output seeds in rows ``[|O|, n,
    K]``, ``out`` ``[T, h, n]``. ``carry`` (``[T, h, n]``), if given, receives every g_t.
    f'(a_t) is read off s_t = f(a_t) (tanh: 1 - s^2, ReLU: [s > 0]) unless ``pre``
    (the pre-activations ``[T, h, n]``) is given: then from a_t, for auxiliaries that
    are not a forward pass."""
    steps = out.shape[0]
    WT = np.ascontiguousarray(p.W.T)
    VT = np.ascontiguousarray(p.V.T)
    seed = np.empty_like(out[0])
    g = np.empty_like(out[0]) if carry is None else None
    for t in range(steps - 1, -1, -1):
        g_t = g if carry is None else carry[t]
        if t < steps - 1:
            np.matmul(WT, out[t + 1], out=g_t)
        else:
            g_t[...] = 0.0
        if many_to_many or t == steps - 1:
            np.matmul(VT, delta[t if many_to_many else 0].T, out=seed)
            g_t += seed
        e_t = out[t]
        if activation == "tanh":
            if pre is not None:
                np.tanh(pre[t], out=e_t)
            kernels.tanh_adjoint(states[t + 1] if pre is None else e_t, g_t, e_t)
        else:
            np.greater(states[t + 1] if pre is None else pre[t], 0.0, out=e_t,
                       casting="unsafe")
            e_t *= g_t

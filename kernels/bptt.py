"""Back-propagation through time (BPTT) for the vanilla RNN of DESIGN.md section 2.

Forward pass in row form, time-major, ``s_0 = 0``:

    a_t = x_t U^T + s_{t-1} W^T + b,   s_t = f(a_t),   o_t = s_t V^T + c   (t in O)

Loss: the mean over the R = n |O| output rows, L = 1/R sum_{i, t in O} l(o_t, y_t),
with l softmax cross-entropy or 1/2 ||o - e_y||^2. Backward pass:

    delta_t = dL/do_t = (softmax(o_t) - e_y) / R  (ce),   (o_t - e_y) / R  (mse)
    dL/ds_t = delta_t V [t in O] + dL/da_{t+1} W
    dL/da_t = dL/ds_t * f'(a_t),    f'(a_t) = 1 - s_t^2 (tanh),  [s_t > 0] (relu)
    dV = sum_t delta_t^T s_t,   dc = sum_t delta_t^T 1,
    dW = sum_t dL/da_t^T s_{t-1},   db = sum_t dL/da_t^T 1,   dU = sum_t dL/da_t^T x_t

f' is evaluated from the stored states ``[T + 1, n, h]``, so pre-activations
are not kept. Each time step costs BLAS GEMMs on ``[n, h]`` blocks that stay in
cache (forward: x_t U^T and s_{t-1} W^T; backward: dL/da_t W, dL/da_t^T s_{t-1}
and dL/da_t^T x_t); the backward pass keeps only the current gradient block.
Token inputs (``U x_t = U[:, j]``) gather columns of U in the forward pass and
give ``dU[:, j]`` = the sum of the dL/da_t rows at positions holding token j, a
segment sum (no one-hot matrices).
"""

import math

import numba as nb
import numpy as np

from padmmirnn.kernels.activation import ACT_RELU, ACT_TANH
from padmmirnn.kernels.output import LOSS_MSE
from padmmirnn.kernels.tokens import gather_columns, segment_add


@nb.njit(cache=True)
def output_delta(o, y, loss, scale):
    """Turn the outputs ``o`` (``[R, K]``) into ``scale * dl/do`` in place.

    ce: ``dl/do = softmax(o) - e_y``; mse: ``dl/do = o - e_y``. Returns the loss sum
    over the rows (float64), computed as ``loss_and_correct`` does.
    """
    rows, K = o.shape
    total = 0.0
    for i in range(rows):
        yi = y[i]
        if loss == LOSS_MSE:
            sq = 0.0
            for k in range(K):
                r = o[i, k] - (1.0 if k == yi else 0.0)
                sq += r * r
                o[i, k] = r * scale
            total += 0.5 * sq
        else:
            oy = o[i, yi]
            mx = o[i, 0]
            for k in range(1, K):
                if o[i, k] > mx:
                    mx = o[i, k]
            z = 0.0
            for k in range(K):
                e = math.exp(o[i, k] - mx)
                o[i, k] = e
                z += e
            total += mx + math.log(z) - oy
            w = scale / z
            for k in range(K):
                o[i, k] *= w
            o[i, yi] -= scale
    return total


@nb.njit(cache=True)
def step_backward(ds, extra, s, act, da, db):
    """``da = (ds + extra) * f'(a)`` for one time step (``[n, h]`` arrays), and
    ``db += sum_i da_i``.

    ``s = f(a)`` is the stored state; ``extra`` may be empty (then omitted).
    Returns the sum over rows of ``||da_i||``.
    """
    rows, cols = da.shape
    has_extra = extra.size > 0
    total = 0.0
    for i in range(rows):
        sq = 0.0
        for j in range(cols):
            g = ds[i, j]
            if has_extra:
                g += extra[i, j]
            sij = s[i, j]
            if act == ACT_RELU:
                v = g if sij > 0.0 else 0.0
            else:
                v = g * (1.0 - sij * sij)
            da[i, j] = v
            db[j] += v
            sq += v * v
        total += math.sqrt(sq)
    return total


def forward_states(inputs: np.ndarray, U: np.ndarray, W: np.ndarray, b: np.ndarray,
                   act: int) -> np.ndarray:
    """States ``[T + 1, n, h]`` of the forward pass (``s_0 = 0``) in the dtype of W.

    ``inputs`` is ``[T, n, d]`` float (dense) or ``[T, n]`` integer token ids.
    """
    dtype = W.dtype
    steps, n = inputs.shape[:2]
    h = W.shape[0]
    states = np.empty((steps + 1, n, h), dtype)
    states[0] = 0.0
    UT = np.ascontiguousarray(U.T, dtype)
    WT = np.ascontiguousarray(W.T)
    b = b.astype(dtype, copy=False)
    a = np.empty((n, h), dtype)
    rec = np.empty((n, h), dtype)
    for t in range(steps):
        if inputs.ndim == 2:
            gather_columns(UT, inputs[t], a)
        else:
            np.matmul(inputs[t], UT, out=a)
        if t:
            np.matmul(states[t], WT, out=rec)
            a += rec
        a += b
        if act == ACT_TANH:
            np.tanh(a, out=states[t + 1])
        else:
            np.maximum(a, 0.0, out=states[t + 1])
    return states


def bptt(inputs: np.ndarray, targets: np.ndarray, U: np.ndarray, W: np.ndarray,
         b: np.ndarray, V: np.ndarray, c: np.ndarray, act: int, loss: int
         ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                    np.ndarray]:
    """Mean loss and its exact gradients by back-propagation through time.

    ``inputs`` is ``[T, n, d]`` (dense) or ``[T, n]`` token ids (vocabulary
    ``U.shape[1]``); ``targets`` is ``[1, n]`` (many-to-one: output at t = T) or
    ``[T, n]`` (many-to-many) integer labels. Computes in the dtype of W.

    Returns ``(L, dU, dW, db, dV, dc, norms)``: the mean loss L over the output rows
    (float), the gradients of L shaped like the weights, and ``norms[t - 1] =
    sum_i ||dL/da_{t,i}||`` = the mean over the n samples of ``||dL_i/da_{t,i}||``,
    where L_i is sample i's mean loss over its output steps (``[T]``, float64):
    its decay towards t = 1 shows vanishing gradients, its growth exploding ones.
    """
    steps, n = inputs.shape[:2]
    outs = targets.shape[0]
    if outs not in (1, steps) or targets.shape[1] != n:
        raise ValueError(f"targets shape {targets.shape} does not fit inputs {inputs.shape}")
    dtype = W.dtype
    h = W.shape[0]
    tokens = inputs.ndim == 2
    V = V.astype(dtype, copy=False)
    states = forward_states(inputs, U, W, b, act)
    many = outs == steps and steps > 1
    s_out = states[1:].reshape(steps * n, h) if many else states[steps]
    delta = s_out @ V.T
    delta += c.astype(dtype)
    rows = delta.shape[0]
    total = output_delta(delta, targets.reshape(-1), loss, 1.0 / rows)
    dV = delta.T @ s_out
    dc = delta.sum(axis=0)
    dW = np.zeros((h, h), dtype)
    db = np.zeros(h, dtype)
    dU = np.zeros((U.shape[1], h) if tokens else U.shape, dtype)  # dU^T for tokens
    part_w = np.empty((h, h), dtype)
    part_u = np.empty((0, 0) if tokens else U.shape, dtype)
    norms = np.empty(steps)
    da = np.empty((n, h), dtype)
    ds = np.zeros((n, h), dtype)
    extra = np.empty((n, h), dtype)
    for t in range(steps - 1, -1, -1):  # da = dL/da_{t+1}, the state is states[t + 1]
        if t < steps - 1:
            np.matmul(da, W, out=ds)
        j = t if many else t - steps + 1  # output block of s_{t+1}, if any
        if j >= 0:
            np.matmul(delta[j * n:(j + 1) * n], V, out=extra)
        norms[t] = step_backward(ds, extra if j >= 0 else extra[:0], states[t + 1], act, da,
                                 db)
        if t:
            np.matmul(da.T, states[t], out=part_w)
            dW += part_w
        if tokens:
            segment_add(inputs[t], da, dU)
        else:
            np.matmul(da.T, inputs[t].astype(dtype, copy=False), out=part_u)
            dU += part_u
    if tokens:
        dU = np.ascontiguousarray(dU.T)
    return total / rows, dU, dW, db, dV, dc, norms


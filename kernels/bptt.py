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

f' is evaluated from the stored states, so pre-activations are not kept. The
products over all time steps are single BLAS GEMMs on 2-D views; the time loop
holds one ``[n, h] x [h, h]`` product per step. Token inputs (``U x_t = U[:, j]``)
give ``dU[:, j]`` = the sum of the dL/da_t rows at positions holding token j, a
segment sum (no one-hot matrices).
"""

import math

import numba as nb
import numpy as np
from padmmirnn.kernels.activation import ACT_RELU, ACT_TANH
from padmmirnn.kernels.output import LOSS_MSE
from padmmirnn.kernels.tokens import gather_columns, segment_sum


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
def step_backward(ds, extra, s, act, da):
    """``da = (ds + extra) * f'(a)`` for one time step (``[n, h]`` arrays).

    ``s = f(a)`` is the stored state; ``extra`` may be empty (then omitted) and may
    be the same array as ``da``. Returns the sum over rows of ``||da_i||``.
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
            sq += v * v
        total += math.sqrt(sq)
    return total


def _activate(a: np.ndarray, act: int) -> None:
    if act == ACT_TANH:
        np.tanh(a, out=a)
    else:
        np.maximum(a, 0.0, out=a)


def rnn_states(inputs: np.ndarray, U: np.ndarray, W: np.ndarray, b: np.ndarray,
               act: int) -> np.ndarray:
    """States ``[T + 1, n, h]`` of the forward pass (``s_0 = 0``) in the dtype of W.

    ``inputs`` is ``[T, n, d]`` float (dense) or ``[T, n]`` integer token ids.
    """
    dtype = W.dtype
    steps, n = inputs.shape[:2]
    h = W.shape[0]
    states = np.empty((steps + 1, n, h), dtype)
    states[0] = 0.0
    flat = states[1:].reshape(steps * n, h)
    if inputs.ndim == 2:
        gather_columns(np.ascontiguousarray(U.T, dtype), inputs.reshape(-1), flat)
    else:
        np.matmul(inputs.reshape(steps * n, -1).astype(dtype, copy=False), U.T.astype(dtype),
                  out=flat)
    flat += b.astype(dtype)
    WT = np.ascontiguousarray(W.T)
    rec = np.empty((n, h), dtype)
    for t in range(steps):
        if t:
            np.matmul(states[t], WT, out=rec)
            states[t + 1] += rec
        _activate(states[t + 1], act)
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
    V = V.astype(dtype, copy=False)
    states = rnn_states(inputs, U, W, b, act)
    many = outs == steps and steps > 1
    s_out = states[1:].reshape(steps * n, h) if many else states[steps]
    delta = s_out @ V.T
    delta += c.astype(dtype)
    rows = delta.shape[0]
    total = output_delta(delta, targets.reshape(-1), loss, 1.0 / rows)
    dV = delta.T @ s_out
    dc = delta.sum(axis=0)
    da = np.empty((steps, n, h), dtype)
    norms = np.empty(steps)
    none = np.empty((0, 0), dtype)
    if many:
        np.matmul(delta, V, out=da.reshape(steps * n, h))
        norms[-1] = step_backward(da[-1], none, states[steps], act, da[-1])
    else:
        norms[-1] = step_backward(delta @ V, none, states[steps], act, da[-1])
    ds = np.empty((n, h), dtype)
    for t in range(steps - 2, -1, -1):
        np.matmul(da[t + 1], W, out=ds)
        norms[t] = step_backward(ds, da[t] if many else none, states[t + 1], act, da[t])
    da_flat = da.reshape(steps * n, h)
    dW = da[1:].reshape(-1, h).T @ states[1:steps].reshape(-1, h)
    db = da_flat.sum(axis=0)
    if inputs.ndim == 2:
        dU = np.ascontiguousarray(segment_sum(inputs.reshape(-1), da_flat, U.shape[1]).T)
    else:
        dU = da_flat.T @ inputs.reshape(steps * n, -1).astype(dtype, copy=False)
    return total / rows, dU, dW, db, dV, dc, norms

"""The Elman (vanilla) cell, PyTorch's ``nn.RNN``:

    a_t = U x_t + b + W s_{t-1},    s_t = f(a_t)      (f = tanh or ReLU)

Adjoint, from the seeds ``g_t = dL/ds_t`` coming from outside the layer:

    lambda_t = W^T e_{t+1} [t < T] + g_t,    e_t = f'(a_t) * lambda_t,

``e_t = dL/da_t`` is both ``delta_in`` and ``delta_hh``. ``f'`` is read off the states
(``1 - s_t^2`` for tanh, ``[s_t > 0]`` for ReLU) unless pre-activations are given (the
full-batch ADMM's auxiliaries, which need not be a forward pass). One product per
step: ``a_t = [U b W] z_t`` with ``z_t = [x_t; 1; s_{t-1}]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from padmmirnn import kernels
from padmmirnn.nn.cells.base import Cell, Trace, scratch, spans, stacked_weights
from padmmirnn.nn.params import Layer


def activate(a: np.ndarray, activation: str, out: np.ndarray | None = None) -> np.ndarray:
    if activation == "tanh":
        return np.tanh(a, out=out)
    return np.maximum(a, 0, out=out)


class ElmanTrace(Trace):
    """The pre-activations ``[T, h, n]``, overwritten by the adjoint ``e_t``."""

    def __init__(self, pre: np.ndarray):
        self.pre = pre
        self.delta_in = self.delta_hh = pre


def elman_forward(w: Layer, Z: np.ndarray, dx: int, tokens: np.ndarray | None,
                  activation: str, pre: np.ndarray, zero_start: bool = True,
                  active: Sequence[int] | None = None) -> None:
    """``pre[t] = a_t`` and ``Z[t + 1, dx + 1:] = f(a_t)``; the first step without the
    state when it is zero (``zero_start``); ``active``: step t only on the columns
    ``[:n_t]`` (:func:`~padmmirnn.nn.cells.base.spans`)."""
    h = w.W.shape[0]
    theta = stacked_weights(w, tokens is not None)
    for t, (a, _) in enumerate(spans(pre.shape[0], pre.shape[2], active)):
        P = pre[t, :, :a]
        if t or not zero_start:
            np.matmul(theta, Z[t, :dx + 1 + h, :a], out=P)
        elif tokens is not None:
            P[...] = w.b[:, None]
        else:
            np.matmul(w.U, Z[0, :dx, :a], out=P)
            P += w.b[:, None]
        if tokens is not None:
            kernels.add_columns(w.U, tokens[t, :a], P)
        activate(P, activation, out=Z[t + 1, dx + 1:dx + 1 + h, :a])


def elman_adjoint(W: np.ndarray, states: np.ndarray, seeds: np.ndarray, every_step: bool,
                  activation: str, out: np.ndarray, carry: np.ndarray | None = None,
                  pre: np.ndarray | None = None,
                  active: Sequence[int] | None = None) -> None:
    """``out[t] = e_t`` (``[T, h, n]``) from ``states`` ``[T + 1, h, n]`` (s_0 = 0) and the
    seeds (``[T, h, n]``, or ``[1, h, n]`` at each sample's last step); ``carry``
    receives every lambda_t; ``pre`` the pre-activations, when ``f'`` cannot be read off
    the states; ``active``: step t on the columns ``[:a_t]``, of which ``[b_t:a_t]``
    end there (lambda_t = g_t) and ``[:b_t]`` carry ``W^T e_{t+1}``."""
    steps = out.shape[0]
    WT = np.ascontiguousarray(W.T)
    g = np.empty_like(out[0]) if carry is None else None
    for t, (a, b) in reversed(list(enumerate(spans(steps, out.shape[2], active)))):
        g_t = g if carry is None else carry[t]
        if b:
            np.matmul(WT, out[t + 1, :, :b], out=g_t[:, :b])
            if every_step:
                g_t[:, :b] += seeds[t, :, :b]
        if a > b:
            g_t[:, b:a] = seeds[t if every_step else 0, :, b:a]
        e_t, g_a = out[t, :, :a], g_t[:, :a]
        if activation == "tanh":
            if pre is not None:
                np.tanh(pre[t, :, :a], out=e_t)
            kernels.tanh_adjoint(states[t + 1, :, :a] if pre is None else e_t, g_a, e_t)
        else:
            np.greater(states[t + 1, :, :a] if pre is None else pre[t, :, :a], 0.0, out=e_t,
                       casting="unsafe")
            e_t *= g_a


class ElmanCell(Cell):
    name = "rnn"
    gates = 1
    activations = ("tanh", "relu")

    def trace(self, steps: int, h: int, n: int, dtype: np.dtype,
              side_by_side: bool) -> ElmanTrace:
        return ElmanTrace(scratch(steps, h, n, dtype, side_by_side))

    def forward(self, w: Layer, Z: np.ndarray, dx: int, tokens: np.ndarray | None,
                trace: ElmanTrace, zero_start: bool = True,
                active: Sequence[int] | None = None) -> None:
        elman_forward(w, Z, dx, tokens, self.activation, trace.pre, zero_start, active)

    def adjoint(self, w: Layer, Z: np.ndarray, dx: int, trace: ElmanTrace,
                seeds: np.ndarray, every_step: bool,
                active: Sequence[int] | None = None) -> None:
        h = w.W.shape[0]
        elman_adjoint(w.W, Z[:, dx + 1:dx + 1 + h], seeds, every_step, self.activation,
                      trace.pre, active=active)

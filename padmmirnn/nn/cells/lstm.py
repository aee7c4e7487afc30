"""The LSTM cell, PyTorch's ``nn.LSTM`` (no peepholes, no projection), gates in its
order ``i, f, g, o``:

    P_t = U x_t + b + W s_{t-1}                      ([4 h, n])
    i, f, o = sigma(P_i), sigma(P_f), sigma(P_o),    g = tanh(P_g)
    c_t = f * c_{t-1} + i * g,    s_t = o * tanh(c_t)          (c_0 = s_0 = 0)

Adjoint, with ``ds_t = g_t + W^T delta_{t+1}`` (``g_t`` the outside seed) and the cell
carry ``dc``:

    dc_t = dc_{t+1} f_{t+1} + ds_t o_t (1 - tanh(c_t)^2)
    delta_i = dc_t g i (1 - i),   delta_f = dc_t c_{t-1} f (1 - f),
    delta_g = dc_t i (1 - g^2),   delta_o = ds_t tanh(c_t) o (1 - o)

All four gates are linear in the same ``z_t = [x_t; 1; s_{t-1}]``: one product per
step, one Gram matrix for the ADMM block step, ``delta_hh = delta_in``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from padmmirnn import kernels
from padmmirnn.nn.cells.base import Cell, Trace, gate_scale, scratch, spans, stacked_weights
from padmmirnn.nn.params import Layer


class LstmTrace(Trace):
    """Activated gates ``[T, 4h, n]`` (overwritten by the adjoint), cell states
    ``[T + 1, h, n]`` and ``tanh(c_t)`` ``[T, h, n]``."""

    def __init__(self, gates: np.ndarray, cells: np.ndarray, tanh_c: np.ndarray):
        self.gates, self.tanh_c = gates, tanh_c
        self.cells = cells
        self.delta_in = self.delta_hh = gates


class LstmCell(Cell):
    name = "lstm"
    gates = 4
    trace_blocks = 6

    def initial_bias(self, h: int) -> np.ndarray:
        """Forget-gate bias 1 (Jozefowicz et al. 2015: the cell keeps its state at the
        start of training), the other gates 0."""
        b = np.zeros(4 * h)
        b[h:2 * h] = 1.0
        return b

    def trace(self, steps: int, h: int, n: int, dtype: np.dtype,
              side_by_side: bool) -> LstmTrace:
        cells = np.empty((steps + 1, h, n), dtype)
        cells[0] = 0.0
        return LstmTrace(scratch(steps, 4 * h, n, dtype, side_by_side), cells,
                         np.empty((steps, h, n), dtype))

    def forward(self, w: Layer, Z: np.ndarray, dx: int, tokens: np.ndarray | None,
                trace: LstmTrace, zero_start: bool = True,
                active: Sequence[int] | None = None) -> None:
        """Per step, on the active columns ``[:a_t]``: ``P_t`` (the i, f, o rows from
        weights scaled by 1/2, so that one ``tanh`` of the whole block gives every gate:
        ``sigma(x) = (1 + tanh(x/2)) / 2``), then
        :func:`~padmmirnn.kernels.lstm_forward_step` (gates, ``c_t``), ``tanh(c_t)`` and
        ``s_t = o tanh(c_t)``."""
        h = w.W.shape[1]
        half = gate_scale(h, w.W.dtype)
        theta = stacked_weights(w, tokens is not None) * half[:, None]
        U = w.U * half[:, None] if tokens is not None else None
        A, C, TC = trace.gates, trace.cells, trace.tanh_c
        for t, (a, _) in enumerate(spans(A.shape[0], A.shape[2], active)):
            P = A[t, :, :a]
            np.matmul(theta, Z[t, :dx + 1 + h, :a], out=P)
            if tokens is not None:
                kernels.add_columns(U, tokens[t, :a], P)
            np.tanh(P, out=P)
            kernels.lstm_forward_step(P, C[t, :, :a], C[t + 1, :, :a])
            np.tanh(C[t + 1, :, :a], out=TC[t, :, :a])
            np.multiply(P[3 * h:], TC[t, :, :a], out=Z[t + 1, dx + 1:dx + 1 + h, :a])

    def adjoint(self, w: Layer, Z: np.ndarray, dx: int, trace: LstmTrace,
                seeds: np.ndarray, every_step: bool,
                active: Sequence[int] | None = None) -> None:
        """Per step: ``ds = W^T delta_{t+1}`` (one product) on the columns that go on to
        t + 1, then :func:`~padmmirnn.kernels.lstm_backward_step` (the seed, the cell
        carry and the four gate adjoints, over the gates); the columns that end at t
        start from their seed alone (their cell carry is still zero)."""
        h = w.W.shape[1]
        WT = np.ascontiguousarray(w.W.T)
        A, C, TC = trace.gates, trace.cells, trace.tanh_c
        ds = np.empty((h, A.shape[2]), A.dtype)
        dc = np.zeros_like(ds)
        none = np.empty((0, 0), A.dtype)
        for t, (a, b) in reversed(list(enumerate(spans(A.shape[0], A.shape[2], active)))):
            if b:
                np.matmul(WT, A[t + 1, :, :b], out=ds[:, :b])  # A[t + 1] holds delta_{t + 1}
                kernels.lstm_backward_step(A[t, :, :b], C[t, :, :b], TC[t, :, :b], ds[:, :b],
                                           seeds[t, :, :b] if every_step else none,
                                           dc[:, :b])
            if a > b:
                kernels.lstm_backward_step(A[t, :, b:a], C[t, :, b:a], TC[t, :, b:a],
                                           seeds[t if every_step else 0, :, b:a], none,
                                           dc[:, b:a])

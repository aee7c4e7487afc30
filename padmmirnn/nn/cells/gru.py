"""The GRU cell as PyTorch's ``nn.GRU`` and ONNX's ``GRU`` with ``linear_before_reset =
1`` define it, gates in their order ``r, z, n``:

    r = sigma(U_r x_t + b_r + W_r s_{t-1}),   z = sigma(U_z x_t + b_z + W_z s_{t-1})
    n = tanh(U_n x_t + b_n + r * (W_n s_{t-1} + b_h))
    s_t = (1 - z) * n + z * s_{t-1}

(``b`` ``[3 h]`` holds PyTorch's ``b_ih + b_hh`` for r and z and ``b_in`` for n; ``bh``
is ``b_hn``.) Adjoint, with ``ds_t = g_t + z_{t+1} ds_{t+1} + W^T delta_hh_{t+1}``:

    a_n = ds (1 - z) (1 - n^2)                 (the adjoint of n's pre-activation)
    delta_r = a_n (W_n s_{t-1} + b_h) r (1 - r),   delta_z = ds (s_{t-1} - n) z (1 - z)
    delta_in = [delta_r; delta_z; a_n],            delta_hh = [delta_r; delta_z; r a_n]

The candidate's rows are :attr:`GruCell.split_rows`: their input part ``[U_n b_n]`` is
linear in ``[x_t; 1]`` with adjoint ``a_n``, their recurrent part ``[W_n b_h]`` in
``[s_{t-1}; 1]`` with adjoint ``r a_n``. The ADMM block step solves the r and z rows
against the Gram matrix of ``z_t = [x_t; 1; s_{t-1}]`` as the other cells do, and the
candidate's two parts each against its own sub-block of that same matrix, the
Kronecker input factor of each linear map (docs/design.md, section 5).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from padmmirnn import kernels
from padmmirnn.nn.cells.base import Cell, Trace, gate_scale, scratch, spans, stacked_weights
from padmmirnn.nn.params import Layer


class GruTrace(Trace):
    """Activated gates ``[T, 3h, n]`` (overwritten by ``delta_in``), the recurrent
    candidate product ``W_n s_{t-1} + b_h`` ``[T, h, n]`` (overwritten by ``r a_n``, the
    candidate rows of ``delta_hh``)."""

    def __init__(self, gates: np.ndarray, hn: np.ndarray):
        self.gates, self.hn = gates, hn
        self.delta_in, self.delta_hh = gates, hn


class GruCell(Cell):
    name = "gru"
    gates = 3
    trace_blocks = 4
    split_rows = slice(2, 3)
    extra_bias = True

    def trace(self, steps: int, h: int, n: int, dtype: np.dtype,
              side_by_side: bool) -> GruTrace:
        return GruTrace(scratch(steps, 3 * h, n, dtype, side_by_side),
                        scratch(steps, h, n, dtype, side_by_side))

    def forward(self, w: Layer, Z: np.ndarray, dx: int, tokens: np.ndarray | None,
                trace: GruTrace, zero_start: bool = True,
                active: Sequence[int] | None = None) -> None:
        """Per step, on the active columns ``[:a_t]``: the r, z rows' product (weights
        scaled by 1/2: ``sigma(x) = (1 + tanh(x/2)) / 2``), the candidate's input part and
        ``W_n s_{t-1}``; ``tanh`` of the r, z rows,
        :func:`~padmmirnn.kernels.gru_forward_gates`, ``tanh`` of the candidate,
        :func:`~padmmirnn.kernels.gru_forward_state`."""
        h = w.W.shape[1]
        tok = tokens is not None
        half = gate_scale(h, w.W.dtype, "rzn")
        rz = stacked_weights(w, tok, slice(0, 2 * h)) * 0.5
        xn = w.b[2 * h:, None] if tok else np.concatenate([w.U[2 * h:], w.b[2 * h:, None]],
                                                         axis=1)
        U = w.U * half[:, None] if tok else None
        Wn, bh = w.W[2 * h:], w.bh
        A, HN = trace.gates, trace.hn
        for t, (a, _) in enumerate(spans(A.shape[0], A.shape[2], active)):
            G, hn = A[t, :, :a], HN[t, :, :a]
            s_prev = Z[t, dx + 1:dx + 1 + h, :a]
            np.matmul(rz, Z[t, :dx + 1 + h, :a], out=G[:2 * h])
            if tok:
                G[2 * h:] = xn
                kernels.add_columns(U, tokens[t, :a], G)
            else:
                np.matmul(xn, Z[t, :dx + 1, :a], out=G[2 * h:])
            np.matmul(Wn, s_prev, out=hn)
            np.tanh(G[:2 * h], out=G[:2 * h])
            kernels.gru_forward_gates(G, hn, bh)
            np.tanh(G[2 * h:], out=G[2 * h:])
            kernels.gru_forward_state(G, s_prev, Z[t + 1, dx + 1:dx + 1 + h, :a])

    def adjoint(self, w: Layer, Z: np.ndarray, dx: int, trace: GruTrace,
                seeds: np.ndarray, every_step: bool,
                active: Sequence[int] | None = None) -> None:
        """Per step: ``W_rz^T delta_rz`` and ``W_n^T (r a_n)`` of step t + 1 (two
        products) on the columns that go on to t + 1, then
        :func:`~padmmirnn.kernels.gru_backward_step` (the sum with the carry and the
        seed, every gate adjoint); the columns that end at t start from their seed alone
        (their carry is still zero)."""
        h = w.W.shape[1]
        WT_rz = np.ascontiguousarray(w.W[:2 * h].T)
        WT_n = np.ascontiguousarray(w.W[2 * h:].T)
        A, HN = trace.gates, trace.hn
        ds = np.empty((h, A.shape[2]), A.dtype)
        dn = np.empty_like(ds)
        carry = np.zeros_like(ds)  # z_{t+1} ds_{t+1}
        none = np.empty((0, 0), A.dtype)
        for t, (a, b) in reversed(list(enumerate(spans(A.shape[0], A.shape[2], active)))):
            s_prev = Z[t, dx + 1:dx + 1 + h]
            if b:
                np.matmul(WT_rz, A[t + 1, :2 * h, :b], out=ds[:, :b])
                # HN[t + 1] holds r a_n of step t + 1
                np.matmul(WT_n, HN[t + 1, :, :b], out=dn[:, :b])
                kernels.gru_backward_step(A[t, :, :b], HN[t, :, :b], s_prev[:, :b], ds[:, :b],
                                          dn[:, :b], seeds[t, :, :b] if every_step else none,
                                          carry[:, :b])
            if a > b:
                kernels.gru_backward_step(A[t, :, b:a], HN[t, :, b:a], s_prev[:, b:a],
                                          seeds[t if every_step else 0, :, b:a], none, none,
                                          carry[:, b:a])

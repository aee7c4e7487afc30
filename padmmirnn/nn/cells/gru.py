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

import numpy as np

from padmmirnn import kernels
from padmmirnn.nn.cells.base import Cell, Trace, scratch, stacked_weights
from padmmirnn.nn.cells.lstm import sigmoid
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
                trace: GruTrace, zero_start: bool = True) -> None:
        h = w.W.shape[1]
        tok = tokens is not None
        rz = stacked_weights(w, tok, slice(0, 2 * h))
        xn = w.b[2 * h:, None] if tok else np.concatenate([w.U[2 * h:], w.b[2 * h:, None]],
                                                         axis=1)
        Wn, bh = w.W[2 * h:], w.bh[:, None]
        A, HN = trace.gates, trace.hn
        for t in range(A.shape[0]):
            G = A[t]
            s_prev = Z[t, dx + 1:dx + 1 + h]
            np.matmul(rz, Z[t, :dx + 1 + h], out=G[:2 * h])
            if tok:
                G[2 * h:] = xn
                kernels.add_columns(w.U, tokens[t], G)
            else:
                np.matmul(xn, Z[t, :dx + 1], out=G[2 * h:])
            np.matmul(Wn, s_prev, out=HN[t])
            HN[t] += bh
            r, z, n = G[:h], G[h:2 * h], G[2 * h:]
            sigmoid(G[:2 * h], G[:2 * h])
            n += r * HN[t]
            np.tanh(n, out=n)
            s = Z[t + 1, dx + 1:dx + 1 + h]
            np.subtract(s_prev, n, out=s)  # s_t = n + z (s_{t-1} - n)
            s *= z
            s += n

    def adjoint(self, w: Layer, Z: np.ndarray, dx: int, trace: GruTrace,
                seeds: np.ndarray, every_step: bool) -> None:
        h = w.W.shape[1]
        WT_rz = np.ascontiguousarray(w.W[:2 * h].T)
        WT_n = np.ascontiguousarray(w.W[2 * h:].T)
        A, HN = trace.gates, trace.hn
        steps = A.shape[0]
        ds = np.empty((h, A.shape[2]), A.dtype)
        carry = np.zeros_like(ds)  # z_{t+1} ds_{t+1}
        tmp = np.empty_like(ds)
        for t in range(steps - 1, -1, -1):
            if t < steps - 1:
                np.matmul(WT_rz, A[t + 1, :2 * h], out=ds)
                ds += WT_n @ HN[t + 1]  # HN[t + 1] holds r a_n of step t + 1
                ds += carry
                if every_step:
                    ds += seeds[t]
            else:
                ds[...] = seeds[t if every_step else 0]
            G = A[t]
            r, z, n = G[:h], G[h:2 * h], G[2 * h:]
            s_prev = Z[t, dx + 1:dx + 1 + h]
            np.multiply(ds, z, out=carry)
            # delta_z = ds (s_{t-1} - n) z (1 - z), written after a_n needs z
            np.subtract(s_prev, n, out=tmp)
            tmp *= ds
            # a_n = ds (1 - z) (1 - n^2), written over n
            np.subtract(ds, carry, out=ds)  # ds (1 - z)
            np.multiply(n, n, out=n)
            np.subtract(1.0, n, out=n)
            n *= ds
            tmp *= z
            np.subtract(1.0, z, out=z)
            z *= tmp
            # delta_r = a_n hn r (1 - r); the candidate's recurrent adjoint r a_n over hn
            hn = HN[t]
            np.multiply(n, hn, out=tmp)
            tmp *= r
            np.multiply(r, n, out=hn)
            np.subtract(1.0, r, out=r)
            r *= tmp

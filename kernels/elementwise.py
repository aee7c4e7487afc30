"""Fused elementwise passes of the default iteration (docs/design.md, section 4).

Each replaces two or three NumPy passes over a block by one, where
the iteration is bound by memory traffic rather than arithmetic. None evaluates a
transcendental function (NumPy's vectorised ``tanh`` is faster than Numba's
scalar one on this machine, which has no SVML).
"""

import numba as nb


@nb.njit(cache=True)
def shifted(a, lam, scale, out):
    """``out = a + scale * lam``: a_hat = a + lambda1 / rho1 (``scale = 1 / rho1``)."""
    x, y, o = a.reshape(-1), lam.reshape(-1), out.reshape(-1)
    for i in range(o.size):
        o[i] = x[i] + scale * y[i]


@nb.njit(cache=True)
def tanh_adjoint(s, lam2, out):
    """``out = (1 - s^2) * lam2``: lambda1_t = f'(a_t) lambda2_t for tanh at a forward
    pass (s = tanh(a), so f'(a) = 1 - s^2 without a tanh)."""
    rows, h = out.shape
    for i in range(rows):
        for j in range(h):
            v = s[i, j]
            out[i, j] = (1.0 - v * v) * lam2[i, j]

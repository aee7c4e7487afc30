"""Pointwise steps of the gated cells (padmmirnn/nn/cells/lstm.py, gru.py): one compiled
call per step does the algebra of the gates, the cell state and their adjoints, which
would otherwise be 15 to 25 NumPy passes over ``[h, n]`` blocks per step.

The transcendental functions stay in NumPy: its SIMD ``tanh`` took 25-35 us for a
``[256, 64]`` float64 block on this machine, Numba's scalar ``math.tanh`` 360-430 us,
the expm1 form of ``activation.py`` 250-320 us and even ``1 / (1 + exp(-x))`` 130-180 us
(no SVML). So the caller applies ``np.tanh`` to whole gate blocks, and a sigmoid is
``sigma(x) = (1 + tanh(x / 2)) / 2``: the gate rows of the weights are pre-scaled by 1/2
(exact in binary floating point), one ``np.tanh`` covers the whole gate block, and these
kernels finish ``(1 + t) / 2``.

Blocks are ``[rows, n]`` views (any strides: the steps of a trace may lie side by side
in memory), gate blocks stack ``h`` rows per gate in PyTorch's order. An empty array
(``size == 0``) stands for a term that is absent (no seed at this step, no recurrent
part at the last step). Written for float32 and float64 alike.
"""

import numba as nb


@nb.njit(cache=True)
def lstm_forward_step(gates, c_prev, c):
    """The LSTM step between its two tanh evaluations (gates ``i, f, g, o``):

    on entry ``gates`` = ``[tanh(P_i / 2); tanh(P_f / 2); tanh(P_g); tanh(P_o / 2)]``
    ``[4 h, n]``; on exit ``i, f, o`` = ``sigma(P)`` = ``(1 + t) / 2`` and ``g`` kept, and
    ``c = f * c_prev + i * g`` (``[h, n]``). The caller then forms ``tanh(c)`` and
    ``s = o * tanh(c)``.
    """
    h, n = c.shape
    for k in range(h):
        for j in range(n):
            i = 0.5 * (1.0 + gates[k, j])
            f = 0.5 * (1.0 + gates[h + k, j])
            g = gates[2 * h + k, j]
            gates[k, j] = i
            gates[h + k, j] = f
            gates[3 * h + k, j] = 0.5 * (1.0 + gates[3 * h + k, j])
            c[k, j] = f * c_prev[k, j] + i * g


@nb.njit(cache=True)
def lstm_backward_step(gates, c_prev, tanh_c, ds, seed, dc):
    """One step of the LSTM adjoint, in place:

        d     = ds + seed                         (dL/ds_t: recurrent part + outside seed)
        dc_t  = dc + d o (1 - tanh(c_t)^2)        (``dc`` on entry: dc_{t+1} f_{t+1})
        delta_i = dc_t g i (1 - i),   delta_f = dc_t c_{t-1} f (1 - f),
        delta_g = dc_t i (1 - g^2),   delta_o = d tanh(c_t) o (1 - o)

    ``gates`` ``[4 h, n]`` holds the activated ``i, f, g, o`` on entry and
    ``delta = [delta_i; delta_f; delta_g; delta_o]`` on exit; ``dc`` becomes the carry
    ``dc_t f_t`` of step t - 1. ``seed`` may be empty; ``ds`` is only read.
    """
    h, n = dc.shape
    has_seed = seed.size > 0
    for k in range(h):
        for j in range(n):
            d = ds[k, j]
            if has_seed:
                d += seed[k, j]
            i = gates[k, j]
            f = gates[h + k, j]
            g = gates[2 * h + k, j]
            o = gates[3 * h + k, j]
            tc = tanh_c[k, j]
            dct = dc[k, j] + d * o * (1.0 - tc * tc)
            gates[k, j] = dct * g * i * (1.0 - i)
            gates[h + k, j] = dct * c_prev[k, j] * f * (1.0 - f)
            gates[2 * h + k, j] = dct * i * (1.0 - g * g)
            gates[3 * h + k, j] = d * tc * o * (1.0 - o)
            dc[k, j] = dct * f


@nb.njit(cache=True)
def gru_forward_gates(gates, hn, bh):
    """The GRU step between its two tanh evaluations (gates ``r, z, n``,
    ``linear_before_reset``):

    on entry ``gates`` = ``[tanh(P_r / 2); tanh(P_z / 2); U_n x_t + b_n]`` ``[3 h, n]`` and
    ``hn`` = ``W_n s_{t-1}`` ``[h, n]``; on exit ``r, z`` = ``(1 + t) / 2``, ``hn`` =
    ``W_n s_{t-1} + b_h`` (``bh`` ``[h]``) and the candidate rows hold its pre-activation
    ``U_n x_t + b_n + r * hn``, for the caller's ``tanh``.
    """
    h, n = hn.shape
    for k in range(h):
        b = bh[k]
        for j in range(n):
            r = 0.5 * (1.0 + gates[k, j])
            gates[k, j] = r
            gates[h + k, j] = 0.5 * (1.0 + gates[h + k, j])
            v = hn[k, j] + b
            hn[k, j] = v
            gates[2 * h + k, j] += r * v


@nb.njit(cache=True)
def gru_forward_state(gates, s_prev, s):
    """``s = (1 - z) n + z s_{t-1}``, written ``n + z (s_{t-1} - n)``, from the activated
    gates ``[r; z; n]`` ``[3 h, n]``."""
    h, n = s.shape
    for k in range(h):
        for j in range(n):
            c = gates[2 * h + k, j]
            s[k, j] = c + gates[h + k, j] * (s_prev[k, j] - c)


@nb.njit(cache=True)
def gru_backward_step(gates, hn, s_prev, ds, dn, seed, carry):
    """One step of the GRU adjoint, in place:

        d   = ds + dn + carry + seed      (W_rz^T delta_rz + W_n^T (r a_n) of step t + 1,
                                           z_{t+1} d_{t+1}, the outside seed)
        a_n = d (1 - z) (1 - n^2),   delta_z = d (s_{t-1} - n) z (1 - z),
        delta_r = a_n hn r (1 - r)   (hn = W_n s_{t-1} + b_h)

    ``gates`` ``[3 h, n]`` holds the activated ``r, z, n`` on entry and ``delta_in =
    [delta_r; delta_z; a_n]`` on exit; ``hn`` becomes ``r a_n`` (the candidate rows of
    ``delta_hh``), ``carry`` becomes ``z d`` for step t - 1. ``dn`` and ``seed`` may be
    empty; ``ds`` is only read.
    """
    h, n = hn.shape
    has_dn = dn.size > 0
    has_seed = seed.size > 0
    for k in range(h):
        for j in range(n):
            d = ds[k, j] + carry[k, j]
            if has_dn:
                d += dn[k, j]
            if has_seed:
                d += seed[k, j]
            r = gates[k, j]
            z = gates[h + k, j]
            c = gates[2 * h + k, j]
            a_n = d * (1.0 - z) * (1.0 - c * c)
            gates[h + k, j] = d * (s_prev[k, j] - c) * z * (1.0 - z)
            gates[2 * h + k, j] = a_n
            gates[k, j] = a_n * hn[k, j] * r * (1.0 - r)
            hn[k, j] = r * a_n
            carry[k, j] = z * d

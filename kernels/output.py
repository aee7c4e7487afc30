"""Per-sample kernels of the output block (docs/design.md, section 3) and losses.

The o-update solves, for every output row (sample and time step in O),

    min_o  l(o, y) + rho3/2 ||o - p||^2,    p = V s_t + c - lambda3/rho3.

Cross-entropy: strongly convex; Newton steps with the Hessian
diag(pi) - pi pi^T + rho3 I inverted in O(K) by Sherman-Morrison, and an Armijo
backtracking line search, starting from the better of the current o and p, so
the update never increases the row objective (up to rounding: once the Newton
decrement is below the rounding of f, full steps converge to machine precision). Squared error
l = 1/2 ||o - e_y||^2 has the closed form o = (e_y + rho3 p) / (1 + rho3).

:func:`output_delta` turns outputs into the loss derivative dl/do, the seed of the
adjoint recursion (BPTT) and of the KKT multiplier estimate.
"""

import math

import numba as nb
import numpy as np

LOSS_CE = 0
LOSS_MSE = 1

# Newton decrement g^T H^-1 g below which the change of f is below its rounding:
# steps are taken without a line search there (quadratic convergence region), so
# the result is accurate to machine precision and continuous in the inputs.
_QUADRATIC_REGION = 1e-14


@nb.njit(cache=True)
def _ce_row(o, y, p, rho3):
    mx = o[0]
    for k in range(1, o.shape[0]):
        if o[k] > mx:
            mx = o[k]
    z = 0.0
    for k in range(o.shape[0]):
        z += math.exp(o[k] - mx)
    val = mx + math.log(z) - o[y]
    if rho3 > 0.0:
        pen = 0.0
        for k in range(o.shape[0]):
            pen += (o[k] - p[k]) ** 2
        val += 0.5 * rho3 * pen
    return val


@nb.njit(cache=True)
def _o_ce_rows(o, p, y, rho3, steps):
    rows, K = o.shape
    x = np.empty(K)
    xn = np.empty(K)
    pr = np.empty(K)
    pi = np.empty(K)
    g = np.empty(K)
    dv = np.empty(K)
    for i in range(rows):
        yi = y[i]
        for k in range(K):
            pr[k] = p[i, k]
            x[k] = o[i, k]
        fx = _ce_row(x, yi, pr, rho3)
        fp = _ce_row(pr, yi, pr, rho3)
        if fp < fx:
            for k in range(K):
                x[k] = pr[k]
            fx = fp
        for _ in range(steps):
            mx = x[0]
            for k in range(1, K):
                if x[k] > mx:
                    mx = x[k]
            z = 0.0
            for k in range(K):
                pi[k] = math.exp(x[k] - mx)
                z += pi[k]
            for k in range(K):
                pi[k] /= z
                g[k] = pi[k] + rho3 * (x[k] - pr[k])
            g[yi] -= 1.0
            # (diag(D) - pi pi^T)^{-1} g with D = pi + rho3 (Sherman-Morrison)
            num = 0.0
            den = 0.0
            for k in range(K):
                dk = pi[k] + rho3
                num += pi[k] * g[k] / dk
                den += pi[k] * pi[k] / dk
            coef = num / (1.0 - den)
            slope = 0.0
            for k in range(K):
                dk = pi[k] + rho3
                dv[k] = (g[k] + pi[k] * coef) / dk
                slope += g[k] * dv[k]
            if slope <= 1e-30:
                break
            if slope <= _QUADRATIC_REGION:
                # Newton decrement below the rounding of f: full step, no line search
                for k in range(K):
                    x[k] -= dv[k]
                fx = _ce_row(x, yi, pr, rho3)
                continue
            t = 1.0
            accepted = False
            for _ in range(40):
                for k in range(K):
                    xn[k] = x[k] - t * dv[k]
                fn = _ce_row(xn, yi, pr, rho3)
                if fn <= fx - 1e-4 * t * slope and fn < fx:
                    for k in range(K):
                        x[k] = xn[k]
                    fx = fn
                    accepted = True
                    break
                t *= 0.5
            if not accepted:
                break
        for k in range(K):
            o[i, k] = x[k]


@nb.njit(cache=True)
def _o_mse_rows(o, p, y, rho3):
    rows, K = o.shape
    inv = 1.0 / (1.0 + rho3)
    for i in range(rows):
        for k in range(K):
            tgt = 1.0 if k == y[i] else 0.0
            o[i, k] = (tgt + rho3 * p[i, k]) * inv


@nb.njit(cache=True)
def o_update(o, p, y, rho3, loss, steps):
    """Update the output auxiliaries ``o`` (``[R, K]``) in place.

    ``p`` is V s + c - lambda3/rho3 for the same rows, ``y`` the integer labels
    ``[R]``, ``loss`` is ``LOSS_CE`` or ``LOSS_MSE``; ``steps`` bounds Newton steps.
    """
    if loss == LOSS_MSE:
        _o_mse_rows(o, p, y, rho3)
    else:
        _o_ce_rows(o, p, y, rho3, steps)


@nb.njit(cache=True)
def loss_and_correct(o, y, loss):
    """Sum of the loss over rows of ``o`` (``[R, K]``) and the number of rows whose
    arg-max equals the label ``y``; the loss sum is accumulated in float64."""
    rows, K = o.shape
    total = 0.0
    correct = 0
    empty = np.empty(0)
    for i in range(rows):
        yi = y[i]
        best = 0
        for k in range(1, K):
            if o[i, k] > o[i, best]:
                best = k
        if best == yi:
            correct += 1
        if loss == LOSS_MSE:
            sq = 0.0
            for k in range(K):
                tgt = 1.0 if k == yi else 0.0
                sq += (o[i, k] - tgt) ** 2
            total += 0.5 * sq
        else:
            total += _ce_row(o[i], yi, empty, 0.0)
    return total, correct


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

"""Every Numba kernel against a plain NumPy reference; the forward pass against a
naive per-sample loop."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_local

from padmmirnn import kernels
from padmmirnn.nn import Params, forward, init_params, loss_sums, outputs

EMPTY = np.zeros((0, 0))


def _g(a, m, q, r1, r2, f):
    return 0.5 * r1 * (a - m) ** 2 + 0.5 * r2 * (q - f(a)) ** 2


def _a_reference_convex(m, q, r1, r2):
    """Unique minimiser of g for tanh when rho1 dominates, by bisection on g' (NumPy)."""
    lo = np.minimum(m, np.arctanh(np.clip(q, -0.999, 0.999))) - 5.0
    hi = np.maximum(m, np.arctanh(np.clip(q, -0.999, 0.999))) + 5.0

    def dg(a):
        t = np.tanh(a)
        return r1 * (a - m) - r2 * (q - t) * (1 - t * t)

    for _ in range(200):
        mid = 0.5 * (lo + hi)
        neg = dg(mid) < 0
        lo = np.where(neg, mid, lo)
        hi = np.where(neg, hi, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("dtype", (np.float64, np.float32))
def test_a_update_tanh_matches_reference_when_convex(dtype):
    rng = np.random.default_rng(0)
    m = rng.standard_normal((50, 7))
    q = np.tanh(rng.standard_normal((50, 7))) + 0.05 * rng.standard_normal((50, 7))
    r1, r2 = 2.0, 1.0  # g'' >= r1 - r2 * max|2 t (q - t)(1 - t^2)| > 0 here
    a = rng.standard_normal((50, 7)).astype(dtype)
    kernels.a_update(a, m.astype(dtype), q.astype(dtype), EMPTY.astype(dtype), r1, r2,
                     kernels.ACT_TANH, 20)
    ref = _a_reference_convex(m, q, r1, r2)
    tol = 1e-9 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(a, ref, atol=tol)


def test_a_update_tanh_nonconvex_is_monotone_and_stationary():
    rng = np.random.default_rng(1)
    m = 3 * rng.standard_normal((200, 5))
    q = 3 * rng.standard_normal((200, 5))  # far outside tanh's range: non-convex g
    a0 = 3 * rng.standard_normal((200, 5))
    lam = rng.standard_normal((200, 5))
    r1, r2 = 0.3, 2.0
    a = a0.copy()
    kernels.a_update(a, m, q, lam, r1, r2, kernels.ACT_TANH, 50)
    qq = q + lam / r2
    assert (_g(a, m, qq, r1, r2, np.tanh) <= _g(a0, m, qq, r1, r2, np.tanh) + 1e-14).all()
    t = np.tanh(a)
    grad = r1 * (a - m) - r2 * (qq - t) * (1 - t * t)
    assert np.abs(grad).max() < 1e-10


def test_a_update_relu_is_global_minimiser():
    rng = np.random.default_rng(2)
    m, q = 2 * rng.standard_normal((300, 4)), 2 * rng.standard_normal((300, 4))
    lam = rng.standard_normal((300, 4))
    r1, r2 = 0.7, 1.9
    a = np.zeros_like(m)
    kernels.a_update(a, m, q, lam, r1, r2, kernels.ACT_RELU, 0)
    relu = lambda x: np.maximum(x, 0)  # noqa: E731
    grid = np.linspace(-12, 12, 48001)[:, None, None]
    qq = q + lam / r2
    best = _g(grid, m, qq, r1, r2, relu).min(axis=0)
    got = _g(a, m, qq, r1, r2, relu)
    assert (got <= best + 1e-12).all()


@pytest.mark.parametrize("act", (kernels.ACT_TANH, kernels.ACT_RELU))
def test_activation_residual_and_multiplier_step(act):
    rng = np.random.default_rng(3)
    s, a, lam = (rng.standard_normal((30, 6)) for _ in range(3))
    f = np.tanh if act == kernels.ACT_TANH else (lambda x: np.maximum(x, 0))
    r = s - f(a)
    old = lam.copy()
    sq, lin = kernels.activation_residual(s, a, lam, 0.8, act, True)
    assert sq == pytest.approx(np.sum(r * r), rel=1e-13)
    assert lin == pytest.approx(np.sum(old * r), rel=1e-13)
    np.testing.assert_allclose(lam, old + 0.8 * r, rtol=1e-14)
    assert kernels.activation_residual(s, a, EMPTY, 0.8, act, True) == pytest.approx((sq, 0.0))


def _softmax(o):
    e = np.exp(o - o.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _o_reference(p, y, rho):
    """Damped Newton with a dense Hessian solve, in NumPy, from o = p."""
    o = p.copy()
    K = p.shape[1]

    def f(v, i):
        return -np.log(_softmax(v)[y[i]]) + 0.5 * rho * np.sum((v - p[i]) ** 2)

    for i in range(len(o)):
        for _ in range(200):
            pi = _softmax(o[i])
            g = pi - np.eye(K)[y[i]] + rho * (o[i] - p[i])
            H = np.diag(pi) - np.outer(pi, pi) + rho * np.eye(K)
            d = np.linalg.solve(H, g)
            t = 1.0
            while f(o[i] - t * d, i) > f(o[i], i) - 1e-4 * t * (g @ d) and t > 1e-12:
                t *= 0.5
            o[i] -= t * d
    return o


@pytest.mark.parametrize("rho", (0.05, 1.0, 10.0))
def test_o_update_ce_matches_reference(rho):
    rng = np.random.default_rng(4)
    p = 2 * rng.standard_normal((25, 6))
    y = rng.integers(0, 6, 25)
    o = 3 * rng.standard_normal((25, 6))
    kernels.o_update(o, p, y, rho, kernels.LOSS_CE, 50)
    np.testing.assert_allclose(o, _o_reference(p, y, rho), atol=1e-7)
    grad = _softmax(o) - np.eye(6)[y] + rho * (o - p)
    assert np.abs(grad).max() < 1e-13


def test_o_update_mse_closed_form():
    rng = np.random.default_rng(5)
    p = rng.standard_normal((10, 4))
    y = rng.integers(0, 4, 10)
    o = np.zeros_like(p)
    kernels.o_update(o, p, y, 0.5, kernels.LOSS_MSE, 0)
    np.testing.assert_allclose(o, (np.eye(4)[y] + 0.5 * p) / 1.5, rtol=1e-14)


def test_loss_and_correct():
    rng = np.random.default_rng(6)
    o = rng.standard_normal((40, 5))
    y = rng.integers(0, 5, 40)
    total, correct = kernels.loss_and_correct(o, y, kernels.LOSS_CE)
    logp = np.log(_softmax(o))
    assert total == pytest.approx(-logp[np.arange(40), y].sum(), rel=1e-13)
    assert correct == int((o.argmax(1) == y).sum())
    total, _ = kernels.loss_and_correct(o, y, kernels.LOSS_MSE)
    assert total == pytest.approx(0.5 * ((o - np.eye(5)[y]) ** 2).sum(), rel=1e-13)


def test_token_kernels():
    rng = np.random.default_rng(7)
    tok = rng.integers(0, 9, 100).astype(np.int32)
    vals = rng.standard_normal((100, 3))
    ref = np.zeros((9, 3))
    np.add.at(ref, tok, vals)
    # feature-major [T, h, n] values over tokens [T, n] (here T = 4, n = 25)
    fm = vals.reshape(4, 25, 3).transpose(0, 2, 1)
    np.testing.assert_allclose(kernels.segment_sum_columns(tok.reshape(4, 25), fm, 9), ref.T,
                               rtol=1e-13)
    np.testing.assert_array_equal(kernels.token_counts(tok, 9), np.bincount(tok, minlength=9))
    table = rng.standard_normal((9, 3))
    cols = rng.standard_normal((3, 100))
    ref_cols = cols + table.T[:, tok]
    kernels.add_columns(np.ascontiguousarray(table.T), tok, cols)
    np.testing.assert_allclose(cols, ref_cols, rtol=1e-15)


@pytest.mark.parametrize("dtype", (np.float64, np.float32))
def test_fused_elementwise_kernels(dtype):
    rng = np.random.default_rng(8)
    a, lam = (rng.standard_normal((3, 40, 6)).astype(dtype) for _ in range(2))
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-13, "atol": 1e-15}
    out = np.empty_like(a)
    kernels.shifted(a, lam, 1.0 / 3.0, out)  # 3-D blocks: a_hat = a + lambda1 / rho1
    np.testing.assert_allclose(out, a + lam / 3.0, **tol)
    s = np.tanh(a[0])
    kernels.tanh_adjoint(s, lam[0], out[0])
    np.testing.assert_allclose(out[0], (1 - np.tanh(a[0]) ** 2) * lam[0], **tol)
    kernels.tanh_adjoint(s, lam[1], s)  # in place, as the recursion calls it
    np.testing.assert_allclose(s, out[0] * lam[1] / lam[0], rtol=1e-5)


@pytest.mark.parametrize("kind", ("dense", "tokens"))
@pytest.mark.parametrize("m2m", (False, True))
@pytest.mark.parametrize("act", ("tanh", "relu"))
def test_forward_matches_per_sample_loop(kind, m2m, act):
    data = make_local(kind, m2m, n=7, steps=6, dim=5, classes=4, seed=8)
    p = init_params(5, 9, 4, seed=3, w_init="gaussian", scale=1.2)
    p.b = np.random.default_rng(9).standard_normal(9)
    p.c = np.random.default_rng(10).standard_normal(4)
    fwd = forward(p, data, act)  # feature-major [T(+1), h, n]
    states, pre = fwd.states, fwd.traces[0].pre
    out = outputs(p, states, m2m)  # rows [|O|, n, K]
    f = np.tanh if act == "tanh" else (lambda x: np.maximum(x, 0))
    for i in range(data.n):
        s = np.zeros(9)
        for t in range(data.info.steps):
            x = np.eye(5)[data.inputs[t, i]] if kind == "tokens" else data.inputs[t, i]
            a = p.U @ x + p.W @ s + p.b
            s = f(a)
            np.testing.assert_allclose(pre[t, :, i], a, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(states[t + 1, :, i], s, rtol=1e-12, atol=1e-12)
            if m2m:
                np.testing.assert_allclose(out[t, i], p.V @ s + p.c, rtol=1e-12, atol=1e-12)
        if not m2m:
            np.testing.assert_allclose(out[0, i], p.V @ s + p.c, rtol=1e-12, atol=1e-12)


def test_loss_sums_perplexity_inputs():
    data = make_local("tokens", True, n=5, steps=4, dim=6, classes=6, seed=11)
    p = Params.elman(np.zeros((3, 6)), np.zeros((3, 3)), np.zeros(3), np.zeros((6, 3)), np.zeros(6))
    total, correct, count = loss_sums(p, data, "tanh", "ce")
    # all-zero weights give uniform predictions: loss log K per output row, perplexity K
    assert count == 20
    assert total / count == pytest.approx(np.log(6), rel=1e-14)


# ---------------------------------------------------------------- the gated cells' steps


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _blocks(rng, gates, h, n, dtype, strided):
    """A pre-activation block ``[G h, n]`` (a strided view when ``strided``: one step of a
    trace whose steps lie side by side) and ``[h, n]`` states."""
    if strided:
        P = rng.standard_normal((gates * h, 3, n)).astype(dtype)[:, 1]
    else:
        P = rng.standard_normal((gates * h, n)).astype(dtype)
    return P, *(rng.standard_normal((h, n)).astype(dtype) for _ in range(4))


TOL = {np.float64: {"rtol": 1e-12, "atol": 1e-12}, np.float32: {"rtol": 2e-5, "atol": 2e-6}}
CASES = [(np.float64, False), (np.float64, True), (np.float32, False)]


@pytest.mark.parametrize("dtype,strided", CASES)
def test_lstm_steps_match_numpy(dtype, strided):
    """lstm_forward_step against sigma(P) and c = f c_prev + i g; lstm_backward_step
    against the adjoint equations of nn/cells/lstm.py, with and without a seed."""
    rng = np.random.default_rng(12)
    h, n = 5, 7
    P, c_prev, ds, seed, dc = _blocks(rng, 4, h, n, dtype, strided)
    i, f, g, o = (P[k * h:(k + 1) * h].astype(np.float64) for k in range(4))
    i, f, g, o = _sig(i), _sig(f), np.tanh(g), _sig(o)
    c_ref = f * c_prev + i * g
    gates = P.copy()
    gates[:h], gates[h:2 * h], gates[3 * h:] = (np.tanh(P[k * h:(k + 1) * h] / 2)
                                               for k in (0, 1, 3))
    gates[2 * h:3 * h] = np.tanh(P[2 * h:3 * h])
    c = np.empty_like(c_prev)
    kernels.lstm_forward_step(gates, c_prev, c)
    np.testing.assert_allclose(gates, np.concatenate([i, f, g, o]), **TOL[dtype])
    np.testing.assert_allclose(c, c_ref, **TOL[dtype])
    tc = np.tanh(c)
    for with_seed in (True, False):
        d = ds + seed if with_seed else ds
        dct = dc + d * o * (1 - tc ** 2)
        want = np.concatenate([dct * g * i * (1 - i), dct * c_prev * f * (1 - f),
                               dct * i * (1 - g ** 2), d * tc * o * (1 - o)])
        G, carry = np.array(np.concatenate([i, f, g, o]), dtype), dc.copy()
        kernels.lstm_backward_step(G, c_prev, tc, ds, seed if with_seed else
                                   np.empty((0, 0), dtype), carry)
        np.testing.assert_allclose(G, want, **TOL[dtype])
        np.testing.assert_allclose(carry, dct * f, **TOL[dtype])


@pytest.mark.parametrize("dtype,strided", CASES)
def test_gru_steps_match_numpy(dtype, strided):
    """gru_forward_gates / gru_forward_state against PyTorch's GRU equations
    (linear_before_reset); gru_backward_step against the adjoint of nn/cells/gru.py, with
    every optional term present and absent."""
    rng = np.random.default_rng(13)
    h, n = 6, 4
    P, s_prev, Wns, ds, dn = _blocks(rng, 3, h, n, dtype, strided)
    seed, carry0 = (rng.standard_normal((h, n)).astype(dtype) for _ in range(2))
    bh = rng.standard_normal(h).astype(dtype)
    r, z = _sig(P[:h].astype(np.float64)), _sig(P[h:2 * h].astype(np.float64))
    hn = Wns + bh[:, None]
    c = np.tanh(P[2 * h:] + r * hn)
    s_ref = (1 - z) * c + z * s_prev
    gates = P.copy()
    gates[:2 * h] = np.tanh(P[:2 * h] / 2)
    HN = Wns.copy()
    kernels.gru_forward_gates(gates, HN, bh)
    np.testing.assert_allclose(gates[:2 * h], np.concatenate([r, z]), **TOL[dtype])
    np.testing.assert_allclose(HN, hn, **TOL[dtype])
    np.testing.assert_allclose(gates[2 * h:], P[2 * h:] + r * hn, **TOL[dtype])
    gates[2 * h:] = np.tanh(gates[2 * h:])
    s = np.empty_like(s_prev)
    kernels.gru_forward_state(gates, s_prev, s)
    np.testing.assert_allclose(s, s_ref, **TOL[dtype])
    none = np.empty((0, 0), dtype)
    for use_dn, use_seed in ((True, True), (False, True), (True, False), (False, False)):
        d = ds + carry0 + (dn if use_dn else 0) + (seed if use_seed else 0)
        a_n = d * (1 - z) * (1 - c ** 2)
        want = np.concatenate([a_n * hn * r * (1 - r), d * (s_prev - c) * z * (1 - z), a_n])
        G = np.array(np.concatenate([r, z, c]), dtype)
        H, carry = np.array(hn, dtype), carry0.copy()
        kernels.gru_backward_step(G, H, s_prev, ds, dn if use_dn else none,
                                  seed if use_seed else none, carry)
        np.testing.assert_allclose(G, want, **TOL[dtype])
        np.testing.assert_allclose(H, r * a_n, **TOL[dtype])
        np.testing.assert_allclose(carry, z * d, **TOL[dtype])

"""Properties of the ADMM block updates (docs/design.md, section 3).

With multipliers 'none' every block minimises the augmented Lagrangian over its
variables exactly (weights, s) or never increases it (a, o): check after each
block, on random problems, for every combination of activation, input kind and
output kind, and for both schedules over whole iterations.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import FAITHFUL, FULLBATCH, make_local

from padmmirnn.admm import AdmmEngine
from padmmirnn.comm import SerialComm
from padmmirnn.config import build_config
from padmmirnn.nn import loss_sums

CASES = list(itertools.product(("tanh", "relu"), ("dense", "tokens"), (False, True)))


def _engine(act, kind, m2m, seed=0, **admm):
    data = make_local(kind, m2m, n=16, steps=5, dim=4, classes=3, seed=seed)
    overrides = {**FAITHFUL, "model.hidden": 6, "model.activation": act, "train.seed": seed,
                 "model.init_scale": 1.5}
    overrides.update({f"admm.{k}": v for k, v in admm.items()})
    return AdmmEngine(build_config(overrides=overrides), [data], data.n, SerialComm())


def _perturb(engine, seed):
    """Move the auxiliaries off the feasible set so every block has work to do."""
    rng = np.random.default_rng(seed)
    st = engine.parts[0].state
    st.A += 0.5 * rng.standard_normal(st.A.shape)
    st.S[1:] += 0.5 * rng.standard_normal(st.S[1:].shape)
    st.O += rng.standard_normal(st.O.shape)
    engine.synced = False


@pytest.mark.parametrize("act,kind,m2m", CASES)
def test_no_block_increases_lagrangian(act, kind, m2m):
    eng = _engine(act, kind, m2m, rho1=0.7, rho2=1.3, rho3=0.4, nu=0.01)
    _perturb(eng, 1)
    pen = eng.penalty(1)
    tol = 1e-12
    for sweep in range(3):
        steps = [
            ("U,W,b", lambda: eng.weights_in(eng.reduce_input(pen), pen)),
            ("V,c", lambda: eng.weights_out(eng.reduce_output(pen), pen)),
            ("a", lambda: eng.block_a(pen)),
            ("s", lambda: eng.block_s(pen)),
            ("o", lambda: eng.block_o(pen)),
        ]
        for name, block in steps:
            before = eng.lagrangian(pen)
            block()
            after = eng.lagrangian(pen)
            assert after <= before + tol * max(1.0, abs(before)), (sweep, name, before, after)
    # the blocks did real work: the objective went down overall
    _perturb(eng, 2)
    start = eng.lagrangian(pen)
    for _ in range(3):
        eng.iterate()
    assert eng.lagrangian(pen) < start


@pytest.mark.parametrize("act,kind,m2m", CASES)
def test_weight_blocks_are_exact_minimisers(act, kind, m2m):
    """After U (resp. W, b, V, c) is solved, any perturbation of it raises L."""
    eng = _engine(act, kind, m2m, rho1=0.9, rho2=1.0, rho3=0.6, nu=0.02)
    _perturb(eng, 3)
    pen = eng.penalty(1)
    eng.weights_in(eng.reduce_input(pen), pen)
    eng.weights_out(eng.reduce_output(pen), pen)
    rng = np.random.default_rng(4)
    # b is solved last among U, W, b and c last among V, c: both are exact minimisers given
    # the others; W is exact given U and the old b, so test the last block of each group.
    for name in ("b", "c"):
        base = eng.lagrangian(pen)
        orig = getattr(eng.params, name).copy()
        for _ in range(3):
            setattr(eng.params, name, orig + 1e-3 * rng.standard_normal(orig.shape))
            assert eng.lagrangian(pen) > base
        setattr(eng.params, name, orig)


@pytest.mark.parametrize("schedule", ("fused", "paper"))
@pytest.mark.parametrize("act,kind,m2m", CASES)
def test_iterations_never_increase_lagrangian(schedule, act, kind, m2m):
    eng = _engine(act, kind, m2m, schedule=schedule, multipliers="none")
    _perturb(eng, 5)
    pen = eng.penalty(1)
    values = [eng.lagrangian(pen)]
    for _ in range(6):
        eng.iterate(want_sums=False)
        values.append(eng.lagrangian(pen))
    diffs = np.diff(values)
    assert (diffs <= 1e-12 * max(1.0, abs(values[0]))).all(), values


@pytest.mark.parametrize("mode", ("all", "output", "none"))
@pytest.mark.parametrize("act,kind,m2m", CASES[:4])
def test_feasible_point_lagrangian_is_loss_plus_regulariser(mode, act, kind, m2m):
    """At the initial point (auxiliaries from a forward pass, lambda = 0)."""
    eng = _engine(act, kind, m2m, multipliers=mode, nu=0.05)
    pen = eng.penalty(1)
    p = eng.params
    sums = loss_sums(p, eng.parts[0].data, act, "ce")
    reg = 0.5 * 0.05 * (np.sum(p.U ** 2) + np.sum(p.W ** 2) + np.sum(p.V ** 2))
    # L is normalised per sample: the loss sum over output rows divided by N
    expected = sums[0] / eng.n_global + reg
    assert eng.lagrangian(pen) == pytest.approx(expected, rel=1e-12)
    r = eng.residuals(pen, (False, False, False))[0]
    assert r[1] < 1e-20 and r[3] < 1e-20 and r[5] < 1e-20


def test_multiplier_step_is_rho_times_residual():
    eng = _engine("tanh", "dense", True, multipliers="all", warmup=0)
    _perturb(eng, 6)
    pen = eng.penalty(1)
    p = eng.params
    st = eng.parts[0].state
    # the state is feature-major: A, S, L1, L2 [T(+1), h, n]; O, L3 rows [T, n, K]
    pre = np.einsum("tnd,hd->thn", eng.parts[0].data.inputs, p.U) + p.b[:, None]
    pre[1:] += np.einsum("kh,thn->tkn", p.W, st.S[1:-1])
    r1 = st.A - pre
    r2 = st.S[1:] - np.tanh(st.A)
    r3 = st.O - (np.einsum("thn,kh->tnk", st.S[1:], p.V) + p.c)
    old = [st.L1.copy(), st.L2.copy(), st.L3.copy()]
    eng.residuals(pen, (True, True, True))
    np.testing.assert_allclose(st.L1, old[0] + pen.rho1 * r1, atol=1e-12)
    np.testing.assert_allclose(st.L2, old[1] + pen.rho2 * r2, atol=1e-12)
    np.testing.assert_allclose(st.L3, old[2] + pen.rho3 * r3, atol=1e-12)


def test_fused_and_paper_statistics_match_explicit_sums():
    """The packed statistics equal sums written out per sample and step."""
    eng = _engine("tanh", "tokens", False, multipliers="all")
    _perturb(eng, 7)
    lam1 = eng.parts[0].state.L1
    lam1[...] = np.random.default_rng(8).standard_normal(lam1.shape)
    pen = eng.penalty(1)
    st_in, st_out = eng.reduce_fused(pen)
    tok = eng.parts[0].data.inputs
    ah = eng.parts[0].state.A + eng.parts[0].state.L1 / pen.rho1
    sp = eng.parts[0].state.S[:-1]
    onehot = np.eye(eng.parts[0].data.info.dim)[tok]
    # feature-major state: sp, ah [T, h, n]; o rows [n, K]
    np.testing.assert_allclose(st_in["XSp"], np.einsum("tnd,thn->dh", onehot, sp), atol=1e-12)
    np.testing.assert_allclose(st_in["XA"], np.einsum("tnd,thn->dh", onehot, ah), atol=1e-12)
    np.testing.assert_allclose(st_in["SpSp"], np.einsum("tin,tjn->ij", sp, sp), atol=1e-12)
    np.testing.assert_allclose(st_in["SpA"], np.einsum("tin,tjn->ij", sp, ah), atol=1e-12)
    np.testing.assert_allclose(st_in["sSp"], sp.sum(axis=(0, 2)), atol=1e-12)
    np.testing.assert_allclose(st_in["sA"], ah.sum(axis=(0, 2)), atol=1e-12)
    s_last = eng.parts[0].state.S[-1]
    oh = eng.parts[0].state.O[0] + eng.parts[0].state.L3[0] / pen.rho3
    np.testing.assert_allclose(st_out["SS"], s_last @ s_last.T, atol=1e-12)
    np.testing.assert_allclose(st_out["SO"], s_last @ oh, atol=1e-12)
    np.testing.assert_allclose(st_out["sS"], s_last.sum(axis=1), atol=1e-12)


@pytest.mark.parametrize("kind", ["dense", "tokens"])
def test_statistics_of_a_forward_pass_need_no_a_hat(kind):
    """At a forward pass (``synced``) the engine takes the statistics with a from the
    weights (linear algebra on small sums); they equal the explicit sums."""
    from padmmirnn.admm import blocks as up

    eng = _engine("tanh", kind, True, multipliers="all")
    assert eng.synced
    part = eng.parts[0]
    part.state.L1[...] = np.random.default_rng(9).standard_normal(part.state.L1.shape)
    explicit = up.input_stats(part.state, part.data, 0.7)
    synced = up.input_stats_synced(eng.params, part.state, part.data, 0.7, part.const)
    for key, value in explicit.items():
        np.testing.assert_allclose(synced[key], value, rtol=1e-10, atol=1e-12, err_msg=key)
    _perturb(eng, 3)  # no longer a forward pass: the algebra would be wrong
    off = up.input_stats_synced(eng.params, part.state, part.data, 0.7, part.const)
    assert not np.allclose(off["SpA"], up.input_stats(part.state, part.data, 0.7)["SpA"])


def test_rho_schedule_geometric_with_cap():
    eng = _engine("tanh", "dense", False, rho_schedule="geometric", rho_growth=2.0,
                  rho_max_scale=5.0, rho1=0.5)
    assert [eng.penalty(k).rho1 for k in (1, 2, 3, 4, 10)] == [0.5, 1.0, 2.0, 2.5, 2.5]


@pytest.mark.parametrize("base", [FAITHFUL, FULLBATCH], ids=["faithful", "fullbatch"])
def test_float32_tracks_float64(base):
    data64 = make_local("dense", False, n=20, steps=4, seed=9)
    data32 = make_local("dense", False, n=20, steps=4, seed=9, dtype=np.float32)
    runs = []
    for dt, data in (("float64", data64), ("float32", data32)):
        cfg = build_config(overrides={**base, "model.hidden": 5, "train.dtype": dt})
        eng = AdmmEngine(cfg, [data], data.n, SerialComm())
        for _ in range(5):
            eng.iterate(want_sums=False)
        assert eng.parts[0].state.A.dtype == np.dtype(dt)
        runs.append(eng.params)
    np.testing.assert_allclose(runs[1].W, runs[0].W, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("act,kind,m2m", CASES)
def test_s_block_is_exact_minimiser(act, kind, m2m):
    eng = _engine(act, kind, m2m, rho1=0.8, rho2=1.1, rho3=0.5)
    _perturb(eng, 10)
    pen = eng.penalty(1)
    eng.block_s(pen)
    base = eng.lagrangian(pen)
    rng = np.random.default_rng(11)
    s = eng.parts[0].state.S
    for t in (1, s.shape[0] - 1):
        orig = s[t].copy()
        s[t] += 1e-4 * rng.standard_normal(orig.shape)
        assert eng.lagrangian(pen) > base
        s[t] = orig

"""ADMM that trains (docs/admm-convergence.md): the recommended configuration and
the options it is built from.

Recommended (``RECOMMENDED`` below): multipliers 'all' from the least-squares (KKT)
multiplier estimate, auxiliaries re-synchronised with a forward pass every
iteration, joint [U W b] / [V c] solves, backtracking on the true training loss
(heavy-ball momentum is an option, exercised in the parts test). Theory for these tests:

* at a feasible point the KKT multipliers are minus the BPTT adjoint, so
  -sum_t lambda1_t s_{t-1}^T is exactly the BPTT gradient of W (times N);
* the joint weight solve and the backward (s_t, a_t) sweep are exact/safeguarded
  block minimisers, so with multipliers 'none' they never increase L;
* the backtracking step control never lets the true training loss increase
  (unless every halving failed, which a small problem does not reach);
* every new global quantity goes through ``sum_parts``: splitting the samples into
  parts gives the same iterates.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FAITHFUL, FULLBATCH, make_local

from padmmirnn.admm import AdmmEngine
from padmmirnn.comm import SerialComm
from padmmirnn.config import build_config, load_config
from padmmirnn.errors import ConfigError
from padmmirnn.nn import gradients, loss_sums
from padmmirnn.samples import LocalData

ELMAN = ("U", "W", "b", "V", "c")

RECOMMENDED = {
    "multipliers": "all", "multiplier_update": "kkt", "warmup": 0, "resync_every": 1,
    "aux_sweeps": 0, "weight_solve": "joint", "step_control": "backtrack",
    "rho1": 1.0, "rho3": 1.0,
}


def _engine(data, hidden=8, seed=0, act="tanh", parts=None, **admm):
    """An engine of the faithful formulation, with ``admm`` settings on top."""
    overrides = {**FAITHFUL, "model.hidden": hidden, "model.activation": act,
                 "train.seed": seed}
    overrides.update({f"admm.{k}": v for k, v in admm.items()})
    return AdmmEngine(build_config(overrides=overrides), parts or [data], data.n, SerialComm())


def _learnable(n=96, steps=6, dim=4, classes=3, seed=0):
    """Labels that depend on the whole sequence (a sign pattern of time sums)."""
    data = make_local("dense", False, n=n, steps=steps, dim=dim, classes=classes, seed=seed)
    score = data.inputs[: steps // 2, :, 0].sum(0) + 0.5 * data.inputs[steps // 2:, :, 1].sum(0)
    y = np.digitize(score, np.quantile(score, [1 / 3, 2 / 3])).astype(np.int32)
    return LocalData(data.info, data.inputs, y[None, :], 0, n)


def _loss(eng, data, act="tanh"):
    s = loss_sums(eng.params, data, act, "ce")
    return s[0] / s[2], s[1] / s[2]


def test_recommended_configuration_trains():
    """Training loss never increases (backtracking) and falls well below the start;
    the objective reported from the sums goes down too."""
    data = _learnable()
    eng = _engine(data, **RECOMMENDED)
    loss0, _ = _loss(eng, data)
    losses, objectives = [loss0], []
    for _ in range(25):
        sums = eng.sum_parts(eng.iterate(want_sums=True))
        objectives.append(eng.summarize(sums)["objective"])
        losses.append(_loss(eng, data)[0])
    assert np.all(np.diff(losses) <= 1e-12 * losses[0]), losses
    assert losses[-1] < 0.6 * loss0, (loss0, losses[-1])
    assert objectives[-1] < 0.7 * objectives[0], objectives
    assert _loss(eng, data)[1] > 0.6  # chance is 1/3


def test_defaults_are_the_recommended_configuration():
    """The default is mini-batch ADMM (also under AP, as consensus); the fullbatch preset
    is the full-batch hybrid (the recommended block options, backtracking, also in async
    runs on a local loss)."""
    assert build_config().admm.batch_size > 0
    cfg = load_config("fullbatch")
    assert cfg.admm.batch_size == 0
    for key, value in RECOMMENDED.items():
        assert getattr(cfg.admm, key) == value or (key == "step_control" and
                                                   cfg.admm.step_control == "auto"), key
    assert cfg.backtracking()
    assert load_config("fullbatch", {"train.parallel": "async"}).backtracking()  # local loss
    assert not build_config(overrides=FAITHFUL).backtracking()
    # AP runs the default: mini-batch consensus by averaging, one join per pass
    ap = build_config(overrides={"train.parallel": "async"})
    assert ap.admm.batch_size > 0 and ap.consensus() == "average"
    with pytest.raises(ConfigError, match="one join per pass"):
        build_config(overrides={"train.parallel": "async", "admm.sync_every": 3})


def test_faithful_default_trains_less():
    """The same budget with the faithful formulation (the preset) reaches a higher loss:
    the point of the new options, pinned on a small problem."""
    data = _learnable()
    rec, faithful = _engine(data, **RECOMMENDED), _engine(data)
    for _ in range(25):
        rec.iterate(want_sums=False)
        faithful.iterate(want_sums=False)
    assert _loss(rec, data)[0] < _loss(faithful, data)[0]


@pytest.mark.parametrize("act", ("tanh", "relu"))
def test_kkt_multipliers_are_minus_the_bptt_adjoint(act):
    data = make_local("dense", False, n=20, steps=5, dim=4, classes=3, seed=3)
    eng = _engine(data, hidden=6, act=act, multipliers="all", multiplier_update="kkt",
                  warmup=0)
    eng.block_kkt_multipliers()  # the initial state is a forward pass: feasible
    st, p = eng.parts[0].state, eng.params
    dU, dW, db, dV, dc = (getattr(gradients(p, data, act, "ce").grads, k)
                          for k in ELMAN)
    n = data.n
    # feature-major state: L1, S [T(+1), h, n]; L3 rows [1, n, K]
    np.testing.assert_allclose(-np.einsum("tin,tjn->ij", st.L1[1:], st.S[1:-1]) / n, dW,
                               atol=1e-12)
    np.testing.assert_allclose(-np.einsum("tin,tnd->id", st.L1, data.inputs) / n, dU,
                               atol=1e-12)
    np.testing.assert_allclose(-st.L1.sum((0, 2)) / n, db, atol=1e-12)
    np.testing.assert_allclose(-st.L3[0].T @ st.S[-1].T / n, dV, atol=1e-12)


@pytest.mark.parametrize("m2m", (False, True))
@pytest.mark.parametrize("act", ("tanh", "relu"))
def test_backward_sweep_and_joint_solve_never_increase_lagrangian(act, m2m):
    data = make_local("dense", m2m, n=16, steps=5, dim=4, classes=3, seed=4)
    eng = _engine(data, hidden=6, act=act, multipliers="none", aux_order="backward",
                  aux_sweeps=2, weight_solve="joint", rho1=0.7, rho2=1.3, rho3=0.4, nu=0.01)
    rng = np.random.default_rng(5)
    st = eng.parts[0].state
    st.A += 0.5 * rng.standard_normal(st.A.shape)
    st.S[1:] += 0.5 * rng.standard_normal(st.S[1:].shape)
    eng.synced = False  # off the forward pass
    pen = eng.penalty(1)
    values = [eng.lagrangian(pen)]
    for _ in range(3):
        st_in, st_out = eng.reduce_fused(pen)
        eng.weights_in(st_in, pen)
        values.append(eng.lagrangian(pen))
        eng.weights_out(st_out, pen)
        values.append(eng.lagrangian(pen))
        eng.block_o(pen)
        values.append(eng.lagrangian(pen))
        eng.block_backward(pen)
        values.append(eng.lagrangian(pen))
    diffs = np.diff(values)
    assert (diffs <= 1e-12 * max(1.0, abs(values[0]))).all(), values
    assert values[-1] < values[0]


def test_joint_weight_solve_is_exact_minimiser():
    data = make_local("dense", False, n=16, steps=5, dim=4, classes=3, seed=6)
    eng = _engine(data, hidden=6, weight_solve="joint", nu=0.02)
    st = eng.parts[0].state
    st.A += 0.3 * np.random.default_rng(7).standard_normal(st.A.shape)
    eng.synced = False  # off the forward pass
    pen = eng.penalty(1)
    st_in, st_out = eng.reduce_fused(pen)
    eng.weights_in(st_in, pen)
    eng.weights_out(st_out, pen)
    base = eng.lagrangian(pen)
    rng = np.random.default_rng(8)
    for name in ("U", "W", "b", "V", "c"):
        orig = getattr(eng.params, name).copy()
        setattr(eng.params, name, orig + 1e-3 * rng.standard_normal(orig.shape))
        assert eng.lagrangian(pen) > base, name
        setattr(eng.params, name, orig)


def test_backtracking_keeps_loss_from_increasing_with_huge_steps():
    """rho tiny = steps 1/rho far too long: the safeguard must halve them."""
    data = _learnable(seed=1)
    eng = _engine(data, **{**RECOMMENDED, "rho1": 0.01, "rho3": 0.01, "backtrack_max": 12})
    losses = [_loss(eng, data)[0]]
    for _ in range(8):
        eng.iterate(want_sums=False)
        losses.append(_loss(eng, data)[0])
    assert np.all(np.diff(losses) <= 1e-12 * losses[0]), losses
    assert eng.alpha < 0.5  # the safeguard did act
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("grow_after", [0, 2])
def test_step_length_grows_only_after_first_trial_acceptances(grow_after):
    """alpha doubles only once ``step_grow_after`` iterations in a row were accepted at
    their first trial, and is otherwise kept from the last iteration or halved."""
    data = _learnable(seed=1)
    eng = _engine(data, **{**RECOMMENDED, "rho1": 0.05, "rho3": 0.05, "backtrack_max": 12,
                           "step_grow_after": grow_after})
    grew = halved = 0
    for _ in range(16):
        alpha, streak, trials = eng.alpha, eng.streak, eng.trials
        eng.iterate(want_sums=False)
        first_trial = eng.trials - trials == 1
        assert eng.streak == (streak + 1 if first_trial else 0)
        if streak >= grow_after:
            expected = min(1.0, 2.0 * alpha)
        else:
            expected = alpha
        if first_trial:
            assert eng.alpha == expected
        else:
            assert eng.alpha < expected
            halved += 1
        grew += eng.alpha > alpha
    assert grew and halved  # both branches were taken


def test_without_backtracking_huge_steps_increase_loss():
    """The same run without the safeguard is not monotone: the test above is not vacuous."""
    data = _learnable(seed=1)
    cfg = {**RECOMMENDED, "rho1": 0.01, "rho3": 0.01, "step_control": "none", "momentum": 0.0,
           "weight_solve": "joint"}
    eng = _engine(data, **cfg)
    losses = [_loss(eng, data)[0]]
    for _ in range(8):
        eng.iterate(want_sums=False)
        losses.append(_loss(eng, data)[0])
    assert np.any(np.diff(losses) > 0), losses


def test_parts_give_the_same_iterates():
    """Everything global (statistics, trial losses) goes through sum_parts."""
    data = _learnable(n=60)
    cut = 25
    parts = [LocalData(data.info, data.inputs[:, a:b], data.targets[:, a:b], a, b)
             for a, b in ((0, cut), (cut, data.n))]
    cfg = {**RECOMMENDED, "momentum": 0.5}
    one = _engine(data, **cfg)
    two = _engine(data, parts=parts, **cfg)
    for _ in range(6):
        one.iterate(want_sums=False)
        two.iterate(want_sums=False)
    np.testing.assert_allclose(two.params.W, one.params.W, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(two.params.V, one.params.V, rtol=1e-9, atol=1e-11)
    assert two.alpha == one.alpha


def test_dual_step_scales_the_multiplier_step():
    data = make_local("dense", True, n=10, steps=4, dim=3, classes=3, seed=9)
    eng = _engine(data, hidden=5, multipliers="all", warmup=0, dual_step=0.25)
    st = eng.parts[0].state
    st.O += 1.0
    pen = eng.penalty(1)
    r3 = st.O - (np.einsum("thn,kh->tnk", st.S[1:], eng.params.V) + eng.params.c)
    eng.residuals(pen, (True, True, True))
    np.testing.assert_allclose(st.L3, 0.25 * pen.rho3 * r3, atol=1e-12)


def test_resync_makes_the_point_feasible():
    data = make_local("dense", False, n=10, steps=4, dim=3, classes=3, seed=10)
    eng = _engine(data, hidden=5)
    for _ in range(2):
        eng.iterate(want_sums=False)
    eng.resync()
    r = eng.residuals(eng.penalty(1), (False, False, False))[0]
    assert r[1] < 1e-24 and r[3] < 1e-24 and r[5] < 1e-24


@pytest.mark.parametrize("overrides", [
    {"admm.multipliers": "none"},                             # kkt needs multipliers all
    {"admm.step_control": "backtrack", "admm.resync_every": 0},  # needs resync_every 1
    {"admm.momentum": 0.5, "admm.step_control": "none"},      # needs backtracking
    {"admm.momentum": 0.5, "admm.resync_every": 0},           # auto does not backtrack here
    {"admm.dual_step": 0.0},
    {"admm.aux_sweeps": -1},
    {"admm.aux_order": "forward"},
    {"admm.weight_solve": "newton"},
])
def test_new_options_are_validated(overrides):
    with pytest.raises(ConfigError):
        build_config(overrides=overrides)


def test_train_metrics_from_synced_state_equal_a_forward_pass():
    """The default iteration leaves a, s, o equal to the forward pass of the weights:
    the training metrics read off o equal those of a true forward pass."""
    data = _learnable()
    eng = AdmmEngine(build_config(overrides={**FULLBATCH, "model.hidden": 8}), [data], data.n,
                     SerialComm())
    for _ in range(3):
        eng.iterate(want_sums=False)
        sums = eng.train_loss_sums()
        assert sums is not None
        np.testing.assert_allclose(sums[0], loss_sums(eng.params, data, "tanh", "ce"),
                                   rtol=1e-12)
    faithful = _engine(data)
    faithful.iterate(want_sums=False)
    assert faithful.train_loss_sums() is None  # its a, s, o are not a forward pass


def test_synced_residual_sums_equal_recomputed_ones():
    data = _learnable()
    eng = AdmmEngine(build_config(overrides={**FULLBATCH, "model.hidden": 8}), [data], data.n,
                     SerialComm())
    for _ in range(2):
        fast = eng.iterate(want_sums=True)[0]
        recomputed = eng.residuals(eng.penalty(eng.iteration), (False, False, False))[0]
        # the multipliers changed after the sums were taken: compare the loss and the
        # residual norms (the lambda.r terms vanish with r)
        assert fast[0] == pytest.approx(recomputed[0], rel=1e-12)
        assert recomputed[1] < 1e-24 and recomputed[3] < 1e-24 and recomputed[5] < 1e-24
        assert fast[1:].tolist() == [0.0] * 6

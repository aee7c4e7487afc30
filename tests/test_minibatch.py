"""Mini-batch hybrid ADMM (padmmirnn/minibatch.py): the step is the block minimiser
of a mini-batch's augmented Lagrangian, it trains, its running Gram solves agree
with dense algebra, and it resumes bit for bit."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import make_local, traced_peak

from padmmirnn.admm.blockstep import RunningGram
from padmmirnn.admm.minibatch import MinibatchAdmm
from padmmirnn.cli import main
from padmmirnn.comm import SerialComm
from padmmirnn.config import build_config, decay_rule, size_rule
from padmmirnn.nn import forward, gradients, loss_sums


def _trainer(data, n=None, **admm):
    cfg = build_config(overrides={"model.hidden": 6, "admm.batch_size": 8,
                                  **{f"admm.{k}": v for k, v in admm.items()}})
    return MinibatchAdmm(cfg, data, n or data.n, SerialComm())


@pytest.mark.parametrize("kind,m2m,token_step", [("dense", False, "all"),
                                                 ("tokens", True, "all"),
                                                 ("tokens", True, "active")])
def test_step_with_the_batch_gram_is_the_exact_block_minimiser(kind, m2m, token_step):
    """With C the batch's own Gram matrix (decay 0), no decay of weights or cap, one
    step is the minimiser of the batch's augmented Lagrangian over each block:
    Theta - (1/rho) grad (G / rows)^-1, grad the gradient of the mean loss (BPTT, checked
    against finite differences elsewhere) and G = sum z z^T from a forward pass. Token
    4 never occurs: ``admm.token_step = all`` solves for its column too (its Gram row is
    the damping alone), ``active`` minimises over the batch's token columns only, the
    principal sub-block of G on them, and leaves the absent token's column as it was."""
    data = make_local(kind, m2m, n=10, steps=4, dim=5, classes=3, seed=2)
    if kind == "tokens":
        data.inputs[...] = data.inputs % 4
    damping = 1e-3  # one-hot rows sum to the ones row: the token Gram alone is singular
    tr = _trainer(data, batch_size=10, cov_decay=0.0, damping=damping, nu=0.0,
                  trust_radius=0.0, rho1=2.0, rho3=4.0, token_step=token_step)
    p = tr.params.copy()
    g = gradients(p, data, "tanh", "ce").grads
    states = forward(p, data, "tanh").states
    steps, n = 4, 10
    s_prev = states[:-1]  # s_{t-1}, [T, h, n]
    if kind == "dense":
        x = data.inputs.transpose(0, 2, 1)
    else:
        x = np.zeros((steps, 5, n))
        for t in range(steps):
            x[t, data.inputs[t], np.arange(n)] = 1.0
    z = np.concatenate([x, np.ones((steps, 1, n)), s_prev], axis=1)
    G = np.einsum("tin,tjn->ij", z, z) / (steps * n)
    theta = np.concatenate([p.U, p.b[:, None], p.W], axis=1)
    grad = np.concatenate([g.U, g.b[:, None], g.W], axis=1)
    cols = np.arange(len(G))
    if token_step == "active":  # the absent token's column is not solved for
        cols = cols[cols != 4]
        G, grad = G[np.ix_(cols, cols)], grad[:, cols]
    expect_in = theta.copy()
    expect_in[:, cols] -= grad @ np.linalg.inv(G + damping * np.eye(len(G))) / 2.0
    s_out = states[1:] if m2m else states[-1:]
    zo = np.concatenate([s_out, np.ones((s_out.shape[0], 1, n))], axis=1)
    Go = np.einsum("tin,tjn->ij", zo, zo) / (s_out.shape[0] * n)
    expect_out = np.concatenate([p.V, p.c[:, None]], axis=1) \
        - np.concatenate([g.V, g.c[:, None]], axis=1) \
        @ np.linalg.inv(Go + damping * np.eye(len(Go))) / 4.0
    tr.step()
    q = tr.params
    np.testing.assert_allclose(np.concatenate([q.U, q.b[:, None], q.W], axis=1), expect_in,
                               rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(np.concatenate([q.V, q.c[:, None]], axis=1), expect_out,
                               rtol=1e-9, atol=1e-11)


def test_token_gram_solve_equals_the_dense_solve():
    """The Schur-complement solve of the token Gram (diagonal counts block) equals a
    dense solve of the same matrix, also on a principal sub-block of token columns."""
    rng = np.random.default_rng(0)
    vocab, rest = 7, 4
    g = RunningGram(vocab + rest, vocab)
    g.diag = rng.uniform(0.5, 2.0, vocab)
    g.cross = 0.1 * rng.standard_normal((vocab, rest))
    a = rng.standard_normal((rest, rest))
    g.rest = a @ a.T + np.eye(rest)
    dense = np.block([[np.diag(g.diag), g.cross], [g.cross.T, g.rest]])
    R = rng.standard_normal((3, vocab + rest))
    np.testing.assert_allclose(g.solve(R, 0.01), R @ np.linalg.inv(dense + 0.01 * np.eye(11)),
                               rtol=1e-10, atol=1e-12)
    some = np.array([1, 4, 5])  # a principal sub-block: these token columns and the rest
    sel = np.concatenate([some, vocab + np.arange(rest)])
    Rs = R[:, sel]
    np.testing.assert_allclose(g.solve(Rs, 0.01, tokens=some),
                               Rs @ np.linalg.inv(dense[np.ix_(sel, sel)] + 0.01 * np.eye(7)),
                               rtol=1e-10, atol=1e-12)


def test_active_token_step_equals_the_full_one_when_every_token_occurs():
    """When every batch holds every token, the active-token step is the full one."""
    data = make_local("tokens", True, n=64, steps=5, dim=4, classes=3, seed=4)
    runs = [_trainer(data, token_step=mode) for mode in ("all", "active")]
    for tr in runs:
        tr.step()
    for k, v in runs[0].params.arrays().items():
        np.testing.assert_allclose(runs[1].params.arrays()[k], v, rtol=1e-12, atol=1e-14)



@pytest.mark.parametrize("kind,m2m", [("dense", False), ("tokens", True)])
def test_passes_reduce_the_training_loss(kind, m2m):
    data = make_local(kind, m2m, n=64, steps=5, dim=6, classes=3, seed=4)
    if kind == "tokens":  # learnable: the label of a step is its token mod 3
        data.targets[...] = data.inputs % 3
    tr = _trainer(data)
    before = loss_sums(tr.params, data, "tanh", "ce")
    for _ in range(6):
        tr.step()
    after = loss_sums(tr.params, data, "tanh", "ce")
    assert after[0] < 0.9 * before[0]
    assert tr.steps == 6 * 8 and tr.iteration == 6


def test_resume_continues_bit_for_bit(tmp_path):
    common = ["train", "--set", "admm.batch_size=500", "--set", "model.hidden=16"]
    assert main([*common, "--iterations", "3", "--out", str(tmp_path / "full")]) == 0
    part = tmp_path / "part"
    assert main([*common, "--iterations", "2", "--checkpoint-every", "2",
                 "--out", str(part)]) == 0
    assert main([*common, "--iterations", "3", "--resume", "latest", "--out", str(part)]) == 0
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (tmp_path / "full", part)]
    assert [r["iteration"] for r in rows[1]] == [1, 2, 3]
    for a, b in zip(*rows, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["test_loss"] == b["test_loss"]
        assert a["batch_loss"] == b["batch_loss"]


def test_evaluation_in_blocks_equals_one_forward_pass(monkeypatch):
    """Long sequences are evaluated in blocks of samples (a bounded memory): the sums
    equal those of one forward pass over all samples."""
    from padmmirnn import nn
    from padmmirnn.nn import network

    data = make_local("tokens", True, n=50, steps=6, dim=5, classes=3, seed=9)
    p = nn.init_params(5, 7, 3, 0, "orthogonal", 1.0)
    net = nn.Network.of(p, "tanh")
    whole = net.loss_sums(p, data, "ce")
    per_sample = net.bytes_per_sample(data.info, 7, 8)
    monkeypatch.setattr(network, "EVAL_BYTES", 8 * per_sample)
    assert net.eval_block(data.info, 7, 8) == 8
    blocks = net.loss_sums(p, data, "ce")
    np.testing.assert_allclose(blocks, whole, rtol=1e-13)
    assert blocks[2] == whole[2] == 50 * 6


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("kind,m2m", [("dense", False), ("tokens", True)])
def test_kkt_statistics_are_minus_the_bptt_gradient_sums(cell, layers, kind, m2m):
    """The KKT multipliers of a forward pass equal the adjoint: per layer, the mini-batch
    statistics D = sum lambda z^T of batch_statistics (its token block Dx, a GRU's
    candidate bias sum bh) and the output block's are minus the BPTT gradient of the
    mean loss times the output rows, for every cell and a stacked network."""
    from padmmirnn.admm.blockstep import batch_statistics
    from padmmirnn.nn import Network, layer_name

    data = make_local(kind, m2m, n=9, steps=4, dim=5, classes=3, seed=6)
    net = Network.build(cell, "tanh", layers)
    p = net.init_params(5, 6, 3, 1, "gaussian", 1.0)
    rng = np.random.default_rng(2)
    p = p.map(lambda a: a + 0.2 * rng.standard_normal(a.shape))  # nonzero biases
    st = batch_statistics(net, p, data, "ce", np.dtype(np.float64))
    res = gradients(p, data, "tanh", "ce")
    g, rows = res.grads, res.rows
    assert st["counts"][2] == rows
    assert st["counts"][0] / rows == pytest.approx(res.loss, rel=1e-13)
    tol = {"rtol": 1e-11, "atol": 1e-12}
    for l in range(layers):
        D = st[f"l{l}.D"]
        dx = 0 if (kind == "tokens" and l == 0) else g.layer(l).U.shape[1]
        np.testing.assert_allclose(D[:, dx + 1:], -rows * getattr(g, layer_name("W", l)),
                                   **tol)
        np.testing.assert_allclose(D[:, dx], -rows * getattr(g, layer_name("b", l)), **tol)
        dU = st["l0.Dx"] if dx == 0 else D[:, :dx]
        np.testing.assert_allclose(dU, -rows * getattr(g, layer_name("U", l)), **tol)
        if cell == "gru":
            np.testing.assert_allclose(st[f"l{l}.bh"], -rows * getattr(g, layer_name("bh", l)),
                                       **tol)
    h = p.hidden
    np.testing.assert_allclose(st["out.D"][:, :h], -rows * g.V, **tol)
    np.testing.assert_allclose(st["out.D"][:, h], -rows * g.c, **tol)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("kind,m2m", [("dense", False), ("tokens", True)])
def test_the_memory_estimate_covers_a_step(cell, layers, kind, m2m):
    """Network.bytes_per_sample (the memory check's and the evaluation blocks' figure)
    against the peak of NumPy's allocations (tracemalloc) in a mini-batch ADMM step's
    statistics and a BPTT gradient: every layer's state and the cell's trace (the gated
    cells' gates, cell states, candidate products), the outputs and the seeds; within
    6% above (the cells' [h, n] temporaries) and 15% below."""

    from padmmirnn.admm.blockstep import batch_statistics
    from padmmirnn.nn import Network

    n, h = 100, 16
    data = make_local(kind, m2m, n=n, steps=20, dim=12, classes=5, seed=3)
    net = Network.build(cell, "tanh", layers)
    p = net.init_params(12, h, 5, 0, "gaussian", 1.0)
    estimate = net.bytes_per_sample(data.info, h, 8) * n

    def stats():
        batch_statistics(net, p, data, "ce", np.dtype(np.float64))

    def grads():
        net.gradients(p, data, "ce")

    for run in (stats, grads):
        peak = traced_peak(run)
        assert 0.85 * estimate <= peak <= 1.06 * estimate, (run.__name__, peak / estimate)


def test_the_batch_rule_keeps_the_tuned_defaults_at_64_and_yields_to_set_values():
    """``auto`` settings follow :func:`batch_rule` of the batch of one step (capped at
    the training set) and the steps per pass: the tuned defaults at batch 64 of a few
    thousand samples or more; a shorter Gram memory and a wider cap as a pass has
    fewer steps, the two-sided step and momentum above 64; a value set by hand wins;
    only the rule's keys accept ``auto``."""
    from padmmirnn.config import batch_rule
    from padmmirnn.errors import ConfigError

    tuned = {"cov_decay": 0.95, "trust_radius": 0.25, "output_factor": 0.0,
             "block_momentum": 0.0, "output_trust": 1.0, "average": 0.99}
    for b, n in ((64, 4000), (64, 60000), (16, 60000)):
        assert batch_rule(b, n) == tuned
    rules = [batch_rule(b, 60000) for b in (64, 128, 1024, 4096, 16384, 60000)]
    for small, big in zip(rules, rules[1:], strict=False):
        assert 0.3 <= big["cov_decay"] <= small["cov_decay"]
        assert small["trust_radius"] <= big["trust_radius"] <= 0.5
    assert batch_rule(4000, 4000) == batch_rule(60000, 60000)  # one step per pass
    assert batch_rule(1024, 4000)["output_factor"] > 0
    assert batch_rule(1024, 4000)["block_momentum"] > 0
    a = build_config(overrides={"admm.batch_size": 1024, "admm.cov_decay": 0.9}).admm
    assert a.cov_decay == 0.9 and a.trust_radius == "auto"
    size = {"weights": 6000, "rows": 4000}
    resolved = a.for_batch(4000, **size)
    assert resolved.cov_decay == 0.9
    assert resolved.trust_radius == batch_rule(1024, 4000)["trust_radius"]
    assert a.for_batch(500, **size).trust_radius == batch_rule(500, 500)["trust_radius"]
    assert a.for_batch(4000, ranks=4, **size).trust_radius == batch_rule(256, 1000)[
        "trust_radius"]
    with pytest.raises(ConfigError, match="admm.damping' must be of type float, got str"):
        build_config(overrides={"admm.damping": "auto"})
    with pytest.raises(ConfigError, match="admm.cov_decay' must be of type float or 'auto'"):
        build_config(overrides={"admm.cov_decay": "fast"})


def _one_batch_step(data, **admm):
    """A block step and its state for ``data`` as one batch, with the statistics of
    the initial weights (no trust radius, no decay: the step is linear in them)."""
    cfg = build_config(overrides={"model.hidden": 6, "admm.batch_size": data.n,
                                  "admm.trust_radius": 0.0, "admm.cov_decay": 0.0,
                                  "admm.nu": 0.0, "admm.rho_schedule": "constant",
                                  **{f"admm.{k}": v for k, v in admm.items()}})
    tr = MinibatchAdmm(cfg, data, data.n, SerialComm())
    return tr.block, tr.state, tr.block.statistics(tr.state.params, data)


def test_the_output_factor_left_solves_the_step_with_the_adjoint_gram():
    """With ``admm.output_factor`` = k the output block's change is ``(S + k mean(diag
    S) I)^-1 D/R (C + damping I)^-1 / rho3``, S the adjoint Gram per output row, C
    the batch's Gram per row (decay 0): the two-sided (Kronecker-factored) step; S is
    positive semi-definite."""
    data = make_local("dense", False, n=20, steps=4, dim=5, classes=3, seed=8)
    k = 0.5
    block, state, st = _one_batch_step(data, output_factor=k, block_momentum=0.0)
    V0, c0 = state.params.V.copy(), state.params.c.copy()
    block.apply(state, st, 1.0)
    R = st["counts"][2]
    h = V0.shape[1]
    rest = st["out.rest"]
    C = rest / R + block.a.damping * np.eye(h + 1)
    S = st["out.S"] / R
    left = S + k * np.trace(S) / S.shape[0] * np.eye(S.shape[0])
    expect = np.linalg.solve(left, np.linalg.solve(C, (st["out.D"] / R).T).T) / block.a.rho3
    np.testing.assert_allclose(np.c_[state.params.V - V0, state.params.c - c0], expect,
                               rtol=1e-9, atol=1e-12)
    assert np.all(np.linalg.eigvalsh(S) > -1e-12)


def test_block_momentum_adds_mu_times_the_last_change():
    """With ``admm.block_momentum`` = mu and the same statistics twice, the second
    change is mu times the first plus the plain step's second change (the steps are
    linear in the statistics with no trust radius and no weight decay)."""
    data = make_local("dense", False, n=20, steps=4, dim=5, classes=3, seed=9)
    mu = 0.5
    plain, s0, st = _one_batch_step(data, block_momentum=0.0, output_factor=0.0)
    heavy, s1, _ = _one_batch_step(data, block_momentum=mu, output_factor=0.0)
    start = s0.params.copy()
    changes = []
    for block, state in ((plain, s0), (heavy, s1)):
        seen = [state.params.copy()]
        for _ in range(2):
            block.apply(state, {k: v.copy() for k, v in st.items()}, 1.0)
            seen.append(state.params.copy())
        changes.append([{k: b - a for (k, a), b in zip(x.arrays().items(),
                                                       y.arrays().values(), strict=True)}
                        for x, y in zip(seen, seen[1:], strict=False)])
    (p1, p2), (h1, h2) = changes
    for key in start.arrays():
        np.testing.assert_allclose(h1[key], p1[key], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(h2[key], mu * p1[key] + p2[key], rtol=1e-9, atol=1e-13)


def test_weight_decay_follows_the_model_size_and_the_steps_per_pass():
    """``admm.nu = auto`` is 3e-3 min(1, p / R)^2 with p the first layer's input weights:
    full for a model with as many input weights as targets, falling with the square of
    the ratio below; at least 6e-4 when a pass has at most 4 block steps (a batch of a
    quarter of the set or more); an explicit value stays; every engine resolves it for
    its own model and data, from U's size (not the recurrent or output weights)."""
    assert size_rule(4000, 4000) == size_rule(10 ** 6, 4000) == 3e-3
    assert size_rule(1000, 10000) == pytest.approx(3e-3 * 0.01)
    assert size_rule(100, 10000) < size_rule(1000, 10000)
    assert decay_rule(400, 4000, 62.5) == size_rule(400, 4000)
    assert decay_rule(400, 4000, 4.0) == decay_rule(400, 4000, 1.0) == 6e-4
    assert decay_rule(4000, 4000, 1.0) == 3e-3
    a = build_config().admm
    assert a.nu == "auto" and a.for_batch(4000, weights=400, rows=4000).nu == \
        pytest.approx(3e-5)
    fashion = {"weights": 64 * 28, "rows": 60000}
    big = build_config(overrides={"admm.batch_size": 16384}).admm
    assert big.for_batch(60000, **fashion).nu == 6e-4
    assert big.for_batch(60000, ranks=64, **fashion).nu == 6e-4  # k is the global one
    assert dataclasses.replace(big, batch_size=4096).for_batch(60000, **fashion).nu == \
        pytest.approx(size_rule(64 * 28, 60000))
    assert build_config(overrides={"admm.nu": 0.0}).admm.for_batch(
        4000, weights=400, rows=4000).nu == 0.0
    data = make_local("tokens", True, n=20, steps=5, dim=6, classes=3, seed=1)
    tr = _trainer(data)
    rows = 20 * 5  # many-to-many: a target per step
    assert tr.a.nu == pytest.approx(decay_rule(tr.params.U.size, rows, 20 / 64))
    assert tr.a.nu < size_rule(tr.params.size, rows)
    assert tr.block.a.nu == tr.a.nu


def test_the_penalty_growth_follows_the_labels_per_sequence():
    """``admm.rho_growth = auto`` is 1.05^(1/sqrt(|O|)): exactly 1.05 for one label per
    sequence (every many-to-one run keeps its schedule), slower with a label per step;
    an explicit value stays; each engine resolves it from its own data, so the pass-k
    penalty scale of a many-to-many run is 1.05^((k-1)/sqrt(T))."""
    from padmmirnn.admm.minibatch import penalty_scale
    from padmmirnn.config import growth_rule

    assert growth_rule(1.0) == 1.05
    assert growth_rule(100.0) == pytest.approx(1.05 ** 0.1)
    assert 1.0 < growth_rule(100.0) < growth_rule(4.0) < growth_rule(1.0)
    a = build_config().admm
    assert a.rho_growth == "auto"
    assert a.for_batch(4000, weights=400, rows=4000).rho_growth == 1.05
    assert a.for_batch(3600, weights=77, rows=360000).rho_growth == pytest.approx(
        1.05 ** 0.1)
    assert build_config(overrides={"admm.rho_growth": 1.2}).admm.for_batch(
        3600, weights=77, rows=360000).rho_growth == 1.2
    tr = _trainer(make_local("tokens", True, n=20, steps=4, dim=6, classes=3, seed=1))
    assert tr.a.rho_growth == pytest.approx(1.05 ** 0.5)  # T = 4 labels per sequence
    assert penalty_scale(tr.a, 3) == pytest.approx(1.05 ** 1.5)

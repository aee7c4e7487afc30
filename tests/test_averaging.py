"""The average of a trainer's iterates (padmmirnn/averaging.py): the model a run
evaluates and saves is the moving average of its steps' iterates (mini-batch ADMM,
consensus, the gradient methods), the lazy token columns equal the dense recursion,
and a resumed run equals an uninterrupted one bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_local

from padmmirnn.admm.minibatch import MinibatchAdmm
from padmmirnn.averaging import RAMP, IterateAverage
from padmmirnn.comm import SerialComm
from padmmirnn.config import batch_rule, build_config
from padmmirnn.errors import ConfigError
from padmmirnn.nn import Params


def _decay(t: int, cap: float) -> float:
    return min(cap, (1.0 + t) / (1.0 + RAMP + t))


def _reference(iterates: list[np.ndarray], start: np.ndarray, cap: float) -> np.ndarray:
    """theta_bar_t = d_t theta_bar_{t-1} + (1 - d_t) theta_t from theta_bar_0 = theta_0."""
    mean = start.copy()
    for t, theta in enumerate(iterates, start=1):
        d = _decay(t, cap)
        mean = d * mean + (1.0 - d) * theta
    return mean


def test_the_lazy_token_columns_equal_the_dense_recursion():
    """Steps that move only some columns of ``U`` (and every other array): the lazy
    average, brought up to date, equals the dense recursion to rounding; between
    updates the columns just moved and the dense arrays are already exact."""
    rng = np.random.default_rng(3)
    p = Params({"U": rng.standard_normal((6, 30)), "W": rng.standard_normal((6, 6)),
                "V": rng.standard_normal((2, 6))})
    lazy, dense = IterateAverage(0.9, p, "U"), IterateAverage(0.9, p)
    for _ in range(40):
        cols = np.sort(rng.choice(30, size=rng.integers(1, 8), replace=False))
        lazy.before(p, cols)
        U = p.U.copy()
        U[:, cols] += rng.standard_normal((6, len(cols)))
        p = p.replace(U=U, W=p.W + rng.standard_normal((6, 6)),
                      V=p.V + rng.standard_normal((2, 6)))
        lazy.after(p, cols)
        dense.after(p, None)
        np.testing.assert_allclose(lazy.mean.U[:, cols], dense.mean.U[:, cols], atol=1e-12)
        np.testing.assert_array_equal(lazy.mean.W, dense.mean.W)
    assert not np.allclose(lazy.mean.U, dense.mean.U, atol=1e-6)  # some columns wait
    lazy.finish(p)
    for name in p.names():
        np.testing.assert_allclose(getattr(lazy.mean, name), getattr(dense.mean, name),
                                   rtol=1e-12, atol=1e-12)


def _trainer(data, **admm):
    cfg = build_config(overrides={"model.hidden": 5, "admm.batch_size": 8,
                                  **{f"admm.{k}": v for k, v in admm.items()}})
    return MinibatchAdmm(cfg, data, data.n, SerialComm())


def _data(kind: str):
    """Token inputs: 40 tokens, 3 steps, batches of 8, so that no batch holds them all."""
    if kind == "dense":
        return make_local("dense", False, n=48, steps=4, dim=3, classes=3, seed=5)
    return make_local("tokens", True, n=48, steps=3, dim=40, classes=3, seed=5)


@pytest.mark.parametrize("kind", ["dense", "tokens"])
def test_the_model_is_the_moving_average_of_the_iterates(kind):
    """``model`` after two passes is the recursion over every block step's iterate
    (recorded from the step itself), ``params`` the last iterate; ``average = 0`` gives
    the last iterate as the model."""
    data = _data(kind)
    tr = _trainer(data, average=0.7)
    assert tr.block.sparse == (kind == "tokens")
    start = tr.params.flat()
    iterates = []
    apply = tr.block.apply

    def recorded(state, stats, scale):
        loss = apply(state, stats, scale)
        iterates.append(state.params.flat())
        return loss

    tr.block.apply = recorded
    tr.step()
    tr.step()
    assert len(iterates) == 2 * 6
    want = _reference(iterates, start, 0.7)
    np.testing.assert_allclose(tr.model.flat(), want, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(tr.params.flat(), iterates[-1])
    assert np.abs(tr.model.flat() - tr.params.flat()).max() > 1e-3
    plain = _trainer(data, average=0.0)
    plain.step()
    assert plain.model is plain.params


@pytest.mark.parametrize("kind", ["dense", "tokens"])
def test_a_resumed_average_continues_bit_for_bit(kind):
    """Three passes equal two, the state dict into a new trainer built from the saved
    iterate, and one more: the model and the iterate bitwise."""
    data = _data(kind)
    full = _trainer(data, average=0.9)
    for _ in range(3):
        full.step()
    part = _trainer(data, average=0.9)
    part.step()
    part.step()
    state = part.state_dict()
    resumed = MinibatchAdmm(part.cfg, data, data.n, SerialComm(), part.params.copy())
    resumed.load_state_dict(state)
    resumed.step()
    np.testing.assert_array_equal(resumed.model.flat(), full.model.flat())
    np.testing.assert_array_equal(resumed.params.flat(), full.params.flat())


def test_the_average_follows_the_steps_per_pass():
    """auto: 0.99 with at least 16 block steps per pass, off below (its window would lag
    behind a run of few steps) and in the consensus modes; a value set by hand wins;
    [0, 1) only."""
    assert batch_rule(64, 4000)["average"] == 0.99
    assert batch_rule(256, 4096)["average"] == 0.99
    assert batch_rule(1024, 4000)["average"] == 0.0
    assert batch_rule(4000, 4000)["average"] == 0.0
    assert build_config().admm.for_batch(4000, weights=100, rows=4000,
                                         consensus=True).average == 0.0  # joins average
    a = build_config(overrides={"admm.average": 0.5}).admm
    assert a.for_batch(4000, weights=100, rows=4000).average == 0.5
    with pytest.raises(ConfigError, match="admm.average' must be in"):
        build_config(overrides={"admm.average": 1.0})


def test_the_gradient_methods_average_their_iterates_the_same_way():
    """``optim.average``: Adam's model after two epochs is the same recursion over its
    optimizer steps' iterates; its state dict resumes it bit for bit; off by default;
    not for CELGC."""
    from padmmirnn.gradient.trainer import GradientTrainer

    data = _data("dense")
    over = {"train.algo": "adam", "model.hidden": 5, "optim.batch_size": 8}
    cfg = build_config(overrides={**over, "optim.average": 0.8})
    tr = GradientTrainer(cfg, data, data.n, SerialComm())
    start = tr.params.flat()
    iterates = []
    sync_step = tr._sync_step

    def recorded(batch):
        out = sync_step(batch)
        iterates.append(tr.params.flat())
        return out

    tr._sync_step = recorded
    tr.step()
    state = tr.state_dict()
    resumed = GradientTrainer(cfg, data, data.n, SerialComm(), tr.params.copy())
    resumed.load_state_dict(state)
    tr.step()
    resumed.step()
    np.testing.assert_allclose(tr.model.flat(), _reference(iterates, start, 0.8),
                               rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(resumed.model.flat(), tr.model.flat())
    plain = GradientTrainer(build_config(overrides=over), data, data.n, SerialComm())
    assert plain.model is plain.params
    with pytest.raises(ConfigError, match="optim.average is for the synchronous"):
        build_config(overrides={"train.algo": "celgc", "optim.average": 0.9})


@pytest.mark.parametrize("kind,mode", [("dense", "duals"), ("tokens", "average")])
def test_consensus_averages_the_ranks_mean_iterate(kind, mode):
    """Consensus on 2 virtual ranks, joined every 2 local steps: the model is the
    moving average of the ranks' mean iterate over the local steps (the joins average
    the ranks' averages; all ranks share the decays), and the state dict resumes it bit
    for bit."""
    from padmmirnn.admm.consensus import ConsensusAdmm
    from padmmirnn.comm.virtual import VirtualRanks

    data = _data(kind)
    cfg = build_config(overrides={"model.hidden": 5, "admm.batch_size": 8,
                                  "admm.consensus": mode, "admm.sync_every": 2,
                                  "admm.average": 0.8})
    comm = SerialComm()

    def build(params=None):
        return ConsensusAdmm(cfg, data, data.n, comm, params, VirtualRanks(comm, 2))

    tr = build()
    assert tr.block.sparse == (kind == "tokens")
    start, current = tr.params.flat(), []
    apply = tr.block.apply

    def recorded(state, *args):
        loss = apply(state, *args)
        current.append(state.params.flat())
        return loss

    tr.block.apply = recorded
    tr.step()
    state = tr.state_dict()
    resumed = build(tr.params.copy())
    resumed.load_state_dict(state)
    tr.step()
    resumed.step()
    means = [(a + b) / 2 for a, b in zip(current[::2], current[1::2], strict=True)]
    assert len(means) == 2 * tr.local_steps
    np.testing.assert_allclose(tr.model.flat(), _reference(means, start, 0.8),
                               rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(resumed.model.flat(), tr.model.flat())
    assert np.abs(tr.model.flat() - tr.params.flat()).max() > 1e-3

"""BPTT gradients (the model's forward pass and adjoint recursion) and the gradient
baselines (padmmirnn/gradient/)."""

import math

import numpy as np
import pytest

from padmmirnn.comm import SerialComm
from padmmirnn.config import build_config
from padmmirnn.gradient import optimizers as bl
from padmmirnn.gradient.trainer import GradientTrainer
from padmmirnn.nn import Gradients, Params, forward, gradients, init_params, loss_sums
from padmmirnn.samples import DatasetInfo, LocalData

ELMAN = ("U", "W", "b", "V", "c")

CASES = [
    ("dense", False, "tanh", "ce"),
    ("dense", True, "relu", "ce"),
    ("tokens", False, "tanh", "ce"),
    ("tokens", True, "tanh", "mse"),
]


def make_data(n: int, steps: int, dim: int, classes: int, kind: str, many: bool,
              seed: int = 0, scale: float = 1.0) -> LocalData:
    rng = np.random.default_rng(seed)
    if kind == "dense":
        x = scale * rng.standard_normal((steps, n, dim))
    else:
        x = rng.integers(0, dim, (steps, n)).astype(np.int32)
    y = rng.integers(0, classes, (steps if many else 1, n)).astype(np.int32)
    info = DatasetInfo(path="mem", n=n, steps=steps, dim=dim, classes=classes, kind=kind,
                       many_to_many=many)
    return LocalData(info, x, y, 0, n)


def make_params(d: int, h: int, k: int, seed: int = 1, scale: float = 1.0) -> Params:
    p = init_params(d, h, k, seed, "gaussian", scale)
    rng = np.random.default_rng(seed + 100)
    p.b = 0.3 * rng.standard_normal(h)
    p.c = 0.3 * rng.standard_normal(k)
    return p


def mean_loss(p: Params, data: LocalData, act: str, loss: str) -> float:
    return gradients(p, data, act, loss).loss


@pytest.mark.parametrize("kind,many,act,loss", CASES)
def test_gradients_match_central_differences(kind, many, act, loss):
    d, h, k, eps = 4, 5, 3, 1e-6
    data = make_data(7, 6, d, k, kind, many, seed=2)
    p = make_params(d, h, k)
    if act == "relu":  # no pre-activation within reach of the kink
        pre = forward(p, data, act).traces[0].pre
        assert np.abs(pre).min() > 1e-3
    res = gradients(p, data, act, loss)
    for name in ELMAN:
        w = getattr(p, name)
        fd = np.zeros_like(w)
        for i in np.ndindex(w.shape):
            old = w[i]
            w[i] = old + eps
            up = mean_loss(p, data, act, loss)
            w[i] = old - eps
            down = mean_loss(p, data, act, loss)
            w[i] = old
            fd[i] = (up - down) / (2 * eps)
        g = getattr(res.grads, name)
        assert g.shape == w.shape and g.dtype == np.float64
        err = np.linalg.norm(g - fd) / np.linalg.norm(fd)
        assert err < 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("kind,many,act,loss", CASES)
def test_loss_equals_model_mean_loss(kind, many, act, loss):
    data = make_data(9, 5, 6, 4, kind, many, seed=3)
    p = make_params(6, 7, 4, seed=4)
    total, _, count = loss_sums(p, data, act, loss)
    res = gradients(p, data, act, loss)
    assert res.rows == count == 9 * (5 if many else 1)
    assert res.loss == pytest.approx(total / count, rel=1e-13)


def test_float32_gradients_close_to_float64():
    data = make_data(16, 6, 4, 3, "dense", False)
    p = make_params(4, 5, 3)
    g64 = gradients(p, data, "tanh", "ce")
    g32 = gradients(p, data, "tanh", "ce", dtype=np.float32)
    assert g32.loss == pytest.approx(g64.loss, rel=1e-5)
    for name in ELMAN:
        a, b = getattr(g32.grads, name), getattr(g64.grads, name)
        assert a.dtype == np.float64
        assert np.linalg.norm(a - b) < 1e-4 * np.linalg.norm(b)


def test_step_norms_mean_over_samples_and_time_profile():
    data = make_data(6, 1, 3, 3, "dense", False)
    p = make_params(3, 4, 3)
    one = gradients(p, LocalData(data.info, data.inputs[:, :1], data.targets[:, :1], 0, 1),
                       "tanh", "ce")
    assert one.step_norms[0] == pytest.approx(np.linalg.norm(one.grads.b), rel=1e-14)
    # duplicating every sample changes neither the mean loss, its gradient, nor the norms
    data = make_data(6, 8, 3, 3, "dense", True)
    twice = LocalData(data.info, np.concatenate([data.inputs] * 2, axis=1),
                      np.concatenate([data.targets] * 2, axis=1), 0, 2 * data.n)
    a, b = gradients(p, data, "tanh", "ce"), gradients(p, twice, "tanh", "ce")
    assert b.loss == pytest.approx(a.loss, rel=1e-14)
    np.testing.assert_allclose(b.step_norms, a.step_norms, rtol=1e-13)
    np.testing.assert_allclose(b.grads.W, a.grads.W, rtol=1e-12, atol=1e-15)
    # many-to-one: contracting W -> vanishing towards t = 1, expanding -> exploding
    data = make_data(16, 30, 3, 3, "dense", False)
    small = gradients(make_params(3, 8, 3, scale=0.2), data, "tanh", "ce").step_norms
    assert small[0] < 1e-6 * small[-1]
    big = init_params(3, 16, 3, 1, "orthogonal", 3.0)
    data = make_data(16, 30, 3, 3, "dense", False, scale=1e-7)
    assert gradients(big, data, "relu", "ce").step_norms[0] > 1e3 * small[-1]


def test_targets_shape_checked():
    data = make_data(5, 4, 3, 3, "dense", True)
    with pytest.raises(ValueError, match="targets shape"):
        gradients(make_params(3, 4, 3), LocalData(data.info, data.inputs, data.targets[:2],
                                                     0, data.n), "tanh", "ce")


# -- optimizers -------------------------------------------------------------------------------


def learnable_problem(seed: int = 0) -> LocalData:
    """Labels = arg-max of a fixed linear map of the summed inputs (learnable, small)."""
    data = make_data(64, 4, 5, 3, "dense", False, seed=seed)
    proj = np.random.default_rng(seed + 1).standard_normal((5, 3))
    data.targets[0] = np.argmax(data.inputs.sum(0) @ proj, axis=1)
    return data


def train_step(p: Params, data: LocalData, opt: bl.Optimizer, act: str, loss: str,
               clip_norm: float | None = None) -> Gradients:
    """Gradients, optional clipping by global norm, one optimizer step."""
    res = gradients(p, data, act, loss)
    if clip_norm is not None:
        bl.clip_by_norm(res.grads, clip_norm)
    opt.step(p, res.grads)
    return res


OPTIMIZERS = {
    "sgd": lambda: bl.SGD(0.5),
    "momentum": lambda: bl.Momentum(0.1, mu=0.9),
    "adam": lambda: bl.Adam(0.05),
    "rmsprop": lambda: bl.RMSProp(0.01),
    "adagrad": lambda: bl.Adagrad(0.2),
    "celgc": lambda: bl.CELGC(0.5, gamma=1.0, period=2),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_decreases_loss(name):
    data = learnable_problem()
    p = init_params(5, 8, 3, 1, "orthogonal", 0.5)
    opt = OPTIMIZERS[name]()
    first = mean_loss(p, data, "tanh", "ce")
    for _ in range(30):
        train_step(p, data, opt, "tanh", "ce")
    last = mean_loss(p, data, "tanh", "ce")
    assert last < 0.5 * first, f"{name}: {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_state_dict_round_trip(name):
    data = learnable_problem()
    p = init_params(5, 8, 3, 1, "orthogonal", 0.5)
    opt = OPTIMIZERS[name]()
    for _ in range(3):
        train_step(p, data, opt, "tanh", "ce")
    state = opt.state_dict()
    assert all(isinstance(v, np.ndarray | int | float) for v in state.values())
    q = p.copy()
    fresh = OPTIMIZERS[name]()
    fresh.load_state_dict(state)
    grads = gradients(p, data, "tanh", "ce").grads
    opt.step(p, grads)
    fresh.step(q, grads)
    for k in ELMAN:
        np.testing.assert_array_equal(getattr(p, k), getattr(q, k))


def test_adam_first_steps_closed_form():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    rng = np.random.default_rng(5)
    p0 = make_params(3, 4, 2)
    g1 = Params.elman(*(rng.uniform(0.1, 2.0, a.shape) * rng.choice([-1.0, 1.0], a.shape)
                  for a in bl._arrays(p0)))
    g2 = Params.elman(*(rng.standard_normal(a.shape) for a in bl._arrays(p0)))
    p = p0.copy()
    opt = bl.Adam(lr, b1, b2, eps)
    opt.step(p, g1)
    for k in ELMAN:
        g, x0, x1 = getattr(g1, k), getattr(p0, k), getattr(p, k)
        np.testing.assert_allclose(x1, x0 - lr * g / (np.abs(g) + eps), rtol=0, atol=1e-15)
        np.testing.assert_allclose(x1 - x0, -lr * np.sign(g), rtol=0, atol=lr * 1e-7)
    x1 = p.copy()
    opt.step(p, g2)
    for k in ELMAN:
        a, b = getattr(g1, k), getattr(g2, k)
        m = (1 - b1) * (b1 * a + b)
        v = (1 - b2) * (b2 * a * a + b * b)
        step = lr * (m / (1 - b1 ** 2)) / (np.sqrt(v / (1 - b2 ** 2)) + eps)
        np.testing.assert_allclose(getattr(p, k), getattr(x1, k) - step, rtol=0, atol=1e-15)


def test_schedules():
    cos = bl.make_schedule("cosine", 2.0, total=10)
    assert [cos(k) for k in (0, 5, 10, 20)] == pytest.approx([2.0, 1.0, 0.0, 0.0], abs=1e-15)
    assert cos(2) == pytest.approx(1.0 + math.cos(math.pi / 5))
    step = bl.make_schedule("step", 1.0, factor=0.5, every=3)
    assert [step(k) for k in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    assert bl.make_schedule("constant", 0.3)(1000) == 0.3
    with pytest.raises(ValueError, match="unknown schedule"):
        bl.make_schedule("linear", 1.0)
    # the optimizer reads lr(t) with t = steps taken so far
    p = Params.elman(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros(1), np.zeros((1, 1)), np.zeros(1))
    g = Params.elman(*(np.ones_like(a) for a in bl._arrays(p)))
    opt = bl.SGD(step)
    for _ in range(4):
        opt.step(p, g)
    assert p.b[0] == pytest.approx(-(1 + 1 + 1 + 0.5))


# -- clipping and CELGC -----------------------------------------------------------------------


def test_clip_by_norm():
    rng = np.random.default_rng(6)
    g = Params.elman(*(rng.standard_normal(s) for s in [(3, 2), (3, 3), (3,), (2, 3), (2,)]))
    norm = math.sqrt(sum(float((a * a).sum()) for a in bl._arrays(g)))
    assert bl.global_norm(g) == pytest.approx(norm, rel=1e-14)
    kept = g.copy()
    assert bl.clip_by_norm(kept, 2 * norm) == pytest.approx(norm)
    for k in ELMAN:
        np.testing.assert_array_equal(getattr(kept, k), getattr(g, k))
    clipped = g.copy()
    assert bl.clip_by_norm(clipped, 0.5) == pytest.approx(norm)
    assert bl.global_norm(clipped) == pytest.approx(0.5, rel=1e-14)
    for k in ELMAN:
        np.testing.assert_allclose(getattr(clipped, k), getattr(g, k) * 0.5 / norm, rtol=1e-14)
    assert bl.clipped_step_size(0.1, 1.0, 5.0) == 0.1
    assert bl.clipped_step_size(0.1, 1.0, 50.0) == pytest.approx(0.02)
    assert bl.clipped_step_size(0.1, 1.0, 0.0) == 0.1


def test_clipping_tames_exploding_gradients():
    """ReLU, W orthogonal times 3 (spectral radius 3), T = 30: gradients grow ~2^T
    back in time. Plain SGD blows up; clipping the gradient norm keeps it finite."""
    data = make_data(32, 30, 4, 3, "dense", False, scale=1e-7)
    runs = {}
    for clip in (None, 0.1):
        p = init_params(4, 16, 3, 1, "orthogonal", 3.0)
        assert np.max(np.abs(np.linalg.eigvals(p.W))) == pytest.approx(3.0)
        opt = bl.SGD(0.1)
        losses = []
        with np.errstate(all="ignore"):
            for _ in range(20):
                res = train_step(p, data, opt, "relu", "ce", clip_norm=clip)
                losses.append(res.loss)
                if not math.isfinite(res.loss):
                    break
        runs[clip] = np.array(losses)
    plain, clipped = runs[None], runs[0.1]
    assert plain[0] < 10.0  # a moderate start: the blow-up comes from the gradient step
    assert not np.isfinite(plain).all() or plain.max() > 1e6 * plain[0]
    assert len(plain) <= 5
    assert len(clipped) == 20 and np.isfinite(clipped).all()


def test_celgc_period_one_is_clipped_sgd():
    data = learnable_problem()
    eta, gamma = 0.5, 0.2
    p = init_params(5, 8, 3, 1, "orthogonal", 0.5)
    q = p.copy()
    opt = bl.CELGC(eta, gamma, period=1)
    clipped = []
    for _ in range(12):
        g = gradients(q, data, "tanh", "ce").grads
        norm = bl.global_norm(g)
        clipped.append(gamma / norm < eta)
        step = min(eta, gamma / norm)
        for x, gx in zip(bl._arrays(q), bl._arrays(g), strict=True):
            x -= step * gx
        train_step(p, data, opt, "tanh", "ce")
        for k in ELMAN:
            np.testing.assert_array_equal(getattr(p, k), getattr(q, k))
    assert any(clipped) and not all(clipped)  # both branches of min(eta, gamma/||g||) ran


def test_celgc_averages_every_period_in_place():
    calls = []

    def average(p: Params) -> Params:
        calls.append(opt.t)
        return Params.elman(*(np.full_like(a, 7.0) for a in bl._arrays(p)))

    p = make_params(2, 3, 2)
    arrays = bl._arrays(p)
    g = Params.elman(*(np.ones_like(a) for a in arrays))
    opt = bl.CELGC(0.1, 1e9, period=3, average=average)
    for _ in range(7):
        opt.step(p, g)
    assert calls == [3, 6]
    assert all(a is b for a, b in zip(arrays, bl._arrays(p), strict=True))
    np.testing.assert_allclose(p.W, 7.0 - 0.1)  # averaged at step 6, one local step since


# -- the epoch loop ---------------------------------------------------------------------------


def test_epoch_is_the_shuffled_minibatch_loop():
    """One GradientTrainer epoch equals the reference loop: batches of the permutation
    default_rng([seed, epoch]) of the sample indices (the last one smaller), a gradient,
    clipping by global norm, an Adam step each; and it reduces the training loss."""
    data = learnable_problem()
    cfg = build_config(overrides={"train.algo": "adam", "model.hidden": 8, "train.seed": 3,
                                  "optim.lr": 0.02, "optim.batch_size": 15,
                                  "optim.clip_norm": 5.0})
    p = init_params(5, 8, 3, 1, "orthogonal", 0.5)
    trainer = GradientTrainer(cfg, data, data.n, SerialComm(), p.copy())
    q, opt = p.copy(), bl.Adam(0.02)
    first = mean_loss(p, data, "tanh", "ce")
    for epoch in range(3):
        trainer.step()
        order = np.random.default_rng([3, epoch]).permutation(data.n)
        sizes = [len(order[lo:lo + 15]) for lo in range(0, data.n, 15)]
        assert sizes == [15, 15, 15, 15, 4]
        for lo in range(0, data.n, 15):
            train_step(q, data.take(order[lo:lo + 15]), opt, "tanh", "ce", clip_norm=5.0)
        for k in ELMAN:
            np.testing.assert_allclose(getattr(trainer.params, k), getattr(q, k), rtol=1e-12,
                                       atol=1e-14)
    assert trainer.iteration == 3 and opt.t == 15
    assert mean_loss(trainer.params, data, "tanh", "ce") < 0.8 * first


# -- token inputs: the gradient and the update on the batch's tokens' columns ------------------


def token_batch(n: int = 9, steps: int = 6, vocab: int = 40, used: int = 12,
                seed: int = 4) -> LocalData:
    """Token inputs from the first ``used`` ids of ``vocab``, with lengths 1..steps."""
    data = make_data(n, steps, vocab, 3, "tokens", False, seed=seed)
    lengths = np.random.default_rng(seed).integers(1, steps + 1, n).astype(np.int32)
    return LocalData(data.info, data.inputs % used, data.targets, 0, n, lengths)


def real_tokens(batch: LocalData) -> np.ndarray:
    steps = batch.inputs.shape[0]
    return np.unique(batch.inputs[np.arange(steps)[:, None] < batch.lengths[None, :]])


def test_token_gradient_on_columns_is_the_dense_gradient_there():
    """The first layer's U gradient on ``columns`` (the batch's real tokens and two ids
    it lacks) equals the dense gradient's columns; every other dense column is zero and
    the other weights' gradients are the dense ones."""
    from padmmirnn.nn.network import Network

    batch = token_batch()
    p = make_params(40, 5, 3)
    net = Network.of(p, "tanh")
    dense = net.gradients(p, batch, "ce")
    real = real_tokens(batch)
    cols = np.union1d(real, [20, 33])
    part = net.gradients(p, batch, "ce", columns=cols)
    np.testing.assert_allclose(part.grads.U, dense.grads.U[:, cols], rtol=1e-13, atol=1e-15)
    assert np.all(np.abs(dense.grads.U[:, real]).max(axis=0) > 0)
    assert not dense.grads.U[:, np.setdiff1d(np.arange(40), real)].any()
    for k in ("W", "b", "V", "c"):
        np.testing.assert_array_equal(getattr(part.grads, k), getattr(dense.grads, k))
    assert part.loss == dense.loss


COLUMN_STEPS = ([1, 4, 5], [0, 4, 11], [4, 5])


def column_gradients(p: Params, seed: int = 8) -> list[Params]:
    """Random gradients, their U on the columns of each of :data:`COLUMN_STEPS`."""
    rng = np.random.default_rng(seed)
    return [Params({k: rng.standard_normal((v.shape[0], len(cols)) if k == "U" else v.shape)
                    for k, v in p.arrays().items()}) for cols in COLUMN_STEPS]


@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_column_step_equals_the_dense_step_where_zero_changes_nothing(name):
    """SGD and Adagrad on the batch's columns equal their dense step on the gradient
    that is zero elsewhere, bitwise."""
    p = make_params(12, 4, 3)
    q = p.copy()
    dense, lazy = OPTIMIZERS[name](), OPTIMIZERS[name]()
    for g, cols in zip(column_gradients(p), COLUMN_STEPS, strict=True):
        full = np.zeros_like(p.U)
        full[:, cols] = g.U
        dense.step(p, g.replace(U=full))
        lazy.step(q, g, {"U": np.array(cols)})
    for k in ELMAN:
        np.testing.assert_array_equal(getattr(q, k), getattr(p, k))


def test_lazy_adam_moves_the_batch_columns_only():
    """Adam on columns: a column of U follows Adam's recursion over the steps that
    touched it, with t and the bias correction counted over every step (torch's
    SparseAdam); a column no step touched, and its moments, stay as they were; the
    other weights take the dense update."""
    lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-8
    p0 = make_params(12, 4, 3)
    p, q = p0.copy(), p0.copy()
    lazy, dense = bl.Adam(lr, b1, b2, eps), bl.Adam(lr, b1, b2, eps)
    grads = column_gradients(p0)
    for g, cols in zip(grads, COLUMN_STEPS, strict=True):
        lazy.step(p, g, {"U": np.array(cols)})
        dense.step(q, g.replace(U=np.zeros_like(p0.U)))
    for j in range(12):
        x, m, v = p0.U[:, j].copy(), 0.0, 0.0
        for t, (g, cols) in enumerate(zip(grads, COLUMN_STEPS, strict=True), 1):
            if j in cols:
                gj = g.U[:, cols.index(j)]
                m = b1 * m + (1 - b1) * gj
                v = b2 * v + (1 - b2) * gj * gj
                x = x - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        np.testing.assert_allclose(p.U[:, j], x, rtol=0, atol=1e-15)
    untouched = [j for j in range(12) if not any(j in c for c in COLUMN_STEPS)]
    assert untouched and not lazy.state["m"].U[:, untouched].any()
    for k in ("W", "b", "V", "c"):
        np.testing.assert_array_equal(getattr(p, k), getattr(q, k))


@pytest.mark.parametrize("mode", ["lazy", "dense"])
def test_token_epoch_is_the_reference_loop(mode):
    """An Adam epoch on token inputs with lengths equals the loop of dense BPTT
    gradients, clipping and an Adam step: on the batch's real tokens' columns
    (``optim.token_update = lazy``) or on every column (``dense``)."""
    from padmmirnn.nn.network import Network

    data = token_batch(n=40, steps=7, vocab=60, used=25, seed=6)
    cfg = build_config(overrides={"train.algo": "adam", "model.hidden": 5, "train.seed": 2,
                                  "optim.lr": 0.02, "optim.batch_size": 8,
                                  "optim.clip_norm": 0.5, "optim.token_update": mode})
    p = init_params(60, 5, 3, 1, "orthogonal", 0.5)
    trainer = GradientTrainer(cfg, data, data.n, SerialComm(), p.copy())
    q, opt, net = p.copy(), bl.Adam(0.02), Network.of(p, "tanh")
    for epoch in range(2):
        trainer.step()
        order = np.random.default_rng([2, epoch]).permutation(data.n)
        for lo in range(0, data.n, 8):
            batch = data.take(order[lo:lo + 8])
            grads = net.gradients(q, batch, "ce").grads
            bl.clip_by_norm(grads, 0.5)
            if mode == "dense":
                opt.step(q, grads)
            else:
                cols = real_tokens(batch)
                opt.step(q, grads.replace(U=grads.U[:, cols]), {"U": cols})
        for k in ELMAN:
            np.testing.assert_allclose(getattr(trainer.params, k), getattr(q, k), rtol=1e-12,
                                       atol=1e-14)

"""The cells (padmmirnn/nn/cells/) and stacked layers: forward passes against per-sample
NumPy loops of PyTorch's documented cell equations (torch is not a dependency), BPTT
gradients against central differences, and the mini-batch ADMM statistics against the
gradients they must equal."""

import numpy as np
import pytest

from padmmirnn.nn import Network, Params, gradients, loss_sums, outputs
from padmmirnn.samples import DatasetInfo, LocalData

CELLS = ("rnn", "gru", "lstm")


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def make_data(n, steps, dim, classes, kind, many, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "dense":
        x = rng.standard_normal((steps, n, dim))
    else:
        x = rng.integers(0, dim, (steps, n)).astype(np.int32)
    y = rng.integers(0, classes, (steps if many else 1, n)).astype(np.int32)
    info = DatasetInfo("mem", n, steps, dim, classes, kind, many)
    return LocalData(info, x, y, 0, n)


def make_params(cell, layers, d, h, k, seed=1) -> Params:
    """Random weights with nonzero biases (every term of the cell exercised)."""
    p = Network.build(cell, "tanh", layers).init_params(d, h, k, seed, "gaussian", 1.0)
    rng = np.random.default_rng(seed + 7)
    return p.map(lambda a: a + 0.3 * rng.standard_normal(a.shape))


def reference_outputs(p: Params, cell: str, data: LocalData) -> np.ndarray:
    """o_t per sample from PyTorch's equations (nn.RNN, nn.GRU, nn.LSTM documentation),
    one sample and one step at a time: [n, |O|, K]."""
    steps, n = data.inputs.shape[:2]
    h = p.hidden
    out = []
    for i in range(n):
        xs = [np.eye(p.U.shape[1])[data.inputs[t, i]] if data.info.kind == "tokens"
              else data.inputs[t, i] for t in range(steps)]
        for l in range(p.layers):
            w = p.layer(l)
            s, c, ys = np.zeros(h), np.zeros(h), []
            for x in xs:
                gi = w.U @ x + w.b
                gh = w.W @ s
                if cell == "rnn":
                    s = np.tanh(gi + gh)
                elif cell == "lstm":  # i, f, g, o
                    i_, f, g, o = np.split(gi + gh, 4)
                    c = _sigmoid(f) * c + _sigmoid(i_) * np.tanh(g)
                    s = _sigmoid(o) * np.tanh(c)
                else:  # r, z, n, linear_before_reset: n = tanh(W_in x + b_in + r (W_hn h + b_hn))
                    r = _sigmoid(gi[:h] + gh[:h])
                    z = _sigmoid(gi[h:2 * h] + gh[h:2 * h])
                    n_ = np.tanh(gi[2 * h:] + r * (gh[2 * h:] + w.bh))
                    s = (1 - z) * n_ + z * s
                ys.append(s)
            xs = ys
        rows = xs if data.info.many_to_many else xs[-1:]
        out.append([p.V @ s + p.c for s in rows])
    return np.array(out)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers", (1, 2))
@pytest.mark.parametrize("kind,many", (("dense", False), ("tokens", True)))
def test_forward_equals_the_cell_equations(cell, layers, kind, many):
    data = make_data(5, 4, 3, 4, kind, many, seed=3)
    p = make_params(cell, layers, 3, 6, 4)
    net = Network.of(p, "tanh")
    assert net.cell.name == cell and net.layers == layers
    o = outputs(p, net.forward(p, data).states, many)  # rows [|O|, n, K]
    np.testing.assert_allclose(o.transpose(1, 0, 2), reference_outputs(p, cell, data),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers", (1, 2))
@pytest.mark.parametrize("kind,many", (("dense", False), ("tokens", True)))
def test_gradients_match_central_differences(cell, layers, kind, many):
    d, h, k, eps = 3, 4, 3, 1e-6
    data = make_data(5, 4, d, k, kind, many, seed=2)
    p = make_params(cell, layers, d, h, k)
    res = gradients(p, data, "tanh", "ce")
    assert res.grads.names() == p.names()
    for name in p.names():
        w = getattr(p, name)
        fd = np.zeros_like(w)
        for i in np.ndindex(w.shape):
            old = w[i]
            w[i] = old + eps
            up = gradients(p, data, "tanh", "ce").loss
            w[i] = old - eps
            down = gradients(p, data, "tanh", "ce").loss
            w[i] = old
            fd[i] = (up - down) / (2 * eps)
        g = getattr(res.grads, name)
        err = np.linalg.norm(g - fd) / max(np.linalg.norm(fd), 1e-12)
        assert err < 1e-6, f"{cell} x{layers} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("cell", CELLS)
def test_loss_sums_equal_the_gradients_loss(cell):
    data = make_data(9, 5, 3, 4, "dense", True, seed=4)
    p = make_params(cell, 2, 3, 5, 4)
    total, _, rows = loss_sums(p, data, "tanh", "ce")
    res = gradients(p, data, "tanh", "ce")
    assert res.rows == rows
    assert res.loss == pytest.approx(total / rows, rel=1e-13)


@pytest.mark.parametrize("cell", CELLS)
def test_a_forward_pass_continues_from_its_final_state(cell):
    """Reading a sequence in two pieces (``start`` = the first piece's final states)
    gives the states of one pass over the whole (generation reads one token at a time)."""
    data = make_data(3, 6, 5, 5, "tokens", True, seed=5)
    p = make_params(cell, 2, 5, 4, 5)
    net = Network.of(p, "tanh")
    whole = net.forward(p, data).states
    first = LocalData(data.info, data.inputs[:4], data.targets[:4], 0, 3)
    rest = LocalData(data.info, data.inputs[4:], data.targets[4:], 0, 3)
    state = net.forward(p, first).final()
    np.testing.assert_allclose(net.forward(p, rest, start=state).states[1:], whole[5:],
                               rtol=1e-13)


def test_the_cell_is_read_off_the_weights():
    for cell in CELLS:
        p = make_params(cell, 1, 3, 4, 2)
        assert Network.of(p, "tanh").cell.name == cell
    with pytest.raises(ValueError, match="model.activation"):
        Network.build("lstm", "relu")

"""Export of every cell and layer count (padmmirnn/export.py): ONNX Runtime gives the
model's probabilities, the PyTorch-layout tensors run PyTorch's documented equations
(in NumPy: torch is not a dependency) to the model's logits; and a trained gated,
stacked model loads, describes itself, predicts and generates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import padmmirnn
from padmmirnn.cli import main
from padmmirnn.export import export, onnx_gates, torch_metadata, torch_tensors
from padmmirnn.nn import Network

CELLS = ("rnn", "gru", "lstm")
D, H, K, T = 5, 6, 4, 7
CORPUS = ("To be, or not to be: that is the question. Whether 'tis nobler in the mind "
          "to suffer the slings and arrows of outrageous fortune.\n") * 6


def make_model(cell: str, layers: int, kind: str, many: bool, activation: str = "tanh",
               seed: int = 0) -> padmmirnn.Model:
    """A model with random weights, every bias nonzero (every term of the cell and of
    the bias layouts exercised)."""
    p = Network.build(cell, activation, layers).init_params(D, H, K, seed, "gaussian", 1.0)
    rng = np.random.default_rng(seed + 1)
    p = p.map(lambda a: a + 0.3 * rng.standard_normal(a.shape))
    return padmmirnn.Model(p, activation, "ce", kind, D, K, many)


def make_inputs(kind: str, n: int = 9, steps: int = T, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "tokens":
        return rng.integers(0, D, (n, steps))
    return rng.standard_normal((n, steps, D))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def torch_reference(t: dict[str, np.ndarray], meta: dict[str, str], x: np.ndarray) -> np.ndarray:
    """The logits of ``nn.{RNN,GRU,LSTM}(num_layers=L, batch_first=True)`` and the
    ``nn.Linear`` head from their tensors, by the equations of PyTorch's documentation
    (one step at a time, every sample at once); ``x`` ``[N, T, d]``."""
    cell, layers = meta["cell"], int(meta["num_layers"])
    f = np.tanh if meta["nonlinearity"] == "tanh" else (lambda a: np.maximum(a, 0))
    seq = [x[:, k] for k in range(x.shape[1])]
    for k in range(layers):
        Wi, Wh = t[f"rnn.weight_ih_l{k}"], t[f"rnn.weight_hh_l{k}"]
        bi, bh = t[f"rnn.bias_ih_l{k}"], t[f"rnn.bias_hh_l{k}"]
        hid = Wh.shape[1]
        h = np.zeros((x.shape[0], hid))
        c = np.zeros_like(h)
        out = []
        for xt in seq:
            gi, gh = xt @ Wi.T + bi, h @ Wh.T + bh
            if cell == "rnn":
                h = f(gi + gh)
            elif cell == "lstm":  # i, f, g, o
                i, fg, g, o = np.split(gi + gh, 4, axis=1)
                c = _sigmoid(fg) * c + _sigmoid(i) * np.tanh(g)
                h = _sigmoid(o) * np.tanh(c)
            else:  # r, z, n
                r = _sigmoid(gi[:, :hid] + gh[:, :hid])
                z = _sigmoid(gi[:, hid:2 * hid] + gh[:, hid:2 * hid])
                n = np.tanh(gi[:, 2 * hid:] + r * gh[:, 2 * hid:])
                h = (1 - z) * n + z * h
            out.append(h)
        seq = out
    logits = [s @ t["head.weight"].T + t["head.bias"] for s in seq]
    return np.stack(logits, axis=1) if meta["many_to_many"] == "true" else logits[-1]


LAYOUTS = [("dense", False), ("tokens", True), ("dense", True), ("tokens", False)]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers", (1, 2))
@pytest.mark.parametrize("kind,many", LAYOUTS[:2])
def test_onnx_runtime_gives_the_models_probabilities(cell, layers, kind, many, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = make_model(cell, layers, kind, many)
    export(model, "onnx", tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ops.count({"rnn": "RNN", "gru": "GRU", "lstm": "LSTM"}[cell]) == layers
    for n, steps in ((9, T), (3, 2)):  # the batch size and the length are dynamic
        x = make_inputs(kind, n, steps)
        feed = x.astype(np.int64) if kind == "tokens" else x.astype(np.float32)
        got = session.run(None, {"inputs": feed})[0]
        want = model.predict_proba(x)
        assert got.shape == want.shape == ((n, steps, K) if many else (n, K))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kind,many", LAYOUTS[2:])
def test_onnx_other_layouts(cell, kind, many, tmp_path):
    """Many-to-many dense and many-to-one token models, two layers."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = make_model(cell, 2, kind, many, seed=5)
    export(model, "onnx", tmp_path / "m.onnx")
    x = make_inputs(kind)
    feed = x.astype(np.int64) if kind == "tokens" else x.astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"inputs": feed})[0]
    np.testing.assert_allclose(got, model.predict_proba(x), atol=1e-5, rtol=0)


def test_onnx_relu_elman(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = make_model("rnn", 2, "dense", False, activation="relu")
    export(model, "onnx", tmp_path / "m.onnx")
    x = make_inputs("dense")
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(
        None, {"inputs": x.astype(np.float32)})[0]
    np.testing.assert_allclose(got, model.predict_proba(x), atol=1e-5, rtol=0)


def test_onnx_gate_order_permutes_blocks():
    """ONNX's LSTM blocks are PyTorch's i, o, f, g; its GRU's are z, r, n."""
    a = np.repeat(np.arange(4.0), 2)[:, None]
    np.testing.assert_array_equal(onnx_gates(a, "lstm", 2)[:, 0], [0, 0, 3, 3, 1, 1, 2, 2])
    np.testing.assert_array_equal(onnx_gates(a[:6], "gru", 2)[:, 0], [1, 1, 0, 0, 2, 2])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers", (1, 2))
@pytest.mark.parametrize("kind,many", LAYOUTS[:2])
def test_torch_layout_runs_pytorchs_equations(cell, layers, kind, many, tmp_path):
    """The safetensors tensors, read back, through PyTorch's equations give the logits
    of the model (its weights rounded to float32 as the file holds them)."""
    pytest.importorskip("safetensors")
    from safetensors import safe_open
    from safetensors.numpy import load_file

    model = make_model(cell, layers, kind, many)
    export(model, "torch", tmp_path / "m.safetensors")
    t = {k: v.astype(np.float64) for k, v in load_file(str(tmp_path / "m.safetensors")).items()}
    with safe_open(str(tmp_path / "m.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta == torch_metadata(model)
    assert meta["cell"] == cell and meta["num_layers"] == str(layers)
    assert sorted(t) == sorted(torch_tensors(model))
    assert t["rnn.weight_ih_l0"].shape == (model.net.cell.gates * H, D)
    x = make_inputs(kind)
    dense = np.eye(D)[x] if kind == "tokens" else x  # one-hot rows, as nn.RNN takes them
    f32 = padmmirnn.Model(model.params.astype(np.float32).astype(np.float64), "tanh", "ce",
                          kind, D, K, many)
    np.testing.assert_allclose(torch_reference(t, meta, dense), f32.logits(x), atol=1e-10,
                               rtol=1e-10)


def test_torch_gru_bias_layout():
    """PyTorch's GRU: bias_ih = b (r, z sums and b_in), bias_hh = [0, 0, b_hn]."""
    model = make_model("gru", 2, "dense", False)
    t = torch_tensors(model)
    for k in range(2):
        w = model.params.layer(k)
        np.testing.assert_array_equal(t[f"rnn.bias_ih_l{k}"], w.b.astype(np.float32))
        np.testing.assert_array_equal(t[f"rnn.bias_hh_l{k}"][:2 * H], 0)
        np.testing.assert_array_equal(t[f"rnn.bias_hh_l{k}"][2 * H:], w.bh.astype(np.float32))


# ------------------------------------------------- trained gated, stacked language models


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """Character language models with two layers of GRU and LSTM, briefly trained."""
    root = tmp_path_factory.mktemp("gated")
    (root / "play.txt").write_text(CORPUS)
    assert main(["data", "prepare", "text", "--source", str(root / "play.txt"),
                 "--out", str(root / "lm_train.h5"), "--steps", "12"]) == 0
    out = {}
    for cell in ("gru", "lstm"):
        assert main(["train", "--dataset", str(root / "lm_train.h5"), "--iterations", "2",
                     "--set", f"model.cell={cell}", "--set", "model.layers=2",
                     "--set", "model.hidden=10", "--out", str(root / cell)]) == 0
        out[cell] = root / cell / "weights.h5"
    return out


@pytest.mark.parametrize("cell", ("gru", "lstm"))
def test_a_gated_model_loads_predicts_and_generates(gated, cell, tmp_path):
    model = padmmirnn.load(gated[cell])
    assert repr(model).startswith(f"Model({cell.upper()}, 2 layers, h = 10, tokens")
    assert model.net.cell.name == cell and model.net.layers == 2
    proba = model.predict_proba("to be")
    assert proba.shape == (1, 5, model.classes)
    np.testing.assert_allclose(proba.sum(axis=-1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(model.predict("to be"), proba.argmax(axis=-1))
    a = model.generate("To be", 60, temperature=0.8, seed=3)
    assert a == model.generate("To be", 60, temperature=0.8, seed=3)
    assert a != model.generate("To be", 60, temperature=0.8, seed=4)
    assert a.startswith("To be") and len(a) == len("To be") + 60 and set(a) <= set(CORPUS)
    assert model.generate("To be", 20, temperature=0) == model.generate(
        "To be", 20, temperature=0, seed=9)
    assert main(["export", "--weights", str(gated[cell]), "--format", "onnx",
                 "--out", str(tmp_path / "m.onnx")]) == 0
    assert main(["export", "--weights", str(gated[cell]), "--format", "onnx", "--lengths",
                 "--out", str(tmp_path / "l.onnx")]) == 0
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(tmp_path / "l.onnx")).graph
    assert [i.name for i in graph.input] == ["inputs", "lengths"]
    with pytest.raises(ValueError, match="--lengths is for --format onnx"):
        export(model, "torch", tmp_path / "t.safetensors", lengths=True)


@pytest.mark.parametrize("cell", ("gru", "lstm"))
def test_reading_a_prompt_token_by_token_equals_one_pass(gated, cell):
    """Generation reads one token at a time from every layer's state (and an LSTM's cell
    state): the states equal those of one pass over the whole prompt, and the next
    token's probabilities equal predict_proba's at the prompt's last step."""
    model = padmmirnn.load(gated[cell])
    ids = model.encode("To be, or not")[0]
    whole = model._advance(ids, None)
    state = None
    for i in ids:
        state = model._advance(np.array([i]), state)
    assert len(whole) == len(state) == 2
    for (s1, c1), (s2, c2) in zip(whole, state, strict=True):
        np.testing.assert_allclose(s2, s1, rtol=1e-13, atol=1e-15)
        assert (c1 is None) == (c2 is None) == (cell != "lstm")
        if c1 is not None:
            np.testing.assert_allclose(c2, c1, rtol=1e-13, atol=1e-15)
    p = model.params
    o = p.V @ state[-1][0][:, 0] + p.c
    e = np.exp(o - o.max())
    np.testing.assert_allclose(e / e.sum(), model.predict_proba(ids[None])[0, -1], rtol=1e-12)


def test_export_refuses_an_unknown_format(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown export format"):
        export(make_model("lstm", 1, "dense", False), "tflite", tmp_path / "m")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers", (1, 2))
@pytest.mark.parametrize("kind,many", LAYOUTS)
def test_onnx_sequence_lens_gives_the_masked_forward(cell, layers, kind, many, tmp_path):
    """Exported with lengths, ONNX Runtime on padded data (random padding) gives the
    probabilities of padmmirnn's forward pass with lengths: the many-to-one output at
    each sequence's last real step, the many-to-many rows at its real steps."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from padmmirnn.nn.network import by_length
    from padmmirnn.samples import DatasetInfo, LocalData

    model = make_model(cell, layers, kind, many, seed=3)
    export(model, "onnx", tmp_path / "m.onnx", lengths=True)
    n = 9
    x = make_inputs(kind, n)
    lengths = np.random.default_rng(4).integers(1, T + 1, n).astype(np.int32)
    feed = x.astype(np.int64) if kind == "tokens" else x.astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(
        None, {"inputs": feed, "lengths": lengths})[0]
    info = DatasetInfo("memory", n, T, D, K, kind, many)
    inputs = x.T.astype(np.int32) if kind == "tokens" else x.transpose(1, 0, 2)
    targets = np.zeros((T if many else 1, n), np.int32)
    data = by_length(LocalData(info, np.ascontiguousarray(inputs), targets, 0, n, lengths))
    o = model.net.forward(model.params, data).outputs(model.params, many)  # [|O|, n, K]
    e = np.exp(o - o.max(axis=-1, keepdims=True))
    want = np.zeros((n, T, K) if many else (n, K))
    for j, i in enumerate(np.argsort(-lengths, kind="stable")):
        if many:
            want[i, :lengths[i]] = (e / e.sum(axis=-1, keepdims=True))[:lengths[i], j]
        else:
            want[i] = (e / e.sum(axis=-1, keepdims=True))[0, j]
    if many:  # rows past a sequence's length are not outputs
        got = got * (np.arange(T)[None, :, None] < lengths[:, None, None])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # and the padding changes nothing: a different filling, the same outputs
    x2 = make_inputs(kind, n, seed=8)
    pad = np.arange(T)[None, :] >= lengths[:, None]
    x2[~pad] = x[~pad]
    feed2 = x2.astype(np.int64) if kind == "tokens" else x2.astype(np.float32)
    got2 = ort.InferenceSession(str(tmp_path / "m.onnx")).run(
        None, {"inputs": feed2, "lengths": lengths})[0]
    if many:
        got2 = got2 * (np.arange(T)[None, :, None] < lengths[:, None, None])
    np.testing.assert_allclose(got2, got, atol=1e-6, rtol=0)

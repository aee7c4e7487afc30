"""The model API: train from Python, load, predict, generate, export (ONNX, PyTorch
layout), and one clear error for every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_random_split

import padmmirnn
from padmmirnn import datafiles
from padmmirnn.cli import main

CORPUS = ("To be, or not to be: that is the question. Whether 'tis nobler in the mind "
          "to suffer the slings and arrows of outrageous fortune.\n") * 6


def _train(out: Path, *args: str) -> Path:
    assert main(["train", "--out", str(out), *args]) == 0
    return out / "weights.h5"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three briefly trained models: the default dataset (dense, many-to-one), a
    token classifier and a character-level language model (many-to-many)."""
    root = tmp_path_factory.mktemp("models")
    write_random_split(root / "tok_train.h5", "tokens", n=60, steps=7, dim=11, classes=3)
    (root / "play.txt").write_text(CORPUS)
    assert main(["data", "prepare", "text", "--source", str(root / "play.txt"),
                 "--out", str(root / "lm_train.h5"), "--steps", "12"]) == 0
    return {
        "dense": _train(root / "dense", "--iterations", "2"),
        "tokens": _train(root / "tok", "--dataset", str(root / "tok_train.h5"),
                         "--iterations", "3", "--set", "model.hidden=9"),
        "lm": _train(root / "lm", "--dataset", str(root / "lm_train.h5"), "--iterations", "4",
                     "--set", "model.hidden=16", "--checkpoint-every", "4"),
        "lm_data": root / "lm_train.h5", "tok_data": root / "tok_train.h5",
    }


def _inputs(path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path) as f:
        return np.asarray(f["inputs"]), np.asarray(f["targets"])


def test_the_loaded_model_reproduces_the_runs_evaluation(models):
    model = padmmirnn.load(models["dense"])
    summary = json.loads((models["dense"].parent / "summary.json").read_text())
    x, y = _inputs(datafiles.resolve("default")[1])
    result = model.evaluate(x, y)
    assert result["accuracy"] == summary["test_accuracy"]
    assert result["loss"] == pytest.approx(summary["test_loss"], rel=1e-12)
    proba = model.predict_proba(x[:50])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(model.predict(x[:50]), proba.argmax(axis=1))


@pytest.mark.parametrize("name", ["dense", "tokens", "lm"])
def test_onnx_runtime_gives_the_models_probabilities(models, name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = padmmirnn.load(models[name])
    data = {"dense": datafiles.resolve("default")[1], "tokens": models["tok_data"],
            "lm": models["lm_data"]}[name]
    x, _ = _inputs(data)
    assert main(["export", "--weights", str(models[name]), "--format", "onnx",
                 "--out", str(tmp_path / "m.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    feed = x.astype(np.int64) if model.input_kind == "tokens" else x.astype(np.float32)
    got = session.run(None, {"inputs": feed})[0]
    want = model.predict_proba(x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the batch size is dynamic
    np.testing.assert_allclose(session.run(None, {"inputs": feed[:3]})[0], want[:3], atol=1e-5)


@pytest.mark.parametrize("name", ["dense", "tokens", "lm"])
def test_torch_layout_runs_pytorchs_documented_equations(models, name, tmp_path):
    """h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh), logits = h W^T + b of the
    head, in NumPy on the exported tensors (read back from the safetensors file)."""
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file

    model = padmmirnn.load(models[name])
    assert main(["export", "--weights", str(models[name]), "--format", "torch",
                 "--out", str(tmp_path / "m.safetensors")]) == 0
    t = {k: v.astype(np.float64) for k, v in load_file(str(tmp_path / "m.safetensors")).items()}
    data = {"dense": datafiles.resolve("default")[1], "tokens": models["tok_data"],
            "lm": models["lm_data"]}[name]
    x, _ = _inputs(data)
    x = x[:64]
    if model.input_kind == "tokens":  # one-hot rows, as nn.RNN takes them
        x = np.eye(model.input_dim)[x]
    h = np.zeros((x.shape[0], t["rnn.weight_hh_l0"].shape[0]))
    steps = []
    for k in range(x.shape[1]):
        h = np.tanh(x[:, k] @ t["rnn.weight_ih_l0"].T + t["rnn.bias_ih_l0"]
                    + h @ t["rnn.weight_hh_l0"].T + t["rnn.bias_hh_l0"])
        steps.append(h @ t["head.weight"].T + t["head.bias"])
    logits = np.stack(steps, axis=1) if model.many_to_many else steps[-1]
    f32 = padmmirnn.Model(model.params.astype(np.float32).astype(np.float64),
                          model.activation, model.loss, model.input_kind, model.input_dim,
                          model.classes, model.many_to_many)
    src = _inputs(data)[0][:64]
    np.testing.assert_allclose(logits, f32.logits(src), atol=1e-6, rtol=0)


def test_a_checkpoint_loads_as_the_same_model(models):
    """A checkpoint has no model attributes of its own: its training data supply the
    input kind, the layout and the vocabulary."""
    from padmmirnn.checkpoint import find_latest

    ckpt = padmmirnn.load(find_latest(models["lm"].parent / "checkpoints"))
    final = padmmirnn.load(models["lm"])
    assert ckpt.many_to_many and ckpt.input_kind == "tokens"
    assert ckpt.vocabulary == final.vocabulary
    np.testing.assert_array_equal(ckpt.predict_proba("to be"), final.predict_proba("to be"))


def test_generate_is_seeded_and_uses_the_vocabulary(models):
    model = padmmirnn.load(models["lm"])
    a = model.generate("To be", 80, temperature=0.8, seed=3)
    assert a == model.generate("To be", 80, temperature=0.8, seed=3)
    assert a != model.generate("To be", 80, temperature=0.8, seed=4)
    assert a.startswith("To be") and len(a) == len("To be") + 80
    assert set(a) <= set(CORPUS)
    greedy = model.generate("To be", 30, temperature=0)
    assert greedy == model.generate("To be", 30, temperature=0, seed=99)


def test_generate_from_the_command_line(models, capsys):
    args = ["generate", "--weights", str(models["lm"]), "--prompt", "the ", "--length", "40",
            "--seed", "1"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("the ")


def test_predict_writes_one_row_per_sample(models, tmp_path):
    x, _ = _inputs(datafiles.resolve("default")[1])
    path = tmp_path / "some.h5"
    with h5py.File(path, "w") as f:
        f["inputs"] = x[:25]
    assert main(["predict", "--weights", str(models["dense"]), "--input", str(path),
                 "--out", str(tmp_path / "p.csv")]) == 0
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 26 and rows[0].startswith("sample,predicted,p_")
    model = padmmirnn.load(models["dense"])
    predicted = [int(r.split(",")[1]) for r in rows[1:]]
    assert predicted == model.predict(x[:25]).tolist()


def test_strings_are_encoded_with_the_saved_vocabulary(models):
    model = padmmirnn.load(models["lm"])
    ids = model.encode("to be", steps=5)
    assert [model.vocabulary[i] for i in ids[0]] == list("to be")
    np.testing.assert_array_equal(model.predict_proba("to be"), model.predict_proba(ids))


def test_bad_inputs_raise_one_sentence(models):
    dense, lm = padmmirnn.load(models["dense"]), padmmirnn.load(models["lm"])
    with pytest.raises(ValueError, match=r"inputs must be \[N, T, 28\]"):
        dense.predict(np.zeros((2, 28, 5)))
    with pytest.raises(ValueError, match="NaN"):
        dense.predict(np.full((1, 28, 28), np.nan))
    with pytest.raises(ValueError, match="no vocabulary"):
        dense.predict("some text")
    with pytest.raises(ValueError, match="token ids must lie in"):
        lm.predict(np.full((1, 4), 10_000))
    with pytest.raises(ValueError, match="language model"):
        dense.generate("x", 3)
    no_unk = padmmirnn.Model(lm.params, lm.activation, lm.loss, lm.input_kind, lm.input_dim,
                             lm.classes, True, [t if t != "<unk>" else "~" for t in
                                                lm.vocabulary], None, lm.prepared)
    with pytest.raises(ValueError, match="not in the vocabulary, which has no <unk>"):
        no_unk.encode("zebra\u00e9")
    with pytest.raises(ValueError, match="not found"):
        padmmirnn.load(models["dense"].parent / "missing.h5")


@pytest.mark.parametrize("args,message", [
    (["export", "--weights", "missing.h5", "--format", "onnx", "--out", "m.onnx"],
     "weights file not found"),
    (["predict", "--weights", "WEIGHTS", "--input", "lines.txt", "--out", "p.csv"],
     "no vocabulary"),
    (["generate", "--weights", "WEIGHTS", "--prompt", "x"], "language model"),
    (["predict", "--weights", "WEIGHTS", "--input", "wide.h5", "--out", "p.csv"],
     "inputs must be [N, T, 28]")])
def test_bad_command_line_input_is_one_line_and_exit_2(models, tmp_path, args, message):
    (tmp_path / "lines.txt").write_text("a line\n")
    with h5py.File(tmp_path / "wide.h5", "w") as f:
        f["inputs"] = np.zeros((2, 28, 5), np.float32)
    args = [a.replace("WEIGHTS", str(models["dense"])) for a in args]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        proc = subprocess.run([sys.executable, "-P", "-m", "padmmirnn", *args],
                              capture_output=True, text=True, timeout=120)
    finally:
        os.chdir(cwd)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.onnx").exists()


def test_api_training_equals_the_cli_run_bit_for_bit(tmp_path):
    args = {"train.iterations": 2, "model.hidden": 12}
    run = padmmirnn.train(dataset="default", **args, output__dir=str(tmp_path / "api"))
    assert main(["train", "--iterations", "2", "--set", "model.hidden=12",
                 "--out", str(tmp_path / "cli")]) == 0
    _same_weights(tmp_path / "api", tmp_path / "cli")
    cli_rows = [json.loads(r) for r in (tmp_path / "cli" / "metrics.jsonl").read_text()
                .splitlines()]
    keys = ("train_loss", "test_loss", "test_accuracy")
    assert [[r[k] for k in keys] for r in run.metrics] == [[r[k] for k in keys]
                                                          for r in cli_rows]
    assert run.summary["test_accuracy"] == run.model.evaluate(
        *_inputs(datafiles.resolve("default")[1]))["accuracy"]


def _same_weights(a: Path, b: Path) -> None:
    with h5py.File(a / "weights.h5") as fa, h5py.File(b / "weights.h5") as fb:
        for name in ("U", "W", "b", "V", "c"):
            assert fa[name][()].tobytes() == fb[name][()].tobytes(), name


MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which(
    "mpiexec")
PROGRAM = """
import sys
from mpi4py import MPI
import padmmirnn
padmmirnn.train(dataset="default", comm=MPI.COMM_WORLD, output__dir=sys.argv[1],
                **{"train.iterations": 2, "model.hidden": 12})
"""


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found")
def test_api_training_in_an_mpi4py_program_equals_the_cli_run(tmp_path):
    (tmp_path / "prog.py").write_text(PROGRAM)
    for cmd in ([sys.executable, "-P", str(tmp_path / "prog.py"), str(tmp_path / "api")],
                [sys.executable, "-P", "-m", "padmmirnn", "train", "--iterations", "2",
                 "--set", "model.hidden=12", "--out", str(tmp_path / "cli")]):
        proc = subprocess.run([MPIEXEC, "-n", "2", *cmd], capture_output=True, text=True,
                              timeout=180)
        assert proc.returncode == 0, proc.stderr
    for name in ("api", "cli"):
        assert json.loads((tmp_path / name / "summary.json").read_text())["ranks"] == 2
    _same_weights(tmp_path / "api", tmp_path / "cli")


def test_predict_on_a_csv_of_raw_texts_names_the_classes(tmp_path):
    """A word-level classifier prepared from CSV: raw texts are tokenised, cut and padded
    as the training texts were, and the rows name the predicted class."""
    texts = ["good fun film", "bad dull film", "fun good plot", "dull bad plot"] * 10
    labels = ["fresh", "rotten", "fresh", "rotten"] * 10
    (tmp_path / "r.csv").write_text("text,label\n" + "".join(
        f"{t},{lab}\n" for t, lab in zip(texts, labels, strict=True)))
    assert main(["data", "prepare", "csv", "--source", str(tmp_path / "r.csv"),
                 "--out", str(tmp_path / "r_train.h5"), "--steps", "5",
                 "--test-fraction", "0"]) == 0
    weights = _train(tmp_path / "run", "--dataset", str(tmp_path / "r_train.h5"),
                     "--iterations", "3", "--set", "model.hidden=8")
    model = padmmirnn.load(weights)
    assert model.class_names and model.prepared["level"] == "word"
    x, _ = _inputs(tmp_path / "r_train.h5")
    prepared_rows = {tuple(row) for row in x}  # encoded as at prepare time (rows shuffled)
    assert all(tuple(row) in prepared_rows for row in model.encode(texts[:4]))
    (tmp_path / "new.csv").write_text("text\ngood fun film\nbad dull plot\n")
    assert main(["predict", "--weights", str(weights), "--input", str(tmp_path / "new.csv"),
                 "--out", str(tmp_path / "p.csv")]) == 0
    rows = (tmp_path / "p.csv").read_text().splitlines()[1:]
    names = [r.split(",")[1] for r in rows]
    assert names == [model.class_names[k] for k in model.predict(["good fun film",
                                                                  "bad dull plot"])]

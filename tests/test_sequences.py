"""Issue 25 without the cells: a validation split (file or share of the training file),
early stopping that restores the best weights, its checkpoint/resume contract, and
bucketed mini-batches for the gradient baselines."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_random_split

import padmmirnn
from padmmirnn.cli import main
from padmmirnn.comm import SerialComm
from padmmirnn.config import load_config
from padmmirnn.datafiles import write_dataset
from padmmirnn.gradient.trainer import GradientTrainer
from padmmirnn.samples import bucketed_batches, validation_rows
from padmmirnn.splits import load_data


def _lengths_split(path, n=90, steps=8, dim=7, classes=3, seed=0):
    """A token split with lengths in [1, T], real tokens first (zeros after)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, steps + 1, n)
    x = rng.integers(2, dim, (n, steps)).astype(np.int32)
    x[np.arange(steps)[None, :] >= lengths[:, None]] = 0
    y = rng.integers(0, classes, n).astype(np.int32)
    write_dataset(path, x, y, classes=classes, vocab=dim, lengths=lengths)
    return x, y, lengths


def _rows(path):
    with h5py.File(path) as f:
        return np.asarray(f["inputs"]), np.asarray(f["targets"])


# ---------------------------------------------------------------- the split


def test_validation_rows_are_a_seeded_partition_of_the_file():
    train, val = validation_rows(50, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(50))
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()
    again = validation_rows(50, 0.2, seed=3)[1]
    np.testing.assert_array_equal(val, again)
    assert not np.array_equal(val, validation_rows(50, 0.2, seed=4)[1])


@pytest.mark.parametrize("chunk", [None, 7])
def test_validation_fraction_splits_the_training_file(tmp_path, chunk):
    x, y, lengths = _lengths_split(tmp_path / "s_train.h5")
    train, test, val = load_data(str(tmp_path / "s_train.h5"), "", SerialComm(), np.float64,
                                 chunk, validation_fraction=0.25, seed=5)
    keep, held = validation_rows(90, 0.25, 5)
    assert test is None and (train.info.n, val.info.n) == (len(keep), len(held))
    for split, rows in ((train, keep), (val, held)):
        np.testing.assert_array_equal(split.local.inputs, x[rows].T)
        np.testing.assert_array_equal(split.local.targets[0], y[rows])
        np.testing.assert_array_equal(split.local.lengths, lengths[rows])
        np.testing.assert_array_equal(split.lengths, lengths[rows])
        np.testing.assert_array_equal(np.concatenate([p.inputs for p in split.parts], axis=1),
                                      x[rows].T)
        np.testing.assert_array_equal(np.concatenate([p.lengths for p in split.parts]),
                                      lengths[rows])
        assert (split.local.start, split.local.stop) == (0, len(rows))


def _one_line(capsys, code, expected):
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("padmmirnn: error: ") and expected in err, err


@pytest.mark.parametrize("settings,expected", [
    (["data.validation_fraction=1.0"], "'data.validation_fraction' must lie in (0, 1)"),
    (["data.validation_fraction=-0.1"], "'data.validation_fraction' must lie in (0, 1)"),
    (["data.validation_fraction=1.5"], "'data.validation_fraction' must lie in (0, 1)"),
    (["train.early_stopping=3"], "train.early_stopping needs a validation split"),
    (["data.validation_fraction=0.1", "data.validation=x.h5"], "give one"),
    (["train.monitor=loss"], "must be one of val_loss, val_accuracy"),
    (["data.validation_fraction=0.01"], "leaves 0 validation samples of 40"),
    (["data.validation_fraction=0.99"], "leaves 0 training samples of 40"),
])
def test_bad_validation_settings_are_one_line(tmp_path, capsys, settings, expected):
    write_random_split(tmp_path / "t_train.h5")
    out = tmp_path / "out"
    args = [a for kv in settings for a in ("--set", kv)]
    code = main(["train", "--dataset", str(tmp_path / "t_train.h5"), "--out", str(out),
                 "--iterations", "1", *args])
    _one_line(capsys, code, expected)
    assert not out.exists()


@pytest.mark.parametrize("make,expected", [
    (lambda p: write_random_split(p, kind="tokens"), "validation split does not match"),
    (lambda p: write_random_split(p, classes=4), "classes 4 vs 3"),
    (lambda p: write_random_split(p, dim=6), "input size 6 vs 5"),
    (lambda p: write_random_split(p, many_to_many=True), "target layout"),
    (lambda p: None, "dataset file not found"),
])
def test_a_validation_file_that_does_not_match_is_one_line(tmp_path, capsys, make, expected):
    write_random_split(tmp_path / "t_train.h5")
    make(tmp_path / "v.h5")
    out = tmp_path / "out"
    code = main(["train", "--dataset", str(tmp_path / "t_train.h5"), "--out", str(out),
                 "--iterations", "1", "--set", f"data.validation={tmp_path / 'v.h5'}"])
    _one_line(capsys, code, expected)
    assert not out.exists()


def test_a_validation_file_is_evaluated(tmp_path):
    write_random_split(tmp_path / "t_train.h5", n=30)
    write_random_split(tmp_path / "v.h5", n=11, seed=4)
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(tmp_path / "t_train.h5"), "--out", str(out),
                 "--iterations", "2", "--set", "model.hidden=5",
                 "--set", f"data.validation={tmp_path / 'v.h5'}"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    model = padmmirnn.load(out / "weights.h5")
    summary = json.loads((out / "summary.json").read_text())
    x, y = _rows(tmp_path / "v.h5")
    best = rows[summary["best_iteration"] - 1]
    assert model.evaluate(x, y)["loss"] == pytest.approx(best["val_loss"], rel=1e-12)
    assert summary["best_val_loss"] == min(r["val_loss"] for r in rows)


# ---------------------------------------------------------------- early stopping


OVERFIT = ["--set", "model.hidden=24", "--set", "optim.lr=0.02", "--set", "optim.batch_size=8",
           "--set", "optim.clip_norm=0", "--set", "data.validation_fraction=0.3",
           "--set", "train.early_stopping=2"]


@pytest.fixture
def noisy(tmp_path):
    """Random labels: a network that memorises the training part gets worse on the
    held-out part, so the validation loss has an early minimum."""
    write_random_split(tmp_path / "noise_train.h5", n=80, steps=5, dim=4, seed=3)
    write_random_split(tmp_path / "noise_test.h5", n=20, steps=5, dim=4, seed=4)
    return ["--dataset", str(tmp_path / "noise_train.h5"), *OVERFIT]


@pytest.mark.parametrize("algo", ["adam", "admm"])
def test_early_stopping_restores_the_best_weights(tmp_path, noisy, algo):
    out = tmp_path / "run"
    extra = ["--set", "admm.batch_size=8"] if algo == "admm" else []
    assert main(["train", *noisy, "--algo", algo, *extra, "--iterations", "40",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in rows]
    best = int(np.argmin(losses)) + 1
    assert summary["best_iteration"] == best and summary["best_val_loss"] == min(losses)
    # patience 2: two evaluations without improvement after the best, then the stop
    assert summary["early_stopped_at"] == best + 2 == summary["iterations"] < 40
    assert summary["weights_from"] == "best"
    assert summary["best_test_accuracy"] == rows[best - 1]["test_accuracy"]
    assert summary["test_accuracy"] == rows[-1]["test_accuracy"]  # the last evaluation's
    # weights.h5 evaluates to the best validation metrics, not to the last ones
    model = padmmirnn.load(out / "weights.h5")
    x, y = _rows(tmp_path / "noise_train.h5")
    held = validation_rows(80, 0.3, 0)[1]
    got = model.evaluate(x[held], y[held])
    assert got["loss"] == pytest.approx(summary["best_val_loss"], rel=1e-12)
    assert got["accuracy"] == summary["best_val_accuracy"]
    assert got["loss"] != pytest.approx(rows[-1]["val_loss"], rel=1e-6)
    tx, ty = _rows(tmp_path / "noise_test.h5")
    assert model.evaluate(tx, ty)["accuracy"] == summary["best_test_accuracy"]


def test_restore_best_false_keeps_the_last_weights(tmp_path, noisy):
    out = tmp_path / "run"
    assert main(["train", *noisy, "--algo", "adam", "--iterations", "40", "--out", str(out),
                 "--set", "train.restore_best=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights_from"] == "last"
    tx, ty = _rows(tmp_path / "noise_test.h5")
    assert padmmirnn.load(out / "weights.h5").evaluate(tx, ty)["accuracy"] == \
        summary["test_accuracy"]


def test_monitor_val_accuracy(tmp_path, noisy):
    out = tmp_path / "run"
    assert main(["train", *noisy, "--algo", "adam", "--iterations", "40", "--out", str(out),
                 "--set", "train.monitor=val_accuracy"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracies = [r["val_accuracy"] for r in rows]
    assert summary["best_iteration"] == int(np.argmax(accuracies)) + 1  # the first maximum
    assert summary["best_val_accuracy"] == max(accuracies)


@pytest.mark.parametrize("algo", ["adam", "admm"])
def test_resume_with_early_stopping_equals_an_uninterrupted_run(tmp_path, noisy, algo):
    extra = ["--set", "admm.batch_size=8"] if algo == "admm" else []
    common = ["train", *noisy, "--algo", algo, *extra, "--iterations", "40",
              "--set", "train.early_stopping=3"]
    full = tmp_path / "full"
    assert main([*common, "--out", str(full)]) == 0
    whole = json.loads((full / "summary.json").read_text())
    # stop between the best evaluation and the early stop: the resumed run must carry
    # the best weights, their metrics and the evaluations since them
    cut = whole["best_iteration"] + 1
    assert cut < whole["early_stopped_at"]
    part = tmp_path / "part"
    assert main([*common, "--iterations", str(cut), "--checkpoint-every", str(cut),
                 "--out", str(part)]) == 0
    with h5py.File(part / "checkpoints" / f"ckpt-{cut:08d}.h5") as f:
        assert f["best"].attrs["iteration"] == whole["best_iteration"]
        assert f["best"].attrs["since"] == 1
    assert main([*common, "--resume", "latest", "--out", str(part)]) == 0
    resumed = json.loads((part / "summary.json").read_text())
    for key in ("best_iteration", "early_stopped_at", "iterations", "best_val_loss",
                "best_val_accuracy", "best_test_loss", "best_test_accuracy", "test_loss"):
        assert resumed[key] == whole[key], key
    with h5py.File(full / "weights.h5") as a, h5py.File(part / "weights.h5") as b:
        for name in a.attrs["weight_names"].split(","):
            assert np.array_equal(a[name][()], b[name][()]), name
    rows = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, whole["iterations"] + 1))


def test_target_accuracy_falls_back_to_validation(tmp_path):
    write_random_split(tmp_path / "t_train.h5", n=40)
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(tmp_path / "t_train.h5"), "--out", str(out),
                 "--iterations", "5", "--set", "data.validation_fraction=0.25",
                 "--set", "train.target_accuracy=0.01", "--set", "model.hidden=4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["target_reached_at"] == 1 and rows[0]["test_accuracy"] is None
    assert rows[0]["val_accuracy"] >= 0.01


# ---------------------------------------------------------------- bucketed batches


def test_bucketed_batches_are_the_permutation_sorted_within_windows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 1003)
    order = rng.permutation(1003)
    batches = bucketed_batches(order, lengths, 16, 5)
    assert len(batches) == -(-1003 // 16)
    flat = np.concatenate(batches)
    np.testing.assert_array_equal(np.sort(flat), np.arange(1003))  # each sample once
    for w in range(0, 1003, 80):  # each window holds the same samples as the permutation's
        window = np.concatenate(batches[w // 16: w // 16 + 5])
        np.testing.assert_array_equal(np.sort(window), np.sort(order[w:w + 80]))
        assert (np.diff(lengths[window]) <= 0).all()  # by decreasing length
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    plain = np.mean([np.ptp(lengths[order[lo:lo + 16]]) for lo in range(0, 1003, 16)])
    assert spread < plain / 3
    shuffled = bucketed_batches(order, lengths, 16, 5, np.random.default_rng(1))
    assert sorted(map(tuple, shuffled)) == sorted(map(tuple, batches))
    assert [tuple(b) for b in shuffled] != [tuple(b) for b in batches]
    for b in shuffled:
        assert (np.diff(lengths[b]) <= 0).all()
    # equal lengths: the permutation's order, as without bucketing
    same = bucketed_batches(order, np.full(1003, 7), 16, 5)
    np.testing.assert_array_equal(np.concatenate(same), order)


def _gradient_trainer(path, bucket: bool, comm=None, rank_count: int = 1):
    cfg = load_config(overrides={"data.dataset": str(path), "train.algo": "adam",
                                 "train.bucket": bucket, "train.bucket_window": 3,
                                 "optim.batch_size": 8, "model.hidden": 5})
    train, _, _ = load_data(str(path), "", comm or SerialComm(), np.float64, None)
    return GradientTrainer(cfg, train.local, train.info.n, comm or SerialComm(),
                           lengths=train.lengths)


def test_gradient_trainer_buckets_by_length_when_the_data_have_lengths(tmp_path):
    _, _, lengths = _lengths_split(tmp_path / "s_train.h5")
    on, off = (_gradient_trainer(tmp_path / "s_train.h5", b) for b in (True, False))
    order = np.random.default_rng([0, 0]).permutation(90)
    got, plain = on.batches(order), off.batches(order)
    assert sorted(len(b) for b in got) == sorted(len(b) for b in plain)
    assert np.mean([np.ptp(lengths[b]) for b in got]) < np.mean(
        [np.ptp(lengths[b]) for b in plain])
    np.testing.assert_array_equal(np.concatenate(plain), order)
    on.step()
    off.step()
    assert not np.array_equal(on.params.flat(), off.params.flat())
    # without lengths nothing changes
    write_random_split(tmp_path / "n_train.h5", kind="tokens", n=90, steps=8, dim=7)
    a = _gradient_trainer(tmp_path / "n_train.h5", True)
    b = _gradient_trainer(tmp_path / "n_train.h5", False)
    np.testing.assert_array_equal(np.concatenate(a.batches(order)), order)
    a.step()
    b.step()
    np.testing.assert_array_equal(a.params.flat(), b.params.flat())


MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which(
    "mpiexec")


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found")
@pytest.mark.parametrize("algo", ["adam", "admm"])
def test_early_stopping_on_two_ranks_equals_serial(tmp_path, noisy, algo):
    extra = ["--set", "admm.batch_size=8"] if algo == "admm" else []
    args = ["train", *noisy, "--algo", algo, *extra, "--iterations", "40"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-P", "-m", "padmmirnn", *args,
           "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert two["ranks"] == 2
    for key in ("best_iteration", "early_stopped_at", "iterations"):
        assert one[key] == two[key], key
    assert two["best_val_loss"] == pytest.approx(one["best_val_loss"], rel=1e-9)
    a, b = (padmmirnn.load(tmp_path / d / "weights.h5").params for d in ("one", "two"))
    np.testing.assert_allclose(b.flat(), a.flat(), rtol=1e-8, atol=1e-10)

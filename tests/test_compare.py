"""``padmmirnn compare``, the wall-clock budget, and the adding problem."""

from __future__ import annotations

import csv
import importlib.util
import json

import numpy as np
from conftest import write_random_split

from padmmirnn.cli import main
from padmmirnn.compare import time_to
from padmmirnn.datafiles import make_adding, read_info


def _toy(tmp_path):
    write_random_split(tmp_path / "toy_train.h5", n=40, dim=4, seed=1)
    write_random_split(tmp_path / "toy_test.h5", n=12, dim=4, seed=2)
    return str(tmp_path / "toy_train.h5")


def test_compare_writes_curves_and_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    plots = importlib.util.find_spec("matplotlib") is not None
    args = ["compare", "--algos", "admm,adam,celgc", "--dataset", _toy(tmp_path),
            "--iterations", "3", "--set", "model.hidden=5", "--out", str(out),
            "--thresholds", "0.2,0.99", "--loss-thresholds", "5.0"]
    assert main(args + ([] if plots else ["--no-plots"])) == 0
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["algo"] for r in rows] == ["admm"] * 3 + ["adam"] * 3 + ["celgc"] * 3
    with open(out / "time_to_accuracy.csv") as f:
        table = {r["algo"]: r for r in csv.DictReader(f)}
    assert set(table) == {"admm", "adam", "celgc"}
    for algo in table:
        summary = json.loads((out / algo / "summary.json").read_text())
        assert float(table[algo]["final_test_accuracy"]) == summary["test_accuracy"]
    assert "| admm |" in capsys.readouterr().out
    # the ledger at each threshold is the first evaluation that reached it
    with open(out / "to_threshold.csv") as f:
        ledger = list(csv.DictReader(f))
    assert len(ledger) == 3 * 3
    for row in ledger:
        metrics = [json.loads(line) for line in
                   (out / row["algo"] / "metrics.jsonl").read_text().splitlines()]
        t = float(row["threshold"])
        hit = [m for m in metrics if (m["test_accuracy"] >= t if row["metric"] ==
                                      "test_accuracy" else m["test_loss"] <= t)]
        if not hit:
            assert row["wall_time_s"] == row["iterations"] == row["syncs"] == ""
            continue
        assert int(row["iterations"]) == hit[0]["iteration"]
        assert int(row["syncs"]) == hit[0]["syncs"] and int(row["bytes"]) == hit[0]["bytes"]
        assert float(row["wall_time_s"]) == hit[0]["wall_time_s"]
    assert any(r["metric"] == "test_accuracy" and r["threshold"] == "0.99"
               and r["iterations"] == "" for r in ledger)
    if plots:
        for name in ("curves_vs_iterations.png", "curves_vs_time.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_rejects_unknown_algorithm_before_training(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--algos", "admm,lbfgs", "--out", str(out), "--no-plots"]) == 2
    assert "config key 'train.algo' must be one of" in capsys.readouterr().err
    assert not (out / "admm").exists()


def test_time_to_threshold():
    rows = [{"wall_time_s": t, "test_accuracy": a} for t, a in [(1, 0.3), (2, 0.55), (3, 0.9)]]
    assert time_to(rows, 0.5) == 2 and time_to(rows, 0.8) == 3 and time_to(rows, 0.95) is None


def test_budget_stops_every_algorithm(tmp_path):
    for algo in ("admm", "adam"):
        out = tmp_path / algo
        assert main(["train", "--algo", algo, "--dataset", _toy(tmp_path), "--iterations",
                     "1000", "--set", "train.budget_seconds=1e-9", "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["iterations"] == 1 and summary["test_accuracy"] is not None


def test_adding_problem_structure():
    x, y = make_adding(500, 40, seed=3, classes=10)
    assert x.shape == (500, 40, 2) and y.shape == (500,)
    markers = x[:, :, 1]
    assert (markers.sum(axis=1) == 2).all()
    assert (markers[:, :20].sum(axis=1) == 1).all() and (markers[:, 20:].sum(axis=1) == 1).all()
    total = (x[:, :, 0].astype(np.float64) * markers).sum(axis=1)
    np.testing.assert_array_equal(y, np.minimum((total / 2 * 10).astype(int), 9))
    assert y.min() <= 1 and y.max() >= 8  # the bins span the range
    # reproducible from the seed, different for another seed
    np.testing.assert_array_equal(make_adding(500, 40, seed=3)[0], x)
    assert not np.array_equal(make_adding(500, 40, seed=4)[0], x)


def test_data_prepare_adding_writes_train_and_test(tmp_path):
    out = tmp_path / "add_train.h5"
    assert main(["data", "prepare", "adding", "--out", str(out), "--steps", "30",
                 "--samples", "64", "--test-samples", "16"]) == 0
    info = read_info(str(out))
    test = read_info(str(tmp_path / "add_test.h5"))
    assert (info.n, info.steps, info.dim, info.classes) == (64, 30, 2, 10)
    assert test.n == 16
    assert main(["train", "--algo", "adam", "--dataset", str(out), "--iterations", "1",
                 "--out", str(tmp_path / "run")]) == 0


def test_target_accuracy_stops_after_the_first_evaluation_that_reaches_it(tmp_path):
    """The run ends right after the first evaluation at or above the target, and equals
    the same run without the target up to that iteration; a target never reached
    changes nothing."""
    common = ["train", "--dataset", _toy(tmp_path), "--set", "model.hidden=8"]
    whole = tmp_path / "whole"
    assert main([*common, "--iterations", "12", "--out", str(whole)]) == 0
    rows = [json.loads(r) for r in (whole / "metrics.jsonl").read_text().splitlines()]
    accs = [r["test_accuracy"] for r in rows]
    target = sorted(set(accs))[-2]  # reached, but not only at the last iteration
    first = next(r["iteration"] for r in rows if r["test_accuracy"] >= target)
    out = tmp_path / "target"
    assert main([*common, "--iterations", "12", "--set", f"train.target_accuracy={target}",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == first and summary["target_reached_at"] == first
    stopped = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_loss"] for r in stopped] == [r["test_loss"] for r in rows[:first]]
    never = tmp_path / "never"
    assert max(accs[:3]) < 1
    assert main([*common, "--iterations", "3", "--set", "train.target_accuracy=1",
                 "--out", str(never)]) == 0
    summary = json.loads((never / "summary.json").read_text())
    assert summary["iterations"] == 3 and summary["target_reached_at"] is None
    assert main([*common, "--set", "train.target_accuracy=85", "--out",
                 str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    # a loss target (nats): the first evaluation at or below it
    losses = [r["test_loss"] for r in rows]
    goal = sorted(losses)[1]
    first = next(r["iteration"] for r in rows if r["test_loss"] <= goal)
    out = tmp_path / "loss"
    assert main([*common, "--iterations", "12", "--set", f"train.target_loss={goal!r}",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == first == summary["target_reached_at"]

"""Gradient baselines through the training driver (serial) and across ranks (MPI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_local

from padmmirnn.cli import main
from padmmirnn.comm import SerialComm
from padmmirnn.config import build_config
from padmmirnn.gradient.trainer import GradientTrainer
from padmmirnn.nn import init_params, loss_sums


def _trainer(algo, data, comm, n_global=None, **optim):
    cfg = build_config(overrides={"train.algo": algo, "model.hidden": 6,
                                  **{f"optim.{k}": v for k, v in optim.items()}})
    p = init_params(data.info.dim, 6, data.info.classes, 0, "orthogonal", 1.0)
    return GradientTrainer(cfg, data, n_global or data.info.n, comm, p)


@pytest.mark.parametrize("algo,lr", [("sgd", 0.1), ("momentum", 0.02), ("adam", 0.01),
                                     ("rmsprop", 0.01), ("adagrad", 0.1), ("celgc", 0.1)])
def test_every_algorithm_reduces_the_training_loss(algo, lr):
    data = make_local("dense", False, n=60, steps=4, dim=5, classes=3, seed=1)
    tr = _trainer(algo, data, SerialComm(), batch_size=16, lr=lr)
    before = loss_sums(tr.params, data, "tanh", "ce")
    for _ in range(15):
        tr.step()
    stats = tr.describe(None)
    after = loss_sums(tr.params, data, "tanh", "ce")
    assert after[0] < 0.8 * before[0]
    assert len(stats["grad_step_norms"]) == 4


def test_clipping_bounds_the_step(tmp_path):
    data = make_local("dense", False, n=40, steps=4, dim=5, classes=3, seed=3)
    tr = _trainer("sgd", data, SerialComm(), batch_size=40, lr=0.5, clip_norm=1e-3)
    w0 = tr.params.W.copy()
    tr.step()  # one step of at most lr * clip_norm in norm
    assert np.linalg.norm(tr.params.W - w0) <= 0.5 * 1e-3 + 1e-15


@pytest.mark.parametrize("algo", ["adam", "celgc"])
def test_cli_gradient_run_writes_epoch_metrics(tmp_path, algo):
    out = tmp_path / algo
    assert main(["train", "--algo", algo, "--iterations", "2", "--out", str(out),
                 "--set", "model.hidden=16"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert len(rows[0]["grad_step_norms"]) == 28
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algo"] == algo and summary["iteration_unit"] == "epoch"

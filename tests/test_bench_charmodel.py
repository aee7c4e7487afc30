"""The character-model benchmark's equal-time reading (benchmarks/charmodel.py): a run's
clock is its cumulative training seconds (compute and communication, not the
evaluation), and a run is read at its last evaluation within the budget. Fast; no
training."""

from __future__ import annotations

import json
from types import SimpleNamespace

from conftest import bench_module


def test_the_clock_counts_training_seconds_and_the_budget_takes_the_last_evaluation(
        tmp_path):
    charmodel = bench_module("charmodel")
    run = tmp_path / "padmmirnn-lstm-s0"
    run.mkdir()
    (run / "summary.json").write_text("{}")  # an existing run is read, not repeated
    lines = [{"iteration": k, "wall_time_s": 10.0 * k, "t_compute_s": 2.0, "t_comm_s": 0.5,
              "test_loss": 3.0 - k} for k in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines))
    curve = charmodel.padmmirnn_run("lstm", SimpleNamespace(seed=0, ranks=1), tmp_path)
    assert [m["seconds"] for m in curve] == [2.5, 5.0, 7.5]  # not the wall time
    assert charmodel.at(curve, 6.0)["pass"] == 2
    assert charmodel.at(curve, 7.5)["pass"] == 3
    assert charmodel.at(curve, 2.0) is None  # the first pass took longer

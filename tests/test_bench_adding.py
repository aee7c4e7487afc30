"""The adding benchmark's result parsing (benchmarks/adding.py): what its tables report
of a run's metrics.jsonl. Fast; no training."""

from __future__ import annotations

import json

import pytest
from conftest import bench_module


def _module():
    return bench_module("adding")


def test_curve_and_summary(tmp_path):
    adding = _module()
    lines = [{"iteration": k, "test_accuracy": acc, "t_compute_s": 2.0 + k, "wall_time_s": 9}
             for k, acc in ((1, 0.18), (2, 0.25), (3, 0.29), (4, 0.27))]
    lines.insert(2, {"iteration": 2, "note": "a record without an evaluation"})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    curve = adding.read_curve(path)
    assert [r["iteration"] for r in curve] == [1, 2, 3, 4]
    # training seconds accumulate t_compute_s, not the wall time (which holds evaluations)
    assert [r["seconds"] for r in curve] == [3.0, 7.0, 12.0, 18.0]
    s = adding.summarise(curve, prior=0.185)
    assert s["reach_pass"] == 3 and s["reach_s"] == 12.0  # first pass >= prior + 0.10
    assert s["best"] == 0.29 and s["last"] == 0.27 and s["passes"] == 4
    assert s["acc@1"] == 0.18 and s["acc@5"] is None
    assert s["s_per_pass"] == pytest.approx(4.5)  # median of 3, 4, 5, 6
    assert adding.summarise(curve, prior=0.2)["reach_pass"] is None


def test_run_names_and_aggregate():
    adding = _module()
    f = adding.parse_name("T100-n10000-lstm-admm-noprecond-s2")
    assert f == {"T": 100, "N": 10000, "cell": "lstm", "method": "admm-noprecond", "seed": 2}
    rows = [{**f, "seed": s, "acc@1": a, "acc@5": None, "acc@10": None, "acc@20": None,
             "acc@40": None, "best": a, "reach_pass": r, "s_per_pass": 1.0}
            for s, a, r in ((0, 0.5, 3), (1, 0.7, None))]
    (agg,) = adding.aggregate(rows)
    assert agg["seeds"] == 2 and agg["best"] == "0.600 [0.500, 0.700]"
    assert agg["reach_pass"] == "3,-" and agg["acc@5"] == "-"
    assert agg["acc@1"] == "0.600 [0.500, 0.700]"

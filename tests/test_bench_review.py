"""The review benchmark's model selection (benchmarks/review.py): the reported test
accuracy is the one at the best validation pass, not the best test pass. Fast; no
training."""

from __future__ import annotations

from conftest import bench_module


def _module():
    return bench_module("review")


def test_selection_takes_the_first_best_validation_pass():
    review = _module()
    curve = [{"pass": k, "val_accuracy": v, "test_accuracy": t, "seconds": k}
             for k, v, t in ((1, 0.60, 0.58), (2, 0.71, 0.69), (3, 0.66, 0.75),
                             (4, 0.71, 0.70))]
    best = review.selected(curve)
    assert best["pass"] == 2 and best["test_accuracy"] == 0.69  # not pass 3's 0.75
    assert best["best_test_accuracy"] == 0.75 and best["passes_run"] == 4

"""Time per pass of the gated cells on the default dataset, measured back to back in one
run: mini-batch ADMM (the default) and Adam, for the Elman, GRU and LSTM cells (h = 64,
float64, one thread, no evaluation). The figures are medians over ``--repeats``
passes after one warm-up pass, taken in rounds (every configuration once per round),
so that a change of the machine's load shifts them all alike; the table gives the
ratios that matter: a gated ADMM pass against a gated Adam epoch, and gated against
Elman.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

CELLS = ("rnn", "gru", "lstm")
ALGOS = ("admm", "adam")


def trainer(local, n: int, algo: str, cell: str, layers: int):
    from padmmirnn.admm.minibatch import MinibatchAdmm
    from padmmirnn.comm import SerialComm
    from padmmirnn.config import build_config
    from padmmirnn.gradient.trainer import GradientTrainer

    cfg = build_config(overrides={"train.algo": algo, "model.cell": cell,
                                  "model.layers": layers})
    kind = MinibatchAdmm if algo == "admm" else GradientTrainer
    return kind(cfg, local, n, SerialComm())


def measure(local, n: int, layers: int, repeats: int) -> dict[tuple[str, str], float]:
    """Median seconds per pass of every (cell, algo), in interleaved rounds."""
    runs = {(c, a): trainer(local, n, a, c, layers) for c in CELLS for a in ALGOS}
    for tr in runs.values():
        tr.step()  # warm-up: compilation, caches
    times: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, tr in runs.items():
            t0 = time.perf_counter()
            tr.step()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    from benchmarks.common import default_training_set, table

    p = argparse.ArgumentParser(prog="python -m benchmarks cells")
    p.add_argument("--out", default="runs/bench-cells")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", type=int, default=1)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    local = default_training_set()
    t = measure(local, local.n, a.layers, a.repeats)
    rows = [{"cell": c, "admm_pass_s": t[c, "admm"], "adam_epoch_s": t[c, "adam"],
             "admm_over_adam": t[c, "admm"] / t[c, "adam"],
             "admm_over_rnn_admm": t[c, "admm"] / t["rnn", "admm"],
             "adam_over_rnn_adam": t[c, "adam"] / t["rnn", "adam"]} for c in CELLS]
    print(table(rows))
    (out / "cells.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0

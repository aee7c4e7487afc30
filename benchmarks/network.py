"""Time to an accuracy on a simulated interconnect (issue 16): 2 ranks on the default
dataset, every collective and one-sided round trip delayed by ``alpha`` (the
``train.net_latency_us`` option) for each alpha in ``--latencies``.

Modes: the mini-batch ADMM default (SP, one reduction per mini-batch), the same with
local steps averaged once per pass (``admm.consensus = average``), the full-batch hybrid
(SP), AP over the full-batch hybrid with staleness 2 (iteration gap and bounded delay),
and data-parallel Adam (its defaults). Time to the target: for runs that evaluate every
iteration or epoch, the wall time of the first evaluation at or above it; for AP, which
evaluates at its end, the wall time of the shortest of the runs of ``--ap-iterations``
that reaches it. Wall times include the evaluations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODES = (
    ("ADMM mini-batch (SP, default)", ["--iterations", "4"], False),
    ("ADMM mini-batch, averaged once per pass", ["--iterations", "4", "--set",
                                                  "admm.consensus=average"], False),
    ("ADMM full-batch (SP)", ["--config", "fullbatch", "--iterations", "40"], False),
    ("ADMM AP gap, tau 2", ["--config", "fullbatch", "--parallel", "async",
                            "--staleness", "2"], True),
    ("ADMM AP delay, tau 2", ["--config", "fullbatch", "--parallel", "async", "--staleness",
                              "2", "--staleness-kind", "publishes"], True),
    ("Adam data-parallel (default)", ["--algo", "adam", "--iterations", "12"], False),
)


def first_reaching(rows: list[dict], target: float) -> tuple[float | None, int | None]:
    """(wall time, iteration) of the first evaluation at or above ``target``."""
    for r in rows:
        if r.get("test_accuracy") is not None and r["test_accuracy"] >= target:
            return r["wall_time_s"], r["iteration"]
    return None, None


def main() -> int:
    from benchmarks.common import read_jsonl, run_job, table

    p = argparse.ArgumentParser(prog="python -m benchmarks network")
    p.add_argument("--out", default="runs/bench-network")
    p.add_argument("--latencies", default="0,50,500,5000", help="alpha in microseconds")
    p.add_argument("--target", type=float, default=0.85)
    p.add_argument("--ap-iterations", default="15,30,45,60")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for alpha in (float(a) for a in args.latencies.split(",")):
        for name, flags, ap in MODES:
            net = ["--set", f"train.net_latency_us={alpha:g}"]
            tag = f"{name.split(' (')[0].replace(' ', '_').replace(',', '')}-a{alpha:g}"
            if ap:
                seconds = iterations = syncs = None
                for its in (int(i) for i in args.ap_iterations.split(",")):
                    s = run_job([*flags, *net, "--iterations", str(its)], 2,
                                out / f"{tag}-{its}")
                    if s["test_accuracy"] >= args.target:
                        seconds, iterations = s["wall_time_s"], its
                        break
            else:
                run = out / tag
                run_job([*flags, *net], 2, run)
                metrics = read_jsonl(run / "metrics.jsonl")
                seconds, iterations = first_reaching(metrics, args.target)
                syncs = next((r["syncs"] for r in metrics if r["iteration"] == iterations),
                             None)
            rows.append({"latency_us": alpha, "mode": name, "seconds_to_target": seconds,
                         "iterations_or_epochs": iterations, "training_syncs": syncs})
            print(table(rows[-1:]), flush=True)
    print(table(rows))
    (out / "network.json").write_text(json.dumps(rows, indent=1))
    return 0

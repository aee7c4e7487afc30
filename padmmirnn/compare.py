"""``padmmirnn compare``: several algorithms on the same data, cores and clock.

Each algorithm trains in turn (same communicator, same dataset, same seed) into
``OUT/<algo>/``; then ``OUT/curves.csv`` holds every evaluated iteration of every
run, ``OUT/time_to_accuracy.csv`` and ``.md`` the table (final and best test
accuracy, wall time to reach each threshold), ``OUT/to_threshold.csv`` and ``.md``
the ledger at each threshold (test accuracy at least, or test loss at most: wall
time, iterations or epochs, synchronisations and bytes per rank to reach it), and
the PNG plots show loss and accuracy against iterations and against wall time.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from padmmirnn.atomic import atomic_write_text
from padmmirnn.config import Config, build_config
from padmmirnn.logs import get_logger
from padmmirnn.training import run_training

CURVE_KEYS = ("iteration", "wall_time_s", "train_loss", "train_accuracy", "test_loss",
              "test_accuracy", "syncs", "bytes")
THRESHOLDS = (0.5, 0.8)


def reached(rows: list[dict], threshold: float, metric: str = "accuracy") -> dict | None:
    """The first evaluation whose test (else train) accuracy is at least ``threshold``
    (``metric`` "accuracy") or whose test (else train) loss is at most it ("loss")."""
    for r in rows:
        value = r.get(f"test_{metric}")
        value = r.get(f"train_{metric}") if value is None else value
        if value is not None and (value >= threshold if metric == "accuracy"
                                  else value <= threshold):
            return r
    return None


def time_to(rows: list[dict], threshold: float) -> float | None:
    """Wall time of the first evaluation whose test (else train) accuracy >= threshold."""
    r = reached(rows, threshold)
    return None if r is None else r["wall_time_s"]


def threshold_rows(curves: dict[str, list[dict]], summaries: dict[str, dict],
                   accuracies: tuple[float, ...], losses: tuple[float, ...]) -> list[dict]:
    """The ledger at each threshold: per algorithm, what it took to get there."""
    out = []
    for metric, values in (("accuracy", accuracies), ("loss", losses)):
        for t in values:
            for algo, rows in curves.items():
                r = reached(rows, t, metric) or {}
                out.append({"algo": algo, "metric": f"test_{metric}",
                            "threshold": t, "wall_time_s": r.get("wall_time_s"),
                            "iterations": r.get("iteration"),
                            "unit": summaries[algo]["iteration_unit"],
                            "syncs": r.get("syncs"), "bytes": r.get("bytes")})
    return out


def table_rows(curves: dict[str, list[dict]], summaries: dict[str, dict],
               thresholds: tuple[float, ...] = THRESHOLDS) -> list[dict]:
    out = []
    for algo, rows in curves.items():
        accs = [r["test_accuracy"] for r in rows if r.get("test_accuracy") is not None]
        s = summaries[algo]
        out.append({
            "algo": algo, "iterations": s["iterations"], "unit": s["iteration_unit"],
            "wall_time_s": round(s["wall_time_s"], 2),
            "final_test_accuracy": s["test_accuracy"],
            "best_test_accuracy": max(accs) if accs else None,
            **{f"time_to_{100 * t:g}pct_s": time_to(rows, t) for t in thresholds},
        })
    return out


def _markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r[k]
            cells.append("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def run_compare(base: Config, algos: list[str], out_dir: Path, comm, plots: bool,
                thresholds: tuple[float, ...] = THRESHOLDS,
                loss_thresholds: tuple[float, ...] = ()) -> list[dict]:
    """Train each algorithm with ``base`` (its algo replaced) and write the comparison."""
    if plots:
        from padmmirnn.plots import require_matplotlib

        require_matplotlib()
    log = get_logger()
    configs = {}
    for algo in algos:  # validate every configuration before the first run
        d = base.to_dict()
        d["train"]["algo"] = algo
        d["output"]["dir"] = str(out_dir / algo)
        configs[algo] = build_config(d)
    curves, summaries = {}, {}
    for algo, cfg in configs.items():
        log.info("compare: training %s", algo)
        summaries[algo] = run_training(cfg, comm)
        path = out_dir / algo / "metrics.jsonl"
        curves[algo] = ([json.loads(line) for line in path.read_text().splitlines()]
                        if comm.rank == 0 else [])
    rows = table_rows(curves, summaries, thresholds)
    ledger = threshold_rows(curves, summaries, thresholds, loss_thresholds)
    if comm.rank == 0:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["algo", *CURVE_KEYS])
        for algo, rs in curves.items():
            for r in rs:
                w.writerow([algo, *(r.get(k) for k in CURVE_KEYS)])
        atomic_write_text(out_dir / "curves.csv", buf.getvalue())
        atomic_write_text(out_dir / "time_to_accuracy.csv", _csv(rows))
        atomic_write_text(out_dir / "time_to_accuracy.md", _markdown(rows))
        atomic_write_text(out_dir / "to_threshold.csv", _csv(ledger))
        atomic_write_text(out_dir / "to_threshold.md", _markdown(ledger))
        if plots:
            from padmmirnn.plots import plot_curves

            plot_curves(curves, out_dir)
        print(_markdown(rows), end="")
        print(_markdown(ledger), end="")
    return rows

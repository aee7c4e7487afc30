"""Parallel benchmarks on the default dataset, measured in one run.

* SP (issue 5): time per ADMM iteration at 1 and 2 ranks (h = 128 by default,
  evaluation off so only iterations are timed), speedup, parallel efficiency and
  the share of iteration time spent in communication (max over ranks), for the
  full-batch configuration (one reduction per iteration) and the mini-batch default
  (one per mini-batch; an iteration is a pass).
* AP (issue 7): rank 0's iterations per second and time to a test accuracy for
  SP and AP (tau = 1, 2, 4) in the full-batch configuration (AP's), without and with
  ``--straggler 1:2``; AP's throughput under the straggler relative to its own
  throughput without one.
* Consensus under stragglers (issue 24): time to a test accuracy for SP (the default),
  SP with rebalancing (``train.rebalance``), SP consensus (``admm.consensus =
  average``, one join per pass) and AP consensus at tau = 1, 2, 4, each without a
  straggler, with rank 1 slowed 2x for the whole run (``1:2``) and for one pass of
  three (``1:2:2-2``, a transient straggler); every run stops at the target
  (``train.target_accuracy``), evaluated after every pass (AP: rank 0's snapshot).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.common import read_jsonl, run_job, table


def sp_speedup(out: Path, hidden: int, iterations: int, preset: str | None) -> dict:
    common = ["--set", f"model.hidden={hidden}", "--iterations", str(iterations),
              "--set", f"train.eval_every={iterations}", *(["--config", preset] if preset
                                                          else [])]
    name = preset or "minibatch"
    one = run_job(common, 1, out / f"sp-1-{name}")
    two = run_job([*common, "--parallel", "sync"], 2, out / f"sp-2-{name}")
    t1, t2 = one["time_per_iteration_s"], two["time_per_iteration_s"]
    return {"config": name, "hidden": hidden, "t_iter_1rank_s": t1, "t_iter_2ranks_s": t2,
            "speedup": t1 / t2, "efficiency": t1 / t2 / 2,
            "comm_share_2ranks": two["t_comm_s"] / t2,
            "bytes_reduced_per_iteration": two["bytes_reduced_per_iteration"]}


def _rank0_rate(folder: Path, mode: str, summary: dict) -> float:
    """Iterations per second of rank 0 without evaluation: the median over its logged
    iterations (async), or the mean iteration time after warm-up (sync: every rank
    runs at the slowest rank's pace)."""
    if mode == "async":
        rows = read_jsonl(folder / "async_rank0.jsonl")[2:]
        return 1.0 / statistics.median(r["iteration_s"] for r in rows)
    return 1.0 / summary["time_per_iteration_s"]


def ap_straggler(out: Path, hidden: int, lengths: list[int], taus: list[int],
                 targets: tuple[float, ...] = (0.8, 0.85)) -> tuple[list[dict], list[dict]]:
    """SP and AP with and without a 2x straggler, in the full-batch configuration (SP's
    step control on the global training loss, AP's on each rank's own). Every mode
    runs once per length in ``lengths`` (iterations of rank 0, each a whole job with
    its consistent end), giving test accuracy against wall time; rank 0's throughput
    is read from the longest run. Returns (one row per mode, every run)."""
    rows, runs = [], []
    modes = ([("sync", 0, "iterations")] + [("async", t, "iterations") for t in taus]
             + [("async", t, "publishes") for t in taus if t >= 2])
    for straggler in ("", "1:2"):
        for mode, tau, kind in modes:
            label = {"sync": "sync", "async": "async" if kind == "iterations" else "delay"}[mode]
            name = f"{label}{tau if mode == 'async' else ''}-{'strag' if straggler else 'even'}"
            points = []
            for n in sorted(lengths):
                args = ["--set", f"model.hidden={hidden}", "--iterations", str(n),
                        "--parallel", mode, "--staleness", str(tau), "--staleness-kind", kind,
                        "--config", "fullbatch"]
                if mode == "sync":  # evaluate at the end only, as async runs do
                    args += ["--set", f"train.eval_every={n}"]
                if straggler:
                    args += ["--straggler", straggler]
                folder = out / f"{name}-{n}"
                summary = run_job(args, 2, folder)
                points.append((n, summary, folder))
                runs.append({"run": name, "iterations": n,
                             "wall_time_s": summary["wall_time_s"],
                             "test_accuracy": summary["test_accuracy"]})
            n, summary, folder = points[-1]
            row = {"run": name, "mode": mode, "kind": kind, "tau": tau,
                   "straggler": straggler or "-",
                   "rank0_it_per_s": _rank0_rate(folder, mode, summary),
                   "iterations_per_rank": "/".join(map(str, summary["iterations_per_rank"])),
                   "wall_time_s": summary["wall_time_s"],
                   "test_accuracy": summary["test_accuracy"]}
            for target in targets:  # the first run (fewest iterations) that reaches it
                hit = [p[1]["wall_time_s"] for p in points if p[1]["test_accuracy"] >= target]
                row[f"time_to_{target:g}_s"] = hit[0] if hit else None
            rows.append(row)
    even = {(r["mode"], r["kind"], r["tau"]): r["rank0_it_per_s"] for r in rows
            if r["straggler"] == "-"}
    for r in rows:
        r["throughput_vs_no_straggler"] = r["rank0_it_per_s"] / even[(r["mode"], r["kind"],
                                                                      r["tau"])]
    return rows, runs


STRAGGLERS = {"none": "", "persistent": "1:2", "transient": "1:2:2-2"}


def _time_to_target(folder: Path, summary: dict) -> float | None:
    """Wall seconds at the evaluation that reached the target (None: not reached)."""
    k = summary.get("target_reached_at")
    if k is None:
        return None
    return next(r["wall_time_s"] for r in read_jsonl(folder / "metrics.jsonl")
                if r["iteration"] == k)


def consensus_straggler(out: Path, target: float, taus: list[int], max_passes: int,
                        dataset: str | None = None, repeats: int = 1,
                        scenarios: tuple[str, ...] = tuple(STRAGGLERS),
                        ranks: int = 2) -> list[dict]:
    """Time to ``target`` on ``ranks`` ranks (more than the cores: oversubscribed, and
    labelled so) for each mode and straggler scenario (the median of ``repeats`` runs;
    the straggler is rank 1), one row each, with its ratio to SP's time without a
    straggler and, for the straggler scenarios, to SP's under the same straggler."""
    modes = [("SP", ["--parallel", "sync"]),
             ("SP rebalance", ["--parallel", "sync", "--set", "train.rebalance=true"]),
             ("SP consensus", ["--parallel", "sync", "--set", "admm.consensus=average"])]
    modes += [(f"AP tau {t}", ["--parallel", "async", "--staleness", str(t)]) for t in taus]
    common = ["--iterations", str(max_passes), "--set", f"train.target_accuracy={target:g}",
              "--set", "train.eval_every=1", *(["--dataset", dataset] if dataset else [])]
    times: dict[tuple[str, str], list] = {}
    passes: dict[tuple[str, str], list] = {}
    for rep_ in range(repeats):  # rounds over every cell: the machine's noise spreads
        for scenario in scenarios:
            spec = STRAGGLERS[scenario]
            for label, args in modes:
                folder = out / f"{label.replace(' ', '-')}-{scenario}-{rep_}"
                extra = ["--straggler", spec] if spec else []
                summary = run_job([*common, *args, *extra], ranks, folder)
                times.setdefault((label, scenario), []).append(
                    _time_to_target(folder, summary))
                passes.setdefault((label, scenario), []).append(
                    summary.get("target_reached_at"))
    rows = []
    for (label, scenario), ts in times.items():
        reached = [t for t in ts if t is not None]
        rows.append({"mode": label, "straggler": scenario,
                     "passes": "/".join("-" if p is None else str(p)
                                        for p in passes[label, scenario]),
                     "time_s": statistics.median(reached) if reached else None})
    base = {(r["mode"], r["straggler"]): r["time_s"] for r in rows}
    for r in rows:
        sp_even, sp_same = base.get(("SP", "none")), base.get(("SP", r["straggler"]))
        r["vs_SP_no_straggler"] = r["time_s"] / sp_even if r["time_s"] and sp_even else None
        r["vs_SP_same_straggler"] = (r["time_s"] / sp_same if r["time_s"] and sp_same
                                     else None)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks parallel")
    p.add_argument("--out", default="runs/bench-parallel")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--ap-hidden", type=int, default=64)
    p.add_argument("--ap-lengths", default="15,30,60",
                   help="AP study: iterations of rank 0 per run (one job per length)")
    p.add_argument("--taus", default="1,2,4")
    p.add_argument("--skip-sp", action="store_true")
    p.add_argument("--skip-ap", action="store_true")
    p.add_argument("--consensus", action="store_true",
                   help="run only the consensus straggler study (issue 24)")
    p.add_argument("--target", type=float, default=0.85)
    p.add_argument("--max-passes", type=int, default=12)
    p.add_argument("--dataset", default=None, help="consensus study: another training file")
    p.add_argument("--repeats", type=int, default=3, help="consensus study: runs per cell")
    p.add_argument("--ranks", type=int, default=2, help="consensus study: ranks (more than "
                   "the cores oversubscribes them: label such times as oversubscribed)")
    p.add_argument("--scenarios", default=",".join(STRAGGLERS),
                   help="consensus study: stragglers to run (none, persistent, transient)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    if a.consensus:
        result["consensus"] = consensus_straggler(
            out, a.target, [int(t) for t in a.taus.split(",")], a.max_passes, a.dataset,
            a.repeats, tuple(a.scenarios.split(",")), a.ranks)
        print(table(result["consensus"]))
        (out / "consensus.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if not a.skip_sp:
        result["sp"] = [sp_speedup(out, a.hidden, a.iterations, preset)
                        for preset in ("fullbatch", None)]
        print(table(result["sp"]))
    if not a.skip_ap:
        result["ap"], result["ap_runs"] = ap_straggler(
            out, a.ap_hidden, [int(n) for n in a.ap_lengths.split(",")],
            [int(t) for t in a.taus.split(",")])
        print(table(result["ap"]))
        print(table(result["ap_runs"]))
    (out / "parallel.json").write_text(json.dumps(result, indent=2) + "\n")
    if "ap" in result:
        plot_ap(result["ap"], result["ap_runs"], out / "async_straggler.png")
    return 0


def plot_ap(rows: list[dict], runs: list[dict], path: Path) -> None:
    """Left: rank 0's iterations per second, even ranks vs a straggler, per mode.
    Right: test accuracy against wall time under the straggler, per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: plot skipped (pip install 'padmmirnn[plot]')")
        return

    def pretty(mode: str) -> str:
        return (mode.replace("async", "AP gap ").replace("delay", "AP delay ")
                .replace("sync", "SP"))

    modes = [r["run"].rsplit("-", 1)[0] for r in rows if r["straggler"] == "-"]
    rate = {(r["run"].rsplit("-", 1)[0], r["straggler"]): r["rank0_it_per_s"] for r in rows}
    x = range(len(modes))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax.bar([i - 0.2 for i in x], [rate[(m, "-")] for m in modes], 0.4, label="no straggler")
    ax.bar([i + 0.2 for i in x], [rate[(m, "1:2")] for m in modes], 0.4,
           label="rank 1 slowed 2x (--straggler 1:2)")
    ax.set_xticks(list(x), [pretty(m) for m in modes], fontsize=8)
    ax.set_ylabel("rank 0 iterations per second")
    ax.legend(loc="lower left", framealpha=0.95)
    ax.grid(axis="y", alpha=0.3)
    for m in modes:
        pts = sorted((r["wall_time_s"], r["test_accuracy"]) for r in runs
                     if r["run"] == f"{m}-strag")
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=pretty(m))
    ax2.set_xlabel("wall time (s), rank 1 slowed 2x")
    ax2.set_ylabel("test accuracy")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

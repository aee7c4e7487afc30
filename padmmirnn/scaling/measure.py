"""Measure a study's points: read each point's timings back from its run folder.

Timings come from the runs' own records. Synchronous runs: ``metrics.jsonl`` holds, for
every iteration, the compute and communication seconds of the slowest rank (max over
ranks); the first ``TIMING_WARMUP`` iterations (compilation, first touch) are dropped
and the median over the remaining iterations is taken. Asynchronous runs: the per-rank
logs ``async_rank{r}.jsonl``; the median over iterations per rank, then the slowest rank.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from padmmirnn.outputs import TIMING_WARMUP
from padmmirnn.scaling.manifest import Point


@dataclass
class Measured:
    """One point's timings, read back from its outputs."""

    point: Point
    parallel: str
    launcher: str
    cpus_on_node: int
    git_revision: str
    iterations: int
    timed_iterations: int
    t_iter_median_s: float
    t_iter_max_s: float
    t_compute_s: float
    t_comm_s: float
    bytes_reduced_per_iteration: int
    stopped: str | None

    @property
    def oversubscribed(self) -> bool:
        """More threads on a node than it has CPUs."""
        per_node = math.ceil(self.point.ranks / self.point.nodes) * self.point.threads
        return per_node > self.cpus_on_node


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_launch_env(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k: v for k, v in pairs}


@dataclass(frozen=True)
class Timings:
    """Seconds per timed iteration of the slowest rank: median and maximum over
    iterations, and the medians of its compute and communication parts."""

    median_s: float
    max_s: float
    compute_s: float
    comm_s: float
    timed: int


def iteration_timings(out: Path, warmup: int) -> Timings | None:
    """The timings of a run folder after dropping ``warmup`` iterations, or None when
    nothing is left. Synchronous runs: per iteration the slowest rank (metrics.jsonl),
    then the median. Asynchronous runs: per rank the median (async_rank*.jsonl), then
    the slowest rank."""
    rank_logs = sorted(out.glob("async_rank*.jsonl"))
    if rank_logs:
        per_rank = []
        for log in rank_logs:
            rows = _jsonl(log)[warmup:]
            if rows:
                it = np.array([r["iteration_s"] for r in rows])
                comm = np.array([r["comm_s"] for r in rows])
                per_rank.append(Timings(float(np.median(it)), float(it.max()),
                                        float(np.median(it - comm)), float(np.median(comm)),
                                        len(rows)))
        if not per_rank:
            return None
        slowest = max(per_rank, key=lambda t: t.median_s)
        return Timings(slowest.median_s, max(t.max_s for t in per_rank), slowest.compute_s,
                       slowest.comm_s, min(t.timed for t in per_rank))
    rows = [r for r in _jsonl(out / "metrics.jsonl")
            if "t_compute_s" in r and r["iteration"] > warmup]
    if not rows:
        return None
    compute = np.array([r["t_compute_s"] for r in rows])
    comm = np.array([r["t_comm_s"] for r in rows])
    total = compute + comm
    return Timings(float(np.median(total)), float(total.max()), float(np.median(compute)),
                   float(np.median(comm)), len(rows))


def measure(root: Path, point: Point) -> Measured | None:
    """The point's timings, or None if it has not run (no summary.json)."""

    out = root / point.out
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    launch = _read_launch_env(out / "launch.env")
    t = iteration_timings(out, TIMING_WARMUP)
    if t is None:  # too few iterations to drop the warm-up: the run's own mean
        mean = summary["time_per_iteration_s"]
        t = Timings(mean, mean, summary["t_compute_s"], summary["t_comm_s"], 0)
    return Measured(point=point, parallel=summary.get("parallel", point.parallel),
                    launcher=launch.get("launcher", "unknown"),
                    cpus_on_node=int(launch.get("cpus_on_node") or os.cpu_count() or 1),
                    git_revision=launch.get("git_revision", point.git_revision),
                    iterations=int(summary["iterations"]), timed_iterations=t.timed,
                    t_iter_median_s=t.median_s, t_iter_max_s=t.max_s,
                    t_compute_s=t.compute_s, t_comm_s=t.comm_s,
                    bytes_reduced_per_iteration=int(summary["bytes_reduced_per_iteration"]),
                    stopped=summary.get("stopped"))

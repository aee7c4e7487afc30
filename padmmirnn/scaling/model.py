"""The communication model of a study, fitted to its measured points and projected to
more nodes.

The model fitted to the measured points (oversubscribed points excluded) is::

    t_iteration(P, N) = c * (N / P) * T + d  +  alpha * ceil(log2 P) + beta * 2 (P - 1) / P * B

with T the sequence length, B the bytes of the per-iteration reduction, c the compute
seconds per sample-step, d the per-iteration compute that does not shrink with P (the
replicated weight solves), alpha the latency of one reduction stage and beta the
seconds per byte (1 / bandwidth) of a bandwidth-optimal Allreduce. The reduction time is
measured as the time in the collective, so alpha also absorbs waiting for the slowest
rank (load imbalance, a shared machine's noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from padmmirnn.scaling.measure import Measured


def allreduce_seconds(ranks: int, nbytes: float, latency_s: float,
                      seconds_per_byte: float) -> float:
    """An Allreduce of ``nbytes`` over ``ranks``: ``alpha * ceil(log2 P) + beta * 2 (P - 1)
    / P * bytes`` (latency per stage, bandwidth-optimal volume); 0 on one rank."""
    if ranks == 1:
        return 0.0
    return (latency_s * math.ceil(math.log2(ranks))
            + seconds_per_byte * 2 * (ranks - 1) / ranks * nbytes)


@dataclass(frozen=True)
class Model:
    """Seconds per iteration as compute + reduction (see the module docstring)."""

    compute_per_sample_step_s: float
    compute_fixed_s: float
    latency_s: float
    seconds_per_byte: float
    bytes_per_iteration: int

    def compute(self, ranks: int, samples: int, steps: int) -> float:
        return self.compute_per_sample_step_s * samples / ranks * steps + self.compute_fixed_s

    def comm(self, ranks: int) -> float:
        return allreduce_seconds(ranks, self.bytes_per_iteration, self.latency_s,
                                 self.seconds_per_byte)

    def time(self, ranks: int, samples: int, steps: int) -> float:
        return self.compute(ranks, samples, steps) + self.comm(ranks)


def _nonnegative_fit(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0 for two unknowns: the best of the full fit (if
    non-negative) and each one-unknown fit."""
    candidates = []
    if np.linalg.matrix_rank(a) == a.shape[1]:
        x = np.linalg.lstsq(a, b, rcond=None)[0]
        if (x >= 0).all():
            candidates.append(x)
    for j in range(a.shape[1]):
        col = a[:, j]
        if col @ col > 0:
            x = np.zeros(a.shape[1])
            x[j] = max(col @ b / (col @ col), 0.0)
            candidates.append(x)
    if not candidates:
        return np.zeros(a.shape[1])
    return min(candidates, key=lambda x: float(np.sum((a @ x - b) ** 2)))


def fit_model(points: list[Measured], latency_s: float | None = None,
              bandwidth: float | None = None) -> tuple[Model, list[str]]:
    """Fit compute (c, d) and reduction (alpha, beta) to the points that are not
    oversubscribed; ``latency_s``/``bandwidth`` (bytes/s) replace the fitted values
    (e.g. the target cluster's interconnect). Returns the model and notes on the fit."""
    usable = [m for m in points if not m.oversubscribed] or points
    notes = [f"fitted to {len(usable)} of {len(points)} measured points"
             + (" (oversubscribed points excluded)" if len(usable) < len(points) else "")]
    work = np.array([m.point.samples / m.point.ranks * m.point.steps for m in usable], float)
    t_comp = np.array([m.t_compute_s for m in usable])
    c, d = _nonnegative_fit(np.column_stack([work, np.ones_like(work)]), t_comp)
    if len(set(work)) < 2:
        notes.append("one work size per rank only: all compute is taken as per-sample (d=0)")
    nbytes = max(m.bytes_reduced_per_iteration for m in points)
    multi = [m for m in usable if m.point.ranks > 1]
    stages = np.array([math.ceil(math.log2(m.point.ranks)) for m in multi], float)
    volume = np.array([2 * (m.point.ranks - 1) / m.point.ranks * m.bytes_reduced_per_iteration
                       for m in multi], float)
    t_comm = np.array([m.t_comm_s for m in multi])
    if not multi:
        alpha = beta = 0.0
        notes.append("no multi-rank point: the reduction cost is unknown (taken as 0)")
    else:
        design = np.column_stack([stages, volume])
        if np.linalg.matrix_rank(design) < 2:
            notes.append("latency and bandwidth cannot be told apart from these points (one "
                         "rank count, one message size): the reduction time is fitted as "
                         "latency; pass --bandwidth-gbs for a bandwidth term")
            design[:, 1] = 0.0
            if bandwidth:
                t_comm = t_comm - volume / bandwidth
        alpha, beta = _nonnegative_fit(design, t_comm)
    if latency_s is not None:
        alpha = latency_s
        notes.append(f"latency set to {latency_s * 1e6:g} us (not fitted)")
    if bandwidth:
        beta = 1.0 / bandwidth
        notes.append(f"bandwidth set to {bandwidth / 1e9:g} GB/s (not fitted)")
    return Model(float(c), float(d), float(alpha), float(beta), nbytes), notes


def projection(model: Model, kind: str, base: Measured, ranks_per_node: int,
               max_nodes: int) -> list[dict]:
    """The model's rows of the report at 1, 2, 4, ... up to ``max_nodes`` nodes with
    ``ranks_per_node`` ranks each, for the problem of ``base`` (the smallest measured
    point): its samples (strong) or its samples per rank (weak)."""
    rows = []
    nodes = 1
    while nodes <= max_nodes:
        ranks = nodes * ranks_per_node
        samples = base.point.samples // base.point.ranks * ranks if kind == "weak" else \
            base.point.samples
        t = model.time(ranks, samples, base.point.steps)
        rows.append({"source": "projected", "kind": kind, "name": f"{kind}-{ranks}r-{nodes}n",
                     "parallel": base.parallel, "git_revision": base.git_revision,
                     "launcher": "model", "nodes": nodes, "ranks": ranks,
                     "threads": base.point.threads, "oversubscribed": False,
                     "samples": samples, "steps": base.point.steps, "hidden": base.point.hidden,
                     "t_iter_median_s": t, "model_t_iter_s": t,
                     "t_compute_s": model.compute(ranks, samples, base.point.steps),
                     "t_comm_s": model.comm(ranks),
                     "bytes_reduced_per_iteration": model.bytes_per_iteration,
                     "samples_per_s": samples / t})
        nodes *= 2
    return rows

"""The report of a study: ``scaling.csv`` (the measured points next to the model's
projection, with speedup and efficiency), ``model.json`` (the fitted model) and a
Markdown summary; with matplotlib also ``scaling-{kind}.png``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from padmmirnn.errors import PadmmError
from padmmirnn.scaling.accuracy import FABRICS, parse_fabrics, report_accuracy
from padmmirnn.scaling.manifest import manifest_points, read_manifest
from padmmirnn.scaling.measure import Measured, measure
from padmmirnn.scaling.model import fit_model, projection
from padmmirnn.scaling.planning import KINDS
from padmmirnn.scaling.plots import plot_scaling

CSV_COLUMNS = ("source", "kind", "name", "parallel", "git_revision", "launcher", "nodes",
               "ranks", "threads", "oversubscribed", "samples", "steps", "hidden",
               "iterations", "timed_iterations", "t_iter_median_s", "t_iter_max_s",
               "t_compute_s", "t_comm_s", "bytes_reduced_per_iteration", "samples_per_s",
               "speedup", "efficiency", "model_t_iter_s", "stopped")


def _row(m: Measured) -> dict:
    p = m.point
    return {"source": "measured", "kind": p.kind, "name": p.name, "parallel": m.parallel,
            "git_revision": m.git_revision, "launcher": m.launcher, "nodes": p.nodes,
            "ranks": p.ranks, "threads": p.threads, "oversubscribed": m.oversubscribed,
            "samples": p.samples, "steps": p.steps, "hidden": p.hidden,
            "iterations": m.iterations, "timed_iterations": m.timed_iterations,
            "t_iter_median_s": m.t_iter_median_s, "t_iter_max_s": m.t_iter_max_s,
            "t_compute_s": m.t_compute_s, "t_comm_s": m.t_comm_s,
            "bytes_reduced_per_iteration": m.bytes_reduced_per_iteration,
            "samples_per_s": p.samples / m.t_iter_median_s, "stopped": m.stopped or ""}


def _scale(rows: list[dict], kind: str, base_ranks: int, base_time: float,
           key: str = "t_iter_median_s") -> None:
    """Speedup and efficiency against the smallest rank count (ideal: P / P0 and 1).
    Weak scaling: the speedup is the scaled one (throughput ratio)."""
    for r in rows:
        factor = r["ranks"] / base_ranks
        ratio = base_time / r[key]
        r["speedup"] = ratio * factor if kind == "weak" else ratio
        r["efficiency"] = r["speedup"] / factor


def report(directory: str, plots: bool = True, ranks_per_node: int | None = None,
           project_nodes: int = 64, latency_us: float | None = None,
           bandwidth_gbs: float | None = None, fabrics: str = FABRICS) -> list[str]:
    """Collect the measured points into ``scaling.csv`` next to the model's projection,
    write ``model.json`` and (with matplotlib) ``scaling-{kind}.png``; with accuracy
    points also the time to the target against rank count on each of ``fabrics``
    (:mod:`padmmirnn.scaling.accuracy`). Returns a Markdown summary."""
    fabric_list = parse_fabrics(fabrics)
    root = Path(directory).resolve()
    manifest = read_manifest(root)
    points = [p for p in manifest_points(manifest) if p.kind in KINDS]
    accuracy = [p for p in manifest_points(manifest) if p.kind == "accuracy"]
    lines = []
    if points:
        lines = _report_scaling(root, points, plots, ranks_per_node, project_nodes,
                                latency_us, bandwidth_gbs)
    if accuracy:
        lines += report_accuracy(root, accuracy, manifest.get("accuracy", {}), fabric_list,
                                 (ranks_per_node or 1) * project_nodes)
    return lines


def _report_scaling(root: Path, points: list, plots: bool, ranks_per_node: int | None,
                    project_nodes: int, latency_us: float | None,
                    bandwidth_gbs: float | None) -> list[str]:
    if plots:
        from padmmirnn.plots import require_matplotlib

        require_matplotlib()
    measured = [m for m in (measure(root, p) for p in points) if m is not None]
    missing = sorted({p.name for p in points} - {m.point.name for m in measured})
    if not measured:
        raise PadmmError(f"{root}: no point has run yet (no runs/*/summary.json)")
    model, notes = fit_model(measured, None if latency_us is None else latency_us * 1e-6,
                             None if bandwidth_gbs is None else bandwidth_gbs * 1e9)
    fitted = [m for m in measured if not m.oversubscribed] or measured
    rpn = ranks_per_node or max(math.ceil(m.point.ranks / m.point.nodes) for m in fitted)
    rows: list[dict] = []
    for kind in KINDS:
        group = sorted((m for m in measured if m.point.kind == kind),
                       key=lambda m: (m.point.ranks, m.point.nodes))
        if not group:
            continue
        base = group[0]
        measured_rows = [_row(m) for m in group]
        for m, r in zip(group, measured_rows, strict=True):
            r["model_t_iter_s"] = model.time(m.point.ranks, m.point.samples, m.point.steps)
        _scale(measured_rows, kind, base.point.ranks, base.t_iter_median_s)
        projected = projection(model, kind, base, rpn, project_nodes)
        _scale(projected, kind, base.point.ranks,
               model.time(base.point.ranks, base.point.samples, base.point.steps))
        rows += measured_rows + projected
    with open(root / "scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({k: _csv_value(r.get(k)) for k in CSV_COLUMNS} for r in rows)
    params = {"compute_per_sample_step_s": model.compute_per_sample_step_s,
              "compute_fixed_s": model.compute_fixed_s, "latency_s": model.latency_s,
              "bandwidth_bytes_per_s": (1.0 / model.seconds_per_byte
                                        if model.seconds_per_byte else None),
              "bytes_per_iteration": model.bytes_per_iteration,
              "ranks_per_node_projected": rpn, "notes": notes}
    (root / "model.json").write_text(json.dumps(params, indent=2) + "\n")
    lines = _markdown(rows, params)
    lines.append(f"\nwrote {root / 'scaling.csv'}, {root / 'model.json'}")
    if missing:
        lines.append(f"not run yet: {', '.join(missing)}")
    if plots:
        written = [plot_scaling([r for r in rows if r["kind"] == kind], kind, rpn,
                                root / f"scaling-{kind}.png")
                   for kind in KINDS if any(r["kind"] == kind for r in rows)]
        lines.append("wrote " + ", ".join(str(p) for p in written))
    return lines


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _markdown(rows: list[dict], params: dict) -> list[str]:
    head = ("| source | kind | nodes | ranks | samples | t/iter median [s] | t/iter max [s] | "
            "compute [s] | comm [s] | samples/s | speedup | efficiency | model [s] |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        source = r["source"] + (" (oversubscribed)" if r.get("oversubscribed") else "")
        lines.append("| " + " | ".join([
            source, r["kind"], str(r["nodes"]), str(r["ranks"]), str(r["samples"]),
            f"{r['t_iter_median_s']:.4g}",
            f"{r['t_iter_max_s']:.4g}" if r.get("t_iter_max_s") is not None else "",
            f"{r['t_compute_s']:.4g}", f"{r['t_comm_s']:.3g}", f"{r['samples_per_s']:.4g}",
            f"{r['speedup']:.3g}", f"{r['efficiency']:.3g}", f"{r['model_t_iter_s']:.4g}"])
            + " |")
    bw = params["bandwidth_bytes_per_s"]
    lines += ["", f"model: compute {params['compute_per_sample_step_s'] * 1e6:.4g} us per "
              f"sample-step per rank + {params['compute_fixed_s'] * 1e3:.4g} ms per iteration; "
              f"reduction latency {params['latency_s'] * 1e3:.4g} ms per stage, bandwidth "
              + (f"{bw / 1e9:.4g} GB/s" if bw else "not modelled")
              + f"; {params['bytes_per_iteration']} bytes reduced per iteration; projected "
              f"with {params['ranks_per_node_projected']} ranks per node"]
    lines += [f"  - {n}" for n in params["notes"]]
    return lines

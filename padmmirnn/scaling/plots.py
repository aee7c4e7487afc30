"""Plots of a study: speedup and efficiency against ranks, one figure per kind."""

from __future__ import annotations

from pathlib import Path


def plot_scaling(rows: list[dict], kind: str, ranks_per_node: int, path: Path) -> Path:
    """Speedup and efficiency against ranks: measured points (hollow when
    oversubscribed), the model's projection (dashed) and the ideal (dotted)."""
    from padmmirnn.plots import require_matplotlib

    plt = require_matplotlib()
    measured = [r for r in rows if r["source"] == "measured"]
    projected = [r for r in rows if r["source"] == "projected"]
    base = measured[0]["ranks"]
    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = sorted({r["ranks"] for r in rows})
    ideal = [x / base for x in xs]
    ax_s.plot(xs, ideal, ":", color="gray", label="ideal")
    ax_e.plot(xs, [1.0] * len(xs), ":", color="gray", label="ideal")
    for ax, key in ((ax_s, "speedup"), (ax_e, "efficiency")):
        ax.plot([r["ranks"] for r in projected], [r[key] for r in projected], "--",
                color="C1", marker=".", label=f"projected by the model ({ranks_per_node} "
                "ranks/node)")
        for over in (False, True):
            pts = [r for r in measured if bool(r["oversubscribed"]) == over]
            if pts:
                ax.plot([r["ranks"] for r in pts], [r[key] for r in pts], "o", color="C0",
                        markerfacecolor="none" if over else "C0", markersize=8,
                        label="measured, oversubscribed" if over else "measured")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"MPI ranks (nodes = ranks / {ranks_per_node} when projected)")
        ax.grid(alpha=0.3, which="both")
    ax_s.set_yscale("log", base=2)
    ax_s.set_ylabel("scaled speedup" if kind == "weak" else "speedup")
    ax_e.set_ylabel("parallel efficiency")
    ax_e.set_ylim(0, 1.2)
    ax_s.legend(fontsize=8)
    m0 = measured[0]
    what = (f"{m0['samples'] // m0['ranks']} samples per rank" if kind == "weak"
            else f"{m0['samples']} samples")
    fig.suptitle(f"{kind} scaling, {what}, T={m0['steps']}, hidden={m0['hidden']} "
                 f"({m0['parallel'] if m0['ranks'] > 1 else measured[-1]['parallel']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""PNG plots of training curves (matplotlib is an optional extra: ``padmmirnn[plot]``)."""

from __future__ import annotations

from pathlib import Path

from padmmirnn.errors import PadmmError


def require_matplotlib():
    """Import matplotlib with a non-interactive backend, or fail with one clear line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PadmmError("plots need matplotlib: pip install 'padmmirnn[plot]' "
                         "(or pass --no-plots)") from None
    return plt


def plot_curves(curves: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """Loss and accuracy (train dashed, test solid) against iterations and against
    wall time, one PNG per x axis; ``curves`` maps an algorithm to its metric rows."""
    plt = require_matplotlib()
    written = []
    for xkey, xlabel, name in (("iteration", "iteration (ADMM) / epoch (gradient methods)",
                                "curves_vs_iterations.png"),
                               ("wall_time_s", "wall time [s]", "curves_vs_time.png")):
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
        for algo, rows in curves.items():
            x = [r[xkey] for r in rows]
            line, = ax_loss.plot(x, [r["test_loss"] if r.get("test_loss") is not None
                                     else r["train_loss"] for r in rows], label=algo)
            ax_loss.plot(x, [r["train_loss"] for r in rows], "--", color=line.get_color(),
                         alpha=0.6)
            ax_acc.plot(x, [r["test_accuracy"] if r.get("test_accuracy") is not None
                            else r["train_accuracy"] for r in rows], color=line.get_color(),
                        label=algo)
            ax_acc.plot(x, [r["train_accuracy"] for r in rows], "--", color=line.get_color(),
                        alpha=0.6)
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel("loss (solid: test, dashed: train)")
        ax_acc.set_ylabel("accuracy (solid: test, dashed: train)")
        for ax in (ax_loss, ax_acc):
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        ax_acc.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written

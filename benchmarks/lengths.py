"""The ADMM configurations across sequence lengths: the default dataset's digits cut
into T = 1, 2, 4, 7, 14, 28 steps of 784 / T pixels (T = 1 is one 784-pixel step, the
setup of the public ADMMiRNN MNIST code), and the test accuracy each configuration
reaches: the faithful preset (its 30 iterations), the full-batch hybrid (its 60
iterations) and the mini-batch default (``--default-passes`` passes), serial.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

CONFIGS = (("faithful", ["--config", "faithful"]), ("fullbatch", ["--config", "fullbatch"]),
           ("default", []))


def cut(source: str, target: Path, steps: int) -> None:
    """Write the split ``source`` with every sequence re-cut into ``steps`` steps."""
    import h5py

    from padmmirnn.datafiles import write_dataset

    with h5py.File(source) as f:
        x = np.asarray(f["inputs"], np.float32)
        y = np.asarray(f["targets"])
        classes = int(f.attrs["classes"])
    n = x.shape[0]
    write_dataset(target, x.reshape(n, steps, -1), y, classes=classes, vocab=None,
                  source=f"{source} cut into {steps} steps", license="see the source")


def main() -> int:
    from benchmarks.common import run_job, table
    from padmmirnn import datafiles

    p = argparse.ArgumentParser(prog="python -m benchmarks lengths")
    p.add_argument("--out", default="runs/bench-lengths")
    p.add_argument("--steps", default="1,2,4,7,14,28")
    p.add_argument("--default-passes", type=int, default=20)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = datafiles.resolve("default")
    rows = []
    for steps in (int(v) for v in a.steps.split(",")):
        path = out / f"mnist{steps}_train.h5"
        cut(train, path, steps)
        cut(test, out / f"mnist{steps}_test.h5", steps)
        row = {"T": steps, "pixels_per_step": 784 // steps}
        for name, args in CONFIGS:
            extra = ["--iterations", str(a.default_passes)] if name == "default" else []
            summary = run_job(["--dataset", str(path), *args, *extra], 1,
                              out / f"{name}-T{steps}")
            row[f"{name}_test_accuracy"] = summary["test_accuracy"]
            row[f"{name}_s"] = summary["wall_time_s"]
        rows.append(row)
        print(table([row]), flush=True)
    print(table(rows))
    (out / "lengths.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0

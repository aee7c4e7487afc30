"""Helpers: run padmmirnn as a job and read what it wrote."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


def mpiexec() -> str:
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which(
        "mpiexec")
    if found is None:
        raise SystemExit("mpiexec not found: pip install 'padmmirnn[mpich]'")
    return found


def run_job(args: list[str], ranks: int, out: Path, timeout: float = 1800) -> dict:
    """Run ``padmmirnn train ARGS --out OUT`` on ``ranks`` processes; return summary.json."""
    cmd = [sys.executable, "-P", "-m", "padmmirnn", "train", *args, "--out", str(out)]
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"job failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def default_training_set():
    """The embedded default dataset's whole training split, in float64 (``LocalData``)."""
    import numpy as np

    from padmmirnn import datafiles

    train, _ = datafiles.resolve("default")
    info = datafiles.read_info(train)
    return datafiles.read_slice(info, 0, info.n, np.float64)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def table(rows: list[dict]) -> str:
    """A markdown table of ``rows`` with the keys of the first (missing values: -)."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(k) is None else f"{r[k]:.4g}"
                                       if isinstance(r[k], float) else str(r[k])
                                       for k in keys) + " |")
    return "\n".join(lines)

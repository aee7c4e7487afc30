"""What a run writes under ``--out``: metrics.jsonl, summary.json, config.toml.

Only rank 0 writes. ``summary.json`` and ``config.toml`` are written atomically;
``metrics.jsonl`` is a log, one flushed JSON line per evaluated iteration.
"""

from __future__ import annotations

import json
from pathlib import Path

from padmmirnn.atomic import atomic_write_text

# Iterations excluded from the timing summary and from scaling measurements
# (compilation, caches, first touch).
TIMING_WARMUP = 2


def _iteration(line: str) -> float:
    """The iteration of a metrics line; a line cut short by a killed job counts as none."""
    try:
        return json.loads(line)["iteration"] if line.endswith("\n") else float("inf")
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


class RunOutput:
    """The output folder of one run (a no-op on ranks other than 0)."""

    def __init__(self, directory: str | Path, active: bool, resume_after: int | None = None):
        """``resume_after``: a resumed run keeps the metrics lines up to that iteration
        (a killed run may have logged past its last checkpoint) and appends."""
        self.dir = Path(directory)
        self.active = active
        self._metrics = None
        if active:
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / "metrics.jsonl"
            kept = ""
            if resume_after is not None and path.exists():
                kept = "".join(line for line in path.read_text().splitlines(keepends=True)
                               if _iteration(line) <= resume_after)
            atomic_write_text(path, kept)
            self._metrics = open(path, "a")

    def path(self, name: str) -> Path:
        return self.dir / name

    def write_config(self, toml_text: str) -> None:
        if self.active:
            atomic_write_text(self.dir / "config.toml", toml_text)

    def metrics(self, record: dict) -> None:
        if self.active:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def summary(self, record: dict) -> None:
        if self.active:
            atomic_write_text(self.dir / "summary.json", json.dumps(record, indent=2) + "\n")

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

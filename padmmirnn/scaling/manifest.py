"""A study's manifest: its points (one job each) and how to read them back. The
module the others share (planning writes it; running, measuring and reporting read it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from padmmirnn.errors import PadmmError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Point:
    """One job of a study, as recorded in the manifest (paths relative to the study)."""

    name: str
    kind: str
    ranks: int
    nodes: int
    threads: int
    samples: int
    steps: int
    hidden: int
    parallel: str
    dataset: str
    out: str
    script: str
    train_args: tuple[str, ...]
    git_revision: str


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise PadmmError(f"{path}: no scaling study here (write one with padmmirnn scaling plan)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PadmmError(f"{path}: unreadable manifest ({exc})") from None


def manifest_points(manifest: dict) -> list[Point]:
    return [Point(**{**p, "train_args": tuple(p["train_args"])}) for p in manifest["points"]]

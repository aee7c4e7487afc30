"""What a split holds and how samples are cut over ranks: the in-memory side of the
data, free of file formats (no HDF5 here; the maths imports this, not the reader).

Each rank holds the contiguous slice ``[r N / p, (r + 1) N / p)`` of the global
sample order, time-major (docs/design.md, section 9).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset file holds, read from its header (no sample data)."""

    path: str
    n: int
    steps: int
    dim: int
    classes: int
    kind: str
    many_to_many: bool


@dataclass
class LocalData:
    """One rank's slice of a split, time-major.

    ``inputs`` is ``[T, n, d]`` (dense) or ``[T, n]`` int32 (tokens); ``targets``
    is ``[1, n]`` for many-to-one (the output step is t = T) or ``[T, n]``.
    """

    info: DatasetInfo
    inputs: np.ndarray
    targets: np.ndarray
    start: int
    stop: int

    @property
    def n(self) -> int:
        return self.stop - self.start

    def take(self, idx: np.ndarray) -> LocalData:
        """The samples at local positions ``idx`` (copies), e.g. a mini-batch; its
        ``start``/``stop`` count positions within the batch."""
        return LocalData(self.info, np.take(self.inputs, idx, axis=1),
                         np.take(self.targets, idx, axis=1), 0, len(idx))


def partition(n: int, size: int, rank: int) -> tuple[int, int]:
    """Contiguous block ``[start, stop)`` of rank ``rank`` out of ``size`` over ``n``."""
    return (rank * n) // size, ((rank + 1) * n) // size


def chunk_partition(n: int, chunk: int, size: int, rank: int) -> tuple[int, int]:
    """Like :func:`partition`, but every boundary falls on a multiple of ``chunk``
    (the deterministic-reduction mode, where work is done per global chunk)."""
    chunks = -(-n // chunk)
    lo, hi = partition(chunks, size, rank)
    return min(lo * chunk, n), min(hi * chunk, n)


def split_parts(local: LocalData, chunk: int | None) -> list[LocalData]:
    """Split a slice into parts of ``chunk`` samples (the last may be shorter), each
    in its own freshly allocated arrays; ``None`` keeps the slice whole."""
    if chunk is None or local.n <= chunk and local.start % chunk == 0:
        return [local]
    parts = []
    for lo in range(local.start, local.stop, chunk):
        hi = min(lo + chunk, local.stop)
        sl = slice(lo - local.start, hi - local.start)
        parts.append(LocalData(local.info, np.array(local.inputs[:, sl]),
                               np.array(local.targets[:, sl]), lo, hi))
    return parts

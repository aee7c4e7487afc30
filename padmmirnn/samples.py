"""What a split holds and how samples are cut over ranks: the in-memory side of the
data, free of file formats (no HDF5 here; the maths imports this, not the reader).

Each rank holds the contiguous slice ``[r N / p, (r + 1) N / p)`` of the global
sample order, time-major (docs/design.md, section 9). Sequences may be shorter than
the split's T: ``lengths[i] = L_i`` in [1, T] says that steps ``0 .. L_i - 1`` of
sample i are real and the rest is padding (``None``: every sample has length T).
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
    has_lengths: bool = False  # the file carries a ``lengths`` dataset

    def output_rows(self, n: int) -> int:
        """Labelled targets of ``n`` samples: one each, or T each when many-to-many (the
        padded steps of sequences with lengths counted too)."""
        return n * (self.steps if self.many_to_many else 1)


@dataclass
class LocalData:
    """One rank's slice of a split, time-major.

    ``inputs`` is ``[T, n, d]`` (dense) or ``[T, n]`` int32 (tokens); ``targets``
    is ``[1, n]`` for many-to-one (the output step is t = T) or ``[T, n]``;
    ``lengths`` is ``[n]`` int32 with values in [1, T] (steps ``0 .. L_i - 1`` real,
    the rest padding) or ``None`` (all T); the network's passes skip the padded steps
    (:func:`padmmirnn.nn.network.by_length`).
    """

    info: DatasetInfo
    inputs: np.ndarray
    targets: np.ndarray
    start: int
    stop: int
    lengths: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.stop - self.start

    def take(self, idx: np.ndarray) -> LocalData:
        """The samples at local positions ``idx`` (copies), e.g. a mini-batch; its
        ``start``/``stop`` count positions within the batch."""
        return LocalData(self.info, np.take(self.inputs, idx, axis=1),
                         np.take(self.targets, idx, axis=1), 0, len(idx),
                         None if self.lengths is None else np.take(self.lengths, idx))

    def step_lengths(self) -> np.ndarray:
        """``[n]`` lengths, T for every sample of a split without ``lengths``."""
        if self.lengths is None:
            return np.full(self.n, self.inputs.shape[0], np.int32)
        return self.lengths


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
                               np.array(local.targets[:, sl]), lo, hi,
                               None if local.lengths is None else np.array(local.lengths[sl])))
    return parts


def bucketed_batches(order: np.ndarray, lengths: np.ndarray, batch_size: int,
                     window: int, rng: np.random.Generator | None = None
                     ) -> list[np.ndarray]:
    """Mini-batches of sequences of similar length, drawn within a permutation.

    ``order`` is the pass's permutation of global sample indices, ``lengths`` the
    global ``[N]`` lengths (indexed by those indices). The permutation is cut into
    windows of ``window * batch_size`` consecutive entries; each window is sorted by
    decreasing length (stable: equal lengths keep the permutation's order) and cut
    into batches of ``batch_size`` (the pass's last batch may be shorter); ``rng``,
    when given, shuffles the order of the batches within each window (so that a
    pass does not run long-to-short within every window). The result depends only on
    ``order``, ``lengths`` and ``rng``, never on the rank count: with the same seeds
    every rank computes the same batches, and a synchronous run equals the serial one.
    Every batch holds its samples by decreasing length, so the samples still active
    at step t are a prefix of the batch (and of each rank's share of it). The batches
    together are ``order`` re-arranged: every index exactly once, and there are
    ``ceil(N / batch_size)`` of them, as without bucketing.
    """
    if batch_size < 1 or window < 1:
        raise ValueError("batch_size and window must be >= 1")
    order = np.asarray(order)
    span = batch_size * window
    batches: list[np.ndarray] = []
    for lo in range(0, len(order), span):
        block = order[lo:lo + span]
        block = block[np.argsort(-np.asarray(lengths)[block], kind="stable")]
        cut = [block[i:i + batch_size] for i in range(0, len(block), batch_size)]
        if rng is not None:
            cut = [cut[i] for i in rng.permutation(len(cut))]
        batches.extend(cut)
    return batches


def validation_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``round(fraction * n)`` of a file's ``n`` samples for validation.

    The held-out rows are the first ones of a permutation of ``0 .. n - 1`` seeded by
    ``(seed, n)``, so they depend on the file and the seed only, never on the rank
    count. Returns ``(train_rows, val_rows)``, both in increasing file order: each part
    keeps the file's order, and its own global order is the position in these arrays
    (the training part is then partitioned contiguously over ranks by that index, as
    a whole file is). Either may be empty; the caller checks that they can be split."""
    held = int(round(fraction * n))
    order = np.random.default_rng([seed, n, 0x56414C]).permutation(n)
    val = np.sort(order[:held])
    keep = np.ones(n, bool)
    keep[val] = False
    return np.flatnonzero(keep), val


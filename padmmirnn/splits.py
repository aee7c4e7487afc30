"""A run's data: this rank's slice of the training, validation and test splits, read
and checked the same way on every rank before the first collective that uses them.

A validation split is a file (``data.validation``) or a share of the training file
(``data.validation_fraction``): then the file's rows are divided by
:func:`~padmmirnn.samples.validation_rows` (seeded, independent of the rank count) and
each part is a split of its own, in file order, partitioned over the ranks by its own
global index; a rank reads the contiguous range of file rows that spans its slice and
keeps the rows of its part.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from padmmirnn import datafiles
from padmmirnn.comm import agree
from padmmirnn.errors import DataError
from padmmirnn.samples import (
    DatasetInfo,
    LocalData,
    chunk_partition,
    partition,
    split_parts,
    validation_rows,
)


@dataclass
class Split:
    """A rank's slice of one split, whole and cut into the engine's parts (fixed chunks
    of the global order with ``train.reduction = deterministic``, else the slice).

    ``info.n`` counts the split's samples (a part of a file when it is one of the two
    parts of a validation fraction); ``lengths`` are the ``[info.n]`` lengths of the
    whole split in its global order, on every rank (None: all T), e.g. to draw
    bucketed batches identically on every rank."""

    info: DatasetInfo
    local: LocalData
    parts: list[LocalData]
    lengths: np.ndarray | None = None
    rows: np.ndarray | None = None  # the file rows of the global order (None: all)
    file_info: DatasetInfo | None = None  # the whole file's, when ``rows`` are a part


def load_split(path: str, comm, dtype: np.dtype, chunk: int | None, what: str,
               rows: np.ndarray | None = None, info: DatasetInfo | None = None) -> Split:
    """Check the file and read this rank's slice (``chunk``: parts of that many samples
    in global order, else one part); a problem on any rank stops all. ``rows``: the
    split is these rows of the file (increasing; None: all of them), and its global
    order is their position."""
    if info is None:
        info = agree(comm, lambda: datafiles.read_info(path))
    n = info.n if rows is None else len(rows)
    units = -(-n // chunk) if chunk else n
    if units < comm.size:
        unit = f"chunks of {chunk} samples" if chunk else "samples"
        raise DataError(f"{path}: {units} {what} {unit} cannot be split over {comm.size} "
                        f"ranks (every rank needs at least one)")
    if chunk:
        start, stop = chunk_partition(n, chunk, comm.size, comm.rank)
    else:
        start, stop = partition(n, comm.size, comm.rank)
    lo, hi = (start, stop) if rows is None else (int(rows[start]), int(rows[stop - 1]) + 1)
    local = agree(comm, lambda: datafiles.read_slice(info, lo, hi, np.dtype(dtype)))
    lengths = datafiles.read_lengths(info)
    file_info = info
    if rows is not None:
        info = dataclasses.replace(info, n=n)
        local = dataclasses.replace(local.take(rows[start:stop] - lo), info=info,
                                    start=start, stop=stop)
        lengths = None if lengths is None else lengths[rows]
    return Split(info, local, split_parts(local, chunk), lengths, rows,
                 file_info if rows is not None else None)


def reslice(split: Split, comm, start: int, stop: int, dtype: np.dtype) -> Split:
    """This rank's new slice ``[start, stop)`` of the split's global order (rebalancing),
    read from its file like :func:`load_split`; a read error on any rank stops all."""
    file_info, rows = split.file_info or split.info, split.rows
    lo, hi = (start, stop) if rows is None else (int(rows[start]), int(rows[stop - 1]) + 1)
    local = agree(comm, lambda: datafiles.read_slice(file_info, lo, hi, np.dtype(dtype)))
    if rows is not None:
        local = dataclasses.replace(local.take(rows[start:stop] - lo), info=split.info,
                                    start=start, stop=stop)
    return dataclasses.replace(split, local=local, parts=[local])


def _check_matches(train: DatasetInfo, other: DatasetInfo, what: str) -> None:
    a, b = train, other
    if (a.kind, a.dim, a.classes, a.many_to_many) != (b.kind, b.dim, b.classes,
                                                       b.many_to_many):
        raise DataError(f"{b.path}: {what} split does not match training split {a.path} "
                        f"(kind {b.kind} vs {a.kind}, input size {b.dim} vs {a.dim}, "
                        f"classes {b.classes} vs {a.classes}, or target layout differ)")


def load_data(dataset: str, test: str, comm, dtype: np.dtype, chunk: int | None,
              validation: str = "", validation_fraction: float = 0.0, seed: int = 0
              ) -> tuple[Split, Split | None, Split | None]:
    """The training split, its test split and its validation split (each None when
    there is none), which must match the training split in kind, input size, classes
    and target layout. ``validation_fraction`` in (0, 1) holds that share of the
    training file out (drawn by ``seed``, the same for any rank count)."""
    train_path, test_path = agree(comm, lambda: datafiles.resolve(dataset, test))
    val = None
    if validation_fraction:
        info = agree(comm, lambda: datafiles.read_info(train_path))
        keep, held = validation_rows(info.n, validation_fraction, seed)
        for count, what in ((len(held), "validation"), (len(keep), "training")):
            units = -(-count // chunk) if chunk else count
            if units < comm.size:
                unit = f" in chunks of {chunk}" if chunk else ""
                raise DataError(f"{train_path}: data.validation_fraction = "
                                f"{validation_fraction} leaves {count} {what} samples of "
                                f"{info.n}{unit}, fewer than the {comm.size} rank(s) (every "
                                f"rank needs at least one of each)")
        train = load_split(train_path, comm, dtype, chunk, "training", keep, info)
        val = load_split(train_path, comm, dtype, chunk, "validation", held, info)
    else:
        train = load_split(train_path, comm, dtype, chunk, "training")
    if validation:
        val = load_split(validation, comm, dtype, chunk, "validation")
        _check_matches(train.info, val.info, "validation")
    tested = load_split(test_path, comm, dtype, chunk, "test") if test_path else None
    if tested is not None:
        _check_matches(train.info, tested.info, "test")
    return train, tested, val

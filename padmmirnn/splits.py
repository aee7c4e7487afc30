"""A run's data: this rank's slice of the training and test splits, read and checked
the same way on every rank before the first collective that uses them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from padmmirnn import datafiles
from padmmirnn.comm import agree
from padmmirnn.errors import DataError
from padmmirnn.samples import DatasetInfo, LocalData, chunk_partition, partition, split_parts


@dataclass
class Split:
    """A rank's slice of one split, whole and cut into the engine's parts (fixed chunks
    of the global order with ``train.reduction = deterministic``, else the slice)."""

    info: DatasetInfo
    local: LocalData
    parts: list[LocalData]


def load_split(path: str, comm, dtype: np.dtype, chunk: int | None, what: str) -> Split:
    """Check the file and read this rank's slice (``chunk``: parts of that many samples
    in global order, else one part); a problem on any rank stops all."""
    info = agree(comm, lambda: datafiles.read_info(path))
    units = -(-info.n // chunk) if chunk else info.n
    if units < comm.size:
        unit = f"chunks of {chunk} samples" if chunk else "samples"
        raise DataError(f"{path}: {units} {what} {unit} cannot be split over {comm.size} "
                        f"ranks (every rank needs at least one)")
    if chunk:
        start, stop = chunk_partition(info.n, chunk, comm.size, comm.rank)
    else:
        start, stop = partition(info.n, comm.size, comm.rank)
    local = agree(comm, lambda: datafiles.read_slice(info, start, stop, np.dtype(dtype)))
    return Split(info, local, split_parts(local, chunk))


def reslice(split: Split, comm, start: int, stop: int, dtype: np.dtype) -> Split:
    """This rank's new slice ``[start, stop)`` of an already checked split (rebalancing),
    read from its file; a read error on any rank stops all."""
    info = split.info
    local = agree(comm, lambda: datafiles.read_slice(info, start, stop, np.dtype(dtype)))
    return Split(info, local, [local])


def load_data(dataset: str, test: str, comm, dtype: np.dtype,
              chunk: int | None) -> tuple[Split, Split | None]:
    """The training split and its test split (if there is one), which must match it."""
    train_path, test_path = agree(comm, lambda: datafiles.resolve(dataset, test))
    train = load_split(train_path, comm, dtype, chunk, "training")
    tested = load_split(test_path, comm, dtype, chunk, "test") if test_path else None
    if tested is not None:
        a, b = train.info, tested.info
        if (a.kind, a.dim, a.classes, a.many_to_many) != (b.kind, b.dim, b.classes,
                                                           b.many_to_many):
            raise DataError(f"{test_path}: test split does not match training split "
                            f"{train_path} (kind, input size, classes or target layout "
                            f"differ)")
    return train, tested

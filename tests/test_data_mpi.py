"""Rank slices of prepared files under ``mpiexec -n 2`` (pytest-mpi): together the
ranks read every sample exactly once, and each slice holds the right samples."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from test_converters import write_idx_folder

from padmmirnn.converters import PrepareOptions, prepare
from padmmirnn.datafiles import read_info, read_slice
from padmmirnn.samples import partition

pytestmark = pytest.mark.mpi



def _prepared_files(folder: Path) -> list[str]:
    """Rank 0's files: an IDX pair (dense, odd N) and a character LM (tokens [N, T])."""
    write_idx_folder(folder / "idx", n=(13, 3))
    prepare(PrepareOptions("idx", str(folder / "img_train.h5"), source=str(folder / "idx")))
    text = folder / "corpus.txt.gz"
    text.write_bytes(gzip.compress(("the quick brown fox jumps over the lazy dog. " * 9)
                                   .encode()))
    prepare(PrepareOptions("text", str(folder / "lm_train.h5"), source=str(text), steps=8))
    return [str(folder / "img_train.h5"), str(folder / "lm_train.h5")]


def test_rank_slices_cover_each_sample_once(comm, tmp_path):
    assert comm.size == 2
    files = comm.allgather(_prepared_files(tmp_path) if comm.rank == 0 else None)[0]
    for path in files:
        info = read_info(path)
        start, stop = partition(info.n, comm.size, comm.rank)
        local = read_slice(info, start, stop, np.float64)
        assert local.inputs.shape[1] == local.targets.shape[1] == stop - start
        pieces = comm.allgather((start, stop, local.inputs, local.targets))
        covered = np.concatenate([np.arange(a, b) for a, b, _, _ in pieces])
        np.testing.assert_array_equal(covered, np.arange(info.n))  # once each, in order
        whole = read_slice(info, 0, info.n, np.float64)
        np.testing.assert_array_equal(np.concatenate([p[2] for p in pieces], axis=1),
                                      whole.inputs)
        np.testing.assert_array_equal(np.concatenate([p[3] for p in pieces], axis=1),
                                      whole.targets)
    comm.barrier()  # rank 0's files stay until every rank has read them

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


def _lengths_file(comm, folder: Path, n: int = 57) -> str:
    """Rank 0 writes a token split with lengths; every rank gets its path."""
    path = folder / "len_train.h5"
    if comm.rank == 0:
        from padmmirnn.datafiles import write_dataset

        rng = np.random.default_rng(1)
        lengths = rng.integers(1, 9, n)
        x = rng.integers(2, 6, (n, 8)).astype(np.int32)
        x[np.arange(8)[None, :] >= lengths[:, None]] = 0
        write_dataset(path, x, rng.integers(0, 3, n).astype(np.int32), classes=3, vocab=6,
                      lengths=lengths)
    return comm.allgather(str(path) if comm.rank == 0 else None)[0]


def _gathered(comm, split) -> tuple[np.ndarray, ...]:
    """The ranks' slices of a split put together in global order."""
    pieces = comm.allgather((split.local.start, split.local.stop, split.local.inputs,
                             split.local.targets, split.local.lengths))
    assert [p[0] for p in pieces] == [0] + [p[1] for p in pieces[:-1]]  # contiguous
    return tuple(np.concatenate([p[i] for p in pieces], axis=-1) for i in (2, 3, 4))


@pytest.mark.parametrize("chunk", [None, 5])
def test_validation_split_is_the_same_for_one_and_two_ranks(comm, tmp_path, chunk):
    from padmmirnn.comm import SerialComm
    from padmmirnn.splits import load_data

    path = _lengths_file(comm, tmp_path)
    serial = load_data(path, "", SerialComm(), np.float64, chunk, validation_fraction=0.3,
                       seed=7)
    both = load_data(path, "", comm, np.float64, chunk, validation_fraction=0.3, seed=7)
    for one, two in ((serial[0], both[0]), (serial[2], both[2])):
        assert one.info.n == two.info.n
        for a, b in zip((one.local.inputs, one.local.targets, one.local.lengths),
                        _gathered(comm, two), strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(one.lengths, two.lengths)  # global, on every rank
        if chunk:  # rank boundaries on chunk boundaries of the part's own order
            assert two.local.start % chunk == 0
    comm.barrier()


def test_a_fraction_that_leaves_a_rank_without_samples_stops_both(comm, tmp_path):
    from padmmirnn.errors import DataError
    from padmmirnn.splits import load_data

    path = _lengths_file(comm, tmp_path, n=20)
    with pytest.raises(DataError, match="leaves 1 validation samples of 20, fewer than the 2"):
        load_data(path, "", comm, np.float64, None, validation_fraction=0.05)
    comm.barrier()


def test_bucketed_gradient_batches_equal_serial(comm, tmp_path):
    from padmmirnn.comm import SerialComm
    from padmmirnn.config import load_config
    from padmmirnn.gradient.trainer import GradientTrainer
    from padmmirnn.splits import load_data

    path = _lengths_file(comm, tmp_path)
    cfg = load_config(overrides={"data.dataset": path, "train.algo": "adam",
                                 "train.bucket_window": 2, "optim.batch_size": 6,
                                 "model.hidden": 5})
    trainers = []
    for c in (SerialComm(), comm):
        train, _, _ = load_data(path, "", c, np.float64, None, validation_fraction=0.2)
        trainers.append(GradientTrainer(cfg, train.local, train.info.n, c,
                                        lengths=train.lengths))
    order = np.random.default_rng([0, 0]).permutation(trainers[0].n_global)
    for a, b in zip(*(t.batches(order) for t in trainers), strict=True):
        np.testing.assert_array_equal(a, b)
    for t in trainers:
        t.step()
        t.step()
    np.testing.assert_allclose(trainers[1].params.flat(), trainers[0].params.flat(),
                               rtol=1e-10, atol=1e-12)
    comm.barrier()

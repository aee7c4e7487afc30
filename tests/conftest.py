"""Shared fixtures: small random problems built in memory, and dataset files."""

from __future__ import annotations

import tempfile
import tomllib
from pathlib import Path

import numpy as np
import pytest

from padmmirnn.comm import MPIComm, launched_by_mpi, launcher_rank
from padmmirnn.config import preset_path
from padmmirnn.datafiles import write_dataset
from padmmirnn.samples import DatasetInfo, LocalData

# The faithful formulation (the packaged preset), as dotted overrides: tests of the
# ADMMiRNN block theory pin it, whatever the defaults are.
FAITHFUL = {f"admm.{k}": v for k, v in
            tomllib.loads(preset_path("faithful").read_text())["admm"].items()}
# The full-batch hybrid (the packaged preset): tests of the full-batch engine's
# defaults pin it, whatever the mini-batch defaults are.
FULLBATCH = {f"admm.{k}": v for k, v in
             tomllib.loads(preset_path("fullbatch").read_text())["admm"].items()}


def make_local(kind: str, many_to_many: bool, n: int = 12, steps: int = 5, dim: int = 4,
               classes: int = 3, seed: int = 0, dtype=np.float64) -> LocalData:
    """A random in-memory dataset slice (time-major, as the engine uses it)."""
    rng = np.random.default_rng(seed)
    info = DatasetInfo("memory", n, steps, dim, classes, kind, many_to_many)
    if kind == "dense":
        inputs = rng.standard_normal((steps, n, dim)).astype(dtype)
    else:
        inputs = rng.integers(0, dim, size=(steps, n)).astype(np.int32)
    targets = rng.integers(0, classes, size=(steps if many_to_many else 1, n)).astype(np.int32)
    return LocalData(info, inputs, targets, 0, n)


def write_random_split(path, kind="dense", many_to_many=False, n=40, steps=6, dim=5, classes=3,
                       seed=0):
    """Write a random split file in the canonical format (sample-major)."""
    rng = np.random.default_rng(seed)
    if kind == "dense":
        x = rng.standard_normal((n, steps, dim)).astype(np.float32)
        vocab = None
    else:
        x = rng.integers(0, dim, size=(n, steps)).astype(np.int32)
        vocab = dim
    y = rng.integers(0, classes, size=(n, steps) if many_to_many else (n,)).astype(np.int32)
    write_dataset(path, x, y, classes=classes, vocab=vocab, source="random", license="none")
    return x, y


def traced_peak(run) -> int:
    """Peak bytes that Python allocations reach during ``run()`` (tracemalloc), after one
    call that loads its compiled kernels."""
    import tracemalloc

    run()
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def pytest_configure(config):
    """Under mpiexec every rank gets its own temporary base directory: ranks sharing
    pytest's default one race to clean it up (a PytestWarning in the MPI stage)."""
    if launched_by_mpi() and config.option.basetemp is None:
        config.option.basetemp = str(Path(tempfile.gettempdir())
                                     / f"padmmirnn-pytest-rank{launcher_rank()}")


@pytest.fixture
def local_factory():
    return make_local


@pytest.fixture
def comm():
    """A duplicate of COMM_WORLD for tests run under ``mpiexec`` (pytest-mpi)."""
    c = MPIComm()
    yield c
    c.free()


def bench_module(name: str):
    """``benchmarks/NAME.py`` loaded as a module (the benchmarks are not a package that
    the tests import; their parsing and selection code is tested without training)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

"""Whole jobs under ``mpiexec -n 2``, launched from a serial test: results equal
the serial run, and errors end the job with a clear exit status, never a hang."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_random_split

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which(
    "mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found")


def _run(args, ranks=2, env=None, timeout=120):
    cmd = [sys.executable, "-P", "-m", "padmmirnn", *args]
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    full_env = {**os.environ, **(env or {})}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    return proc, time.monotonic() - t0


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["dense", "tokens"])
def test_two_rank_run_matches_serial_run(tmp_path, kind):
    write_random_split(tmp_path / "d_train.h5", kind, n=41, dim=6, seed=1)
    write_random_split(tmp_path / "d_test.h5", kind, n=13, dim=6, seed=2)
    common = ["train", "--dataset", str(tmp_path / "d_train.h5"), "--iterations", "4",
              "--set", "model.hidden=6"]
    serial, _ = _run([*common, "--out", str(tmp_path / "serial")], ranks=0)
    assert serial.returncode == 0, serial.stderr
    sp, _ = _run([*common, "--out", str(tmp_path / "sp")])
    assert sp.returncode == 0, sp.stderr
    summary = json.loads((tmp_path / "sp" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["parallel"] == "sync"
    assert summary["bytes_reduced_per_iteration"] > 0
    for a, b in zip(_metrics(tmp_path / "serial"), _metrics(tmp_path / "sp"), strict=True):
        for key in ("objective", "train_loss", "test_loss", "residual_a", "residual_o"):
            assert b[key] == pytest.approx(a[key], rel=1e-10), key
        assert b["train_accuracy"] == a["train_accuracy"]


def test_exception_on_one_rank_ends_the_job(tmp_path):
    write_random_split(tmp_path / "d_train.h5", n=30, seed=1)
    proc, seconds = _run(["train", "--dataset", str(tmp_path / "d_train.h5"), "--iterations",
                          "50", "--out", str(tmp_path / "o")],
                         env={"PADMMIRNN_FAULT_INJECT": "1:2"}, timeout=60)
    assert proc.returncode != 0
    assert seconds < 30
    assert "[rank 1/2] unhandled exception" in proc.stderr
    assert "fault injected" in proc.stderr


def test_more_ranks_than_samples_is_a_clear_error(tmp_path):
    write_random_split(tmp_path / "one_train.h5", n=1, seed=1)
    proc, _ = _run(["train", "--dataset", str(tmp_path / "one_train.h5"),
                    "--out", str(tmp_path / "o")])
    assert proc.returncode == 2
    assert "cannot be split over 2 ranks" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_bad_data_in_one_ranks_slice_stops_every_rank(tmp_path):
    path = tmp_path / "half_train.h5"
    x, _ = write_random_split(path, n=20, seed=1)
    x[15, 0, 0] = np.inf  # only rank 1 reads sample 15
    with h5py.File(path, "r+") as f:
        f["inputs"][...] = x
    proc, seconds = _run(["train", "--dataset", str(path), "--out", str(tmp_path / "o")],
                         timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("padmmirnn: error:")]
    assert len(lines) == 1 and "NaN or inf (first at sample 15)" in lines[0]
    assert "Traceback" not in proc.stderr

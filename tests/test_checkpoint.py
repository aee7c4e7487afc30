"""Checkpoints: atomic, verified, resumable bit for bit, on another rank count,
and written on a graceful stop (docs/design.md, section 8)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_random_split

from padmmirnn.checkpoint import find_latest, list_checkpoints, load_weights, verify_checkpoint
from padmmirnn.cli import main

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which(
    "mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found")


def _cmd(args, ranks):
    cmd = [sys.executable, "-P", "-m", "padmmirnn", *args]
    return [MPIEXEC, "-n", str(ranks), *cmd] if ranks else cmd


def _run(args, ranks=0, timeout=180):
    proc = subprocess.run(_cmd(args, ranks), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc


def _weights(out):
    return load_weights(out / "weights.h5")[0]


def _same(a, b, exact=True):
    for name, value in a.arrays().items():
        other = getattr(b, name)
        if exact:
            assert np.array_equal(value, other), name
        else:
            np.testing.assert_allclose(other, value, rtol=1e-9, atol=1e-11, err_msg=name)


@pytest.fixture
def toy(tmp_path):
    write_random_split(tmp_path / "toy_train.h5", n=33, steps=5, dim=4, seed=1)
    write_random_split(tmp_path / "toy_test.h5", n=9, steps=5, dim=4, seed=2)
    return ["--dataset", str(tmp_path / "toy_train.h5"), "--set", "model.hidden=6",
            "--config", "fullbatch", "--set", "admm.multipliers=all", "--set", "admm.warmup=1"]


# (algo, extra settings): full-batch ADMM (per-sample state), mini-batch ADMM (running
# Gram estimates, no per-sample state), a gradient method (optimizer moments)
ALGOS = {"admm": ("admm", []), "minibatch": ("admm", ["--set", "admm.batch_size=8"]),
         "adam": ("adam", [])}


@pytest.mark.parametrize("name", list(ALGOS))
def test_resume_is_bitwise_identical_serial(tmp_path, toy, name):
    algo, extra = ALGOS[name]
    common = [*toy, "--algo", algo, *extra, "--set", "optim.batch_size=8"]
    assert main(["train", *common, "--iterations", "6", "--out", str(tmp_path / "full")]) == 0
    part = tmp_path / "part"
    assert main(["train", *common, "--iterations", "3", "--checkpoint-every", "3",
                 "--out", str(part)]) == 0
    assert main(["train", *common, "--iterations", "6", "--resume", "latest",
                 "--out", str(part)]) == 0
    _same(_weights(tmp_path / "full"), _weights(part))
    rows = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((part / "summary.json").read_text())
    assert summary["resumed_from"].endswith("ckpt-00000003.h5")


@needs_mpi
@pytest.mark.parametrize("name", list(ALGOS))
def test_resume_is_bitwise_identical_two_ranks(tmp_path, toy, name):
    algo, extra = ALGOS[name]
    common = ["train", *toy, "--algo", algo, *extra, "--set", "optim.batch_size=8"]
    _run([*common, "--iterations", "5", "--out", str(tmp_path / "full")], ranks=2)
    part = tmp_path / "part"
    _run([*common, "--iterations", "2", "--checkpoint-every", "2", "--out", str(part)], ranks=2)
    _run([*common, "--iterations", "5", "--resume", "latest", "--out", str(part)], ranks=2)
    _same(_weights(tmp_path / "full"), _weights(part))


@needs_mpi
@pytest.mark.parametrize("first,second", [(2, 0), (0, 2)])
def test_resume_on_a_different_rank_count(tmp_path, toy, first, second):
    common = ["train", *toy]
    _run([*common, "--iterations", "6", "--out", str(tmp_path / "full")], ranks=first)
    part = tmp_path / "part"
    _run([*common, "--iterations", "3", "--checkpoint-every", "3", "--out", str(part)],
         ranks=first)
    with h5py.File(part / "checkpoints" / "ckpt-00000003.h5") as f:
        assert f.attrs["world_size"] == max(first, 1)
        assert f["state"]["A"].shape == (33, 5, 6)  # global sample order, all samples
    _run([*common, "--iterations", "6", "--resume", "latest", "--out", str(part)],
         ranks=second)
    # a different rank count sums in another order: equal to rounding, not bitwise
    _same(_weights(tmp_path / "full"), _weights(part), exact=False)


def test_truncated_newest_checkpoint_is_skipped(tmp_path, toy, caplog):
    out = tmp_path / "run"
    assert main(["train", *toy, "--iterations", "4", "--checkpoint-every", "2",
                 "--out", str(out)]) == 0
    newest, previous = list_checkpoints(out / "checkpoints")
    size = newest.stat().st_size
    with open(newest, "r+b") as f:
        f.truncate(size // 2)
    assert verify_checkpoint(newest) is not None
    assert find_latest(out / "checkpoints") == previous
    assert main(["train", *toy, "--iterations", "4", "--resume", "latest",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == str(previous) and summary["iterations"] == 4


def test_corrupted_bytes_are_detected(tmp_path, toy):
    out = tmp_path / "run"
    assert main(["train", *toy, "--iterations", "2", "--checkpoint-every", "2",
                 "--out", str(out)]) == 0
    path = list_checkpoints(out / "checkpoints")[0]
    with h5py.File(path, "r") as f:
        offset = f["state"]["A"].id.get_offset() or f["state"]["A"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as f:
        f.seek(offset + 8)
        byte = f.read(1)
        f.seek(offset + 8)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert verify_checkpoint(path) is not None


def _kill_while_writing(out: Path) -> bool:
    """Start a run that checkpoints every iteration and SIGKILL it as soon as a
    checkpoint is being written; True if the kill landed mid-write (a .tmp remains)."""
    proc = subprocess.Popen(_cmd(["train", "--iterations", "40", "--checkpoint-every", "1",
                                  "--keep-checkpoints", "5", "--out", str(out)], 0),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = out / "checkpoints"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if ckpts.is_dir() and list_checkpoints(ckpts) and any(
                    p.name.endswith(".tmp") for p in ckpts.iterdir()):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        else:
            pytest.fail("never saw a checkpoint being written")
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return any(p.name.endswith(".tmp") for p in ckpts.iterdir())


def test_sigkill_while_writing_leaves_previous_checkpoint_usable(tmp_path):
    """Kill the job while a checkpoint is being written (its temporary file exists).
    The writer may finish its rename between our look and the kill: try again then."""
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        if _kill_while_writing(out):
            break
    else:
        pytest.fail("the kill never landed while a checkpoint was being written")
    ckpts = out / "checkpoints"
    latest = find_latest(ckpts)
    assert latest is not None and verify_checkpoint(latest) is None
    # the half-written temporary file is never taken for a checkpoint
    assert all(p.name.startswith("ckpt-") for p in list_checkpoints(ckpts))


def _rank_pid(out: Path, rank: int, timeout: float = 60) -> int:
    """PID of the training process of ``rank`` whose command line names ``out``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(out).encode() in cmd and b"padmmirnn" in cmd and \
                    f"PMI_RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError("rank process not found")


@pytest.mark.parametrize("ranks", [0, pytest.param(2, marks=needs_mpi)])
def test_sigterm_checkpoints_and_exits_zero(tmp_path, toy, ranks):
    out = tmp_path / "run"
    args = ["train", *toy, "--iterations", "100000", "--out", str(out)]
    proc = subprocess.Popen(_cmd(args, ranks), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and
                   len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        target = _rank_pid(out, 1) if ranks else proc.pid
        os.kill(target, signal.SIGTERM)  # one rank only: all must agree to stop
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err and "--resume latest" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "SIGTERM"
    latest = find_latest(out / "checkpoints")
    with h5py.File(latest) as f:
        assert f.attrs["iteration"] == summary["iterations"]
    done = summary["iterations"]
    assert main(["train", *toy, "--iterations", str(done + 2), "--resume", "latest",
                 "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["iterations"] == done + 2


def test_max_walltime_checkpoints_and_exits_zero(tmp_path, toy):
    out = tmp_path / "run"
    assert main(["train", *toy, "--iterations", "100000", "--max-walltime", "0.5",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"].startswith("--max-walltime")
    assert find_latest(out / "checkpoints") is not None
    # a resubmitted job has its own walltime: the time before the checkpoint (more
    # than the limit) does not stop it at once
    done = summary["iterations"]
    assert main(["train", *toy, "--iterations", str(done + 2), "--max-walltime", "0.5",
                 "--resume", "latest", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == done + 2 and summary["stopped"] is None


def test_config_mismatch_is_refused_unless_forced(tmp_path, toy, capsys):
    out = tmp_path / "run"
    assert main(["train", *toy, "--iterations", "2", "--checkpoint-every", "2",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    changed = [*toy, "--set", "admm.rho1=0.5", "--iterations", "3", "--resume", "latest",
               "--out", str(out)]
    assert main(["train", *changed]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("padmmirnn: error: checkpoint") and "different configuration" in err
    assert main(["train", *changed, "--force"]) == 0


def test_inspect_and_evaluate_checkpoint(tmp_path, toy, capsys):
    out = tmp_path / "run"
    assert main(["train", *toy, "--iterations", "2", "--checkpoint-every", "2",
                 "--out", str(out)]) == 0
    path = list_checkpoints(out / "checkpoints")[0]
    capsys.readouterr()
    assert main(["checkpoint", "inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "integrity: ok" in text and "state/A: (33, 5, 6)" in text and "iteration: 2" in text
    assert main(["evaluate", "--checkpoint", str(path)]) == 0
    result = json.loads(capsys.readouterr().out)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["accuracy"] == pytest.approx(last["test_accuracy"], abs=1e-12)


def test_resume_from_an_earlier_checkpoint_prunes_the_abandoned_ones(tmp_path, toy):
    out = tmp_path / "run"
    assert main(["train", *toy, "--iterations", "6", "--checkpoint-every", "2",
                 "--keep-checkpoints", "5", "--out", str(out)]) == 0
    names = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert names == ["ckpt-00000006.h5", "ckpt-00000004.h5", "ckpt-00000002.h5"]
    earlier = out / "checkpoints" / "ckpt-00000002.h5"
    assert main(["train", *toy, "--iterations", "3", "--checkpoint-every", "3",
                 "--keep-checkpoints", "1", "--resume", str(earlier), "--out", str(out)]) == 0
    # the checkpoint just written is kept; 4 and 6 belonged to the abandoned run
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["ckpt-00000003.h5"]


def test_resume_tolerates_a_metrics_line_cut_by_a_kill(tmp_path, toy):
    out = tmp_path / "run"
    assert main(["train", *toy, "--iterations", "2", "--checkpoint-every", "2",
                 "--out", str(out)]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "train_lo')  # what a SIGKILL mid-write leaves
    assert main(["train", *toy, "--iterations", "3", "--resume", "latest",
                 "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]


def _gated(tmp_path, cell):
    """A gated, stacked model on the toy data: mini-batch ADMM keeps one running Gram per
    layer (gram_in, gram_in_1) beside the output block's."""
    write_random_split(tmp_path / "toy_train.h5", n=33, steps=5, dim=4, seed=1)
    write_random_split(tmp_path / "toy_test.h5", n=9, steps=5, dim=4, seed=2)
    return ["--dataset", str(tmp_path / "toy_train.h5"), "--set", "model.hidden=6",
            "--set", f"model.cell={cell}", "--set", "model.layers=2",
            "--set", "admm.batch_size=8", "--set", "optim.batch_size=8"]


@pytest.mark.parametrize("cell,algo", [("gru", "admm"), ("lstm", "admm"), ("lstm", "adam")])
def test_gated_resume_is_bitwise_identical_serial(tmp_path, cell, algo):
    common = [*_gated(tmp_path, cell), "--algo", algo]
    assert main(["train", *common, "--iterations", "4", "--out", str(tmp_path / "full")]) == 0
    part = tmp_path / "part"
    assert main(["train", *common, "--iterations", "2", "--checkpoint-every", "2",
                 "--out", str(part)]) == 0
    with h5py.File(part / "checkpoints" / "ckpt-00000002.h5") as f:
        assert "W_1" in f["weights"] and (cell != "gru" or "bh_1" in f["weights"])
        if algo == "admm":
            assert {"gram_in.rest", "gram_in_1.rest", "gram_out.rest"} <= set(f["optimizer"])
            assert f["optimizer"]["gram_in_1.rest"].shape == (13, 13)  # [s^0; 1; s^1]
    assert main(["train", *common, "--iterations", "4", "--resume", "latest",
                 "--out", str(part)]) == 0
    full, resumed = _weights(tmp_path / "full"), _weights(part)
    assert full.names() == resumed.names()
    _same(full, resumed)


@needs_mpi
@pytest.mark.parametrize("first,second", [(2, 0), (0, 2)])
def test_gated_resume_on_a_different_rank_count(tmp_path, first, second):
    common = ["train", *_gated(tmp_path, "lstm")]
    _run([*common, "--iterations", "4", "--out", str(tmp_path / "full")], ranks=first)
    part = tmp_path / "part"
    _run([*common, "--iterations", "2", "--checkpoint-every", "2", "--out", str(part)],
         ranks=first)
    with h5py.File(part / "checkpoints" / "ckpt-00000002.h5") as f:
        assert f.attrs["world_size"] == max(first, 1)
    _run([*common, "--iterations", "4", "--resume", "latest", "--out", str(part)],
         ranks=second)
    _same(_weights(tmp_path / "full"), _weights(part), exact=False)

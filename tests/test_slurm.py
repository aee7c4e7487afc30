"""slurm/train.sbatch and the scaling scripts on a real Slurm, started on localhost.

The fixture (``tests/slurm_cluster.py``) installs the Debian packages if they are
missing (root and apt-get needed, else the tests are skipped with the reason), starts
its own munged, slurmctld and slurmd on free ports with every file under a temporary
folder, and stops them by the PIDs in their pid files at the end, also when a test
fails. Serial stage only (the jobs start their own MPI ranks).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import pytest
from conftest import write_random_split
from slurm_cluster import Node, SlurmCluster, install_reason

from padmmirnn.checkpoint import find_latest

REPO = Path(__file__).resolve().parents[1]
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
NODE = "padmmnode"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm():
    reason = install_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="padmm-slurm-"))  # short: munge's socket path
    root.chmod(0o755)
    cluster = SlurmCluster(root, [Node(NODE, socket.gethostname(), "127.0.0.1")])
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def toy(slurm, tmp_path):
    path = tmp_path / "toy_train.h5"
    write_random_split(path, n=200, steps=10, dim=6, seed=1)
    return ["--dataset", str(path), "--set", "model.hidden=8"]


def _sbatch(slurm, args: list[str], timeout: float = 150) -> subprocess.CompletedProcess:
    return slurm.run(["timeout", str(int(timeout)), "sbatch", *args], timeout=timeout + 10)


def test_train_sbatch_two_ranks_with_srun(slurm, toy, tmp_path):
    out = tmp_path / "run"
    proc = _sbatch(slurm, ["--wait", "--parsable", f"--output={tmp_path / 'job.out'}",
                           "--time=5", str(TRAIN_SBATCH), *toy, "--iterations", "6",
                           "--out", str(out)])
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert proc.returncode == 0, proc.stderr + log  # sbatch --wait: the job's exit code
    info = slurm.job(proc.stdout.strip().split(";")[0])
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["parallel"] == "sync"  # one 2-rank job
    assert summary["iterations"] == 6
    assert (out / "weights.h5").is_file() and (out / "metrics.jsonl").is_file()
    launch = (out / "launch.env").read_text()
    assert "launcher=srun" in launch and "ranks=2" in launch and "exit_code=0" in launch
    cache = slurm.root / "numba"
    assert {p.name for p in cache.iterdir()} >= {"rank0", "rank1"}  # one cache per rank
    assert "finished with exit code 0" in log


def test_walltime_signal_checkpoints_exits_zero_and_resubmit_resumes(slurm, toy, tmp_path):
    out = tmp_path / "run"
    cmd = [f"--output={tmp_path / 'job.out'}", "--time=5", str(TRAIN_SBATCH), *toy,
           "--out", str(out)]
    proc = _sbatch(slurm, ["--parsable", *cmd, "--iterations", "1000000"], timeout=30)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert slurm.job(job_id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
            (tmp_path / "job.out").read_text()
        assert time.monotonic() < deadline, "the job did not start iterating"
        time.sleep(0.2)
    # What Slurm does at --signal=B:USR1@...: signal the batch shell only.
    sent = slurm.run(["scancel", "--signal=USR1", "--batch", job_id])
    assert sent.returncode == 0, sent.stderr
    info = slurm.wait_ended(job_id, timeout=60)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "received SIGUSR1: forwarding it to the ranks" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "SIGUSR1" and summary["ranks"] == 2
    done = summary["iterations"]
    with h5py.File(find_latest(out / "checkpoints")) as f:
        assert f.attrs["iteration"] == done
    # The same command again continues from the checkpoint (--resume latest is implied).
    again = _sbatch(slurm, ["--wait", *cmd, "--iterations", str(done + 2)])
    assert again.returncode == 0, again.stderr + (tmp_path / "job.out").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == done + 2 and summary["resumed_from"]


def test_scaling_point_script_with_mpiexec(slurm, toy, tmp_path):
    study = tmp_path / "study"
    plan = subprocess.run(
        [sys.executable, "-P", "-m", "padmmirnn", "scaling", "plan", "--kind", "weak",
         "--ranks", "2", "--samples-per-rank", "60", "--dataset", toy[1], "--iterations", "5",
         "--set", "model.hidden=8", "--launcher", "mpiexec", "--time", "5",
         "--slurm-dir", str(TRAIN_SBATCH.parent), "--out", str(study)],
        capture_output=True, text=True, timeout=120, env=slurm.env)
    assert plan.returncode == 0, plan.stderr
    proc = _sbatch(slurm, ["--wait", str(study / "weak-2r-1n.sbatch")])
    logs = "".join(p.read_text() for p in (study / "logs").glob("*.out"))
    assert proc.returncode == 0, proc.stderr + logs
    run = study / "runs" / "weak-2r-1n"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["iterations"] == 5
    assert "launcher=mpiexec" in (run / "launch.env").read_text()
    report = subprocess.run([sys.executable, "-P", "-m", "padmmirnn", "scaling", "report",
                             str(study), "--no-plots"],
                            capture_output=True, text=True, timeout=120, env=slurm.env)
    assert report.returncode == 0, report.stderr
    rows = (study / "scaling.csv").read_text().splitlines()
    assert any(r.startswith("measured,weak,weak-2r-1n,sync,") for r in rows)

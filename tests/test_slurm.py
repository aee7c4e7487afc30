"""slurm/train.sbatch and the scaling scripts on a real Slurm, started on localhost.

The fixture installs the Debian packages if they are missing (root and apt-get needed,
else the tests are skipped with the reason), starts its own munged, slurmctld and
slurmd on free ports with every file under a temporary folder, and stops them by the
PIDs in their pid files at the end, also when a test fails. Serial stage only (the
jobs start their own MPI ranks).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import pytest
from conftest import write_random_split

from padmmirnn.checkpoint import find_latest

REPO = Path(__file__).resolve().parents[1]
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scancel", "scontrol", "sinfo", "squeue")
SEARCH_PATH = os.pathsep.join([str(Path(sys.executable).parent), "/usr/sbin", "/usr/bin",
                               "/sbin", "/bin", os.environ.get("PATH", "")])
NODE = "padmmnode"

pytestmark = pytest.mark.slow


def _missing() -> list[str]:
    return [b for b in DAEMONS + CLIENTS if shutil.which(b, path=SEARCH_PATH) is None]


def _install() -> str | None:
    """Install Slurm and munge with apt-get if needed; the reason to skip, or None."""
    if os.geteuid() != 0:
        return "a local Slurm needs root (munged, slurmctld and slurmd run as root here)"
    if not _missing():
        return None
    if shutil.which("apt-get", path=SEARCH_PATH) is None:
        return f"Slurm is not installed ({', '.join(_missing())} missing) and apt-get is not here"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(cmd[:2])} failed: {exc}"
        if proc.returncode != 0:
            return f"{' '.join(cmd[:2])} exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
    return f"still missing after apt-get: {', '.join(_missing())}" if _missing() else None


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalSlurm:
    """A one-node Slurm cluster (2 CPUs) whose state lives in ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.pid_files = {"slurmd": root / "slurmd.pid", "slurmctld": root / "slurmctld.pid",
                          "munged": root / "munge" / "munged.pid"}
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "PMI_", "PMIX_"))}
        self.env = {**env, "SLURM_CONF": str(self.conf), "PATH": SEARCH_PATH,
                    "PADMMIRNN_PYTHON": sys.executable,
                    "PADMMIRNN_NUMBA_CACHE": str(root / "numba")}

    def start(self) -> None:
        munge = self.root / "munge"
        for sub in (munge, self.root / "state", self.root / "spool", self.root / "log"):
            sub.mkdir(mode=0o755)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self._daemon(["munged", "--force", f"--socket={munge / 'munge.sock'}",
                      f"--key-file={key}", f"--pid-file={self.pid_files['munged']}",
                      f"--log-file={munge / 'munged.log'}",
                      f"--seed-file={munge / 'munged.seed'}"])
        ctld_port, slurmd_port = _free_ports(2)
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=padmmtest", "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={munge / 'munge.sock'}", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "ReturnToService=2",
            "KillWait=5", "InactiveLimit=0",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            f"NodeName={NODE} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs=2 "
            "State=UNKNOWN",
            f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP", ""]))
        self._daemon(["slurmctld", "-f", str(self.conf)])
        self._daemon(["slurmd", "-f", str(self.conf), "-N", NODE])
        deadline = time.monotonic() + 30
        while self.run(["sinfo", "-h", "-n", NODE, "-o", "%T"]).stdout.strip() != "idle":
            if time.monotonic() > deadline:
                raise RuntimeError("the Slurm node did not become idle in 30 s:\n"
                                   + self.logs())
            time.sleep(0.3)

    def _daemon(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=self.env)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {proc.stderr}\n"
                               + self.logs())

    def run(self, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=self.env)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, ...)."""
        line = self.run(["scontrol", "-o", "show", "job", job_id]).stdout
        return dict(f.split("=", 1) for f in line.split() if "=" in f)

    def wait_ended(self, job_id: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id)).get("JobState") in ("PENDING", "RUNNING",
                                                               "COMPLETING", "CONFIGURING"):
            assert time.monotonic() < deadline, f"job {job_id} still {info.get('JobState')}"
            time.sleep(0.3)
        return info

    def logs(self) -> str:
        parts = []
        for log in sorted(self.root.glob("log/*.log")) + [self.root / "munge" / "munged.log"]:
            if log.is_file():
                parts.append(f"== {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons by the PIDs in their pid files."""
        if self.conf.exists() and self.pid_files["slurmctld"].exists():
            try:
                self.run(["scancel", f"--user={os.getuid()}"])
                deadline = time.monotonic() + 20
                while self.run(["squeue", "-h"]).stdout.strip() and time.monotonic() < deadline:
                    time.sleep(0.3)
            except (OSError, subprocess.SubprocessError):
                pass
        for name, pid_file in self.pid_files.items():
            try:
                pid = int(pid_file.read_text().split()[0])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
            if name.encode() not in cmdline:  # not ours any more (PID reused)
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def slurm():
    reason = _install()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="padmm-slurm-"))  # short: munge's socket path
    root.chmod(0o755)
    cluster = LocalSlurm(root)
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

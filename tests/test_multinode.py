"""Two Slurm nodes on one machine (``tests/slurm_cluster.py``): network namespaces
joined by a bridge, one slurmd per namespace with its own hostname and address, ranks
started by ``srun -N 2 --ntasks-per-node=1 --mpi=pmi2`` (or Hydra's mpiexec inside the
allocation), MPI between them over TCP.
MPICH uses its OFI network module over libfabric's TCP provider (``Bridge.ENV``: UCX
would find the shared memory between the namespaces, and its address exchange fails
under Slurm's PMI2 now and then). The two namespaces share this machine's 2 cores (one CPU
per node)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import h5py
import pytest
from conftest import write_random_split
from slurm_cluster import PMI2_STARTUP_FAILURE, Bridge, SlurmCluster, install_reason

from padmmirnn.checkpoint import find_latest, verify_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
PROBE = REPO / "tests" / "rma_probe.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    reason = install_reason() or Bridge.skip_reason()
    if reason:
        pytest.skip(reason)
    bridge = Bridge(2)
    root = Path(tempfile.mkdtemp(prefix="padmm-2n-"))
    root.chmod(0o755)
    c = SlurmCluster(root, bridge.nodes(cpus=1), (socket.gethostname(), bridge.host_addr),
                     Bridge.ENV)
    c.bridge = bridge
    try:
        bridge.up()
        c.start()
        yield c
        if c.startup_retries:
            warnings.warn(f"{c.startup_retries} job(s) failed at MPI start-up "
                          f"({PMI2_STARTUP_FAILURE!r}) and ran again", stacklevel=1)
    finally:
        c.stop()
        bridge.down()
        shutil.rmtree(root, ignore_errors=True)


def _srun(cluster, args: list[str], nodes: int = 2, timeout: float = 180):
    cmd = ["timeout", str(int(timeout)), "srun", "-N", str(nodes), "--ntasks-per-node=1",
           "--mpi=pmi2", "--kill-on-bad-exit=1", sys.executable, "-P", *args]
    return cluster.run_job(cmd, timeout=timeout + 10)


def _train(cluster, args: list[str], out: Path, nodes: int = 2):
    proc = _srun(cluster, ["-m", "padmmirnn", "train", *args, "--out", str(out)], nodes)
    assert proc.returncode == 0, proc.stderr[-3000:] + cluster.logs()
    return json.loads((out / "summary.json").read_text())


def _serial(cluster, args: list[str], out: Path):
    proc = cluster.run([sys.executable, "-P", "-m", "padmmirnn", "train", *args,
                        "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> bytes:
    with h5py.File(out / "weights.h5") as f:
        return b"".join(f[k][()].tobytes() for k in ("U", "W", "b", "V", "c"))


def test_the_ranks_are_on_two_hosts(cluster):
    proc = _srun(cluster, ["-c", "from mpi4py import MPI; import socket; "
                                 "print(MPI.COMM_WORLD.Get_rank(), socket.gethostname(), "
                                 "MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED).Get_size())"])
    assert proc.returncode == 0, proc.stderr
    rows = sorted(line.split() for line in proc.stdout.splitlines())
    assert [r[1] for r in rows] == ["n1", "n2"] and [r[2] for r in rows] == ["1", "1"]


def test_sp_across_two_nodes_equals_serial(cluster, tmp_path):
    """SP over TCP equals the serial run to 1e-10; with deterministic reduction bitwise."""
    common = ["--iterations", "3", "--set", "model.hidden=16"]
    _serial(cluster, common, tmp_path / "serial")
    s = _train(cluster, common, tmp_path / "sp")
    assert s["ranks"] == 2 and s["parallel"] == "sync"
    for a, b in zip(_metrics(tmp_path / "serial"), _metrics(tmp_path / "sp"), strict=True):
        for key in ("batch_loss", "train_loss", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-10), key
    det = [*common, "--set", "train.reduction=deterministic", "--set", "train.chunk=32"]
    _serial(cluster, det, tmp_path / "det1")
    _train(cluster, det, tmp_path / "det2")
    assert _weights(tmp_path / "det1") == _weights(tmp_path / "det2")


def _on_two_nodes_and_one(cluster, args, tmp_path, one_args=None):
    """The summaries of one 2-rank job across the two nodes and of the same job (or the
    job ``one_args``) with both ranks on one host."""
    two = _train(cluster, args, tmp_path / "two")
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent))
    proc = cluster.run([mpiexec, "-n", "2", sys.executable, "-P", "-m", "padmmirnn", "train",
                        *(args if one_args is None else one_args),
                        "--out", str(tmp_path / "one")], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return two, json.loads((tmp_path / "one" / "summary.json").read_text())


def test_ap_across_two_nodes_matches_one_node(cluster, tmp_path):
    """AP, staleness 2, the full-batch preset, 60 iterations on the default dataset:
    at most 1 point below the synchronous run of the same preset on one host; and rank
    1's one-sided reads complete while rank 0 (the window host) computes (its progress
    thread)."""
    common = ["--config", "fullbatch", "--iterations", "60"]
    two, one = _on_two_nodes_and_one(cluster, [*common, "--parallel", "async",
                                               "--staleness", "2"], tmp_path, common)
    assert two["parallel"] == "async" and two["iterations"] == 60
    assert one["parallel"] == "sync"
    # AP is not deterministic (on one host 87.9-88.4% over four runs, 2026-12-03): the
    # reference is the deterministic synchronous run (87.9%), not a second AP run, whose
    # own spread doubles the noise; the nodes must not cost more than 1 point
    assert two["test_accuracy"] >= one["test_accuracy"] - 0.01, (two, one)
    probe = _srun(cluster, [str(PROBE), "host_computes"])
    assert probe.returncode == 0, probe.stderr
    reads = [r["seconds"] for r in json.loads(probe.stdout.splitlines()[-1]) if r["seconds"]]
    assert len(reads[0]) == 5 and max(reads[0]) < 0.25, reads


def test_ap_consensus_across_two_nodes_matches_one_node(cluster, tmp_path):
    """AP on the default (mini-batch consensus through the window), staleness 2, 3
    passes on the default dataset with rank 0 evaluating the snapshot every pass: at most
    2 points below the same job on one host."""
    two, one = _on_two_nodes_and_one(cluster, ["--parallel", "async", "--staleness", "2",
                                               "--iterations", "3",
                                               "--set", "train.eval_every=1"], tmp_path)
    assert two["parallel"] == "async" and two["iterations"] == 3
    assert two["test_accuracy"] >= one["test_accuracy"] - 0.02, (two, one)


def test_checkpoints_move_between_two_nodes_and_one(cluster, tmp_path):
    """A checkpoint of a 2-node job resumes on 1 node and one of a 1-node job on 2
    nodes; with deterministic reduction both equal the uninterrupted run bit for bit."""
    common = ["--set", "model.hidden=12", "--set", "train.reduction=deterministic",
              "--set", "train.chunk=32",
              "--checkpoint-every", "2"]
    _serial(cluster, [*common, "--iterations", "6"], tmp_path / "whole")
    _train(cluster, [*common, "--iterations", "4"], tmp_path / "a")
    s = _serial(cluster, [*common, "--iterations", "6", "--resume", "latest"], tmp_path / "a")
    assert s["iterations"] == 6 and s["ranks"] == 1 and s["resumed_from"]
    assert _weights(tmp_path / "a") == _weights(tmp_path / "whole")
    _serial(cluster, [*common, "--iterations", "4"], tmp_path / "b")
    s = _train(cluster, [*common, "--iterations", "6", "--resume", "latest"], tmp_path / "b")
    assert s["iterations"] == 6 and s["ranks"] == 2 and s["resumed_from"]
    assert _weights(tmp_path / "b") == _weights(tmp_path / "whole")


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy_train.h5"
    write_random_split(path, n=200, steps=10, dim=6, seed=1)
    return ["--dataset", str(path), "--set", "model.hidden=8"]


def _sbatch(cluster, args: list[str], log: Path, timeout: float = 150):
    """``sbatch --wait -N 2`` writing its output to ``log``."""
    return cluster.run_job(["timeout", str(int(timeout)), "sbatch", "-N", "2",
                            "--ntasks-per-node=1", "--no-requeue", "--wait",
                            f"--output={log}", *args], timeout=timeout + 10,
                           logs=lambda: log.read_text() if log.exists() else "")


def _submit_iterating(cluster, args: list[str], out: Path, lines: int, log: Path) -> str:
    """Submit a 2-node job and wait until it has evaluated ``lines`` iterations; a job
    that failed at MPI start-up (see ``slurm_cluster.PMI2_STARTUP_FAILURE``) is
    submitted again. Returns the job id."""
    for _ in range(3):
        proc = cluster.run(["sbatch", "-N", "2", "--ntasks-per-node=1", "--no-requeue",
                            "--parsable", f"--output={log}", *args])
        assert proc.returncode == 0, proc.stderr
        job_id = proc.stdout.strip().split(";")[0]
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 90
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= lines):
            state = cluster.job(job_id).get("JobState")
            if state not in ("PENDING", "RUNNING", "CONFIGURING"):
                text = log.read_text() if log.exists() else ""
                assert PMI2_STARTUP_FAILURE in text, (state, text)
                cluster.startup_retries += 1
                break
            assert time.monotonic() < deadline, "the job did not start iterating"
            time.sleep(0.2)
        else:
            return job_id
    raise AssertionError(f"3 submissions failed at MPI start-up: {log.read_text()}")


def test_usr1_checkpoints_a_two_node_job_which_exits_zero(cluster, toy, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    job_id = _submit_iterating(cluster, ["--time=5", str(TRAIN_SBATCH), *toy, "--iterations",
                                         "1000000", "--out", str(out)], out, 3, log)
    sent = cluster.run(["scancel", "--signal=USR1", "--batch", job_id])  # sbatch --signal's path
    assert sent.returncode == 0, sent.stderr
    info = cluster.wait_ended(job_id, timeout=60)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log.read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "SIGUSR1" and summary["ranks"] == 2
    with h5py.File(find_latest(out / "checkpoints")) as f:
        assert f.attrs["iteration"] == summary["iterations"]


def test_a_lost_node_ends_the_job_and_a_resubmission_resumes(cluster, toy, tmp_path):
    """Node n2 is lost: its slurmd, the step daemon and the rank are killed at once
    (SIGKILL). The job ends within 30 s on n1; the newest complete checkpoint verifies,
    and the same command, resubmitted once n2 is back, resumes from it. Two things end
    it: rank 0's collective watchdog (train.collective_timeout_s = 10) when MPI leaves
    it waiting, and Slurm declaring n2 down (SlurmdTimeout = 5 here) when rank 0 has
    crashed instead (MPICH over UCX sometimes segfaults when the peer's connection
    dies; srun then waits for n2's step daemon until Slurm gives n2 up)."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    cmd = ["--time=5", str(TRAIN_SBATCH), *toy, "--checkpoint-every", "2", "--set",
           "train.collective_timeout_s=10", "--out", str(out)]
    job_id = _submit_iterating(cluster, [*cmd, "--iterations", "1000000"], out, 5, log)
    n1, n2 = cluster.nodes
    t0 = time.monotonic()
    try:
        for pid in cluster.bridge.pids(n2):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = t0 + 30
        while cluster.job(job_id).get("JobState") in ("RUNNING", "CONFIGURING"):
            assert time.monotonic() < deadline, "the job still runs 30 s after losing a node"
            time.sleep(0.2)
        while any(b"padmmirnn" in Path(f"/proc/{p}/cmdline").read_bytes()
                  for p in cluster.bridge.pids(n1) if Path(f"/proc/{p}").exists()):
            assert time.monotonic() < deadline, "a rank still runs on n1 30 s after the loss"
            time.sleep(0.2)
    finally:  # a failure here must not leave n2 lost for the tests after this one
        cluster.run(["scancel", job_id])
        cluster.start_slurmd(n2)
        cluster.run(["scontrol", "update", f"nodename={n2.name}", "state=resume"])
        cluster.wait_idle(timeout=60)
    latest = find_latest(out / "checkpoints")
    assert latest is not None and verify_checkpoint(latest) is None
    with h5py.File(latest) as f:
        done = int(f.attrs["iteration"])
    again = _sbatch(cluster, [*cmd, "--iterations", str(done + 2)], log)
    assert again.returncode == 0, again.stderr + log.read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == done + 2 and summary["ranks"] == 2
    assert Path(summary["resumed_from"]).name == latest.name


def test_mpiexec_starts_the_ranks_across_the_two_nodes(cluster, tmp_path):
    """Hydra's mpiexec inside a 2-node allocation (it starts its proxies with srun):
    one rank on each host, and train.sbatch with PADMMIRNN_LAUNCHER=mpiexec trains
    bitwise equal to the serial run (deterministic reduction). HYDRA_IFACE=eth0 makes
    the proxies reach mpiexec by address: the node names do not resolve here."""
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent))
    env = ["env", "HYDRA_IFACE=eth0", "PADMMIRNN_LAUNCHER=mpiexec",
           f"PADMMIRNN_MPIEXEC={mpiexec}"]
    hosts = tmp_path / "hosts.out"
    probe = (f"{mpiexec} -n 2 {sys.executable} -c 'from mpi4py import MPI; import socket; "
             "c = MPI.COMM_WORLD; rows = c.gather((c.Get_rank(), socket.gethostname(), "
             "c.Split_type(MPI.COMM_TYPE_SHARED).Get_size())); "
             "[print(*r) for r in rows or []]'")
    proc = cluster.run([*env, "timeout", "90", "sbatch", "--wait", "-N", "2",
                        "--ntasks-per-node=1", f"--output={hosts}", "--wrap", probe],
                       timeout=100)
    assert proc.returncode == 0, proc.stderr + (hosts.read_text() if hosts.exists() else "")
    rows = sorted(line.split() for line in hosts.read_text().splitlines() if line.strip())
    assert [r[1:] for r in rows] == [["n1", "1"], ["n2", "1"]], rows
    common = ["--iterations", "3", "--set", "model.hidden=12", "--set",
              "train.reduction=deterministic", "--set", "train.chunk=32"]
    _serial(cluster, common, tmp_path / "serial")
    log = tmp_path / "job.out"
    proc = cluster.run([*env, "timeout", "120", "sbatch", "--wait", "-N", "2",
                        "--ntasks-per-node=1", f"--output={log}", str(TRAIN_SBATCH),
                        *common, "--out", str(tmp_path / "hydra")], timeout=130)
    assert proc.returncode == 0, proc.stderr + log.read_text()
    assert "launcher=mpiexec" in (tmp_path / "hydra" / "launch.env").read_text()
    assert json.loads((tmp_path / "hydra" / "summary.json").read_text())["ranks"] == 2
    assert _weights(tmp_path / "hydra") == _weights(tmp_path / "serial")


def test_a_scaling_study_runs_on_one_node_and_on_two(cluster, toy, tmp_path):
    """``padmmirnn scaling plan --nodes 1,2``: the 1-node and the 2-node point run as
    batch jobs (srun --mpi=pmi2 across n1 and n2), SP on 2 nodes equals the 1-node run
    (strong scaling: same data) to 1e-10, and the report lists both as measured."""
    study = tmp_path / "study"
    plan = cluster.run([sys.executable, "-P", "-m", "padmmirnn", "scaling", "plan", "--kind",
                        "strong", "--ranks", "1,2", "--nodes", "1,2", "--dataset", toy[1],
                        "--iterations", "4", "--set", "model.hidden=8", "--time", "5",
                        "--slurm-dir", str(TRAIN_SBATCH.parent), "--out", str(study)],
                       timeout=120)
    assert plan.returncode == 0, plan.stderr
    for name in ("strong-1r-1n", "strong-2r-2n"):
        def logs(name=name):
            return "".join(p.read_text() for p in (study / "logs").glob(f"{name}-*.out"))

        proc = cluster.run_job(["timeout", "150", "sbatch", "--wait",
                                str(study / f"{name}.sbatch")], timeout=160, logs=logs)
        assert proc.returncode == 0, proc.stderr + logs()
    launch = (study / "runs" / "strong-2r-2n" / "launch.env").read_text()
    assert "nodes=2" in launch and "node_list=n[1-2]" in launch, launch
    one, two = (_metrics(study / "runs" / n) for n in ("strong-1r-1n", "strong-2r-2n"))
    assert len(one) == len(two) == 4
    for a, b in zip(one, two, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-10)
    report = cluster.run([sys.executable, "-P", "-m", "padmmirnn", "scaling", "report",
                          str(study), "--no-plots"], timeout=120)
    assert report.returncode == 0, report.stderr
    rows = (study / "scaling.csv").read_text().splitlines()
    assert any(r.startswith("measured,strong,strong-2r-2n,sync,") for r in rows), rows

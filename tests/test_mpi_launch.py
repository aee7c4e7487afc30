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


def _run(args, ranks=2, env=None, timeout=120, launcher=()):
    cmd = [sys.executable, "-P", "-m", "padmmirnn", *args]
    if ranks:
        cmd = [MPIEXEC, *launcher, "-n", str(ranks), *cmd]
    full_env = {**os.environ, **(env or {})}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    return proc, time.monotonic() - t0


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind,preset", [("dense", None), ("tokens", None),
                                         ("dense", "fullbatch"), ("tokens", "fullbatch")])
def test_two_rank_run_matches_serial_run(tmp_path, kind, preset):
    write_random_split(tmp_path / "d_train.h5", kind, n=41, dim=6, seed=1)
    write_random_split(tmp_path / "d_test.h5", kind, n=13, dim=6, seed=2)
    common = ["train", "--dataset", str(tmp_path / "d_train.h5"), "--iterations", "4",
              "--set", "model.hidden=6",
              *(["--config", preset] if preset else ["--set", "admm.batch_size=8"])]
    keys = (("objective", "train_loss", "test_loss", "residual_a", "residual_o") if preset
            else ("batch_loss", "train_loss", "test_loss"))
    serial, _ = _run([*common, "--out", str(tmp_path / "serial")], ranks=0)
    assert serial.returncode == 0, serial.stderr
    sp, _ = _run([*common, "--out", str(tmp_path / "sp")])
    assert sp.returncode == 0, sp.stderr
    summary = json.loads((tmp_path / "sp" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["parallel"] == "sync"
    assert summary["bytes_reduced_per_iteration"] > 0
    assert 0 <= summary["t_imbalance_s"] <= summary["t_compute_s"]
    for a, b in zip(_metrics(tmp_path / "serial"), _metrics(tmp_path / "sp"), strict=True):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-10), key
        assert b["train_accuracy"] == a["train_accuracy"]


def test_ledger_counts_the_synchronisations_of_data_parallel_adam(tmp_path):
    """Data-parallel Adam reduces once per global mini-batch: the ledger in the summary
    and the metrics counts exactly that, and the bytes of the packed gradients; a
    serial run communicates nothing."""
    n, steps, dim, hidden, classes, batch = 41, 6, 5, 6, 3, 8
    write_random_split(tmp_path / "d_train.h5", n=n, steps=steps, dim=dim, seed=1)
    common = ["train", "--dataset", str(tmp_path / "d_train.h5"), "--algo", "adam",
              "--iterations", "2", "--set", f"model.hidden={hidden}",
              "--set", f"optim.batch_size={batch}"]
    proc, _ = _run([*common, "--out", str(tmp_path / "dp")])
    assert proc.returncode == 0, proc.stderr
    batches = -(-n // batch)
    params = hidden * dim + hidden * hidden + hidden + classes * hidden + classes
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert summary["syncs"] == 2 * batches
    assert summary["bytes"] == 2 * batches * 8 * (params + steps + 3)
    assert [m["syncs"] for m in _metrics(tmp_path / "dp")] == [batches, 2 * batches]
    proc, _ = _run([*common, "--out", str(tmp_path / "serial")], ranks=0)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "serial" / "summary.json").read_text())
    assert summary["syncs"] == 0 and summary["bytes"] == 0


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


def _summary(folder):
    return json.loads((folder / "summary.json").read_text())


def test_async_staleness_zero_run_equals_sync_run(tmp_path):
    """The whole AP job with tau = 0 (RMA windows, final quiescent solve) reproduces
    the SP job on the default dataset, in the default configuration (with tau = 0 the
    step control sums its trial losses over all ranks, as SP's does); per-rank AP logs
    record every iteration."""
    common = ["train", "--iterations", "4", "--set", "model.hidden=16", "--config", "fullbatch"]
    sync, _ = _run([*common, "--parallel", "sync", "--out", str(tmp_path / "sync")],
                   timeout=300)
    assert sync.returncode == 0, sync.stderr
    ap, _ = _run([*common, "--parallel", "async", "--staleness", "0",
                  "--out", str(tmp_path / "async")], timeout=300)
    assert ap.returncode == 0, ap.stderr
    s, a = _summary(tmp_path / "sync"), _summary(tmp_path / "async")
    assert a["parallel"] == "async" and a["iterations"] == 4
    assert a["train_loss"] == pytest.approx(s["train_loss"], rel=1e-9)
    assert a["test_accuracy"] == s["test_accuracy"]
    rows = [json.loads(x) for x in (tmp_path / "async" / "async_rank1.jsonl").read_text()
            .splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert all(r["staleness"] == 0 for r in rows)


@pytest.mark.parametrize("network", [False, True], ids=["shared-memory", "network-path"])
def test_async_with_staleness_trains_as_well_as_sync(tmp_path, network):
    """AP with tau = 2 and the full-batch configuration (its step control on each rank's
    own training loss) on the default dataset and its default 60 iterations: every
    rank's training loss never increases, except where no trial step decreased it
    (a stale direction; the step control then takes its shortest step, rare), and the
    final test accuracy is at most 1 point below SP's (measured: 0.2 below to 0.7
    above; at 30 iterations AP can be 2 points below, docs/async.md). Also on MPICH's
    network path (``MPIR_CVAR_NOLOCAL=1``: the route between nodes)."""
    common = ["train", "--iterations", "60", "--config", "fullbatch"]
    sync, _ = _run([*common, "--parallel", "sync", "--set", "train.eval_every=60",
                    "--out", str(tmp_path / "sync")], timeout=300)
    assert sync.returncode == 0, sync.stderr
    ap, _ = _run([*common, "--parallel", "async", "--staleness", "2",
                  "--out", str(tmp_path / "async")], timeout=300,
                 env={"MPIR_CVAR_NOLOCAL": "1"} if network else None)
    assert ap.returncode == 0, ap.stderr
    for r in (0, 1):
        rows = [json.loads(x) for x in (tmp_path / "async" / f"async_rank{r}.jsonl")
                .read_text().splitlines()]
        losses = [x["local_train_loss"] for x in rows]
        assert len(losses) == 60 and losses[-1] < 0.5 * losses[0]
        exhausted = [x["trials"] == 5 for x in rows]  # backtrack_max + 1
        assert sum(exhausted) <= 3, exhausted
        for k in range(1, 60):
            assert losses[k] <= losses[k - 1] or exhausted[k], (k, losses)
    s, a = _summary(tmp_path / "sync"), _summary(tmp_path / "async")
    assert a["test_accuracy"] >= s["test_accuracy"] - 0.01, (a["test_accuracy"],
                                                             s["test_accuracy"])


def test_async_checkpoint_walltime_and_resume(tmp_path):
    write_random_split(tmp_path / "d_train.h5", n=50, seed=1)
    common = ["train", "--dataset", str(tmp_path / "d_train.h5"), "--parallel", "async",
              "--config", "fullbatch", "--set", "model.hidden=6", "--out", str(tmp_path / "o")]
    proc, _ = _run([*common, "--iterations", "100000", "--max-walltime", "1.5"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = _summary(tmp_path / "o")
    assert s["stopped"] == "--max-walltime" and s["iterations"] > 0
    done = s["iterations"]
    proc, _ = _run([*common, "--iterations", str(done + 3), "--resume", "latest"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _summary(tmp_path / "o")["iterations"] == done + 3


def test_straggler_slows_one_rank(tmp_path):
    write_random_split(tmp_path / "d_train.h5", n=400, steps=20, seed=1)
    proc, _ = _run(["train", "--dataset", str(tmp_path / "d_train.h5"), "--parallel", "async",
                    "--config", "fullbatch", "--staleness", "8", "--straggler", "1:4",
                    "--iterations", "12",
                    "--set", "model.hidden=24", "--out", str(tmp_path / "o")], timeout=120)
    assert proc.returncode == 0, proc.stderr
    per_rank = []
    for r in (0, 1):
        rows = [json.loads(x) for x in (tmp_path / "o" / f"async_rank{r}.jsonl").read_text()
                .splitlines()]
        per_rank.append(np.median([x["iteration_s"] - x["comm_s"] for x in rows[2:]]))
    assert per_rank[1] > 2.0 * per_rank[0]


@pytest.mark.parametrize("spec,message", [("1", "RANK:FACTOR"), ("1:0.5", "FACTOR >= 1")])
def test_bad_straggler_is_a_clear_error(tmp_path, spec, message):
    proc, _ = _run(["train", "--straggler", spec, "--out", str(tmp_path / "o")], ranks=0)
    assert proc.returncode == 2 and message in proc.stderr


def test_bounded_delay_job_under_a_straggler(tmp_path):
    write_random_split(tmp_path / "d_train.h5", n=400, steps=20, seed=1)
    proc, _ = _run(["train", "--dataset", str(tmp_path / "d_train.h5"), "--parallel", "async",
                    "--config", "fullbatch", "--staleness-kind", "publishes", "--staleness", "4",
                    "--straggler", "1:3",
                    "--iterations", "15", "--set", "model.hidden=24",
                    "--out", str(tmp_path / "o")], timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = _summary(tmp_path / "o")
    fast, slow = s["iterations_per_rank"]
    assert fast == 15 and slow < fast
    assert s["staleness_kind"] == "publishes" and s["train_accuracy"] is not None


@pytest.mark.parametrize("args,message", [
    (["--staleness-kind", "publishes", "--staleness", "0"], "needs at least ranks - 1 = 1"),
    (["--straggler", "2:3"], "names rank 2, but the job has 2 rank(s)")])
def test_what_only_the_rank_count_rules_out_is_one_clear_line(tmp_path, args, message):
    """Bounded delay below ranks - 1 would leave every rank waiting for ever."""
    proc, seconds = _run(["train", "--parallel", "async", "--config", "fullbatch", *args,
                          "--out", str(tmp_path / "o")], timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra", [["--parallel", "sync"],
                                   ["--parallel", "async", "--config", "fullbatch", "--set",
                                    "train.eval_every=2"]])
def test_bounded_delay_needs_async_without_periodic_collectives(tmp_path, extra):
    proc, _ = _run(["train", "--staleness-kind", "publishes", *extra,
                    "--out", str(tmp_path / "o")], ranks=0)
    assert proc.returncode == 2 and "staleness_kind = publishes" in proc.stderr


def test_exception_on_one_rank_ends_an_async_job(tmp_path):
    """No rank may wait on a window (or its collective free) for a rank that failed."""
    write_random_split(tmp_path / "d_train.h5", n=30, seed=1)
    proc, seconds = _run(["train", "--dataset", str(tmp_path / "d_train.h5"), "--iterations",
                          "50", "--parallel", "async", "--config", "fullbatch", "--out",
                          str(tmp_path / "o")],
                         env={"PADMMIRNN_FAULT_INJECT": "1:2"}, timeout=60)
    assert proc.returncode != 0 and seconds < 30
    assert "[rank 1/2] unhandled exception" in proc.stderr


@pytest.mark.parametrize("network", [False, True], ids=["shared-memory", "network-path"])
def test_a_rank_killed_mid_async_run_ends_the_job_and_its_checkpoint_resumes(tmp_path,
                                                                             network):
    """A lost node: rank 1 dies by SIGKILL (no exception, no MPI_Abort) at iteration 7 of
    an AP run that checkpoints every 2 iterations. The job ends within 30 s with a
    non-zero status (the other rank may be spinning on a window); the last checkpoint
    (iteration 6) verifies and the run resumes from it to the end."""
    write_random_split(tmp_path / "d_train.h5", n=50, seed=1)
    common = ["train", "--dataset", str(tmp_path / "d_train.h5"), "--parallel", "async",
              "--config", "fullbatch", "--set", "model.hidden=6", "--iterations", "12",
              "--set", "checkpoint.every=2", "--out", str(tmp_path / "o")]
    env = {"MPIR_CVAR_NOLOCAL": "1"} if network else {}
    proc, seconds = _run(common, env={**env, "PADMMIRNN_FAULT_INJECT": "1:7:kill"},
                         timeout=60)
    assert proc.returncode != 0 and seconds < 30, (proc.returncode, seconds)
    from padmmirnn.checkpoint import find_latest

    latest = find_latest(tmp_path / "o" / "checkpoints")
    assert latest is not None and latest.name.endswith("00006.h5"), latest
    proc, _ = _run([*common, "--resume", "latest"], env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = _summary(tmp_path / "o")
    assert s["iterations"] == 12 and s["train_accuracy"] is not None


def test_parallel_from_the_configuration_is_honoured(tmp_path):
    proc, _ = _run(["train", "--set", "train.parallel=none", "--out", str(tmp_path / "o")])
    assert proc.returncode == 2 and "--parallel none was asked for" in proc.stderr


def test_simulated_network_waits_alpha_plus_bytes_over_beta():
    from padmmirnn.comm import SimulatedNetwork

    net = SimulatedNetwork(latency_us=100, bandwidth_gbs=8)  # 1 GB/s
    t0 = time.perf_counter()
    net.wait(1_000_000)
    assert time.perf_counter() - t0 >= 1.1e-3 and net.seconds == pytest.approx(1.1e-3)
    assert not SimulatedNetwork().active


def test_a_run_on_a_simulated_network_reports_it_and_pays_for_it(tmp_path):
    """Data-parallel Adam on 2 ranks with 3 ms per collective: the summary says the
    network was simulated, and every training reduction (the ledger) cost it."""
    write_random_split(tmp_path / "d_train.h5", n=200, seed=1)
    proc, _ = _run(["train", "--dataset", str(tmp_path / "d_train.h5"), "--algo", "adam",
                    "--iterations", "2", "--set", "optim.batch_size=20",
                    "--set", "train.net_latency_us=3000", "--out", str(tmp_path / "o")],
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = _summary(tmp_path / "o")
    net = s["simulated_network"]
    assert net["latency_us"] == 3000 and net["bandwidth_gbs"] == 0
    syncs = _metrics(tmp_path / "o")[-1]["syncs"]
    assert syncs >= 10 and net["simulated_seconds"] >= syncs * 3e-3
    assert s["wall_time_s"] >= net["simulated_seconds"]


def test_an_mpi_init_that_never_returns_ends_the_process(tmp_path):
    """A launcher whose start-up exchange fails silently leaves MPI_Init waiting: the
    watchdog ($PADMMIRNN_MPI_INIT_TIMEOUT) ends the process with exit 1 and the place
    it waited, instead of a hang. MPI_Init is stood in for by an mpi4py whose import
    blocks (a C-level wait holding the interpreter, as MPI_Init does)."""
    fake = tmp_path / "fake" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "MPI.py").write_text("import select\nselect.select([], [], [], 60)\n")
    write_random_split(tmp_path / "toy_train.h5", n=20, dim=3, seed=1)
    env = {"PYTHONPATH": str(tmp_path / "fake"), "PADMMIRNN_MPI_INIT_TIMEOUT": "2"}
    proc, seconds = _run(["train", "--parallel", "sync", "--dataset",
                          str(tmp_path / "toy_train.h5"), "--out", str(tmp_path / "run")],
                         ranks=0, env=env, timeout=50)
    assert proc.returncode == 1 and seconds < 30, (proc.returncode, seconds, proc.stderr)
    assert "Timeout" in proc.stderr and "import_mpi" in proc.stderr, proc.stderr
    proc, _ = _run(["train", "--parallel", "sync", "--dataset", str(tmp_path / "toy_train.h5"),
                    "--out", str(tmp_path / "bad")], ranks=0,
                   env={**env, "PADMMIRNN_MPI_INIT_TIMEOUT": "soon"}, timeout=50)
    assert proc.returncode == 2 and "PADMMIRNN_MPI_INIT_TIMEOUT" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_a_rank_that_stops_answering_ends_the_job_after_the_collective_timeout(tmp_path):
    """Rank 1 stops at iteration 3 without exiting (a node that stopped answering: its
    process lives on, so the launcher notices nothing). Rank 0 waits in the next
    collective; after train.collective_timeout_s it prints one line naming itself and
    the collective, and the job ends non-zero; the checkpoint of iteration 2 verifies."""
    write_random_split(tmp_path / "d_train.h5", n=50, seed=1)
    proc, seconds = _run(["train", "--dataset", str(tmp_path / "d_train.h5"), "--set",
                          "model.hidden=6", "--iterations", "50", "--set",
                          "checkpoint.every=2", "--set", "train.collective_timeout_s=3",
                          "--out", str(tmp_path / "o")],
                         env={"PADMMIRNN_FAULT_INJECT": "1:3:hang"}, timeout=60)
    assert proc.returncode != 0 and seconds < 30, (proc.returncode, seconds, proc.stderr)
    assert "[rank 0/2] padmmirnn: waited 3 s in allreduce_max" in proc.stderr, proc.stderr
    from padmmirnn.checkpoint import find_latest, verify_checkpoint

    latest = find_latest(tmp_path / "o" / "checkpoints")
    assert latest is not None and latest.name.endswith("00002.h5"), latest
    assert verify_checkpoint(latest) is None


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_lost_rank_ends_an_async_consensus_job_under_a_launcher_that_keeps_survivors(
        tmp_path, fault):
    """Rank 1 of an AP consensus run dies by SIGKILL, or stops for good without exiting,
    at pass 4; the launcher is told to keep the survivor running (Hydra's
    ``-disable-auto-cleanup``), so only padmmirnn can end the job: rank 0, waiting on the
    window, sees rank 1's heartbeat stop, names it in one line and aborts the job within
    the timeout (after a SIGKILL Hydra sometimes ends the job itself all the same:
    either way it ends). The newest checkpoint (pass 3) verifies, and the run resumes
    from it."""
    write_random_split(tmp_path / "d_train.h5", n=64, seed=1)
    common = ["train", "--dataset", str(tmp_path / "d_train.h5"), "--parallel", "async",
              "--staleness", "1", "--set", "model.hidden=6", "--set", "admm.batch_size=16",
              "--iterations", "8", "--set", "checkpoint.every=3",
              "--set", "train.collective_timeout_s=4", "--out", str(tmp_path / "o")]
    proc, seconds = _run(common, env={"PADMMIRNN_FAULT_INJECT": f"1:4:{fault}"},
                         timeout=90, launcher=["-disable-auto-cleanup"])
    assert proc.returncode != 0 and seconds < 45, (proc.returncode, seconds, proc.stderr)
    line = "[rank 0/2] padmmirnn: rank 1 has given no heartbeat in the window for 4 s"
    assert line in proc.stderr or (fault == "kill" and "signal 9" in proc.stdout
                                   + proc.stderr), (proc.returncode, proc.stdout, proc.stderr)
    from padmmirnn.checkpoint import find_latest, verify_checkpoint

    latest = find_latest(tmp_path / "o" / "checkpoints")
    assert latest is not None and latest.name.endswith("00003.h5"), latest
    assert verify_checkpoint(latest) is None
    proc, _ = _run([*common, "--resume", "latest"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = _summary(tmp_path / "o")
    assert s["iterations"] == 8 and s["resumed_from"].endswith("00003.h5")


def test_rebalancing_moves_samples_off_a_straggler_and_keeps_sp_equal_to_serial(tmp_path):
    """train.rebalance with rank 1 slowed 3x: after the second pass the blocks are re-cut
    towards the measured speeds (rank 1 keeps far fewer samples), and every metric still
    equals the serial run's (the batches are global, whoever holds them)."""
    write_random_split(tmp_path / "d_train.h5", n=240, steps=8, seed=4)
    common = ["train", "--dataset", str(tmp_path / "d_train.h5"), "--iterations", "4",
              "--set", "model.hidden=16", "--set", "admm.batch_size=24"]
    serial, _ = _run([*common, "--out", str(tmp_path / "serial")], ranks=0)
    assert serial.returncode == 0, serial.stderr
    sp, _ = _run([*common, "--straggler", "1:3", "--set", "train.rebalance=true",
                  "--out", str(tmp_path / "sp")], timeout=180)
    assert sp.returncode == 0, sp.stderr
    assert "rebalanced: rank blocks [0, " in sp.stderr, sp.stderr
    blocks = json.loads(sp.stderr.split("rebalanced: rank blocks ")[-1].split("]")[0] + "]")
    assert 240 - blocks[1] < 240 * 0.4  # rank 1 holds far fewer than half
    for a, b in zip(_metrics(tmp_path / "serial"), _metrics(tmp_path / "sp"), strict=True):
        for key in ("batch_loss", "train_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-10), key

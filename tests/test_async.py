"""AP-ADMMiRNN over RMA windows under ``mpiexec -n 2`` (pytest-mpi)."""

from __future__ import annotations

import sys
import traceback
from contextlib import contextmanager

import numpy as np
import pytest
from conftest import FAITHFUL, FULLBATCH, make_local

from padmmirnn.admm import AdmmEngine, asynchronous
from padmmirnn.admm.packed import input_layout, output_layout
from padmmirnn.comm import abort_job
from padmmirnn.comm.rma import RmaStatsExchange
from padmmirnn.config import build_config
from padmmirnn.nn import Params, loss_sums
from padmmirnn.samples import LocalData, partition

pytestmark = pytest.mark.mpi


@contextmanager
def freed_on_success(free):
    """Free the windows (a collective) when the block succeeds; when it fails on a rank,
    print the failure and abort the job instead: a collective free on that rank alone
    would wait for the others forever, and the test would hang instead of failing."""
    try:
        yield
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        abort_job(2, 1)
        raise
    free()


def _local(full: LocalData, comm) -> LocalData:
    start, stop = partition(full.info.n, comm.size, comm.rank)
    return LocalData(full.info, np.ascontiguousarray(full.inputs[:, start:stop]),
                     np.ascontiguousarray(full.targets[:, start:stop]), start, stop)


def _engine(comm, data, n, base=FAITHFUL, reducer=None, **admm):
    cfg = build_config(overrides={**base, "model.hidden": 7,
                                  **{f"admm.{k}": v for k, v in admm.items()}})
    return AdmmEngine(cfg, [data], n, comm, reducer=reducer)


def _async_engine(comm, data, n, tau, base=FAITHFUL, kind="iterations", **admm):
    """An engine whose statistics reduction is the RMA exchange (given when built)."""
    size = input_layout(data.info.dim, 7).size + output_layout(7, data.info.classes).size
    ex = RmaStatsExchange(comm, size, tau, kind=kind)
    return _engine(comm, data, n, base, reducer=ex, **admm), ex


# the full-batch hybrid without the step control, and with it (tau = 0 sums the trial
# losses over all ranks, as SP does)
HYBRID_ASYNC = {**FULLBATCH, "admm.step_control": "none"}
DEFAULTS: dict = FULLBATCH


@pytest.mark.parametrize("kind,m2m,base", [("dense", False, FAITHFUL),
                                           ("tokens", True, FAITHFUL),
                                           ("dense", True, HYBRID_ASYNC),
                                           ("dense", False, DEFAULTS)])
def test_staleness_zero_equals_sp(comm, kind, m2m, base):
    full = make_local(kind, m2m, n=29, steps=5, dim=6, classes=4, seed=7)
    data = _local(full, comm)
    extra = {} if base is not FAITHFUL else {"multipliers": "all", "warmup": 2}
    sp = _engine(comm, data, 29, base, **extra)
    ap, ex = _async_engine(comm, data, 29, 0, base, **extra)
    with freed_on_success(ex.free):
        for _ in range(6):
            sp.iterate(want_sums=False)
            ap.iterate(want_sums=False)
            for name, value in sp.params.arrays().items():
                np.testing.assert_allclose(getattr(ap.params, name), value, rtol=1e-10,
                                           atol=1e-12)


def test_window_equals_sum_of_latest_contributions(comm):
    full = make_local("dense", False, n=40, steps=4, dim=5, classes=3, seed=8)
    eng, ex = _async_engine(comm, _local(full, comm), 40, 2)
    with freed_on_success(ex.free):
        # ranks run at different speeds: rank 1 pauses, so rank 0 runs ahead (bounded)
        for k in range(7):
            if comm.rank == 1 and k % 2:
                import time

                time.sleep(0.05)
            eng.iterate(want_sums=False)
            published = ex.published()
            assert published.max() - published.min() <= 2 + 1
        comm.barrier()
        window = ex.window_sum()
        total = comm.allreduce_sum(ex.previous.copy())
        np.testing.assert_allclose(window, total, rtol=1e-12, atol=1e-12)
        assert list(ex.published()) == [7, 7] and list(ex.consumed()) == [7, 7]


def test_async_with_staleness_still_descends(comm):
    full = make_local("dense", False, n=60, steps=5, dim=5, classes=3, seed=9)
    eng, ex = _async_engine(comm, _local(full, comm), 60, 2, multipliers="none")
    start = eng.lagrangian()  # a collective on the communicator, not the window
    with freed_on_success(ex.free):
        for _ in range(8):
            eng.iterate(want_sums=False)
    assert eng.lagrangian() < start


def test_bounded_delay_lets_the_fast_rank_run_ahead(comm):
    import time

    full = make_local("dense", False, n=40, steps=4, dim=5, classes=3, seed=11)
    eng, ex = _async_engine(comm, _local(full, comm), 40, 3, kind="publishes")
    with freed_on_success(ex.free):
        t0 = time.perf_counter()
        delays = []
        while time.perf_counter() - t0 < 1.5 and ex.agreed_stop()[0] is None:
            if comm.rank == 1:
                time.sleep(0.15)  # a straggler
            eng.iterate(want_sums=False)
            delays.append(ex.staleness)
        ex.propose_stop(-1, 1)
        comm.barrier()
        counts = comm.allgather(eng.iteration)
        assert counts[0] > 2 * counts[1] > 0  # the fast rank did not wait for the slow one
        if comm.rank == 0:
            assert max(delays[:-1]) <= 3  # within the bound, except when a stop released it
        window = ex.window_sum()
        np.testing.assert_allclose(window, comm.allreduce_sum(ex.previous.copy()),
                                   rtol=1e-12, atol=1e-12)


def test_quiescent_point_gives_every_rank_the_same_backtracked_weights(comm):
    """After stale steps with the local step control, the quiescent solve (checkpoints
    and the end) leaves every rank with the same weights, solved from the window that
    holds every worker's latest contribution, with a global training loss no higher
    than at rank 0's weights before that solve; the run then goes on asynchronously."""
    import time

    full = make_local("dense", False, n=60, steps=5, dim=5, classes=3, seed=12)
    data = _local(full, comm)
    cfg = build_config(overrides={"model.hidden": 7, "train.parallel": "async",
                                  "train.staleness": 2, "admm.batch_size": 0})
    assert cfg.backtracking()
    engine, control = asynchronous.build(cfg, [data], 60, comm)
    with freed_on_success(control.close):
        for k in range(5):
            if comm.rank == 1 and k % 2:
                time.sleep(0.05)
            control.before_step()
            engine.step(evaluate=False)
        assert engine.loss_comm.size == 1  # a local step control
        start = control.before_solve
        control.quiesce()
        window = control.exchange.window_sum()
        np.testing.assert_allclose(window, comm.allreduce_sum(control.exchange.previous.copy()),
                                   rtol=1e-12, atol=1e-12)
        for name, value in engine.params.arrays().items():
            gathered = comm.allgather(value.tobytes())
            assert gathered[0] == gathered[1], name
        rank0_start = Params.from_flat(comm.bcast_array(start.flat()), start)

        def global_loss(params):
            sums = loss_sums(params, data, cfg.model.activation, cfg.model.loss)
            return comm.allreduce_sum(sums.copy())[0]

        assert global_loss(engine.params) <= global_loss(rank0_start)
        assert engine.synced and engine.loss_comm.size == 1
        control.before_step()
        engine.step(evaluate=False)  # and on asynchronously


def test_a_stop_before_a_ranks_first_step_ends_every_rank(comm):
    """BUG 2: in bounded-delay mode a rank that stops before its first step releases
    the others, which finish one step; the quiescent solve must then run on every rank
    (it returned at once on the rank that never stepped and waited in a barrier on the
    others: a hang) and leave them all with the same weights."""
    full = make_local("dense", False, n=40, steps=4, dim=5, classes=3, seed=13)
    cfg = build_config(overrides={**FULLBATCH, "model.hidden": 7, "train.parallel": "async",
                                  "train.staleness": 1, "train.staleness_kind": "publishes",
                                  "train.budget_seconds": 1.0})
    engine, control = asynchronous.build(cfg, [_local(full, comm)], 40, comm)
    with freed_on_success(control.close):
        if comm.rank == 1:
            decision = control.decide(1, elapsed=5.0, job_elapsed=5.0, signum=0)
            assert decision.end and engine.iteration == 0
        else:
            control.before_step()
            engine.step(evaluate=False)  # released by rank 1's stop
            assert engine.iteration == 1
        control.quiesce()
        for name, value in engine.params.arrays().items():
            gathered = comm.allgather(value.tobytes())
            assert gathered[0] == gathered[1], name


@pytest.mark.parametrize("mode", ["duals", "average"])
def test_consensus_with_staleness_zero_equals_the_synchronous_consensus(comm, mode):
    """AP runs mini-batch consensus ADMM through the window (no preset): with tau = 0
    every join reads every rank's contribution of the same pass, so the iterates equal
    those of the synchronous consensus run (1e-10), duals included."""
    from padmmirnn.admm.consensus import ConsensusAdmm

    full = make_local("dense", False, n=48, steps=4, dim=5, classes=3, seed=17)
    data = _local(full, comm)
    common = {"model.hidden": 6, "admm.batch_size": 16, "admm.consensus": mode}
    sync = ConsensusAdmm(build_config(overrides=common), data, 48, comm)
    cfg = build_config(overrides={**common, "train.parallel": "async", "train.staleness": 0})
    trainer, control = asynchronous.build(cfg, [data], 48, comm)
    assert isinstance(trainer, ConsensusAdmm) and trainer.mode == mode
    with freed_on_success(control.close):
        for _ in range(3):
            sync.step()
            control.before_step()
            trainer.step()
            for name, value in sync.params.arrays().items():
                np.testing.assert_allclose(getattr(trainer.params, name), value,
                                           rtol=1e-10, atol=1e-12, err_msg=name)
        if mode == "duals":
            np.testing.assert_allclose(trainer.workers[0].dual, sync.workers[0].dual,
                                       rtol=1e-9, atol=1e-12)
        control.quiesce()
        for name, value in trainer.params.arrays().items():
            gathered = comm.allgather(value.tobytes())
            assert gathered[0] == gathered[1], name


def test_the_default_runs_asynchronously_with_staleness(comm, tmp_path_factory):
    """`padmmirnn train --parallel async --staleness 2` runs the mini-batch default as
    consensus (averaged once per pass; no preset needed), and trains as well as the
    synchronous consensus run of the same passes (training loss within 5%)."""
    from conftest import write_random_split

    from padmmirnn.cli import main

    root = comm.bcast(str(tmp_path_factory.mktemp("ap")) if comm.rank == 0 else None)
    path = f"{root}/toy_train.h5"
    if comm.rank == 0:
        x, y = write_random_split(path, n=96, steps=4, dim=5, classes=3, seed=5)
    comm.barrier()
    common = ["train", "--dataset", path, "--iterations", "6", "--set", "model.hidden=8",
              "--set", "admm.batch_size=16"]
    assert main([*common, "--parallel", "async", "--staleness", "2", "--out",
                 f"{root}/ap"]) == 0
    assert main([*common, "--set", "admm.consensus=average", "--out", f"{root}/sp"]) == 0
    comm.barrier()  # rank 0 has written the summaries
    import json

    ap, sp = (json.loads(open(f"{root}/{name}/summary.json").read()) for name in ("ap", "sp"))
    assert ap["parallel"] == "async" and ap["iterations"] == 6
    assert ap["train_loss"] < 1.05 * sp["train_loss"] < np.log(3)


def test_ap_evaluates_without_a_barrier_and_stops_at_the_target(comm, tmp_path_factory):
    """Asynchronous consensus with train.eval_every: rank 0 evaluates the consensus of the
    latest window snapshot on the whole test split (no collective), and the run ends
    soon after the first snapshot that reaches train.target_accuracy."""
    import json

    from padmmirnn.cli import main

    root = comm.bcast(str(tmp_path_factory.mktemp("target")) if comm.rank == 0 else None)
    out = f"{root}/run"
    assert main(["train", "--parallel", "async", "--staleness", "1", "--iterations", "12",
                 "--set", "train.eval_every=1", "--set", "train.target_accuracy=0.85",
                 "--out", out]) == 0
    comm.barrier()
    rows = [json.loads(r) for r in open(f"{out}/metrics.jsonl").read().splitlines()]
    snapshots = [r for r in rows if "evaluated" in r]
    summary = json.loads(open(f"{out}/summary.json").read())
    reached = summary["target_reached_at"]
    first = next(r["iteration"] for r in snapshots if r["test_accuracy"] >= 0.85)
    assert reached == first and all(r["test_accuracy"] < 0.85 for r in snapshots[:first - 1])
    assert summary["iterations"] <= reached + 1 < 12  # stops within tau passes
    assert rows[-1]["test_accuracy"] > 0.8  # the final consensus, evaluated by all ranks

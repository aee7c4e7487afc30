"""SP-ADMMiRNN under ``mpiexec -n 2`` (pytest-mpi): the same problem with and
without MPI must give the same iterates (docs/design.md, section 6)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FAITHFUL, FULLBATCH, make_local

from padmmirnn.admm import AdmmEngine
from padmmirnn.comm import SerialComm, agree, sum_parts
from padmmirnn.config import build_config
from padmmirnn.errors import DataError
from padmmirnn.samples import LocalData, chunk_partition, partition, split_parts

pytestmark = pytest.mark.mpi



def _slice(full: LocalData, start: int, stop: int) -> LocalData:
    return LocalData(full.info, np.ascontiguousarray(full.inputs[:, start:stop]),
                     np.ascontiguousarray(full.targets[:, start:stop]), start, stop)


def _pair(comm, cfg, full):
    """A serial engine on all samples and an SP engine on this rank's block."""
    start, stop = partition(full.info.n, comm.size, comm.rank)
    serial = AdmmEngine(cfg, [full], full.info.n, SerialComm())
    sp = AdmmEngine(cfg, [_slice(full, start, stop)], full.info.n, comm)
    return serial, sp


CASES = [
    # kind, many_to_many, n (odd n: uneven split), multipliers, schedule
    ("dense", False, 37, "none", "fused"),
    ("dense", True, 20, "all", "paper"),
    ("tokens", False, 21, "output", "fused"),
    ("tokens", True, 4001, "all", "fused"),
    ("dense", False, 37, "hybrid", "fused"),  # the defaults: KKT multipliers, backtracking
    ("tokens", True, 21, "hybrid", "fused"),
]


@pytest.mark.parametrize("kind,m2m,n,mode,schedule", CASES)
def test_sp_matches_serial_every_iteration(comm, kind, m2m, n, mode, schedule):
    assert comm.size == 2
    full = make_local(kind, m2m, n=n, steps=5, dim=6, classes=4, seed=n)
    base = FULLBATCH if mode == "hybrid" else {**FAITHFUL, "admm.multipliers": mode,
                                        "admm.warmup": 1, "admm.schedule": schedule}
    cfg = build_config(overrides={**base, "model.hidden": 7,
                                  "admm.rho_schedule": "geometric"})
    serial, sp = _pair(comm, cfg, full)
    for _ in range(6):
        s_sums = serial.sum_parts(serial.iterate())
        p_sums = sp.sum_parts(sp.iterate())
        np.testing.assert_allclose(p_sums, s_sums, rtol=1e-10, atol=1e-13)
        assert sp.summarize(p_sums)["objective"] == pytest.approx(
            serial.summarize(s_sums)["objective"], rel=1e-10)
        for name, value in serial.params.arrays().items():
            np.testing.assert_allclose(getattr(sp.params, name), value, rtol=1e-10, atol=1e-12)
    # every rank holds the same weights
    gathered = comm.allgather(sp.params.W.tobytes())
    assert gathered[0] == gathered[1]


def test_deterministic_reduction_is_bitwise_rank_independent(comm):
    full = make_local("dense", False, n=103, steps=6, dim=5, classes=3, seed=3)
    cfg = build_config(overrides={"model.hidden": 9, "train.reduction": "deterministic",
                                  "train.chunk": 10, "admm.batch_size": 0})
    serial = AdmmEngine(cfg, split_parts(full, 10), 103, SerialComm())
    start, stop = chunk_partition(103, 10, comm.size, comm.rank)
    assert start % 10 == 0
    sp = AdmmEngine(cfg, split_parts(_slice(full, start, stop), 10), 103, comm)
    for _ in range(5):
        s_sums = serial.sum_parts(serial.iterate())
        p_sums = sp.sum_parts(sp.iterate())
        assert np.array_equal(s_sums, p_sums)
    for name, value in serial.params.arrays().items():
        assert np.array_equal(getattr(sp.params, name), value), name


def test_sum_parts_fast_and_ordered(comm):
    parts = [np.full(3, 1.0 + comm.rank), np.arange(3.0)]
    expected = np.array([3.0, 5.0, 7.0])  # (1 + 0 + 2 + 0), (1+1+2+1), ...
    np.testing.assert_array_equal(sum_parts(comm, parts, False), expected)
    np.testing.assert_array_equal(sum_parts(comm, parts, True), expected)


def test_agree_raises_on_every_rank(comm):
    def check():
        if comm.rank == 1:
            raise DataError("slice of rank 1 is bad")
        return "fine"

    with pytest.raises(DataError, match="slice of rank 1 is bad"):
        agree(comm, check)
    assert agree(comm, lambda: comm.rank) == comm.rank


@pytest.mark.parametrize("algo", ["adam", "momentum"])
def test_sync_gradient_training_matches_serial(comm, algo):
    from padmmirnn.gradient.trainer import GradientTrainer
    from padmmirnn.nn import init_params

    full = make_local("dense", True, n=31, steps=4, dim=5, classes=3, seed=4)
    cfg = build_config(overrides={"train.algo": algo, "model.hidden": 6,
                                  "optim.batch_size": 7, "optim.clip_norm": 0.5})

    def fresh():
        return init_params(5, 6, 3, 0, "orthogonal", 1.0)

    serial = GradientTrainer(cfg, full, 31, SerialComm(), fresh())
    start, stop = partition(31, comm.size, comm.rank)
    sp = GradientTrainer(cfg, _slice(full, start, stop), 31, comm, fresh())
    for _ in range(3):
        serial.step()
        sp.step()
        a, b = serial.describe(None), sp.describe(None)
        assert b["batch_loss"] == pytest.approx(a["batch_loss"], rel=1e-12)
    for name, value in serial.params.arrays().items():
        np.testing.assert_allclose(getattr(sp.params, name), value, rtol=1e-11, atol=1e-13)


def test_celgc_ranks_end_each_epoch_with_the_same_weights(comm):
    from padmmirnn.gradient.trainer import GradientTrainer
    from padmmirnn.nn import init_params

    full = make_local("dense", False, n=41, steps=4, dim=5, classes=3, seed=5)
    cfg = build_config(overrides={"train.algo": "celgc", "model.hidden": 6,
                                  "optim.batch_size": 4, "optim.celgc_period": 3})
    start, stop = partition(41, comm.size, comm.rank)
    tr = GradientTrainer(cfg, _slice(full, start, stop), 41, comm,
                         init_params(5, 6, 3, 0, "orthogonal", 1.0))
    tr.step()
    w = comm.allgather(tr.params.W.tobytes())
    assert w[0] == w[1]
    # local steps happened: the weights moved
    assert not np.allclose(tr.params.W, init_params(5, 6, 3, 0, "orthogonal", 1.0).W)


# float32 state and products, float64 Gram sums and steps: the ranks' partial sums of
# float32 products round differently from the serial sums (about 1e-7 relative per
# product), which three passes of steps carry to a few 1e-7 in the weights (measured)
SP_TOLERANCE = {"float64": (1e-10, 1e-12), "float32": (1e-5, 2e-6)}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind,m2m", [("dense", False), ("tokens", True)])
def test_minibatch_sp_matches_serial(comm, kind, m2m, dtype):
    """Mini-batch ADMM: the same global batches, one reduction each: 2 ranks equal the
    serial run (fast reduction, to rounding: SP_TOLERANCE)."""
    from padmmirnn.admm.minibatch import MinibatchAdmm

    full = make_local(kind, m2m, n=45, steps=5, dim=6, classes=4, seed=21)
    cfg = build_config(overrides={"model.hidden": 7, "admm.batch_size": 10,
                                  "train.dtype": dtype})
    start, stop = partition(45, comm.size, comm.rank)
    serial = MinibatchAdmm(cfg, full, 45, SerialComm())
    sp = MinibatchAdmm(cfg, _slice(full, start, stop), 45, comm)
    rtol, atol = SP_TOLERANCE[dtype]
    for _ in range(3):
        serial.step()
        sp.step()
        for name, value in serial.params.arrays().items():
            np.testing.assert_allclose(getattr(sp.params, name), value, rtol=rtol, atol=atol)
    assert sp.describe(None)["batch_loss"] == pytest.approx(serial.describe(None)["batch_loss"],
                                                            rel=rtol)


def _one_token_step(comm, trainer, cfg, seed: int):
    """One step of ``trainer`` serially and on this rank's slice of token inputs with a
    vocabulary of 300 of which the batches use 6; the weights must agree. Returns the
    SP trainer and the bytes and synchronisations that step added to the ledger."""
    full = make_local("tokens", True, n=40, steps=5, dim=300, classes=4, seed=seed)
    full.inputs[...] = full.inputs % 6
    start, stop = partition(40, comm.size, comm.rank)
    serial = trainer(cfg, full, 40, SerialComm())
    sp = trainer(cfg, _slice(full, start, stop), 40, comm)
    before = comm.ledger.bytes, comm.ledger.syncs
    serial.step()
    sp.step()
    for name, value in serial.params.arrays().items():
        np.testing.assert_allclose(getattr(sp.params, name), value, rtol=1e-10, atol=1e-12)
    return sp, comm.ledger.bytes - before[0], comm.ledger.syncs - before[1]


def test_minibatch_token_reduction_carries_the_batch_tokens_only(comm):
    """Token inputs with a vocabulary of 300 and batches that use 6 of them: each batch
    reduces its token counts, then the statistics of the tokens some rank holds only;
    the weights equal the serial run's, and the bytes are a fraction of the full fields'."""
    from padmmirnn.admm.minibatch import MinibatchAdmm

    cfg = build_config(overrides={"model.hidden": 7, "admm.batch_size": 10})
    sp, nbytes, syncs = _one_token_step(comm, MinibatchAdmm, cfg, seed=24)
    assert syncs == 2 * 4  # counts, then the compact fields
    assert nbytes < 0.2 * 8 * sp.layout.size * 4


def test_adam_token_reduction_carries_the_batch_tokens_only(comm):
    """Data-parallel Adam on token inputs reduces the columns of U that some rank's
    samples touch only (after a reduction of the token indicator): the weights equal the
    serial run's and the bytes are a fraction of the full gradient's."""
    from padmmirnn.gradient.trainer import GradientTrainer

    cfg = build_config(overrides={"train.algo": "adam", "model.hidden": 32,
                                  "optim.batch_size": 10})
    sp, nbytes, syncs = _one_token_step(comm, GradientTrainer, cfg, seed=25)
    assert syncs == 2 * 4
    assert nbytes < 0.2 * 8 * sp.params.size * 4


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_minibatch_deterministic_reduction_is_bitwise_for_any_rank_count(comm, dtype):
    """With train.reduction = deterministic a mini-batch is a group of whole chunks, each
    processed by its owner and added in global chunk order: 2 ranks equal 1 bitwise, in
    float32 as in float64."""
    from padmmirnn.admm.minibatch import MinibatchAdmm

    full = make_local("dense", False, n=47, steps=5, dim=6, classes=4, seed=22)
    cfg = build_config(overrides={"model.hidden": 7, "admm.batch_size": 10,
                                  "train.reduction": "deterministic", "train.chunk": 5,
                                  "train.dtype": dtype})
    serial = MinibatchAdmm(cfg, full, 47, SerialComm(), parts=split_parts(full, 5))
    start, stop = chunk_partition(47, 5, comm.size, comm.rank)
    mine = _slice(full, start, stop)
    sp = MinibatchAdmm(cfg, mine, 47, comm, parts=split_parts(mine, 5))
    for _ in range(3):
        serial.step()
        sp.step()
    for name, value in serial.params.arrays().items():
        np.testing.assert_array_equal(getattr(sp.params, name), value)


def test_minibatch_local_steps_average_once_per_period(comm):
    """admm.consensus = average with sync_every = I: local steps on each rank's samples,
    one reduction every I steps and at the end of a pass; every rank then holds the same
    weights, the ledger counts those reductions only, and the passes reduce the global
    training loss."""
    from padmmirnn.admm.consensus import ConsensusAdmm
    from padmmirnn.nn import loss_sums

    full = make_local("dense", False, n=80, steps=5, dim=6, classes=3, seed=23)
    full.targets[0] = np.argmax(full.inputs.sum(0)[:, :3], axis=1)  # learnable
    cfg = build_config(overrides={"model.hidden": 7, "admm.batch_size": 10,
                                  "admm.consensus": "average", "admm.sync_every": 3})
    start, stop = partition(80, comm.size, comm.rank)
    mine = _slice(full, start, stop)
    tr = ConsensusAdmm(cfg, mine, 80, comm)
    assert tr.local_steps == 8  # 40 samples per rank, local batches of 5

    def global_loss():
        return comm.allreduce_sum(loss_sums(tr.params, mine, "tanh", "ce"))[0]

    before, syncs = global_loss(), comm.ledger.syncs
    for _ in range(3):
        tr.step()
    assert comm.ledger.syncs - syncs == 3 * 3  # ceil(8 / 3) averages per pass
    for name, value in tr.params.arrays().items():
        gathered = comm.allgather(value.tobytes())
        assert gathered[0] == gathered[1], name
    assert global_loss() < before


@pytest.mark.parametrize("mode", ["none", "average", "duals", "outer"])
def test_virtual_ranks_equal_real_ranks(comm, mode):
    """train.virtual_ranks = 2 on one process runs the algorithm of two ranks: every
    iterate equals that of the real 2-rank job (1e-10), in SP and every consensus mode,
    and the ledger counts the same synchronisations and bytes."""
    from padmmirnn.admm.consensus import ConsensusAdmm
    from padmmirnn.admm.minibatch import MinibatchAdmm
    from padmmirnn.comm.virtual import VirtualRanks

    full = make_local("dense", False, n=50, steps=4, dim=5, classes=3, seed=29)
    cfg = build_config(overrides={"model.hidden": 6, "admm.batch_size": 8,
                                  "admm.consensus": mode, "admm.sync_every": 2,
                                  "admm.consensus_rho": 0.5})
    kind = MinibatchAdmm if mode == "none" else ConsensusAdmm
    start, stop = partition(50, comm.size, comm.rank)
    real = kind(cfg, _slice(full, start, stop), 50, comm)
    serial = SerialComm()
    virtual = kind(cfg, full, 50, serial, ranks=VirtualRanks(serial, 2))
    syncs = comm.ledger.syncs
    for _ in range(3):
        real.step()
        virtual.step()
        for name, value in virtual.params.arrays().items():
            np.testing.assert_allclose(getattr(real.params, name), value, rtol=1e-10,
                                       atol=1e-12, err_msg=f"{mode} {name}")
    assert comm.ledger.syncs - syncs == serial.ledger.syncs > 0
    assert real.bytes_per_step == virtual.bytes_per_step


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("kind,m2m", [("dense", False), ("tokens", True)])
def test_gated_stacked_minibatch_sp_matches_serial(comm, cell, kind, m2m):
    """Mini-batch ADMM on two layers of a gated cell: 2 ranks equal the serial run to
    1e-10 (the per-layer statistics, a GRU's candidate sub-block solves, one reduction
    per mini-batch)."""
    from padmmirnn.admm.minibatch import MinibatchAdmm

    full = make_local(kind, m2m, n=45, steps=5, dim=6, classes=4, seed=24)
    cfg = build_config(overrides={"model.hidden": 7, "admm.batch_size": 10,
                                  "model.cell": cell, "model.layers": 2})
    start, stop = partition(45, comm.size, comm.rank)
    serial = MinibatchAdmm(cfg, full, 45, SerialComm())
    sp = MinibatchAdmm(cfg, _slice(full, start, stop), 45, comm)
    assert "W_1" in serial.params.names()
    for _ in range(3):
        serial.step()
        sp.step()
        for name, value in serial.params.arrays().items():
            np.testing.assert_allclose(getattr(sp.params, name), value, rtol=1e-10, atol=1e-12,
                                       err_msg=name)
    assert sp.describe(None)["batch_loss"] == pytest.approx(serial.describe(None)["batch_loss"],
                                                            rel=1e-10)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gated_stacked_adam_sp_matches_serial(comm, cell):
    """Data-parallel Adam on two layers of a gated cell equals the serial run."""
    from padmmirnn.gradient.trainer import GradientTrainer
    from padmmirnn.nn import init_params

    full = make_local("dense", True, n=31, steps=4, dim=5, classes=3, seed=25)
    cfg = build_config(overrides={"train.algo": "adam", "model.hidden": 6,
                                  "model.cell": cell, "model.layers": 2,
                                  "optim.batch_size": 7, "optim.clip_norm": 0.5})

    def fresh():
        return init_params(5, 6, 3, 0, "orthogonal", 1.0, cell=cell, layers=2)

    serial = GradientTrainer(cfg, full, 31, SerialComm(), fresh())
    start, stop = partition(31, comm.size, comm.rank)
    sp = GradientTrainer(cfg, _slice(full, start, stop), 31, comm, fresh())
    for _ in range(3):
        serial.step()
        sp.step()
        assert sp.describe(None)["batch_loss"] == pytest.approx(
            serial.describe(None)["batch_loss"], rel=1e-10)
    for name, value in serial.params.arrays().items():
        np.testing.assert_allclose(getattr(sp.params, name), value, rtol=1e-10, atol=1e-12,
                                   err_msg=name)

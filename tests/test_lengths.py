"""Sequence lengths in the compute (issue 25): a pass over padded data with lengths is
the pass over every sequence cut to its own length. The padding is filled with random
values, so a pass that read it would differ."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import make_local, traced_peak

from padmmirnn.admm.blockstep import batch_statistics
from padmmirnn.admm.minibatch import MinibatchAdmm
from padmmirnn.cli import main
from padmmirnn.comm import SerialComm
from padmmirnn.config import build_config
from padmmirnn.datafiles import write_dataset
from padmmirnn.nn import Network, Params, layer_name
from padmmirnn.nn.network import by_length
from padmmirnn.samples import LocalData, partition

STEPS, DIM, CLASSES, H = 6, 5, 3, 4
CASES = [(cell, layers, kind, m2m) for cell in ("rnn", "gru", "lstm") for layers in (1, 2)
         for kind in ("dense", "tokens") for m2m in (False, True)]


def _data(kind: str, m2m: bool, n: int = 9, seed: int = 3) -> LocalData:
    """Random padded data with random lengths in [1, T] (unordered, one of T)."""
    data = make_local(kind, m2m, n=n, steps=STEPS, dim=DIM, classes=CLASSES, seed=seed)
    lengths = np.random.default_rng(seed + 1).integers(1, STEPS + 1, n).astype(np.int32)
    lengths[n // 2] = STEPS
    return dataclasses.replace(data, lengths=lengths)


def _truncated(data: LocalData, i: int) -> LocalData:
    """Sample ``i`` alone, cut to its length, without lengths: the reference."""
    L = int(data.lengths[i])
    targets = data.targets[:L, i:i + 1] if data.info.many_to_many else data.targets[:, i:i + 1]
    return LocalData(data.info, data.inputs[:L, i:i + 1].copy(), targets.copy(), 0, 1)


def _net(cell: str, layers: int):
    net = Network.build(cell, "tanh", layers)
    p = net.init_params(DIM, H, CLASSES, 1, "gaussian", 1.0)
    rng = np.random.default_rng(2)
    return net, p.map(lambda a: a + 0.2 * rng.standard_normal(a.shape))  # nonzero biases


@pytest.mark.parametrize("cell,layers,kind,m2m", CASES)
def test_masked_pass_equals_the_truncated_sequences(cell, layers, kind, m2m):
    """Outputs, loss sums (loss, correct, rows) and BPTT gradient sums over padded data
    with lengths equal those of every sequence run alone over its own steps; the ADMM
    block statistics (Gram blocks, D, counts) equal the sums of the truncated ones and
    are minus the BPTT gradient sums (the KKT multipliers are the adjoint)."""
    net, p = _net(cell, layers)
    data = _data(kind, m2m)
    parts = [_truncated(data, i) for i in range(data.n)]
    # outputs, in by_length's order
    ordered = by_length(data)
    o = net.forward(p, ordered).outputs(p, m2m)
    order = np.argsort(-data.lengths, kind="stable")
    for j, i in enumerate(order):
        ref = net.forward(p, parts[i]).outputs(p, m2m)[:, 0]
        np.testing.assert_allclose(o[:len(ref), j], ref, rtol=1e-12, atol=1e-14)
    # loss sums
    sums = net.loss_sums(p, data, "ce")
    ref = sum(net.loss_sums(p, q, "ce") for q in parts)
    np.testing.assert_allclose(sums, ref, rtol=1e-12)
    assert sums[2] == (data.lengths.sum() if m2m else data.n)
    # BPTT gradient sums
    res = net.gradients(p, data, "ce")
    refs = [net.gradients(p, q, "ce") for q in parts]
    assert res.rows == sum(r.rows for r in refs)
    assert res.loss * res.rows == pytest.approx(sum(r.loss * r.rows for r in refs), rel=1e-12)
    for k in p.names():
        expect = sum(getattr(r.grads, k) * r.rows for r in refs)
        np.testing.assert_allclose(getattr(res.grads, k) * res.rows, expect, rtol=1e-10,
                                   atol=1e-12, err_msg=k)
    # ADMM statistics: the sums of the truncated ones, and minus the gradient sums
    st = batch_statistics(net, p, data, "ce", np.dtype(np.float64))
    st_ref = [batch_statistics(net, p, q, "ce", np.dtype(np.float64)) for q in parts]
    for k in st:
        np.testing.assert_allclose(st[k], sum(s[k] for s in st_ref), rtol=1e-10, atol=1e-12,
                                   err_msg=k)
    assert st["counts"][1] == data.lengths.sum() and st["counts"][2] == res.rows
    g, rows = res.grads, res.rows
    tol = {"rtol": 1e-10, "atol": 1e-12}
    for l in range(layers):
        D = st[f"l{l}.D"]
        dx = 0 if (kind == "tokens" and l == 0) else g.layer(l).U.shape[1]
        np.testing.assert_allclose(D[:, dx + 1:], -rows * getattr(g, layer_name("W", l)), **tol)
        np.testing.assert_allclose(D[:, dx], -rows * getattr(g, layer_name("b", l)), **tol)
        dU = st["l0.Dx"] if dx == 0 else D[:, :dx]
        np.testing.assert_allclose(dU, -rows * getattr(g, layer_name("U", l)), **tol)
    np.testing.assert_allclose(st["out.D"][:, :H], -rows * g.V, **tol)
    np.testing.assert_allclose(st["out.D"][:, H], -rows * g.c, **tol)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("m2m", [False, True])
def test_gradient_with_lengths_matches_finite_differences(cell, m2m):
    """The BPTT gradient with lengths is the derivative of the masked mean loss."""
    net, p = _net(cell, 2)
    data = _data("dense", m2m, n=5, seed=7)
    res = net.gradients(p, data, "ce")
    rng = np.random.default_rng(0)
    direction = p.map(lambda a: rng.standard_normal(a.shape))
    eps = 1e-6

    def loss(q):
        s = net.loss_sums(q, data, "ce")
        return s[0] / s[2]

    fd = (loss(_axpy(p, direction, eps)) - loss(_axpy(p, direction, -eps))) / (2 * eps)
    exact = sum(float(np.vdot(getattr(res.grads, k), getattr(direction, k)))
                for k in p.names())
    assert exact == pytest.approx(fd, rel=1e-6, abs=1e-9)


def _axpy(p, d, a):
    return Params({k: getattr(p, k) + a * getattr(d, k) for k in p.names()})


def test_lengths_of_t_equal_no_lengths():
    """Every length T: the same figures as without lengths."""
    net, p = _net("gru", 2)
    data = make_local("tokens", True, n=7, steps=STEPS, dim=DIM, classes=CLASSES, seed=1)
    full = dataclasses.replace(data, lengths=np.full(7, STEPS, np.int32))
    np.testing.assert_allclose(net.loss_sums(p, full, "ce"), net.loss_sums(p, data, "ce"),
                               rtol=1e-13)
    a, b = net.gradients(p, full, "ce"), net.gradients(p, data, "ce")
    np.testing.assert_allclose(a.grads.flat(), b.grads.flat(), rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(a.step_norms, b.step_norms, rtol=1e-11)


def _split(path, n=60, steps=8, dim=7, classes=3, seed=0, m2m=False):
    """A token split with lengths in [1, T], real tokens first (zeros after)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, steps + 1, n)
    x = rng.integers(2, dim, (n, steps)).astype(np.int32)
    x[np.arange(steps)[None, :] >= lengths[:, None]] = 0
    y = rng.integers(0, classes, (n, steps) if m2m else n).astype(np.int32)
    write_dataset(path, x, y, classes=classes, vocab=dim, lengths=lengths)
    return lengths


def _padded_further(data: LocalData, extra: int, seed: int) -> LocalData:
    """The same sequences stored with ``extra`` more padded steps, of random values."""
    rng = np.random.default_rng(seed)
    steps, n = data.inputs.shape[:2]
    shape = (steps + extra, *data.inputs.shape[1:])
    if data.info.kind == "tokens":
        inputs = rng.integers(0, data.info.dim, shape).astype(np.int32)
    else:
        inputs = rng.standard_normal(shape)
    inputs[:steps] = data.inputs
    targets = data.targets
    if data.info.many_to_many:
        targets = rng.integers(0, data.info.classes, (steps + extra, n)).astype(np.int32)
        targets[:steps] = data.targets
    info = dataclasses.replace(data.info, steps=steps + extra)
    return LocalData(info, inputs, targets, data.start, data.stop, data.lengths)


def _fullbatch(data: LocalData, preset: str, parts=None, comm=None, n_global=None):
    from padmmirnn.admm import AdmmEngine
    from padmmirnn.config import load_config

    cfg = load_config(preset, {"model.hidden": H, "admm.nu": 1e-3})
    return AdmmEngine(cfg, parts or [data], n_global or data.n, comm or SerialComm())


def _assert_same_weights(ref, other, rtol: float, atol: float) -> None:
    for name, value in ref.params.arrays().items():
        np.testing.assert_allclose(getattr(other.params, name), value, rtol=rtol, atol=atol,
                                   err_msg=name)


@pytest.mark.parametrize("preset", ["fullbatch", "faithful"])
@pytest.mark.parametrize("kind,m2m", [("dense", False), ("tokens", True)])
def test_fullbatch_admm_skips_the_padded_steps(preset, kind, m2m):
    """Full-batch and faithful ADMM on data with lengths: the iterates do not depend on
    the padding (the same sequences with 3 more padded steps of random values give the
    same weights), the engine's own training loss is the masked forward pass's at its
    weights (a many-to-one output read at each sequence's last real step), and with the
    step control the training loss never increases."""
    data = _data(kind, m2m, n=23, seed=7)
    a = _fullbatch(data, preset)
    b = _fullbatch(_padded_further(data, 3, seed=8), preset)
    net = Network.build("rnn", "tanh", 1)
    losses = []
    for _ in range(5):
        a.step()
        b.step()
        _assert_same_weights(a, b, rtol=1e-12, atol=1e-13)
        if a.synced:
            own = np.sum(a.train_loss_sums(), axis=0)
            np.testing.assert_allclose(own, net.loss_sums(a.params, data, "ce"),
                                       rtol=1e-10)
            losses.append(own[0])
    if preset == "fullbatch":
        assert len(losses) == 5 and np.all(np.diff(losses) <= 1e-9 * losses[0]), losses


def test_fullbatch_admm_with_lengths_resumes_on_other_parts():
    """The checkpoint state of a run with lengths (per sample, sample-major, padded steps
    zero) restored into an engine whose samples are cut into other parts continues as
    the uninterrupted run."""
    from padmmirnn.samples import split_parts

    data = _data("dense", True, n=23, seed=9)
    whole = _fullbatch(data, "fullbatch")
    first = _fullbatch(data, "fullbatch")
    for _ in range(2):
        whole.step()
        first.step()
    state = first.state_dict()
    assert state["per_sample"]["A"].shape == (23, STEPS, H)
    short = data.lengths < STEPS
    assert np.all(state["per_sample"]["A"][short, -1] == 0.0)  # a padded step: no state
    again = _fullbatch(data, "fullbatch", parts=split_parts(data, 5), n_global=23)
    again.params = first.params.copy()
    again.load_state_dict(state)
    for _ in range(3):
        whole.step()
        again.step()
    _assert_same_weights(whole, again, rtol=1e-10, atol=1e-12)


def _minibatch(data: LocalData, n_global: int, lengths, **over):
    cfg = build_config(overrides={"model.hidden": 5, "admm.batch_size": 8,
                                  "train.bucket_window": 3, **over})
    return MinibatchAdmm(cfg, data, n_global, SerialComm(), lengths=lengths)


def test_minibatch_admm_buckets_by_length_the_same_for_any_slice():
    """The mini-batch ADMM's batches with lengths: every sample once per pass, each batch
    by decreasing length, sequences of similar length (less spread than unbucketed
    batches), and the same batches whatever slice of the samples a rank holds."""
    data = _data("tokens", False, n=50, seed=5)
    L = data.lengths
    whole = _minibatch(data, 50, L)
    order = np.random.default_rng(0).permutation(50)
    batches = whole.batches(order)
    assert sorted(np.concatenate(batches).tolist()) == list(range(50))
    assert len(batches) == 7 and all(np.all(np.diff(L[b]) <= 0) for b in batches)
    spread = np.mean([np.ptp(L[b]) for b in batches])
    plain = _minibatch(data, 50, None).batches(order)
    assert spread < np.mean([np.ptp(L[b]) for b in plain])
    for lo, hi in ((0, 25), (25, 50)):  # rank 0 and rank 1 of 2
        part = dataclasses.replace(data.take(np.arange(lo, hi)), start=lo, stop=hi)
        mine = _minibatch(part, 50, L).batches(order)
        assert all(np.array_equal(a, b) for a, b in zip(batches, mine, strict=True))
    assert _minibatch(data, 50, L, **{"train.bucket": False}).lengths is None


@pytest.mark.parametrize("cell,m2m", [("gru", False), ("lstm", True)])
def test_minibatch_admm_trains_on_lengths(tmp_path, cell, m2m):
    """A mini-batch ADMM pass over bucketed batches with lengths: finite, lowers the
    training loss, and its first step equals one built from truncated sequences
    (through batch_statistics, checked above)."""
    data = _data("tokens", m2m, n=40, seed=9)
    tr = _minibatch(data, 40, data.lengths, **{"model.cell": cell})
    net = tr.net
    before = net.loss_sums(tr.params, data, "ce")
    for _ in range(3):
        tr.step()
    after = net.loss_sums(tr.params, data, "ce")
    assert np.isfinite(after).all() and after[0] / after[2] < before[0] / before[2]


@pytest.mark.mpi
@pytest.mark.parametrize("cell,kind,m2m", [("rnn", "dense", False), ("gru", "tokens", True),
                                           ("lstm", "tokens", False)])
def test_minibatch_sp_with_lengths_matches_serial(comm, cell, kind, m2m):
    """Mini-batch ADMM with lengths under mpiexec -n 2: the bucketed global batches are
    the serial run's, every rank's share of a batch runs its own real steps, and one
    reduction per batch gives the serial iterates (to rounding)."""
    full = _data(kind, m2m, n=45, seed=21)
    start, stop = partition(45, comm.size, comm.rank)
    mine = dataclasses.replace(full.take(np.arange(start, stop)), start=start, stop=stop)
    over = {"model.cell": cell, "admm.batch_size": 10}
    serial = _minibatch(full, 45, full.lengths, **over)
    cfg = serial.cfg
    sp = MinibatchAdmm(cfg, mine, 45, comm, lengths=full.lengths)
    order = np.random.default_rng(4).permutation(45)
    got = comm.allgather(np.concatenate(sp.batches(order)).tobytes())
    assert got[0] == got[-1] == np.concatenate(serial.batches(order)).tobytes()
    for _ in range(3):
        serial.step()
        sp.step()
        for name, value in serial.params.arrays().items():
            np.testing.assert_allclose(getattr(sp.params, name), value, rtol=1e-10, atol=1e-12)


def test_a_post_padded_classifier_reads_raw_texts_at_their_last_word(tmp_path):
    """A classifier trained on post-padded texts (with lengths) reads raw strings as its
    training data were read: the output at each text's last real token, the same as the
    text's ids cut to its length (the padding after it changes nothing)."""
    import padmmirnn

    texts = ["good fun film", "bad dull film ever made", "fun", "dull bad plot"] * 10
    labels = ["fresh", "rotten", "fresh", "rotten"] * 10
    (tmp_path / "r.csv").write_text("text,label\n" + "".join(
        f"{t},{lab}\n" for t, lab in zip(texts, labels, strict=True)))
    assert main(["data", "prepare", "csv", "--source", str(tmp_path / "r.csv"),
                 "--out", str(tmp_path / "r_train.h5"), "--steps", "7",
                 "--test-fraction", "0"]) == 0
    assert main(["train", "--dataset", str(tmp_path / "r_train.h5"), "--iterations", "2",
                 "--set", "model.hidden=8", "--out", str(tmp_path / "run")]) == 0
    model = padmmirnn.load(tmp_path / "run" / "weights.h5")
    assert model.prepared["padding"] == "post"
    got = model.logits(texts[:4])
    for i, t in enumerate(texts[:4]):
        ids = model.encode(t)[:, :len(t.split())]
        np.testing.assert_allclose(got[i], model.logits(ids)[0], rtol=1e-12, atol=1e-14)
    assert not np.allclose(got[2], model.logits(model.encode(texts[2]))[0])  # read at T


def test_consensus_local_batches_are_bucketed_within_each_rank():
    """Consensus ADMM with lengths: every (virtual) rank's local batches cover its own
    samples, each by decreasing length, and the run trains."""
    from padmmirnn.admm.consensus import ConsensusAdmm
    from padmmirnn.comm.virtual import VirtualRanks

    data = _data("tokens", False, n=40, seed=11)
    cfg = build_config(overrides={"model.hidden": 5, "admm.batch_size": 8,
                                  "admm.consensus": "average", "train.bucket_window": 2})
    comm = SerialComm()
    tr = ConsensusAdmm(cfg, data, 40, comm, ranks=VirtualRanks(comm, 2))
    for w in tr.workers:
        batches = tr._local_batches(w)
        assert sorted(np.concatenate(batches).tolist()) == list(range(w.data.n))
        assert all(np.all(np.diff(w.data.lengths[b]) <= 0) for b in batches)
    before = tr.net.loss_sums(tr.params, data, "ce")
    tr.step()
    after = tr.net.loss_sums(tr.params, data, "ce")
    assert after[0] / after[2] < before[0] / before[2]


@pytest.mark.mpi
@pytest.mark.parametrize("preset", ["fullbatch", "faithful"])
def test_fullbatch_sp_with_lengths_matches_serial(comm, preset):
    """Full-batch SP on data with lengths under mpiexec -n 2 (each rank's slice cut into
    its own length groups) gives the serial run's iterates."""
    data = _data("tokens", False, n=31, seed=11)
    start, stop = partition(data.n, comm.size, comm.rank)
    mine = LocalData(data.info, data.inputs[:, start:stop].copy(),
                     data.targets[:, start:stop].copy(), start, stop,
                     data.lengths[start:stop].copy())
    serial = _fullbatch(data, preset)
    sp = _fullbatch(mine, preset, comm=comm, n_global=data.n)
    for _ in range(4):
        serial.step()
        sp.step()
        _assert_same_weights(serial, sp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("kind,m2m", [("dense", False), ("tokens", True)])
def test_the_memory_estimate_covers_a_step_with_lengths(cell, layers, kind, m2m):
    """Network.bytes_per_sample with lengths (the reordered inputs, the packed copies of
    the regressors and adjoints) against tracemalloc's peak of a mini-batch ADMM step's
    statistics and a BPTT gradient: the peak at most 6% above the estimate, and at least
    70% of it in the worst case (every length T but one: with all of them T the lengths
    are dropped and the passes without them run, below the estimate)."""

    n, h = 100, 16
    data = make_local(kind, m2m, n=n, steps=20, dim=12, classes=5, seed=3)
    info = dataclasses.replace(data.info, has_lengths=True)
    net = Network.build(cell, "tanh", layers)
    p = net.init_params(12, h, 5, 0, "gaussian", 1.0)
    estimate = net.bytes_per_sample(info, h, 8) * n
    rng = np.random.default_rng(0)
    worst = np.full(n, 20, np.int32)
    worst[-1] = 19
    for lengths, low in ((worst, 0.7), (rng.integers(1, 21, n), 0.0)):
        d = dataclasses.replace(data, info=info, lengths=lengths.astype(np.int32))
        for run in (lambda d=d: batch_statistics(net, p, d, "ce", np.dtype(np.float64)),
                    lambda d=d: net.gradients(p, d, "ce")):
            peak = traced_peak(run)
            assert low * estimate <= peak <= 1.06 * estimate, peak / estimate


@pytest.mark.parametrize("cell,layers,kind,m2m", CASES[::3])
def test_a_batch_of_equal_lengths_drops_them_and_keeps_the_layout(cell, layers, kind, m2m):
    """Every length L < T: by_length drops the lengths; the gradient (the mean over the
    samples run alone) and its per-step norms keep the layout of T steps (zero past L),
    which the ranks' reductions rely on whatever lengths their batches hold."""
    net, p = _net(cell, layers)
    data = dataclasses.replace(_data(kind, m2m), lengths=np.full(9, 3, np.int32))
    assert by_length(data).lengths is None
    res = net.gradients(p, data, "ce")
    parts = [net.gradients(p, _truncated(data, i), "ce") for i in range(data.n)]
    assert res.step_norms.shape == (STEPS,) and not res.step_norms[3:].any()
    np.testing.assert_allclose(res.step_norms[:3], np.mean([g.step_norms[:3] for g in parts], 0),
                               rtol=1e-10)
    np.testing.assert_allclose(res.loss, np.mean([g.loss for g in parts]), rtol=1e-12)
    np.testing.assert_allclose(res.grads.flat(), np.mean([g.grads.flat() for g in parts], 0),
                               rtol=1e-9, atol=1e-13)

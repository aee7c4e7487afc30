"""Consensus mini-batch ADMM (padmmirnn/admm/consensus.py) on virtual ranks: the joins'
invariants, the ledger's counts, and resume bit for bit in every mode."""

import json

import numpy as np
import pytest
from conftest import make_local, write_random_split

from padmmirnn.admm.consensus import ConsensusAdmm
from padmmirnn.cli import main
from padmmirnn.comm import SerialComm
from padmmirnn.comm.virtual import VirtualRanks
from padmmirnn.config import build_config
from padmmirnn.nn import loss_sums


def _trainer(mode, ranks=4, sync_every=0, **extra):
    data = make_local("dense", False, n=64, steps=4, dim=5, classes=3, seed=31)
    data.targets[0] = np.argmax(data.inputs.sum(0)[:, :3], axis=1)  # learnable
    cfg = build_config(overrides={"model.hidden": 6, "admm.batch_size": 16,
                                  "admm.consensus": mode, "admm.sync_every": sync_every,
                                  **extra})
    comm = SerialComm()
    return ConsensusAdmm(cfg, data, 64, comm, ranks=VirtualRanks(comm, ranks)), data, comm


def test_duals_sum_to_zero_and_the_consensus_is_the_mean_of_theta_plus_u():
    tr, _, _ = _trainer("duals", sync_every=2, **{"admm.consensus_rho": 0.3})
    tr.step()
    duals = np.stack([w.dual for w in tr.workers])
    assert np.abs(duals).max() > 1e-6  # the ranks drifted apart and the duals saw it
    np.testing.assert_allclose(duals.sum(axis=0), 0.0, atol=1e-12)
    for w in tr.workers:  # every rank restarts a round from z
        np.testing.assert_array_equal(w.state.params.flat(), tr.params.flat())


@pytest.mark.parametrize("mode", ["average", "duals", "outer"])
def test_joins_are_counted_once_per_round_and_the_loss_falls(mode):
    tr, data, comm = _trainer(mode, sync_every=3)
    assert tr.local_batch == 4 and tr.local_steps == 4  # 16 samples per rank
    before = loss_sums(tr.params, data, "tanh", "ce")[0]
    for _ in range(3):
        tr.step()
    assert comm.ledger.syncs == 3 * 2  # ceil(4 / 3) joins per pass
    assert comm.ledger.bytes == 6 * tr.bytes_per_step // 2
    assert loss_sums(tr.params, data, "tanh", "ce")[0] < before


@pytest.mark.parametrize("mode", ["duals", "outer"])
def test_a_resumed_consensus_run_equals_the_uninterrupted_one(tmp_path, mode):
    """Checkpoints keep the joined weights, Grams, the outer velocity and every virtual
    rank's dual: a run resumed after pass 2 equals the uninterrupted 4 passes bit for
    bit."""
    path = tmp_path / "toy_train.h5"
    write_random_split(path, n=48, steps=4, dim=5, classes=3, seed=3)
    common = ["train", "--dataset", str(path), "--set", "model.hidden=6",
              "--set", "admm.batch_size=16", "--set", f"admm.consensus={mode}",
              "--set", "train.virtual_ranks=4", "--set", "admm.sync_every=2"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main([*common, "--iterations", "4", "--out", str(whole)]) == 0
    assert main([*common, "--iterations", "2", "--checkpoint-every", "2",
                 "--out", str(part)]) == 0
    assert main([*common, "--iterations", "4", "--resume", "latest", "--out", str(part)]) == 0
    a = [json.loads(r) for r in (whole / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(r) for r in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["virtual_ranks"] == 4 and summary["ledger"] == "counted"
    assert summary["syncs"] == 4 * 2  # 12 samples per rank: 3 local steps, 2 joins a pass

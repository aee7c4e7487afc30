"""RMA on MPICH's network path: ``MPIR_CVAR_NOLOCAL=1`` makes ranks of one node talk
through the route used between nodes, where operations complete only at a flush and
origin buffers are read late."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which(
    "mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found")
PROBE = str(Path(__file__).with_name("rma_probe.py"))


def _probe(scenario: str, ranks: int = 2) -> list[dict]:
    env = {**os.environ, "MPIR_CVAR_NOLOCAL": "1"}
    proc = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-P", PROBE, scenario],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("[")][-1])


@pytest.mark.parametrize("attempt", range(3))
def test_a_stop_proposed_first_is_agreed_as_proposed(attempt):
    """BUG 1 of the network path: the proposal's origin buffers were temporaries freed
    before the flush, and NumPy reused them: the agreed stop came out as (2, 2)."""
    for rank in _probe("first_operation_is_a_stop"):
        assert rank["agreed"] == [100, 2], rank


@pytest.mark.oversubscribed
def test_bounded_delay_holds_in_every_snapshot_with_three_ranks():
    """BUG 3: the bound was checked outside the mutex and the snapshot read later, so
    with 3 ranks other publishes could land in between: a snapshot could hold a
    contribution more than tau publishes old, and the logged staleness under-reported
    it. Every snapshot not released by a stop must hold every worker, each within tau
    publishes, and the logged staleness must be the true one."""
    ranks = _probe("bounded_delay_snapshots", ranks=3)
    versions = {r["rank"]: r["versions"] for r in ranks}
    checked = 0
    for r in ranks:
        for snap in r["snapshots"]:
            if snap["released"]:
                continue
            held = snap["held"]
            assert min(held) >= 1, snap
            total = sum(held)  # the publishes the snapshot holds
            delay = max(total - versions[p][k - 1] for p, k in enumerate(held))
            assert delay <= len(ranks) - 1, (r["rank"], snap, delay)
            assert snap["logged"] == delay, (r["rank"], snap, delay)
            checked += 1
    assert checked >= 60


def test_operations_on_a_computing_host_complete_without_waiting_for_it():
    """Progress: on the network path a passive-target operation completes only when the
    target enters MPI; rank 0 hosts the windows and computes for 1.5 s, and its progress
    thread must complete rank 1's reads meanwhile (without it the first one waited
    until the end of the compute phase, about 1.3 s)."""
    reads = [r["seconds"] for r in _probe("host_computes") if r["seconds"]][0]
    assert len(reads) == 5 and max(reads) < 0.25, reads

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


def _probe(scenario: str) -> list[dict]:
    env = {**os.environ, "MPIR_CVAR_NOLOCAL": "1"}
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-P", PROBE, scenario],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("[")][-1])


@pytest.mark.parametrize("attempt", range(3))
def test_a_stop_proposed_first_is_agreed_as_proposed(attempt):
    """BUG 1 of the network path: the proposal's origin buffers were temporaries freed
    before the flush, and NumPy reused them: the agreed stop came out as (2, 2)."""
    for rank in _probe("first_operation_is_a_stop"):
        assert rank["agreed"] == [100, 2], rank

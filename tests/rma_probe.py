"""Launched by tests/test_rma_network.py under ``mpiexec -n 2``: one RMA scenario,
named by argv[1]; rank 0 prints one JSON line, the list of what every rank observed."""

from __future__ import annotations

import json
import sys

import numpy as np

from padmmirnn.comm import MPIComm
from padmmirnn.comm.rma import RmaStatsExchange


def first_operation_is_a_stop(comm: MPIComm) -> dict:
    """A rank whose first RMA operation is a stop proposal: the agreed stop must be
    exactly what it proposed (the origin buffers must live until completion)."""
    ex = RmaStatsExchange(comm, 4, 2, kind="iterations")
    if comm.rank == 1:
        ex.propose_stop(100, 2)
    comm.barrier()
    agreed = ex.agreed_stop()
    ex.free()
    return {"agreed": list(agreed)}


def main() -> int:
    comm = MPIComm()
    result = {"first_operation_is_a_stop": first_operation_is_a_stop}[sys.argv[1]](comm)
    every = comm.allgather({"rank": comm.rank, **result})
    if comm.rank == 0:
        print(json.dumps(every), flush=True)
    comm.free()
    return 0


if __name__ == "__main__":
    np.seterr(all="raise")
    sys.exit(main())

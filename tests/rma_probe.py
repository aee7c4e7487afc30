"""Launched by tests/test_rma_network.py under ``mpiexec``: one RMA scenario,
named by argv[1]; rank 0 prints one JSON line, the list of what every rank observed."""

from __future__ import annotations

import json
import sys
import time

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


def bounded_delay_snapshots(comm: MPIComm, iterations: int = 60) -> dict:
    """Bounded-delay exchange with tau = ranks - 1 and ranks at uneven speeds. Rank p
    publishes ``k`` in slot p at its iteration k, so a snapshot names the iteration of
    every worker it holds and their sum is the number of publishes it holds; each rank
    also records the global version of each of its publishes. Snapshots taken once a
    stop was agreed (which releases the bound) are marked."""
    p = comm.size
    ex = RmaStatsExchange(comm, p, p - 1, kind="publishes")
    rng = np.random.default_rng(comm.rank)
    versions, snapshots = [], []
    for k in range(1, iterations + 1):
        buf = np.zeros(p)
        buf[comm.rank] = k
        out = ex.allreduce_sum(buf)
        versions.append(int(ex.counters.read()["last_version"][comm.rank]))
        released = ex.agreed_stop()[0] is not None
        snapshots.append({"held": np.rint(out).astype(int).tolist(),
                          "logged": ex.staleness, "released": released})
        if released:
            break
        time.sleep(float(rng.uniform(0, 2e-3)))
    ex.propose_stop(-1, 1)  # the others may wait for this rank's next publish
    comm.barrier()
    ex.free()
    return {"versions": versions, "snapshots": snapshots}


def host_computes(comm: MPIComm, progress: bool = True) -> dict:
    """Rank 0 hosts the windows and computes for 1.5 s without calling MPI; rank 1's
    one-sided reads of the counters meanwhile (each completed by a flush), timed."""
    ex = RmaStatsExchange(comm, 4, 2, kind="iterations", progress=progress)
    comm.barrier()
    seconds = []
    if comm.rank == 0:
        a = np.random.default_rng(0).random((300, 300))
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.5:
            a = a @ a
            a /= np.abs(a).max()
    else:
        time.sleep(0.2)
        for _ in range(5):
            t0 = time.perf_counter()
            ex.counters.read()
            seconds.append(time.perf_counter() - t0)
            time.sleep(0.05)
    comm.barrier()
    ex.free()
    return {"seconds": seconds}


SCENARIOS = {"first_operation_is_a_stop": first_operation_is_a_stop,
             "bounded_delay_snapshots": bounded_delay_snapshots,
             "host_computes": host_computes,
             "host_computes_without_progress": lambda comm: host_computes(comm, False)}


def main() -> int:
    comm = MPIComm()
    result = SCENARIOS[sys.argv[1]](comm)
    every = comm.allgather({"rank": comm.rank, **result})
    if comm.rank == 0:
        print(json.dumps(every), flush=True)
    comm.free()
    return 0


if __name__ == "__main__":
    np.seterr(all="raise")
    sys.exit(main())

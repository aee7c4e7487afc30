"""Communication: the only module that imports mpi4py.

Algorithms receive a communicator object and call its methods; they never reach
for ``MPI.COMM_WORLD``. :class:`SerialComm` (one process, no MPI imported) and
:class:`MPIComm` (a ``Dup`` of a communicator) offer the same calls. Arrays go
through buffer collectives (``Allreduce`` on contiguous float64), small Python
objects (error messages, paths) through the pickle-based lower-case calls.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import numpy as np

from padmmirnn.errors import PadmmError

_MPI_ENV = ("PMI_SIZE", "PMI_RANK", "PMI_FD", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK",
            "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")


def launched_by_mpi() -> bool:
    """True when the process was started by an MPI launcher (mpiexec, srun --mpi)."""
    return any(k in os.environ for k in _MPI_ENV)


def launcher_rank() -> int:
    """This process's rank as the launcher's environment tells it (0 if unknown),
    for reporting errors that happen before a communicator exists."""
    for key in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


class CommTimer:
    """Seconds spent in, and bytes sent through, array collectives (per rank)."""

    def __init__(self):
        self.seconds = 0.0
        self.bytes = 0


def sum_parts(comm, parts: list[np.ndarray], ordered: bool) -> np.ndarray:
    """Global sum of float64 vectors, one per local part (parts are in global order).

    ``ordered=False``: add the local parts, then one ``Allreduce`` (fast; the
    result depends on the rank count in the last bits). ``ordered=True``: gather
    every rank's parts and add them one by one in global order, so the result is
    bitwise the same for any number of ranks holding the same parts."""
    if not ordered:
        buf = parts[0].copy()
        for extra in parts[1:]:
            buf += extra
        return comm.allreduce_sum(buf)
    rows = comm.allgather_rows(np.stack(parts))
    out = rows[0].copy()
    for row in rows[1:]:
        out += row
    return out


class SerialComm:
    """The communicator of a run on one process: every collective is the identity."""

    rank = 0
    size = 1

    def __init__(self):
        self.timer = CommTimer()

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def allgather_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def gather_samples(self, block: np.ndarray, n_global: int) -> np.ndarray:
        return block

    def allreduce_max(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def bcast_array(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        return buf

    def bcast(self, obj, root: int = 0):
        return obj

    def allgather(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def free(self) -> None:
        pass


class MPIComm:
    """A private duplicate of an MPI communicator (default ``COMM_WORLD``)."""

    def __init__(self, comm=None):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = (comm if comm is not None else MPI.COMM_WORLD).Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.timer = CommTimer()

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        """Sum ``buf`` (contiguous float64) over ranks, in place."""
        t0 = time.perf_counter()
        self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        self.timer.seconds += time.perf_counter() - t0
        self.timer.bytes += buf.nbytes
        return buf

    def allgather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Concatenate every rank's ``[k_r, m]`` float64 rows in rank order."""
        t0 = time.perf_counter()
        counts = np.array(self.comm.allgather(rows.shape[0]), dtype=np.int64) * rows.shape[1]
        out = np.empty((int(counts.sum()) // rows.shape[1], rows.shape[1]))
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.comm.Allgatherv(np.ascontiguousarray(rows), [out, counts, displs,
                                                         self._MPI.DOUBLE])
        self.timer.seconds += time.perf_counter() - t0
        self.timer.bytes += out.nbytes
        return out

    def allreduce_max(self, buf: np.ndarray) -> np.ndarray:
        """Elementwise maximum of ``buf`` (contiguous float64) over ranks, in place."""
        self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.MAX)
        return buf

    def bcast_array(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        """Broadcast a contiguous array from ``root``, in place."""
        self.comm.Bcast(buf, root=root)
        return buf

    def bcast(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def gather_samples(self, block: np.ndarray, n_global: int) -> np.ndarray | None:
        """Concatenate every rank's sample-major block ``[n_r, ...]`` on rank 0, in
        rank order (= global sample order); other ranks get None."""
        t0 = time.perf_counter()
        block = np.ascontiguousarray(block)
        row = int(np.prod(block.shape[1:], dtype=np.int64))
        counts = np.array(self.comm.gather(block.shape[0], root=0) or [0]) * row
        out = None
        if self.rank == 0:
            out = np.empty((n_global, *block.shape[1:]), block.dtype)
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
            recv = [out, counts, displs, self._MPI.Datatype.fromcode(block.dtype.char)]
        else:
            recv = None
        self.comm.Gatherv(block, recv, root=0)
        self.timer.seconds += time.perf_counter() - t0
        return out

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()

    def free(self) -> None:
        if self.comm is not None and not self._MPI.Is_finalized():
            self.comm.Free()
        self.comm = None


def make_comm(parallel: str):
    """The communicator for ``--parallel``: serial unless launched by MPI with >1 rank
    (``auto``) or asked for (``sync``)."""
    if parallel == "auto" and not launched_by_mpi():
        return SerialComm()
    comm = MPIComm()
    if parallel == "none" and comm.size > 1:
        size = comm.size
        comm.free()
        raise PadmmError(f"--parallel none was asked for, but the job has {size} ranks: "
                         "start one process, or use --parallel sync")
    if parallel == "none":
        comm.free()
        return SerialComm()
    if comm.size == 1 and parallel == "auto":
        comm.free()
        return SerialComm()
    return comm


def agree(comm, check) -> object:
    """Run ``check()`` on every rank; if it raises :class:`PadmmError` on any rank,
    raise the first rank's error on *all* ranks (so no rank waits in a collective
    for one that has given up). Returns ``check()``'s value."""
    try:
        value, message = check(), None
    except PadmmError as exc:
        value, message = None, (type(exc), str(exc))
    errors = [(r, m) for r, m in enumerate(comm.allgather(message)) if m is not None]
    if errors:
        rank, (kind, text) = errors[0]
        prefix = f"rank {rank}: " if comm.size > 1 and rank != comm.rank else ""
        raise kind(prefix + text)
    return value


def abort_on_exception(rank: int, size: int) -> None:
    """Print this rank's traceback and end the whole MPI job (no hang on the others)."""
    sys.stderr.write(f"[rank {rank}/{size}] unhandled exception:\n")
    traceback.print_exc()
    sys.stderr.flush()
    if size > 1 and "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(1)


class RmaStatsExchange:
    """Asynchronous, bounded-staleness exchange of the per-iteration statistics over
    MPI one-sided windows (AP-ADMMiRNN, DESIGN.md section 4).

    Window 1 (float64, on ``host``) holds the global statistics. Window 2 (int64)
    holds a mutex word, every worker's counters ``published[r]`` and
    ``consumed[r]``, and the agreed last iteration with its reason (stops). A
    worker keeps its last published contribution and, at iteration k,

    1. waits until every worker has consumed iteration ``k - 1 - tau``,
    2. under the mutex, accumulates ``new - previous`` into window 1 and sets
       ``published[me] = k``,
    3. waits until every worker has published iteration ``max(k - tau, 1)`` (a
       snapshot never lacks a worker's contribution),
    4. under the mutex, reads a snapshot of window 1, then sets ``consumed[me] = k``.

    So the snapshot holds every worker's contribution from iterations within
    ``tau`` of k, and ``tau = 0`` is the synchronous algorithm (the same sums as
    one Allreduce, up to the rounding of accumulating differences). Invariant:
    window 1 equals the sum of every worker's latest published contribution.

    ``kind = "publishes"`` bounds the *delay* instead (as partial-barrier
    asynchronous ADMM): every publish advances a global version; step 1 goes,
    and step 3 waits only while some worker's latest contribution is more than
    ``tau`` publishes old or some worker has not published yet (or a stop is
    agreed). Fast workers then run more iterations than slow ones instead of
    waiting for them.

    Lock discipline without ``MPI_Win_lock``: all ranks hold one passive
    ``Lock_all`` epoch for the whole run and complete each operation with
    ``Flush``; the mutex is a ``Compare_and_swap`` on window 2. Measured here with
    the MPICH wheel: ``Win.Lock`` on a target busy computing waits until that
    target next enters MPI (1.9 s in a 2 s compute phase), while ``Lock_all`` +
    ``Flush`` operations complete in about 1 ms. Waits poll with exponential
    backoff (0.1 ms to 10 ms), not a spinning core.
    """

    NO_STOP = np.iinfo(np.int64).max

    def __init__(self, comm: MPIComm, size: int, staleness: int, host: int = 0,
                 kind: str = "iterations"):
        MPI = comm._MPI
        self._MPI = MPI
        self.comm, self.tau, self.host, self.kind = comm, staleness, host, kind
        self.rank, self.size = comm.rank, comm.size
        p = self.size
        # int64 window: mutex | published[p] | consumed[p] | stop last, reason | version |
        # version at each worker's last publish[p]
        self._stop = 1 + 2 * p
        self._version = self._stop + 2
        here = self.rank == host
        self.win_stats = MPI.Win.Allocate(size * 8 if here else 0, 8, comm=comm.comm)
        self.win_count = MPI.Win.Allocate((self._version + 1 + p) * 8 if here else 0, 8,
                                          comm=comm.comm)
        if here:
            np.frombuffer(self.win_stats.tomemory(), np.float64)[:] = 0.0
            counts = np.frombuffer(self.win_count.tomemory(), np.int64)
            counts[:] = 0
            counts[self._stop] = self.NO_STOP
        comm.barrier()
        self.win_stats.Lock_all()
        self.win_count.Lock_all()
        self.previous = np.zeros(size)
        self.k = 0
        self.timer = comm.timer
        self.wait_seconds = 0.0
        self.staleness = 0
        self._one = np.ones(1, np.int64)
        self._zero = np.zeros(1, np.int64)
        self._counts = np.empty(self._version + p, np.int64)

    # -- primitives ------------------------------------------------------------------

    def _acquire(self) -> None:
        result = np.empty(1, np.int64)
        mine = np.array([self.rank + 1], np.int64)
        delay = 1e-4
        while True:
            self.win_count.Compare_and_swap(mine, self._zero, result, self.host, 0)
            self.win_count.Flush(self.host)
            if result[0] == 0:
                return
            time.sleep(delay)
            delay = min(2 * delay, 1e-2)

    def _release(self) -> None:
        self.win_count.Accumulate(self._zero, self.host, 0, op=self._MPI.REPLACE)
        self.win_count.Flush(self.host)

    def _set(self, which: int, value: int) -> None:
        """Set counter ``which`` (0: published, 1: consumed) of this rank."""
        disp = 1 + which * self.size + self.rank
        self.win_count.Accumulate(np.array([value], np.int64), self.host, disp,
                                  op=self._MPI.REPLACE)
        self.win_count.Flush(self.host)

    def _read_counts(self) -> np.ndarray:
        """Every counter after the mutex word, read element-atomically."""
        self.win_count.Get_accumulate(self._counts, self._counts, self.host, 1,
                                      op=self._MPI.NO_OP)
        self.win_count.Flush(self.host)
        return self._counts

    def counters(self) -> tuple[np.ndarray, np.ndarray]:
        """(published, consumed) of every rank."""
        c, p = self._read_counts(), self.size
        return c[:p].copy(), c[p:2 * p].copy()

    def delays(self) -> np.ndarray:
        """For every rank, how many publishes ago (by anyone) it last published."""
        c, v = self._read_counts(), self._version - 1
        return c[v] - c[v + 1:v + 1 + self.size]

    def _wait(self, ready, stop_releases: bool = False) -> None:
        """Poll (backoff 0.1 ms to 10 ms) until ``ready()``; with ``stop_releases`` also
        stop waiting once a stop is agreed (a stopped rank publishes no more)."""
        delay = 1e-4
        t0 = time.perf_counter()
        while not ready():
            if stop_releases and self.agreed_stop()[0] is not None:
                break
            time.sleep(delay)
            delay = min(2 * delay, 1e-2)
        self.wait_seconds += time.perf_counter() - t0

    def propose_stop(self, last: int, reason: int) -> None:
        """Ask every rank to stop after iteration ``last`` (the earliest proposal wins;
        the reason code is the largest). Safe when ``last`` >= this rank's consumed
        iteration + 1 + tau: no worker can have started an iteration beyond it."""
        disp = self._stop
        self.win_count.Accumulate(np.array([last], np.int64), self.host, disp,
                                  op=self._MPI.MIN)
        self.win_count.Accumulate(np.array([reason], np.int64), self.host, disp + 1,
                                  op=self._MPI.MAX)
        self.win_count.Flush(self.host)

    def agreed_stop(self) -> tuple[int | None, int]:
        """(last iteration to run, reason code), or (None, 0) when nobody asked to stop."""
        out = np.empty(2, np.int64)
        self.win_count.Get_accumulate(out, out, self.host, self._stop, op=self._MPI.NO_OP)
        self.win_count.Flush(self.host)
        return (None if out[0] == self.NO_STOP else int(out[0])), int(out[1])

    def window_sum(self) -> np.ndarray:
        """A consistent copy of window 1 (under the mutex)."""
        out = np.empty_like(self.previous)
        self._acquire()
        try:
            self.win_stats.Get(out, self.host)
            self.win_stats.Flush(self.host)
        finally:
            self._release()
        return out

    # -- the exchange ----------------------------------------------------------------

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        """One iteration's exchange: publish ``buf`` (this rank's statistics) and
        replace it, in place, by a snapshot of the global sum within staleness tau."""
        t0 = time.perf_counter()
        k = self.k + 1
        iterations = self.kind == "iterations"
        if iterations:
            self._wait(lambda: self.counters()[1].min() >= k - 1 - self.tau)
        delta = buf - self.previous
        self._acquire()
        try:
            self.win_stats.Accumulate(delta, self.host, op=self._MPI.SUM)
            self.win_stats.Flush(self.host)
            if not iterations:
                version = np.empty(1, np.int64)
                self.win_count.Fetch_and_op(self._one, version, self.host, self._version,
                                            op=self._MPI.SUM)
                self.win_count.Flush(self.host)
                self.win_count.Accumulate(version + 1, self.host,
                                          self._version + 1 + self.rank, op=self._MPI.REPLACE)
            self._set(0, k)
        finally:
            self._release()
        self.previous = buf.copy()
        if iterations:
            # every worker's contribution is in the snapshot (from its iteration 1 on)
            self._wait(lambda: self.counters()[0].min() >= max(k - self.tau, 1))
            self.staleness = int(k - self.counters()[0].min())
        else:
            self._wait(lambda: self.delays().max() <= self.tau
                       and self.counters()[0].min() >= 1, stop_releases=True)
            self.staleness = int(self.delays().max())
        buf[...] = self.window_sum()
        self._set(1, k)
        self.k = k
        self.timer.seconds += time.perf_counter() - t0
        self.timer.bytes += 2 * buf.nbytes
        return buf

    def free(self) -> None:
        """End the epochs and free both windows (collective; call in ``finally``)."""
        for win in (self.win_stats, self.win_count):
            if win is not None:
                try:
                    win.Unlock_all()
                finally:
                    win.Free()
        self.win_stats = self.win_count = None

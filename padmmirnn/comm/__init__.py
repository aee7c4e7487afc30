"""Communication: with :mod:`padmmirnn.comm.rma`, the only place that imports mpi4py.

Algorithms receive a communicator object when they are built and call its methods;
they never reach for ``MPI.COMM_WORLD``. :class:`SerialComm` (one process, no MPI
imported) and :class:`MPIComm` (a ``Dup`` of a communicator) offer the same calls.
Arrays go through buffer collectives (contiguous float64), small Python objects
(error messages, paths) through the pickle-based lower-case calls.

Every communicator keeps a :class:`Ledger` of its synchronisations: collective
calls (and, in :mod:`padmmirnn.comm.rma`, RMA exchanges), the bytes this rank sent
and the seconds spent, so runs can report what they communicated.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

import numpy as np

from padmmirnn.errors import PadmmError

_MPI_ENV = ("PMI_SIZE", "PMI_RANK", "PMI_FD", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK",
            "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")
INIT_TIMEOUT_ENV = "PADMMIRNN_MPI_INIT_TIMEOUT"
INIT_TIMEOUT_S = 300.0


def import_mpi():
    """``mpi4py.MPI``, with MPI initialised under a watchdog: if MPI_Init has not
    returned after ``$PADMMIRNN_MPI_INIT_TIMEOUT`` seconds (default 300; 0: wait for
    ever), the process prints "Timeout" and where it waited, and exits 1. A launcher's
    start-up exchange that fails without an error (seen with the MPICH wheel under
    ``srun --mpi=pmi2`` across nodes: Slurm's PMI2 server rejects one segment of the
    address exchange and the ranks wait) then ends the job instead of holding the
    allocation until its walltime. A C-level timer: it fires while MPI_Init holds the
    interpreter."""
    if "mpi4py.MPI" in sys.modules:
        return sys.modules["mpi4py.MPI"]
    text = os.environ.get(INIT_TIMEOUT_ENV, "").strip()
    try:
        seconds = float(text) if text else INIT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise PadmmError(f"{INIT_TIMEOUT_ENV} must be a number of seconds (0: no limit), "
                         f"got {text!r}")
    if seconds:
        faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        from mpi4py import MPI
    finally:
        if seconds:
            faulthandler.cancel_dump_traceback_later()
    return MPI


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


class Ledger:
    """What one rank communicated: ``syncs`` (collective calls and RMA exchanges),
    ``bytes`` (payload this rank sent) and ``seconds`` (wall time inside them)."""

    def __init__(self):
        self.seconds = 0.0
        self.syncs = 0
        self.bytes = 0

    def record(self, seconds: float, nbytes: int) -> None:
        self.seconds += seconds
        self.syncs += 1
        self.bytes += int(nbytes)

    def snapshot(self) -> dict:
        return {"syncs": self.syncs, "bytes": self.bytes, "comm_s": self.seconds}


class SimulatedNetwork:
    """An alpha-beta interconnect for studies on one machine: every collective and every
    one-sided round trip of this rank waits ``alpha + bytes / beta`` on top of its real
    cost (``bytes``: what this rank sends in it, or fetches with a one-sided get).
    ``latency_us`` is alpha in microseconds, ``bandwidth_gbs`` beta in Gbit/s (0:
    infinite); both 0 is off. Waits under 2 ms spin (a sleep overshoots them), longer
    ones sleep. ``seconds`` sums the simulated waits, which runs report as such (the
    summary's ``simulated_network``, rank 0's)."""

    def __init__(self, latency_us: float = 0.0, bandwidth_gbs: float = 0.0):
        self.latency_us, self.bandwidth_gbs = latency_us, bandwidth_gbs
        self.alpha = latency_us * 1e-6
        self.bytes_per_s = bandwidth_gbs * 1e9 / 8
        self.seconds = 0.0

    @property
    def active(self) -> bool:
        return self.alpha > 0 or self.bytes_per_s > 0

    def wait(self, nbytes: int) -> None:
        if not self.active:
            return
        d = self.alpha + (nbytes / self.bytes_per_s if self.bytes_per_s else 0.0)
        if d >= 2e-3:
            time.sleep(d)
        else:
            end = time.perf_counter() + d
            while time.perf_counter() < end:
                pass
        self.seconds += d

    def describe(self) -> dict:
        return {"latency_us": self.latency_us, "bandwidth_gbs": self.bandwidth_gbs,
                "simulated_seconds": self.seconds}


def sum_parts(comm, parts: list[np.ndarray], ordered: bool) -> np.ndarray:
    """Global sum of float64 vectors, one per local part (parts are in global order).

    ``ordered=False``: add the local parts, then one ``allreduce_sum`` of ``comm``
    (fast; the result depends on the rank count in the last bits). ``ordered=True``:
    gather every rank's parts and add them one by one in global order, so the result
    is bitwise the same for any number of ranks holding the same parts."""
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
    """The communicator of a run on one process: every collective is the identity
    (and costs nothing: the ledger stays empty)."""

    rank = 0
    size = 1

    def __init__(self):
        self.ledger = Ledger()
        self.network = SimulatedNetwork()  # one process: nothing to simulate

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

    def ranks_on_node(self) -> int:
        return 1

    def free(self) -> None:
        pass


class CollectiveWatchdog:
    """Ends the job when this rank has waited ``timeout_s`` in one collective. MPI over
    TCP does not report a peer whose node died (the collective waits for ever) and a
    stalled peer looks the same; then this rank prints one line (rank, collective,
    seconds) and aborts the job, which the launcher ends on every node. A daemon thread
    checks ten times per timeout (at most once a second); :meth:`enter` and
    :meth:`leave` bracket each blocking call (``timeout_s`` 0: off, no thread)."""

    def __init__(self, timeout_s: float, rank: int, size: int,
                 abort: Callable[[], None]):
        self.timeout_s, self.rank, self.size, self._abort = timeout_s, rank, size, abort
        self._inside: tuple[str, float] | None = None  # (collective, monotonic entry)
        self._stop = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._run, name="padmmirnn-watchdog",
                                            daemon=True)
            self._thread.start()

    def enter(self, what: str) -> None:
        self._inside = (what, time.monotonic())

    def leave(self) -> None:
        self._inside = None

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 10)):
            inside = self._inside
            if inside is not None and time.monotonic() - inside[1] >= self.timeout_s:
                sys.stderr.write(
                    f"[rank {self.rank}/{self.size}] padmmirnn: waited {self.timeout_s:g} s "
                    f"in {inside[0]}: another rank is lost or stalled "
                    "(train.collective_timeout_s); ending the job\n")
                sys.stderr.flush()
                self._abort()
                return

    def free(self) -> None:
        """Stop the thread (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None


class MPIComm:
    """A private duplicate of an MPI communicator (default ``COMM_WORLD``). Every
    collective is a thin call through :meth:`_timed`, which keeps the ledger, adds
    the ``network``'s simulated cost (off unless given) and is watched by a
    :class:`CollectiveWatchdog` (``collective_timeout_s``; 0: not watched)."""

    def __init__(self, comm=None, network: SimulatedNetwork | None = None,
                 collective_timeout_s: float = 0.0):
        MPI = import_mpi()
        self._MPI = MPI
        self.comm = (comm if comm is not None else MPI.COMM_WORLD).Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.ledger = Ledger()
        self.network = network or SimulatedNetwork()
        self.watchdog = CollectiveWatchdog(collective_timeout_s if self.size > 1 else 0.0,
                                           self.rank, self.size,
                                           lambda: abort_job(self.size, 1))

    def _timed(self, what: str, nbytes: int, call: Callable[[], object]):
        """Run one collective (``what``: its name), recording its time and the bytes
        this rank sends."""
        t0 = time.perf_counter()
        self.watchdog.enter(what)
        try:
            result = call()
        finally:
            self.watchdog.leave()
        self.network.wait(nbytes)
        self.ledger.record(time.perf_counter() - t0, nbytes)
        return result

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        """Sum ``buf`` (contiguous float64) over ranks, in place."""
        self._timed("allreduce_sum", buf.nbytes,
                    lambda: self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM))
        return buf

    def allreduce_max(self, buf: np.ndarray) -> np.ndarray:
        """Elementwise maximum of ``buf`` (contiguous float64) over ranks, in place."""
        self._timed("allreduce_max", buf.nbytes,
                    lambda: self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.MAX))
        return buf

    def allgather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Concatenate every rank's ``[k_r, m]`` float64 rows in rank order."""
        rows = np.ascontiguousarray(rows)
        width = rows.shape[1]

        def call() -> np.ndarray:
            counts = np.array(self.comm.allgather(rows.shape[0]), dtype=np.int64) * width
            out = np.empty((int(counts.sum()) // width, width))
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
            self.comm.Allgatherv(rows, [out, counts, displs, self._MPI.DOUBLE])
            return out

        return self._timed("allgather_rows", rows.nbytes, call)

    def gather_samples(self, block: np.ndarray, n_global: int) -> np.ndarray | None:
        """Concatenate every rank's sample-major block ``[n_r, ...]`` on rank 0, in
        rank order (= global sample order); other ranks get None."""
        block = np.ascontiguousarray(block)

        def call() -> np.ndarray | None:
            row = int(np.prod(block.shape[1:], dtype=np.int64))
            counts = np.array(self.comm.gather(block.shape[0], root=0) or [0]) * row
            out, recv = None, None
            if self.rank == 0:
                out = np.empty((n_global, *block.shape[1:]), block.dtype)
                displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
                recv = [out, counts, displs, self._MPI.Datatype.fromcode(block.dtype.char)]
            self.comm.Gatherv(block, recv, root=0)
            return out

        return self._timed("gather_samples", block.nbytes, call)

    def bcast_array(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        """Broadcast a contiguous array from ``root``, in place."""
        sent = buf.nbytes if self.rank == root else 0
        self._timed("bcast_array", sent, lambda: self.comm.Bcast(buf, root=root))
        return buf

    def bcast(self, obj, root: int = 0):
        return self._timed("bcast", 0, lambda: self.comm.bcast(obj, root=root))

    def allgather(self, obj) -> list:
        return self._timed("allgather", 0, lambda: self.comm.allgather(obj))

    def barrier(self) -> None:
        self._timed("barrier", 0, self.comm.Barrier)

    def ranks_on_node(self) -> int:
        """How many ranks of this communicator share this rank's node (its memory)."""
        node = self.comm.Split_type(self._MPI.COMM_TYPE_SHARED)
        try:
            return node.Get_size()
        finally:
            node.Free()

    def free(self) -> None:
        """Free the duplicate (idempotent; nothing to do once MPI is finalized)."""
        self.watchdog.free()
        if self.comm is not None and not self._MPI.Is_finalized():
            self.comm.Free()
        self.comm = None


def make_comm(parallel: str, network: SimulatedNetwork | None = None,
              collective_timeout_s: float = 0.0):
    """The communicator for ``--parallel``: serial unless launched by MPI with >1 rank
    (``auto``) or asked for (``sync``, ``async``); ``network`` a simulated interconnect
    for its collectives and one-sided operations; ``collective_timeout_s`` the
    :class:`CollectiveWatchdog`'s limit (0: none)."""
    if parallel == "auto" and not launched_by_mpi():
        return SerialComm()
    comm = MPIComm(network=network, collective_timeout_s=collective_timeout_s)
    if parallel == "none" and comm.size > 1:
        size = comm.size
        comm.free()
        raise PadmmError(f"--parallel none was asked for, but the job has {size} ranks: "
                         "start one process, or use --parallel sync")
    if parallel == "none" or (comm.size == 1 and parallel == "auto"):
        comm.free()
        return SerialComm()
    return comm


def agree(comm, check: Callable[[], object]) -> object:
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
    abort_job(size, 1)


# Seconds between a rank's last line and its MPI_Abort: the launcher tears the job down
# on an abort, and Hydra sometimes drops what the aborting rank wrote just before (seen
# as a job that ended with code 1 and without the line naming its lost peer).
ABORT_GRACE_S = 1.0


def abort_job(size: int, code: int) -> None:
    """End every rank of a multi-rank MPI job now with ``code`` (``MPI_Abort``): after an
    interrupt or an unexpected error, no rank may be left waiting in a collective, on a
    window or in a collective ``free`` for ranks that will not come. Standard error is
    flushed and given :data:`ABORT_GRACE_S` to reach the launcher first."""
    if size > 1 and "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
        MPI.COMM_WORLD.Abort(code)

"""One-sided (RMA) building blocks and the asynchronous statistics exchange of AP.

Small parts, each used on windows that every rank keeps open in one passive
``Lock_all`` epoch for the whole run (operations complete with ``Flush``):

* :class:`WindowMutex`: a spin lock on one int64 word, taken and released by
  ``Compare_and_swap`` only (one atomic operation on the word, as the window's
  default ``accumulate_ops = same_op_no_op`` asks), used with ``with``;
* :class:`Counters`: named int64 slots read and written element-atomically
  (``Get_accumulate`` with ``NO_OP``, ``Accumulate`` with ``REPLACE``/``MIN``/``MAX``,
  ``Fetch_and_op``);
* :class:`ProgressThread`: keeps MPI's progress engine turning on the rank that hosts
  the windows while it computes;
* :class:`RmaStatsExchange`: the bounded-staleness exchange of AP-ADMMiRNN built
  from them (docs/design.md, section 6).

Why no ``MPI_Win_lock``: measured with the MPICH wheel, ``Win.Lock`` on a target
busy computing waits until that target next enters MPI (1.9 s in a 2 s compute
phase), while ``Lock_all`` + ``Flush`` operations complete in about 1 ms.

Every completed round trip waits the communicator's simulated network, if any
(:class:`~padmmirnn.comm.SimulatedNetwork`: alpha + bytes sent / beta).

Origin buffers stay referenced until the ``Flush`` that completes their operation
(the standard forbids touching an origin buffer before completion). Waits poll with
exponential backoff (0.1 ms to 10 ms), not a spinning core. ``free()`` is
idempotent and collective.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from padmmirnn.comm import MPIComm, SimulatedNetwork, abort_job


def poll(ready: Callable[[], bool]) -> float:
    """Poll ``ready()`` with backoff (0.1 ms doubling to 10 ms) until it holds; returns
    the seconds waited."""
    delay = 1e-4
    t0 = time.perf_counter()
    while not ready():
        time.sleep(delay)
        delay = min(2 * delay, 1e-2)
    return time.perf_counter() - t0


class WindowMutex:
    """Mutual exclusion through the int64 word ``disp`` of ``win`` on ``host``: 0 is
    free, ``rank + 1`` is held by ``rank``. Use as ``with mutex: ...``."""

    def __init__(self, win, host: int, disp: int, rank: int, mpi,
                 network: SimulatedNetwork | None = None,
                 on_wait: Callable[[], None] | None = None):
        self._win, self._host, self._disp = win, host, disp
        self._on_wait = on_wait  # called about once a second while the lock is held
        self._net = network or SimulatedNetwork()
        self._mine = np.array([rank + 1], np.int64)
        self._free = np.zeros(1, np.int64)
        self._seen = np.empty(1, np.int64)
        self._mpi = mpi

    def _swap(self, new: np.ndarray, expected: np.ndarray) -> int:
        self._win.Compare_and_swap(new, expected, self._seen, self._host, self._disp)
        self._win.Flush(self._host)
        self._net.wait(8)
        return int(self._seen[0])

    def acquire(self) -> None:
        checked = time.monotonic()

        def free() -> bool:
            nonlocal checked
            if self._swap(self._mine, self._free) == 0:
                return True
            if self._on_wait is not None and time.monotonic() - checked >= 1.0:
                self._on_wait()
                checked = time.monotonic()
            return False

        poll(free)

    def release(self) -> None:
        holder = self._swap(self._free, self._mine)
        if holder != self._mine[0]:
            raise RuntimeError(f"window mutex released by rank {self._mine[0] - 1} but held "
                               f"by {holder - 1}")

    def __enter__(self) -> WindowMutex:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Counters:
    """Named int64 slots of ``win`` on ``host``: ``layout`` maps a name to its
    (first word, number of words). Every access is element-atomic and completed
    (flushed) before the call returns."""

    def __init__(self, win, host: int, layout: dict[str, tuple[int, int]], mpi,
                 network: SimulatedNetwork | None = None):
        self._win, self._host, self._mpi = win, host, mpi
        self._net = network or SimulatedNetwork()
        self.layout = layout
        self._lo = min(first for first, _ in layout.values())
        self._hi = max(first + length for first, length in layout.values())
        self._all = np.empty(self._hi - self._lo, np.int64)
        self._noop = np.zeros_like(self._all)  # origin of NO_OP reads (not the result)

    def _disp(self, name: str, index: int) -> int:
        first, length = self.layout[name]
        if not 0 <= index < length:
            raise IndexError(f"counter {name}[{index}] (length {length})")
        return first + index

    def read(self) -> dict[str, np.ndarray]:
        """Every slot, in one element-atomic read (copies)."""
        self._win.Get_accumulate(self._noop, self._all, self._host, self._lo,
                                 op=self._mpi.NO_OP)
        self._win.Flush(self._host)
        self._net.wait(8)
        return {name: self._all[first - self._lo:first - self._lo + length].copy()
                for name, (first, length) in self.layout.items()}

    def update(self, name: str, value: int, op, index: int = 0) -> None:
        """``slot = op(slot, value)`` (``REPLACE``, ``MIN``, ``MAX``, ``SUM``)."""
        origin = np.array([value], np.int64)
        self._win.Accumulate(origin, self._host, self._disp(name, index), op=op)
        self._win.Flush(self._host)
        self._net.wait(8)

    def fetch_add(self, name: str, value: int, index: int = 0) -> int:
        """Add ``value`` to the slot; return its value before."""
        origin, result = np.array([value], np.int64), np.empty(1, np.int64)
        self._win.Fetch_and_op(origin, result, self._host, self._disp(name, index),
                               op=self._mpi.SUM)
        self._win.Flush(self._host)
        self._net.wait(8)
        return int(result[0])


class ProgressThread:
    """A thread that enters MPI (``Iprobe`` on ``comm``) every ``interval`` seconds,
    so that passive-target operations on this rank's windows complete while its main
    thread computes. Through shared memory the origin completes them alone; on MPICH's
    network path (between nodes, or ``MPIR_CVAR_NOLOCAL=1``) they wait for the target
    to enter MPI: 175 ms of waiting per AP iteration without this thread, against
    0.3-4 ms with it (docs/async.md). A probe on ``COMM_SELF`` does not drive that
    path; one on the exchange's communicator does. It sleeps between probes (unlike
    ``MPIR_CVAR_ASYNC_PROGRESS``, whose spinning thread takes a core). Needs
    ``MPI_THREAD_MULTIPLE``; :attr:`running` says whether it started. Use with
    ``with``, or :meth:`start` and :meth:`stop` (idempotent)."""

    def __init__(self, comm, mpi, interval: float = 1e-3):
        self._comm, self._mpi, self.interval = comm, mpi, interval
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _run(self) -> None:
        mpi = self._mpi
        while not self._halt.wait(self.interval):
            self._comm.Iprobe(mpi.ANY_SOURCE, mpi.ANY_TAG)

    def start(self) -> ProgressThread:
        if self._thread is None and self._mpi.Query_thread() == self._mpi.THREAD_MULTIPLE:
            self._thread = threading.Thread(target=self._run, name="mpi-progress",
                                            daemon=True)
            self._thread.start()
            # stopped before mpi4py finalizes MPI at exit (atexit runs in reverse order),
            # also when an error skipped the collective free
            atexit.register(self.stop)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> ProgressThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Heartbeat:
    """Liveness through the window, for waits that MPI itself does not watch: a rank
    killed with its node, or stopped for good, never publishes again, and ranks waiting
    on the window would wait for ever under a launcher that keeps survivors running.

    Every rank's slot ``heartbeat[rank]`` is bumped by a thread every ``interval``
    seconds while this rank is alive: while its ``progress()`` token (the trainer's step
    count) moves, or its main thread waits on the window (:meth:`waiting`). A waiting
    rank passes each read of the counters to :meth:`watch`: when another rank's slot has
    not moved for ``timeout_s``, it prints one line naming that rank and ends the job
    (``timeout_s`` 0: not watched, no thread). Like the collective watchdog's, the
    timeout must exceed the longest step. Use with ``with``, or :meth:`start` and
    :meth:`stop` (idempotent)."""

    def __init__(self, counters: Counters, rank: int, size: int, timeout_s: float, mpi,
                 abort: Callable[[], None]):
        self._counters, self.rank, self.size = counters, rank, size
        self.timeout_s, self._mpi, self._abort = timeout_s, mpi, abort
        self.interval = min(1.0, timeout_s / 10) if timeout_s else 0.0
        self.progress: Callable[[], object] = lambda: None
        self._token = 0  # bumped by the main thread while it waits on the window
        self._seen: np.ndarray | None = None  # the others' slots when last changed
        self._since = np.zeros(size)  # monotonic time of each slot's last change
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def follow(self, progress: Callable[[], object]) -> None:
        """Beat while ``progress()`` changes (the trainer's step count)."""
        self.progress = progress

    def waiting(self) -> None:
        """The main thread is waiting on the window: it is alive."""
        self._token += 1

    def _run(self) -> None:
        last = None
        while not self._halt.wait(self.interval):
            now = (self.progress(), self._token)
            if now != last:
                self._counters.update("heartbeat", 1, self._mpi.SUM, index=self.rank)
                last = now

    def watch(self, counters: dict[str, np.ndarray], what: str) -> None:
        """End the job if another rank's heartbeat has not moved for ``timeout_s``."""
        if not self.timeout_s:
            return
        self.waiting()
        beats, now = counters["heartbeat"], time.monotonic()
        if self._seen is None:
            self._seen, self._since[:] = beats.copy(), now
            return
        moved = beats != self._seen
        self._seen[moved], self._since[moved] = beats[moved], now
        late = [q for q in range(self.size) if q != self.rank
                and now - self._since[q] >= self.timeout_s]
        if late:
            sys.stderr.write(
                f"[rank {self.rank}/{self.size}] padmmirnn: rank {late[0]} has given no "
                f"heartbeat in the window for {self.timeout_s:g} s while this rank waited "
                f"{what}: it is lost or stalled (train.collective_timeout_s); ending the job\n")
            sys.stderr.flush()
            self._abort()

    def start(self) -> Heartbeat:
        if (self._thread is None and self.timeout_s and self.size > 1
                and self._mpi.Query_thread() == self._mpi.THREAD_MULTIPLE):
            self._thread = threading.Thread(target=self._run, name="padmmirnn-heartbeat",
                                            daemon=True)
            self._thread.start()
            atexit.register(self.stop)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RmaStatsExchange:
    """Asynchronous, bounded-staleness exchange of the per-iteration statistics over
    MPI one-sided windows (AP-ADMMiRNN, docs/design.md, section 6). It is the
    engine's reducer in asynchronous runs: :meth:`allreduce_sum` replaces the
    Allreduce of the statistics.

    The statistics window (float64, on ``host``) holds the global statistics; the
    control window (int64) holds the mutex word and the :class:`Counters`
    ``published[p]``, ``consumed[p]``, ``stop`` (agreed last iteration, reason),
    ``version`` (publishes so far) and ``last_version[p]`` (the version of each
    worker's latest publish). A worker keeps its last published contribution and,
    at iteration k,

    1. waits until every worker has consumed iteration ``k - 1 - tau``,
    2. under the mutex, accumulates ``new - previous`` into the statistics and sets
       ``published[me] = k``,
    3. waits until every worker has published iteration ``max(k - tau, 1)`` (a
       snapshot never lacks a worker's contribution),
    4. under the mutex, reads a snapshot of the statistics, then sets
       ``consumed[me] = k``.

    So the snapshot holds every worker's contribution from iterations within
    ``tau`` of k, and ``tau = 0`` is the synchronous algorithm (the same sums as
    one Allreduce, up to the rounding of accumulating differences). Invariant: the
    statistics window equals the sum of every worker's latest contribution.

    ``kind = "publishes"`` bounds the *delay* instead (as partial-barrier
    asynchronous ADMM): every publish advances ``version``; step 1 goes; step 2 waits,
    under the mutex, while another worker's latest contribution is already ``tau``
    publishes old (so no contribution in the window is ever older than ``tau``
    publishes); step 3 waits only until every worker has published once (or a stop
    is agreed). Fast workers then run more iterations than slow ones instead of
    waiting for them. It needs ``tau >= ranks - 1`` (the first round of publishes
    makes the first worker ``ranks - 1`` publishes old). A reader is never held by
    the age of a contribution: its own, or that of a worker that is itself waiting
    to read, could not get younger, and the ranks would wait for each other for ever.
    """

    NO_STOP = np.iinfo(np.int64).max

    def __init__(self, comm: MPIComm, size: int, staleness: int, host: int = 0,
                 kind: str = "iterations", progress: bool = True, timeout_s: float = 0.0):
        MPI = comm._MPI
        self._MPI = MPI
        self.comm, self.tau, self.host, self.kind = comm, staleness, host, kind
        self.rank, self.size = comm.rank, comm.size
        p = self.size
        layout = {"published": (1, p), "consumed": (1 + p, p), "stop": (1 + 2 * p, 2),
                  "version": (3 + 2 * p, 1), "last_version": (4 + 2 * p, p),
                  "heartbeat": (4 + 3 * p, p)}
        words = 4 + 4 * p
        here = self.rank == host
        self.win_stats = MPI.Win.Allocate(size * 8 if here else 0, 8, comm=comm.comm)
        self.win_count = MPI.Win.Allocate(words * 8 if here else 0, 8, comm=comm.comm)
        self.win_stats.Lock_all()
        self.win_count.Lock_all()
        if here:  # initialise through RMA inside the epoch (no unsynchronised local stores)
            self.win_stats.Put(np.zeros(size), host)
            init = np.zeros(words, np.int64)
            init[layout["stop"][0]] = self.NO_STOP
            self.win_count.Put(init, host)
            self.win_stats.Flush(host)
            self.win_count.Flush(host)
        comm.barrier()
        self.network = comm.network
        self.counters = Counters(self.win_count, host, layout, MPI, comm.network)
        self.mutex = WindowMutex(self.win_count, host, 0, self.rank, MPI, comm.network,
                                 on_wait=lambda: self._watched("for the window's lock"))
        # the heartbeat thread's own counters (their buffers are not shared across threads)
        self.heartbeat = Heartbeat(Counters(self.win_count, host, layout, MPI),
                                   self.rank, p, timeout_s, MPI, lambda: abort_job(p, 1))
        self.previous = np.zeros(size)
        self.k = 0
        self.ledger = comm.ledger
        self.wait_seconds = 0.0
        self.staleness = 0
        # the host's progress thread (``progress``): the others' operations on its
        # windows complete while it computes, on the network path too
        self.progress = ProgressThread(comm.comm, MPI)
        if here and progress and self.size > 1:
            self.progress.start()
        self.heartbeat.start()

    # -- reads -----------------------------------------------------------------------

    def published(self) -> np.ndarray:
        return self._watched("for the others' publishes")["published"]

    def consumed(self) -> np.ndarray:
        return self._watched("for the others to read")["consumed"]

    def _watched(self, what: str) -> dict[str, np.ndarray]:
        """The counters, checked for lost ranks by the heartbeat (reads of waits)."""
        c = self.counters.read()
        self.heartbeat.watch(c, what)
        return c

    def agreed_stop(self) -> tuple[int | None, int]:
        """(last iteration to run, reason code), or (None, 0) when nobody asked to stop.
        A proposer writes the reason before the iteration, but one read of the pair is
        atomic per element only: an iteration seen without its reason is read again."""
        while True:
            last, reason = self.counters.read()["stop"]
            if last == self.NO_STOP:
                return None, 0
            if reason:
                return int(last), int(reason)

    def window_sum(self) -> np.ndarray:
        """A consistent copy of the statistics window (under the mutex)."""
        out = np.empty_like(self.previous)
        with self.mutex:
            self.win_stats.Get(out, self.host)
            self.win_stats.Flush(self.host)
            self.network.wait(out.nbytes)
        return out

    # -- writes ----------------------------------------------------------------------

    def propose_stop(self, last: int, reason: int) -> None:
        """Ask every rank to stop after iteration ``last`` (the earliest proposal wins;
        the reason code is the largest). Safe when ``last`` >= this rank's consumed
        iteration + 1 + tau: no worker can have started an iteration beyond it. The reason
        is written (and completed) first, so a rank that sees the iteration finds it."""
        self.counters.update("stop", reason, self._MPI.MAX, index=1)
        self.counters.update("stop", last, self._MPI.MIN, index=0)

    def _wait(self, ready: Callable[[], bool]) -> None:
        """Wait (polling with backoff) until ``ready()``."""
        self.wait_seconds += poll(ready)

    def _publish(self, buf: np.ndarray, k: int) -> None:
        """Step 2: add this rank's change of contribution to the window (bounded delay:
        once the bound allows it)."""
        delta = buf - self.previous  # referenced until the Flush below completes it
        if self.kind == "publishes":
            self._locked_poll(self._within_bound, lambda c: self._write(delta, k))
        else:
            with self.mutex:
                self._write(delta, k)
        self.previous = buf.copy()

    def _write(self, delta: np.ndarray, k: int) -> None:
        """Accumulate ``delta`` and record the publish (the caller holds the mutex)."""
        self.win_stats.Accumulate(delta, self.host, op=self._MPI.SUM)
        self.win_stats.Flush(self.host)
        self.network.wait(delta.nbytes)
        if self.kind == "publishes":
            version = self.counters.fetch_add("version", 1)
            self.counters.update("last_version", version + 1, self._MPI.REPLACE,
                                 index=self.rank)
        self.counters.update("published", k, self._MPI.REPLACE, index=self.rank)

    def _within_bound(self, c: dict[str, np.ndarray]) -> bool:
        """Bounded delay, enforced at the write: this rank may publish when no other
        worker's latest contribution is already tau publishes old (or a stop is agreed).
        After the publish every contribution in the window is then at most tau publishes
        old, so the window never holds an older one and a reader needs no bound of its
        own. The wait always ends (with tau >= ranks - 1): the publishes' ages are
        distinct, so at most one worker is tau old, and that one may publish."""
        others = (c["published"] >= 1) & (np.arange(self.size) != self.rank)
        delays = c["version"][0] - c["last_version"][others]
        return c["stop"][0] != self.NO_STOP or not delays.size or delays.max() < self.tau

    def _snapshot_when_all_published(self) -> np.ndarray:
        """Bounded delay: a snapshot once every worker has published (or a stop is
        agreed), read in the same critical section as the check; ``staleness`` is the
        age in publishes of its oldest contribution (at most tau, by the write rule)."""
        out = np.empty_like(self.previous)

        def ready(c: dict[str, np.ndarray]) -> bool:
            return c["published"].min() >= 1 or c["stop"][0] != self.NO_STOP

        def read(c: dict[str, np.ndarray]) -> None:
            self.win_stats.Get(out, self.host)
            self.win_stats.Flush(self.host)
            self.network.wait(out.nbytes)
            published = c["published"] >= 1
            self.staleness = int((c["version"][0] - c["last_version"][published]).max())

        self._locked_poll(ready, read)
        return out

    def _locked_poll(self, ready: Callable[[dict], bool], act: Callable[[dict], None]) -> None:
        """Take the mutex, read the counters; if ``ready(counters)``, ``act(counters)``
        in the same critical section and return, else release and retry with backoff."""
        delay = 1e-4
        t0 = time.perf_counter()
        while True:
            with self.mutex:
                c = self.counters.read()
                if ready(c):
                    act(c)
                    break
            self.heartbeat.watch(c, "under the window's bound")
            time.sleep(delay)
            delay = min(2 * delay, 1e-2)
        self.wait_seconds += time.perf_counter() - t0

    # -- the exchange ----------------------------------------------------------------

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        """One iteration's exchange: publish ``buf`` (this rank's statistics) and
        replace it, in place, by a snapshot of the global sum within staleness tau."""
        t0 = time.perf_counter()
        k = self.k + 1
        if self.kind == "iterations":
            self._wait(lambda: self.consumed().min() >= k - 1 - self.tau)
            self._publish(buf, k)
            # every worker's contribution is in the snapshot (from its iteration 1 on)
            self._wait(lambda: self.published().min() >= max(k - self.tau, 1))
            self.staleness = int(k - self.published().min())
            buf[...] = self.window_sum()
        else:
            self._publish(buf, k)
            buf[...] = self._snapshot_when_all_published()
        self.counters.update("consumed", k, self._MPI.REPLACE, index=self.rank)
        self.k = k
        self.ledger.record(time.perf_counter() - t0, 2 * buf.nbytes)
        return buf

    def free(self) -> None:
        """End the epochs and free both windows (collective; idempotent)."""
        self.progress.stop()
        self.heartbeat.stop()
        for win in (self.win_stats, self.win_count):
            if win is not None:
                try:
                    win.Unlock_all()
                finally:
                    win.Free()
        self.win_stats = self.win_count = None

"""AP-ADMMiRNN: everything an asynchronous run does differently, in one place
(docs/design.md, section 6).

* The engine's one statistics reduction per iteration is the RMA exchange
  (:class:`~padmmirnn.comm.rma.RmaStatsExchange`), given to the engine when it is
  built; every other collective of the engine stays on the communicator.
* The step control sums its trial losses over this rank alone (a global loss per
  trial would be a synchronisation point), except with staleness 0 counted in
  iterations, where every rank runs every iteration in lockstep and AP reproduces
  SP.
* Ranks agree on when to stop through the window, with no collective
  (:meth:`AsyncControl.decide`).
* At quiescent points (checkpoints, the end) every rank re-solves the weights from
  the final window, so all ranks hold the same weights (:meth:`AsyncControl.quiesce`).
"""

from __future__ import annotations

import numpy as np

from padmmirnn.admm.fullbatch import AdmmEngine
from padmmirnn.admm.packed import input_layout, output_layout
from padmmirnn.comm import SerialComm
from padmmirnn.comm.rma import RmaStatsExchange
from padmmirnn.config import Config
from padmmirnn.nn import Params
from padmmirnn.samples import LocalData
from padmmirnn.signals import STOP_TEXT, Stop, stop_reason
from padmmirnn.trainer import Decision


def build(cfg: Config, parts: list[LocalData], n_global: int, comm,
          params: Params | None = None) -> tuple[AdmmEngine, AsyncControl]:
    """The engine of an asynchronous run and its control (which owns the windows)."""
    t = cfg.train
    info = parts[0].info
    h = cfg.model.hidden
    size = input_layout(info.dim, h).size + output_layout(h, info.classes).size
    exchange = RmaStatsExchange(comm, size, t.staleness, kind=t.staleness_kind,
                                progress=t.progress_thread)
    lockstep = t.staleness == 0 and t.staleness_kind == "iterations"
    engine = AdmmEngine(cfg, parts, n_global, comm, params, reducer=exchange,
                        loss_comm=comm if lockstep else SerialComm())
    return engine, AsyncControl(cfg, comm, engine, exchange)


class AsyncControl:
    """The run control of an asynchronous run (the synchronous one is
    :class:`padmmirnn.training.SyncControl`)."""

    asynchronous = True

    def __init__(self, cfg: Config, comm, engine: AdmmEngine, exchange: RmaStatsExchange):
        self.cfg, self.comm, self.engine, self.exchange = cfg, comm, engine, exchange
        self.before_solve: Params | None = None  # the weights the last solve started from
        self._wait_before = 0.0

    def decide(self, k: int, elapsed: float, job_elapsed: float, signum: int) -> Decision:
        """Before iteration ``k``: a rank with a reason to stop proposes the last
        iteration (iteration gap: ``k + tau``, the first no worker can have started;
        bounded delay: everybody stops now); every rank stops before the first
        iteration past the agreed one."""
        reason, _ = stop_reason(self.cfg, elapsed, job_elapsed, signum)
        ex = self.exchange
        if reason:
            ex.propose_stop(k + ex.tau if ex.kind == "iterations" else -1, int(reason))
        last, agreed = ex.agreed_stop()
        if last is None or k <= last:
            return Decision()
        return Decision(end=agreed == Stop.BUDGET, stopped=STOP_TEXT.get(Stop(agreed)))

    def before_step(self) -> None:
        self.before_solve = self.engine.params.copy()
        self._wait_before = self.exchange.wait_seconds

    def rank_record(self) -> dict:
        """What this rank's log line adds about its last iteration."""
        return {"wait_s": self.exchange.wait_seconds - self._wait_before,
                "staleness": self.exchange.staleness, **self.engine.local_progress()}

    def loop_completed(self) -> None:
        """The loop ran all its iterations: in bounded-delay mode the fastest rank ends
        the run for all."""
        if self.exchange.kind == "publishes":
            self.exchange.propose_stop(-1, int(Stop.BUDGET))

    def quiesce(self) -> None:
        """Once every rank has published its last iteration, the window holds the sum
        of every worker's latest contribution; all ranks solve the weights from it, so
        they hold the same weights (before checkpoints and at the end). With staleness
        0 this is exactly the last weight solve of SP. Collective on every rank, also
        on one that a stop released before its first iteration."""
        engine = self.engine
        stepped = self.comm.allreduce_max(np.array([float(self.before_solve is not None)]))
        if not stepped[0]:  # no rank has run an iteration: nothing to re-solve, on any rank
            return
        if self.before_solve is None:  # a stop released this rank before its first step
            self.before_solve = engine.params.copy()
        self.comm.barrier()
        snapshot = self.exchange.window_sum()
        self.comm.barrier()  # nobody publishes again before every rank has read
        # the weight blocks are solved one after the other (U from the previous W, b):
        # redo the last solve from rank 0's starting weights and the final statistics
        scalars = [engine.iteration, engine.alpha, engine.streak]
        flat = self.comm.bcast_array(np.append(self.before_solve.flat(), scalars))
        # rank 0's iteration (bounded-delay ranks differ) and step control
        engine.iteration, engine.alpha, engine.streak = int(flat[-3]), flat[-2], int(flat[-1])
        n_in = engine.in_layout.size
        engine.resolve(Params.from_flat(flat[:-3], self.before_solve),
                       engine.in_layout.unpack(snapshot[:n_in]),
                       engine.out_layout.unpack(snapshot[n_in:]))

    def summary(self, ran: int) -> dict:
        t = self.cfg.train
        return {"staleness": t.staleness, "staleness_kind": t.staleness_kind,
                "wait_s_per_iteration": self.exchange.wait_seconds / max(ran, 1)}

    def close(self) -> None:
        """Free the windows (collective; idempotent)."""
        self.exchange.free()

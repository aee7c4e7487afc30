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

from padmmirnn.admm.consensus import ConsensusAdmm
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
          params: Params | None = None):
    """The trainer of an asynchronous run and its control (which owns the windows):
    mini-batch consensus ADMM (``admm.batch_size`` > 0) or the full-batch engine."""
    t = cfg.train
    info = parts[0].info
    if cfg.admm.batch_size:
        size = ConsensusAdmm.buffer_size(cfg, info, n_global, comm.size)
    else:
        h = cfg.model.hidden
        size = input_layout(info.dim, h).size + output_layout(h, info.classes).size
    exchange = RmaStatsExchange(comm, size, t.staleness, kind=t.staleness_kind,
                                progress=t.progress_thread, timeout_s=t.collective_timeout_s)
    if cfg.admm.batch_size:
        trainer = ConsensusAdmm(cfg, parts[0], n_global, comm, params, WindowRanks(exchange))
        exchange.heartbeat.follow(lambda: trainer.steps)
        return trainer, ConsensusControl(cfg, comm, trainer, exchange)
    lockstep = t.staleness == 0 and t.staleness_kind == "iterations"
    engine = AdmmEngine(cfg, parts, n_global, comm, params, reducer=exchange,
                        loss_comm=comm if lockstep else SerialComm())
    exchange.heartbeat.follow(lambda: (engine.iteration, engine.trials))
    return engine, AsyncControl(cfg, comm, engine, exchange)


class WindowRanks:
    """The window exchange as the consensus trainer's reduction over the ranks: one rank
    per process; a join publishes this rank's contribution and reads back the sum of every
    rank's latest one (within the staleness bound)."""

    counted = False

    def __init__(self, exchange: RmaStatsExchange):
        self.exchange = exchange
        self.size = exchange.size
        self.local = range(exchange.rank, exchange.rank + 1)

    def allreduce_sum(self, buffers: list[np.ndarray]) -> np.ndarray:
        (buf,) = buffers
        return self.exchange.allreduce_sum(buf.copy())


class WindowControl:
    """What every asynchronous run control does through the window: the stop agreement,
    the per-rank log, the summary, freeing the windows."""

    asynchronous = True
    evaluates_alone = False  # evaluations at quiescent points, collective

    def __init__(self, cfg: Config, comm, trainer, exchange: RmaStatsExchange):
        self.cfg, self.comm, self.trainer, self.exchange = cfg, comm, trainer, exchange
        self._wait_before = 0.0
        self.stepped = False  # this rank has run an iteration

    def decide(self, k: int, elapsed: float, job_elapsed: float, signum: int) -> Decision:
        """Before iteration ``k``: a rank with a reason to stop proposes the last
        iteration (iteration gap: ``k + tau``, the first no worker can have started;
        bounded delay: everybody stops now); every rank stops before the first
        iteration past the agreed one."""
        reason, _ = stop_reason(self.cfg, elapsed, job_elapsed, signum)
        ex = self.exchange
        if reason:
            self.propose(k, reason)
        last, agreed = ex.agreed_stop()
        if last is None or k <= last:
            return Decision()
        return Decision(end=agreed == Stop.BUDGET, stopped=STOP_TEXT.get(Stop(agreed)))

    def propose(self, k: int, reason: Stop) -> None:
        """Propose to stop for ``reason`` from before iteration ``k`` on."""
        ex = self.exchange
        ex.propose_stop(k + ex.tau if ex.kind == "iterations" else -1, int(reason))

    def before_step(self) -> None:
        self.stepped = True
        self._wait_before = self.exchange.wait_seconds

    def rank_record(self) -> dict:
        """What this rank's log line adds about its last iteration."""
        return {"wait_s": self.exchange.wait_seconds - self._wait_before,
                "staleness": self.exchange.staleness, **self.local_progress()}

    def local_progress(self) -> dict:
        return {}

    def loop_completed(self) -> None:
        """The loop ran all its iterations: in bounded-delay mode the fastest rank ends
        the run for all."""
        if self.exchange.kind == "publishes":
            self.exchange.propose_stop(-1, int(Stop.BUDGET))

    def summary(self, ran: int) -> dict:
        t = self.cfg.train
        return {"staleness": t.staleness, "staleness_kind": t.staleness_kind,
                "wait_s_per_iteration": self.exchange.wait_seconds / max(ran, 1)}

    def close(self) -> None:
        """Free the windows (collective; idempotent)."""
        self.exchange.free()


class ConsensusControl(WindowControl):
    """The control of asynchronous consensus ADMM: joins through the window; rank 0
    evaluates the consensus of the latest snapshot during the run, with no collective
    (``train.eval_every``); at quiescent points every rank adopts the consensus of the
    final window."""

    evaluates_alone = True

    def snapshot_params(self) -> Params:
        """The model (consensus weights, or their average) of the window's current
        contents (this rank alone)."""
        return self.trainer.model_from(self.exchange.window_sum())

    def quiesce(self) -> None:
        """Once every rank has published its last join, the window holds the sum of every
        rank's latest contribution; all ranks take the consensus from it, so they hold
        the same weights and Grams (before checkpoints and at the end). Collective on
        every rank, also on one a stop released before its first iteration."""
        stepped = self.comm.allreduce_max(np.array([float(self.stepped)]))
        if not stepped[0]:
            return
        self.comm.barrier()
        snapshot = self.exchange.window_sum()
        self.comm.barrier()  # nobody publishes again before every rank has read
        self.trainer.adopt(snapshot)
        # rank 0's pass count (bounded-delay ranks differ)
        self.trainer.iteration = int(self.comm.bcast(self.trainer.iteration))


class AsyncControl(WindowControl):
    """The control of the asynchronous full-batch engine (the synchronous one is
    :class:`padmmirnn.training.SyncControl`)."""

    def __init__(self, cfg: Config, comm, engine: AdmmEngine, exchange: RmaStatsExchange):
        super().__init__(cfg, comm, engine, exchange)
        self.engine = engine
        self.before_solve: Params | None = None  # the weights the last solve started from

    def before_step(self) -> None:
        super().before_step()
        self.before_solve = self.engine.params.copy()

    def local_progress(self) -> dict:
        return self.engine.local_progress()

    def quiesce(self) -> None:
        """Once every rank has published its last iteration, the window holds the sum of
        every worker's latest contribution; all ranks solve the weights from it, so they
        hold the same weights (before checkpoints and at the end). With staleness 0 this
        is exactly the last weight solve of SP. Collective on every rank, also on one that
        a stop released before its first iteration."""
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

"""Consensus mini-batch ADMM: each (virtual) rank takes local block steps on its own
samples, and one reduction every ``admm.sync_every`` local steps (0: once per pass)
joins the ranks (docs/design.md, section 5).

Rank ``r`` of ``P`` holds the samples ``[r N / P, (r + 1) N / P)``, its weights
``theta_r`` and its running Gram estimates, and steps through its samples in local
mini-batches of ``max(1, floor(B / P))`` (``B = admm.batch_size``, the global batch), in
an order keyed by (seed, pass, its first sample); every rank takes the local steps of
the largest slice (smaller slices wrap). With sequence lengths (and ``train.bucket``)
a rank's local batches are bucketed within its order
(:func:`padmmirnn.samples.bucketed_batches`), so each holds sequences of similar
length. The running Grams are averaged at every join.
``admm.consensus`` says how the weights are joined:

* ``average``: ``theta_r <- mean_r theta_r`` (local SGD's averaging; no correction of
  the ranks' drift);
* ``duals``: consensus ADMM (Boyd et al. 2011, section 7.1, scaled form) with per-rank
  duals ``u_r`` and the consensus ``z``: the local steps minimise
  ``f_r(theta) + rho_c/2 |theta - z + u_r|^2`` (the block step's proximal anchor
  ``z - u_r``, weight ``rho_c = admm.consensus_rho``), and a join sets
  ``z = mean_r (theta_r + u_r)``, ``u_r <- u_r + theta_r - z``, ``theta_r <- z``. The
  duals sum to zero over the ranks; they carry each rank's drift from one round to the
  next;
* ``outer``: an outer optimiser on the averaged change (DiLoCo, Douillard et al. 2023):
  every rank starts a round from the global ``theta``; at a join ``Delta = theta -
  mean_r theta_r``, ``v <- mu v + Delta``, ``theta <- theta - lr (Delta + mu v)``
  (Nesterov; ``lr = admm.outer_lr``, ``mu = admm.outer_momentum``; lr 1 and mu 0 is
  ``average``).

With ``admm.average`` set (``auto`` is 0 here: see
:meth:`padmmirnn.config.AdmmConfig.for_batch`) each rank
also keeps the moving average of its local iterates (:mod:`padmmirnn.averaging`), and
a join averages the averages too: every rank leaves with the same average, the
average of the ranks' mean iterate (all ranks take the same steps, so their decays
agree). That average is the model the run evaluates and saves.

One join reduces the packed ``[theta_r (+ u_r), Grams (, average_r)]`` of every rank
once. With
``train.virtual_ranks = P`` a process runs several ranks in turn, each with its own
samples, order, weights, Grams and duals, and their reduction is exact (see
:mod:`padmmirnn.comm.virtual`): a study can count passes, synchronisations and bytes
at rank counts this machine does not have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from padmmirnn.admm.blockstep import BlockState, BlockStep
from padmmirnn.admm.minibatch import ceil_div, penalty_scale
from padmmirnn.averaging import IterateAverage
from padmmirnn.comm.virtual import VirtualRanks
from padmmirnn.config import Config
from padmmirnn.nn import Network, Params
from padmmirnn.samples import LocalData, bucketed_batches, partition
from padmmirnn.trainer import TrainerState


@dataclass
class Worker:
    """One (virtual) rank: its samples (global ``[start, start + data.n)``), its block
    state, with duals its dual ``u_r`` (flat, as :meth:`Params.flat`), and the average
    of its iterates (``admm.average``)."""

    data: LocalData
    start: int
    state: BlockState
    dual: np.ndarray | None = None
    average: IterateAverage | None = None


class ConsensusAdmm:
    """Local block steps on every (virtual) rank, joined every ``admm.sync_every`` steps
    (a :class:`~padmmirnn.trainer.Trainer`); ``ranks`` the virtual ranks (default: one
    per process)."""

    unit = "iteration"

    def __init__(self, cfg: Config, data: LocalData, n_global: int, comm,
                 params: Params | None = None, ranks: VirtualRanks | None = None):
        """``ranks``: the (virtual) ranks and their reduction, or in asynchronous runs the
        window exchange offering the same ``size``, ``local`` and ``allreduce_sum``."""
        self.ranks = ranks or VirtualRanks(comm, comm.size)
        self.cfg = cfg
        self.data, self.n_global, self.comm = data, n_global, comm
        info = data.info
        self.net, self.block, params = self.components(cfg, info, n_global, self.ranks.size,
                                                       params)
        self.a = self.block.a
        self.mode = cfg.consensus()
        P = self.ranks.size
        self.global_state = self.block.initial(params)  # z (duals), theta (outer, average)
        self.velocity = np.zeros(params.size) if self.mode == "outer" else None
        self.average = params.copy() if self.a.average else None  # the joined average
        self.workers = []
        for v in self.ranks.local:
            lo, hi = partition(n_global, P, v)
            cut = slice(lo - data.start, hi - data.start)
            shard = LocalData(info, data.inputs[:, cut], data.targets[:, cut], lo, hi,
                              None if data.lengths is None else data.lengths[cut])
            self.workers.append(Worker(shard, lo, self.global_state.copy(),
                                       np.zeros(params.size) if self.mode == "duals"
                                       else None, self.block.average(params)))
        self.local_batch = max(1, self.a.batch_size // P)
        # every rank takes the local steps of the largest slice (smaller ones wrap)
        self.local_steps = ceil_div(ceil_div(n_global, P), self.local_batch)
        self.every = self.a.sync_every or self.local_steps
        joins = ceil_div(self.local_steps, self.every)
        self.bytes_per_step = 8 * self._buffer(self.workers[0]).size * joins
        self.iteration = 0
        self.steps = 0  # local steps of one rank
        self.last: dict = {}

    @staticmethod
    def components(cfg: Config, info, n_global: int, ranks: int,
                   params: Params | None = None):
        """The network, its block step (the batch rule for the local steps of ``ranks``
        ranks on ``n_global`` training samples) and the (initial) weights."""
        m = cfg.model
        net = Network.build(m.cell, m.activation, m.layers)
        if params is None:
            params = net.init_params(info.dim, m.hidden, info.classes, cfg.train.seed,
                                     m.w_init, m.init_scale)
        a = cfg.admm.for_batch(n_global, weights=params.U.size,
                               rows=info.output_rows(n_global), ranks=ranks, consensus=True)
        return net, BlockStep(a, net, info, m.hidden, m.loss, cfg.train.dtype), params

    @staticmethod
    def buffer_size(cfg: Config, info, n_global: int, ranks: int) -> int:
        """The float64 words one rank contributes to a join (:meth:`_buffer`)."""
        _, block, params = ConsensusAdmm.components(cfg, info, n_global, ranks)
        extra = params.size if block.a.average else 0
        return block.initial(params).flat().size + extra

    @property
    def params(self) -> Params:
        """The joined weights (the consensus ``z``, or the global ``theta``)."""
        return self.global_state.params

    @property
    def model(self) -> Params:
        """The weights evaluated and saved: the joined average of the iterates
        (``admm.average``), else the joined weights."""
        return self.params if self.average is None else self.average

    def model_from(self, total: np.ndarray) -> Params:
        """The model of a sum over the ranks of their :meth:`_buffer` (a window)."""
        n = self.params.size
        part = total[-n:] if self.average is not None else total[:n]
        return Params.from_flat(part / self.ranks.size, self.params)

    def _split(self, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """A mean of :meth:`_buffer` as the block state's flat part and the average."""
        if self.average is None:
            return mean, None
        n = self.params.size
        return mean[:-n], mean[-n:]

    def _adopt_average(self, mean_average: np.ndarray | None) -> None:
        """Every rank's average is the joined one."""
        if mean_average is None:
            return
        self.average = Params.from_flat(mean_average, self.params)
        for w in self.workers:
            w.average.mean = self.average.copy()

    def adopt(self, total: np.ndarray) -> None:
        """Every rank's state from a sum over the ranks of their :meth:`_buffer` (an
        asynchronous run's final window): the joined weights, Grams and average, duals
        kept."""
        mean, mean_average = self._split(total / self.ranks.size)
        self.global_state.load_flat(mean)
        for w in self.workers:
            w.state.load_flat(mean)
        self._adopt_average(mean_average)

    # ------------------------------------------------------------------ joins

    def _buffer(self, w: Worker) -> np.ndarray:
        """What rank ``w`` contributes to a join: ``theta_r (+ u_r)``, its Grams (and the
        average of its iterates, brought up to date)."""
        flat = w.state.flat()
        if w.dual is not None:
            n = w.state.params.size
            flat[:n] += w.dual
        if w.average is None:
            return flat
        w.average.finish(w.state.params)  # before the join moves every column
        return np.concatenate([flat, w.average.mean.flat()])

    def _join(self) -> None:
        """One reduction: the mean of every rank's :meth:`_buffer`, then the mode's
        update of the weights (every rank leaves with the joined weights)."""
        total = self.ranks.allreduce_sum([self._buffer(w) for w in self.workers])
        mean, mean_average = self._split(total / self.ranks.size)
        n = self.params.size
        g = self.global_state
        g.load_grams(mean[n:])
        if self.mode == "outer":
            delta = g.params.flat() - mean[:n]
            mu, lr = self.a.outer_momentum, self.a.outer_lr
            self.velocity *= mu
            self.velocity += delta
            g.params = Params.from_flat(g.params.flat() - lr * (delta + mu * self.velocity),
                                        g.params)
        else:  # average: the mean of theta_r; duals: z = mean of theta_r + u_r
            g.params = Params.from_flat(mean[:n], g.params)
        z = g.params.flat()
        for w in self.workers:
            if w.dual is not None:
                w.dual += w.state.params.flat() - z
            w.state.load_flat(np.concatenate([z, mean[n:]]))
        self._adopt_average(mean_average)

    # ------------------------------------------------------------------ a pass

    def step(self, evaluate: bool = False) -> None:
        """One pass: every rank's local steps over its samples, joined every
        ``sync_every`` steps and at the end."""
        scale = penalty_scale(self.a, self.iteration)
        orders = [self._local_batches(w) for w in self.workers]
        anchors = self._anchors()
        losses = []
        for k in range(self.local_steps):
            for w, order in zip(self.workers, orders, strict=True):
                idx = order[k % len(order)]
                stats = self.block.statistics(w.state.params, w.data.take(idx))
                anchor = anchors.get(id(w))
                cols = self.block.moved_columns(stats)
                if w.average is not None:
                    w.average.before(w.state.params, cols)
                losses.append(self.block.apply(w.state, stats, scale, anchor,
                                               self.a.consensus_rho if anchor else 0.0))
                if w.average is not None:
                    w.average.after(w.state.params, cols)
            self.steps += 1
            if (k + 1) % self.every == 0 or k + 1 == self.local_steps:
                self._join()
                anchors = self._anchors()
        self.iteration += 1
        self.last = {"batch_loss": float(np.mean(losses))}

    def _local_batches(self, w: Worker) -> list[np.ndarray]:
        """Rank ``w``'s local batches in this pass (local positions), from an order of its
        samples keyed by (seed, pass, its first sample): consecutive slices of it,
        wrapping, or with lengths (and ``train.bucket``) bucketed within it (windows of
        ``train.bucket_window`` batches; taken in turn, wrapping)."""
        key = [self.cfg.train.seed, self.iteration, w.start]
        order = np.random.default_rng(key).permutation(w.data.n)
        B = self.local_batch
        if w.data.lengths is None or not self.cfg.train.bucket:
            return [np.take(order, np.arange(k * B, (k + 1) * B) % w.data.n)
                    for k in range(self.local_steps)]
        return bucketed_batches(order, w.data.lengths, self.local_batch,
                                self.cfg.train.bucket_window,
                                np.random.default_rng([*key, 0x42]))

    def _anchors(self) -> dict[int, Params]:
        """Per rank, the proximal point ``z - u_r`` of its local steps (duals only)."""
        if self.mode != "duals":
            return {}
        z = self.params.flat()
        return {id(w): Params.from_flat(z - w.dual, self.params) for w in self.workers}

    # ------------------------------------------------------------------ the trainer

    def evaluation_terms(self) -> tuple[None, None]:
        return None, None

    def describe(self, reduced: np.ndarray | None) -> dict:
        return dict(self.last)

    def state_dict(self) -> TrainerState:
        """At a pass boundary every rank holds the joined weights and Grams; the duals
        differ per rank (``per_rank``, in rank order), the outer velocity is global."""
        arrays = {"steps": np.int64(self.steps), **self.global_state.state()}
        if self.velocity is not None:
            arrays["velocity"] = self.velocity.copy()
        if self.average is not None:  # every rank's, after the pass's last join
            arrays.update(self.workers[0].average.state())
        per_rank = {}
        if self.mode == "duals":
            per_rank["dual"] = np.stack([w.dual for w in self.workers])
        return {"iteration": self.iteration, "arrays": arrays, "per_sample": {},
                "per_rank": per_rank, "ranks": self.ranks.size}

    def load_state_dict(self, state: TrainerState) -> None:
        arrays = state["arrays"]
        self.global_state.load(arrays)
        if self.velocity is not None:
            self.velocity[...] = arrays["velocity"]
        if self.average is not None:
            for w in self.workers:
                w.average.load(arrays, self.params)
            self.average = self.workers[0].average.mean.copy()
        for i, w in enumerate(self.workers):
            w.state = self.global_state.copy()
            if w.dual is not None:
                duals = state.get("per_rank", {}).get("dual")
                w.dual[...] = 0.0 if duals is None else duals[i]
        self.steps = int(arrays["steps"])
        self.iteration = int(state["iteration"])

"""Mini-batch (online) hybrid ADMM, synchronous: one block step (:mod:`.blockstep`) per
global mini-batch, one reduction of the batch's statistics per step, so a run on any
rank count equals the serial one (docs/design.md, section 5).

One iteration is one pass over the training set in global mini-batches of
``admm.batch_size`` samples (any size up to the whole set), drawn from the permutation
of the global sample indices keyed by (seed, pass), as the data-parallel gradient
baselines draw theirs. With sequence lengths (and ``train.bucket``) the batches are
bucketed as theirs are (:func:`padmmirnn.samples.bucketed_batches`: windows of the
permutation sorted by length, from the global lengths every rank holds), so a batch
holds sequences of similar length, runs to its own longest one, and the batches still
do not depend on the rank count. Each rank forms the statistics of the batch's samples it holds;
one reduction sums them; every rank takes the same step.

With ``train.reduction = deterministic`` a mini-batch is a group of whole chunks of
``train.chunk`` samples (chosen by a permutation of the chunk indices): each chunk is
processed by the rank that holds it, and the chunks' statistics are added in global
chunk order, so the run is bitwise the same on any rank count (the chunks are fixed:
no bucketing; each chunk's passes still skip its padded steps).

With ``train.virtual_ranks = P`` the reductions are those of ``P`` ranks (counted in the
ledger as such); a batch's statistics are sums over its samples, so each process forms
its samples' sums at once, which equals the sum of its virtual ranks' sums to rounding.
"""

from __future__ import annotations

import numpy as np

from padmmirnn.admm.blockstep import BlockStep, batch_layout
from padmmirnn.comm.virtual import VirtualRanks
from padmmirnn.config import Config
from padmmirnn.nn import Network, Params
from padmmirnn.samples import LocalData, bucketed_batches
from padmmirnn.trainer import TrainerState


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def penalty_scale(a, iteration: int) -> float:
    """The penalty schedule in pass ``iteration + 1``: ``rho_j(k) = rho_j min(growth^(k-1),
    max_scale)`` if geometric (a decaying step), else 1."""
    if a.rho_schedule != "geometric":
        return 1.0
    return min(a.rho_growth ** iteration, a.rho_max_scale)


class MinibatchAdmm:
    """Mini-batch hybrid ADMM on this rank's slice ``[data.start, data.stop)`` of
    ``n_global`` samples, a :class:`~padmmirnn.trainer.Trainer`; one reduction of the
    packed batch statistics per mini-batch over ``comm`` (``ranks``: the virtual ranks
    the reductions are counted for; ``lengths``: the ``[n_global]`` lengths of the whole
    training split in its global order, identical on every rank, None: all T)."""

    unit = "iteration"

    def __init__(self, cfg: Config, data: LocalData, n_global: int, comm,
                 params: Params | None = None, parts: list[LocalData] | None = None,
                 ranks: VirtualRanks | None = None, lengths: np.ndarray | None = None):
        self.cfg = cfg
        self.lengths = lengths if cfg.train.bucket else None
        self.data, self.n_global, self.comm = data, n_global, comm
        self.ranks = ranks or VirtualRanks(comm, comm.size)
        self.ordered = cfg.train.reduction == "deterministic"
        self.parts = parts or [data]  # chunks in global order (deterministic reduction)
        info = data.info
        m = cfg.model
        self.net = Network.build(m.cell, m.activation, m.layers)
        if params is None:
            params = self.net.init_params(info.dim, m.hidden, info.classes, cfg.train.seed,
                                          m.w_init, m.init_scale)
        self.a = cfg.admm.for_batch(n_global, weights=params.U.size,
                                    rows=info.output_rows(n_global))
        self.block = BlockStep(self.a, self.net, info, m.hidden, m.loss, cfg.train.dtype)
        self.state = self.block.initial(params)
        self.layout = self.block.layout
        self.average = self.block.average(params)
        self.iteration = 0  # passes done
        self.steps = 0  # weight updates done
        batches = ceil_div(n_global, self.a.batch_size)  # deterministic: fewer
        # token inputs: at most (the reductions carry the batches' tokens only)
        self.bytes_per_step = 8 * self.layout.size * batches
        self.last: dict = {}

    @property
    def params(self) -> Params:
        return self.state.params

    @property
    def model(self) -> Params:
        """The weights evaluated and saved: the average of the iterates
        (``admm.average``), else the last iterate."""
        return self.params if self.average is None else self.average.mean

    def batches(self, order: np.ndarray) -> list[np.ndarray]:
        """The pass's global mini-batches (global sample indices) from its permutation
        ``order``: consecutive slices of ``admm.batch_size``, or with lengths bucketed
        (windows of ``train.bucket_window`` batches sorted by decreasing length, the
        batches of a window in an order seeded by (seed, pass))."""
        B = self.a.batch_size
        if self.lengths is None:
            return [order[lo:lo + B] for lo in range(0, len(order), B)]
        rng = np.random.default_rng([self.cfg.train.seed, self.iteration, 0x42])
        return bucketed_batches(order, self.lengths, B, self.cfg.train.bucket_window, rng)

    def _batches(self, rng: np.random.Generator):
        """Every global mini-batch's statistics, one reduction each (none when serial):
        of the samples of a permutation of the global order, or (deterministic) of
        groups of whole chunks, added in global chunk order."""
        block, layout = self.block, self.layout
        if not self.ordered:
            d = self.data
            for idx in self.batches(rng.permutation(self.n_global)):
                stats = block.statistics(self.params, d.take(
                    idx[(idx >= d.start) & (idx < d.stop)] - d.start))
                yield stats if self.ranks.size == 1 else self._reduce(stats)
            return
        chunk = self.cfg.train.chunk
        order = rng.permutation(-(-self.n_global // chunk))
        per_batch = self.a.batch_size // chunk
        held = {p.start // chunk: p for p in self.parts}
        for lo in range(0, len(order), per_batch):
            ids = np.sort(order[lo:lo + per_batch])
            mine = [layout.pack(block.statistics(self.params, held[c]))
                    for c in ids if c in held]
            rows = self.comm.allgather_rows(
                np.stack(mine) if mine else np.empty((0, layout.size)))
            total = rows[0].copy()
            for row in rows[1:]:
                total += row
            yield layout.unpack(total)

    def _reduce(self, stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global sums of a batch's statistics: one reduction; with token inputs two,
        the ``[vocab]`` token counts, then every field with only the token columns that
        some rank's samples hold (the others are zero on every rank): the same sums, for
        the bytes of the batch's tokens instead of the vocabulary's (20 MB a batch at
        19k words and h = 64)."""
        layout, block = self.layout, self.block
        if not block.vocab:
            return layout.unpack(self.ranks.allreduce_sum([layout.pack(stats)]))
        counts = self.ranks.allreduce_sum([stats["l0.diag"]])
        seen = np.flatnonzero(counts)
        compact = batch_layout(self.net, block.dz, len(seen), block.h, block.classes,
                               block.factored)
        mine = {**stats, "l0.diag": stats["l0.diag"][seen], "l0.cross": stats["l0.cross"][seen],
                "l0.Dx": stats["l0.Dx"][:, seen]}
        out = compact.unpack(self.ranks.allreduce_sum([compact.pack(mine)]))
        cross = np.zeros((block.vocab, out["l0.cross"].shape[1]))
        cross[seen] = out["l0.cross"]
        Dx = np.zeros((out["l0.Dx"].shape[0], block.vocab))
        Dx[:, seen] = out["l0.Dx"]
        out.update({"l0.diag": counts, "l0.cross": cross, "l0.Dx": Dx})
        return out

    def step(self, evaluate: bool = False) -> None:
        """One pass over the training set in global mini-batches, one reduction each."""
        scale = penalty_scale(self.a, self.iteration)
        rng = np.random.default_rng([self.cfg.train.seed, self.iteration])
        losses = []
        avg = self.average
        for stats in self._batches(rng):
            cols = self.block.moved_columns(stats)
            if avg is not None:
                avg.before(self.params, cols)
            losses.append(self.block.apply(self.state, stats, scale))
            if avg is not None:
                avg.after(self.params, cols)
            self.steps += 1
        if avg is not None:
            avg.finish(self.params)
        self.iteration += 1
        self.last = {"batch_loss": float(np.mean(losses))}

    def evaluation_terms(self) -> tuple[None, None]:
        return None, None

    def describe(self, reduced: np.ndarray | None) -> dict:
        return dict(self.last)

    def state_dict(self) -> TrainerState:
        arrays = {"steps": np.int64(self.steps), **self.state.state()}
        if self.average is not None:
            arrays.update(self.average.state())
        return {"iteration": self.iteration, "arrays": arrays, "per_sample": {}}

    def load_state_dict(self, state: TrainerState) -> None:
        arrays = state["arrays"]
        self.state.load(arrays)
        if self.average is not None:
            self.average.load(arrays, self.params)
        self.steps = int(arrays["steps"])
        self.iteration = int(state["iteration"])

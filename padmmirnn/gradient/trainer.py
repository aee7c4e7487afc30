"""Gradient baselines across ranks: synchronous data parallel and CELGC.

* ``sync`` (SGD, momentum, Adam, RMSProp, Adagrad): every step uses one *global*
  mini-batch, drawn from a permutation of the global sample indices keyed by
  (seed, epoch), so the batches do not depend on the rank count. Each rank
  computes the loss and gradient sums over the batch's samples it holds; one
  Allreduce of a packed buffer gives the global mean gradient, which is clipped
  by global norm and applied identically on every rank.
  With sequence lengths (and ``train.bucket``) the batches are bucketed: each
  window of ``train.bucket_window`` batches of the permutation is sorted by length
  before it is cut (:func:`padmmirnn.samples.bucketed_batches`), from the global
  lengths every rank holds, so they still do not depend on the rank count.
* CELGC (Liu et al., NeurIPS 2022): each rank steps on its own samples with the
  clipped step ``x <- x - min(eta, gamma/||g||) g`` and the weights are averaged
  over ranks every I steps (one Allreduce). With one rank it is clipped SGD.
"""

from __future__ import annotations

import numpy as np

from padmmirnn.averaging import IterateAverage
from padmmirnn.config import Config
from padmmirnn.gradient.optimizers import (
    CELGC,
    OPTIMIZERS,
    Optimizer,
    clip_by_norm,
    global_norm,
    make_schedule,
)
from padmmirnn.nn import Network, Params
from padmmirnn.samples import LocalData, bucketed_batches
from padmmirnn.trainer import TrainerState

# Default learning rates. Adam's is 1e-3 with global-norm clipping at 1 (optim.clip_norm):
# its former default, 3e-3 without clipping, collapsed on Fashion-MNIST (75% at epoch 4,
# 57% at epoch 60; docs/admm-convergence.md); 1e-3 with clipping is stable on the
# default dataset, Fashion-MNIST and a character language model over 60 epochs.
DEFAULT_LR = {"sgd": 0.05, "momentum": 0.005, "adam": 1e-3, "rmsprop": 1e-3, "adagrad": 0.05,
              "celgc": 0.05}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pack(p: Params, scale: float, extra: list[float]) -> np.ndarray:
    return np.concatenate([p.flat() * scale, extra])


class GradientTrainer:
    """A gradient method as a :class:`~padmmirnn.trainer.Trainer`: one epoch per
    :meth:`step`, on the samples ``[data.start, data.stop)`` of ``n_global``;
    ``params`` (seeded initial weights unless given) are identical on every rank
    after each epoch."""

    unit = "epoch"

    def __init__(self, cfg: Config, data: LocalData, n_global: int, comm,
                 params: Params | None = None, lengths: np.ndarray | None = None):
        """``lengths``: the ``[n_global]`` lengths of the whole training split in its
        global order, identical on every rank (None: all T, no bucketing)."""
        self.cfg, self.o = cfg, cfg.optim
        info = data.info
        m = cfg.model
        self.net = Network.build(m.cell, m.activation, m.layers)
        if params is None:
            params = self.net.init_params(info.dim, m.hidden, info.classes, cfg.train.seed,
                                          m.w_init, m.init_scale)
        self.data, self.n_global, self.comm, self.params = data, n_global, comm, params
        self.lengths = lengths if cfg.train.bucket else None
        self.algo = cfg.train.algo
        self.dtype = np.dtype(cfg.train.dtype)
        lr = self.o.lr or DEFAULT_LR[self.algo]
        B = self.o.batch_size
        # optimizer steps per epoch: global batches, or CELGC's local steps (those of the
        # largest slice, which every rank takes)
        self.local_steps = _ceil_div(_ceil_div(n_global, comm.size), B)
        batches = self.local_steps if self.algo == "celgc" else _ceil_div(n_global, B)
        schedule = make_schedule(self.o.schedule, lr, total=batches * cfg.train.iterations,
                                 factor=self.o.step_factor, every=self.o.step_every * batches)
        if self.algo == "celgc":
            self.optimizer: Optimizer = CELGC(schedule, self.o.celgc_gamma, self.o.celgc_period,
                                              self._average_params)
        else:
            kwargs = {"mu": self.o.momentum} if self.algo == "momentum" else {}
            self.optimizer = OPTIMIZERS[self.algo](schedule, **kwargs)
        self.average = IterateAverage(self.o.average, params) if self.o.average else None
        self.iteration = 0  # epochs done
        self.last: dict = {}
        n_params = params.size
        if self.algo == "celgc":  # a weight average every `period` local steps, + the last
            self.bytes_per_step = 8 * n_params * _ceil_div(batches, self.o.celgc_period)
        else:  # per batch: the gradient sums, the loss, rows, step norms, samples (token
            # inputs: at most; the reduction carries the batch's tokens' columns of U)
            self.bytes_per_step = 8 * (n_params + data.info.steps + 3) * batches

    def _average_params(self, p: Params) -> Params:
        buf = self.comm.allreduce_sum(_pack(p, 1.0, []))
        return Params.from_flat(buf / self.comm.size, p)

    def _local_batch(self, idx: np.ndarray) -> LocalData:
        d = self.data
        return d.take(idx[(idx >= d.start) & (idx < d.stop)] - d.start)

    def _sync_step(self, batch: LocalData) -> tuple[float, float, np.ndarray]:
        steps = self.data.info.steps
        cols = self._columns(batch)
        like = self.params if cols is None else self._compact(cols)
        if batch.targets.shape[1]:
            res = self.net.gradients(self.params, batch, self.cfg.model.loss, self.dtype, cols)
            n = batch.targets.shape[1]
            buf = _pack(res.grads, res.rows, [res.loss * res.rows, res.rows,
                                              *(res.step_norms * n), n])
        else:
            buf = np.zeros(like.size + steps + 3)
        self.comm.allreduce_sum(buf)
        rows, samples = buf[-steps - 2], buf[-1]
        grads = Params.from_flat(buf / rows, like)
        clip = self.o.clip_norm
        norm = clip_by_norm(grads, clip) if clip > 0 else global_norm(grads)
        if cols is None:
            self.optimizer.step(self.params, grads)
        elif self.o.token_update == "lazy":
            self.optimizer.step(self.params, grads, {"U": cols})
        else:
            dense = np.zeros_like(self.params.U)
            dense[:, cols] = grads.U
            self.optimizer.step(self.params, grads.replace(U=dense))
        return buf[-steps - 3] / rows, norm, buf[-steps - 1:-1] / samples

    def _columns(self, batch: LocalData) -> np.ndarray | None:
        """Token inputs: the sorted ids of the global batch's real tokens (None for
        dense inputs), each rank's own joined over the ranks by one reduction of a
        ``[vocab]`` indicator. The first layer's ``U`` gradient is zero in every other
        column, so the gradient sums and their reduction carry these columns only: a
        step costs the batch's tokens, not the vocabulary."""
        if self.data.info.kind != "tokens":
            return None
        mine = np.empty(0, np.int64)
        if batch.targets.shape[1]:
            real = batch.inputs if batch.lengths is None else batch.inputs[
                np.arange(batch.inputs.shape[0])[:, None] < batch.lengths[None, :]]
            mine = np.unique(real)
        if self.comm.size == 1:
            return mine
        held = np.zeros(self.data.info.dim)
        held[mine] = 1.0
        return np.flatnonzero(self.comm.allreduce_sum(held))

    def _compact(self, cols: np.ndarray) -> Params:
        """The weights' shapes with the first layer's ``U`` cut to ``cols``."""
        U = self.params.U
        return self.params.replace(U=np.empty((U.shape[0], len(cols))))

    def _celgc_step(self, batch: LocalData) -> tuple[float, float, np.ndarray]:
        res = self.net.gradients(self.params, batch, self.cfg.model.loss, self.dtype)
        norm = global_norm(res.grads)
        self.optimizer.step(self.params, res.grads)
        return res.loss, norm, res.step_norms

    def batches(self, order: np.ndarray) -> list[np.ndarray]:
        """The pass's global mini-batches (global sample indices) from its permutation
        ``order``: consecutive slices of ``optim.batch_size``, or bucketed by length
        (windows of ``train.bucket_window`` batches sorted by length, the batches of a
        window in an order seeded by (seed, epoch)) when the data have lengths."""
        B = self.o.batch_size
        if self.lengths is None:
            return [order[lo:lo + B] for lo in range(0, len(order), B)]
        rng = np.random.default_rng([self.cfg.train.seed, self.iteration, 0x42])
        return bucketed_batches(order, self.lengths, B, self.cfg.train.bucket_window, rng)

    @property
    def model(self) -> Params:
        """The weights evaluated and saved: the average of the iterates
        (``optim.average``), else the last iterate."""
        return self.params if self.average is None else self.average.mean

    def step(self, evaluate: bool = False) -> None:
        """One pass over the training set; :meth:`describe` then gives its mean batch
        loss, gradient norms and per-step gradient norms."""
        order = np.random.default_rng([self.cfg.train.seed, self.iteration]).permutation(
            self.n_global)
        B = self.o.batch_size
        losses, norms, step_norms = [], [], np.zeros(self.data.info.steps)
        if self.algo == "celgc":
            # every rank walks its own samples in the global order; ranks agree on the
            # number of local steps (that of the largest slice), smaller slices wrap around
            d = self.data
            mine = order[(order >= d.start) & (order < d.stop)]
            walk = np.take(mine, np.arange(self.local_steps * B) % len(mine))
            for idx in self.batches(walk):
                loss, norm, sn = self._celgc_step(self._local_batch(idx))
                losses.append(loss)
                norms.append(norm)
                step_norms += sn
            if self.optimizer.t % self.o.celgc_period:
                self._sync_weights()
        else:
            for idx in self.batches(order):
                loss, norm, sn = self._sync_step(self._local_batch(idx))
                if self.average is not None:
                    self.average.after(self.params, None)
                losses.append(loss)
                norms.append(norm)
                step_norms += sn
        self.iteration += 1
        self.last = {"batch_loss": float(np.mean(losses)), "grad_norm": float(np.mean(norms)),
                     "max_grad_norm": float(np.max(norms)),
                     "grad_step_norms": (step_norms / len(losses)).tolist()}

    def evaluation_terms(self) -> tuple[None, None]:
        return None, None  # no sums to join, no forward pass of the whole training set

    def describe(self, reduced: np.ndarray | None) -> dict:
        return dict(self.last)

    def state_dict(self) -> TrainerState:
        arrays = {k: np.asarray(v) for k, v in self.optimizer.state_dict().items()}
        if self.average is not None:
            arrays.update(self.average.state())
        return {"iteration": self.iteration, "per_sample": {}, "arrays": arrays}

    def load_state_dict(self, state: TrainerState) -> None:
        self.optimizer.load_state_dict(state["arrays"])
        if self.average is not None:
            self.average.load(state["arrays"], self.params)
        self.iteration = int(state["iteration"])

    def _sync_weights(self) -> None:
        """End an epoch with identical weights on every rank (CELGC's last average)."""
        mean = self._average_params(self.params)
        for k in self.params.names():
            getattr(self.params, k)[...] = getattr(mean, k)

"""The ADMMiRNN iteration: block order, rho schedule, multipliers, one reduction.

Schedules (docs/design.md, sections 3 and 4):

* ``fused``: statistics of [x, s_{t-1}, 1, a_hat] and [s, 1, o_hat] are taken
  before the weight blocks (a, s, o, lambda do not change while the weights are
  solved), so ONE reduction per iteration; then U, W, b, V, c, a, s, o, lambda.
* ``paper``: U, W, b, a, s, V, c, o, lambda -- a second reduction for V, c.

The default configuration (``AdmmConfig``) runs the fused schedule with no
a/s/o sweeps: the weights, then a forward re-synchronisation of a, s, o (with
backtracking on the true loss), then the KKT multiplier estimate; the block
order above is that of the faithful formulation (``--config faithful``).

Multiplier modes: ``all`` (lambda1..3), ``output`` (lambda3 only), ``none``
(pure penalty: the iteration never increases the augmented Lagrangian). No
multiplier update happens during the first ``warmup`` iterations. rho follows
``rho_j(k) = rho_j * min(growth^(k-1), max_scale)`` for the geometric schedule.

A rank's samples are held as *parts*: its whole slice (``reduction = "fast"``:
one Allreduce of the local sums), or fixed chunks of the global sample order
(``"deterministic"``: every part's sums are gathered and added in global chunk
order, and every computation is done on identical chunks, so results are
bitwise the same for any rank count).

The engine is a :class:`~padmmirnn.trainer.Trainer`. It is given, when it is built,
the communicator of its collectives, the *reducer* of its one statistics reduction
per iteration (the communicator itself, or in asynchronous runs the RMA exchange of
:mod:`padmmirnn.admm.asynchronous`), and the communicator its step control sums trial
losses over (every rank, or in asynchronous runs this rank alone).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

import padmmirnn.admm.blocks as up
from padmmirnn import kernels
from padmmirnn.admm.blocks import forward_into
from padmmirnn.admm.packed import Layout, constant_layout, input_layout, output_layout
from padmmirnn.comm import sum_parts
from padmmirnn.config import AdmmConfig, Config
from padmmirnn.nn import (
    LOSSES,
    Params,
    init_params,
    input_rows,
    outputs,
    stacked_state,
    states_of,
)
from padmmirnn.samples import LocalData
from padmmirnn.trainer import TrainerState


def length_groups(data: LocalData) -> list[tuple[LocalData, np.ndarray | None]]:
    """A part cut into groups of equal length: per length L of ``data.lengths`` (in
    increasing order) the samples of that length, truncated to their L real steps, and
    their positions in ``data``. A group is then an unpadded split of T = L steps: the
    auxiliaries, constraints and multipliers of the padded steps do not exist, a
    many-to-one output reads s_L, a many-to-many loss has the L real targets. Without
    lengths, or when every sample has all T steps: the part itself (positions None).
    The groups depend on the part alone, so the ordered reduction stays the same for
    any rank count."""
    steps = data.inputs.shape[0]
    if data.lengths is None or np.all(data.lengths == steps):
        return [(data, None)]
    groups = []
    for length in np.unique(data.lengths):
        pos = np.flatnonzero(data.lengths == length)
        L = int(length)
        targets = data.targets[:L] if data.info.many_to_many else data.targets
        groups.append((LocalData(replace(data.info, steps=L),
                                 np.ascontiguousarray(data.inputs[:L, pos]),
                                 np.ascontiguousarray(targets[:, pos]),
                                 data.start, data.start + len(pos)), pos))
    return groups


def _loss_only(loss: float) -> np.ndarray:
    """Residual sums of a forward pass: every residual is zero, the loss remains."""
    out = np.zeros(len(up.Residual))
    out[up.Residual.LOSS] = loss
    return out


@dataclass
class Part:
    """One block of samples of equal length with its ADMM state, a scratch ``[T, h, n]``
    buffer and its constant input statistics; ``origin`` is the index of the part it was
    cut from (:func:`length_groups`) and ``positions`` its samples' positions there
    (None: all of them, in order)."""

    data: LocalData
    state: up.AdmmState
    work: np.ndarray
    const: dict
    origin: int = 0
    positions: np.ndarray | None = None


class AdmmEngine:
    """ADMMiRNN on one rank's samples, a :class:`~padmmirnn.trainer.Trainer`.

    ``comm`` runs the collectives (constant statistics, residual sums); ``reducer``
    (default ``comm``) sums the per-iteration statistics, the one reduction of an
    iteration; ``loss_comm`` (default ``comm``) sums the step control's trial losses.
    """

    unit = "iteration"
    STATE = ("A", "S", "O", "L1", "L2", "L3")  # per-sample arrays of a checkpoint
    ROWS = ("O", "L3")  # kept in rows [|O|, n, K]; the rest is [T, h, n]

    def __init__(self, cfg: Config, parts: list[LocalData], n_global: int, comm,
                 params: Params | None = None, *, reducer=None, loss_comm=None):
        self.cfg = cfg
        self.n_global, self.comm = n_global, comm
        self.reducer = comm if reducer is None else reducer
        self.loss_comm = comm if loss_comm is None else loss_comm
        self.ordered = cfg.train.reduction == "deterministic"
        self.dtype = np.dtype(cfg.train.dtype)
        info = parts[0].info
        self.info = info
        self.tokens = info.kind == "tokens"
        h = cfg.model.hidden
        self.params = params if params is not None else init_params(
            info.dim, h, info.classes, cfg.train.seed, cfg.model.w_init, cfg.model.init_scale)
        # the presets set nu; auto (admm.batch_size = 0 without one) is the size rule
        self.acfg = cfg.admm.for_batch(n_global, weights=self.params.U.size,
                                       rows=info.output_rows(n_global))
        self.iteration = 0
        # True while a, s, o are exactly the forward pass of the current weights
        # (after initialisation and every re-synchronisation; any block update clears it)
        self.synced = True
        self.alpha = 1.0  # step length of the backtracking step control
        self.streak = 0  # iterations in a row whose first trial step was accepted
        self.trials = 0  # forward passes of the step control so far
        self.last_trials = 0  # ... in the last step (backtrack_max + 1: none decreased)
        self._loss: float | None = None  # global training loss sum at the current weights
        self._prev: Params | None = None  # weights before the last step (heavy ball)
        self._sums: list[np.ndarray] | None = None  # residual sums of the last step
        self.parts = []
        self.sizes = [data.n for data in parts]  # the parts as given (the checkpoint's)
        for origin, whole in enumerate(parts):
            for data, positions in length_groups(whole):
                state = self._initial_state(data)
                self.parts.append(Part(data, state, np.empty_like(state.A),
                                       up.constant_stats(data), origin, positions))
        # regressor rows of the input block (real sample-steps) and of the output block
        rows = [np.array([p.data.n * p.data.info.steps,
                          p.data.n * (p.data.info.steps if info.many_to_many else 1)],
                         np.float64) for p in self.parts]
        self.in_rows, self.out_rows = (float(r) for r in self.sum_parts(rows))
        self.in_layout = input_layout(info.dim, h)
        self.out_layout = output_layout(h, info.classes)
        const_layout = constant_layout(info.dim, self.tokens)
        self.const = const_layout.unpack(self.sum_parts([const_layout.pack(p.const)
                                                         for p in self.parts]))

    @property
    def bytes_per_step(self) -> int:
        """Bytes of the packed statistics reduced per iteration (per part when ordered)."""
        size = self.in_layout.size + self.out_layout.size
        return 8 * size * (len(self.parts) if self.ordered else 1)

    # --------------------------------------------------------------------- state

    def _initial_state(self, data: LocalData) -> up.AdmmState:
        """Auxiliaries from a forward pass of the initial weights, multipliers zero."""
        h = self.cfg.model.hidden
        mode = self.acfg.multipliers
        Z = stacked_state(data, h, self.dtype, extra=h if mode == "all" else 0)
        pre = np.empty((data.info.steps, h, data.n), self.dtype)
        forward_into(self.compute_params(), data, self.cfg.model.activation, pre, Z)
        dz = input_rows(data.info)
        o = outputs(self.params, states_of(Z, dz, h), data.info.many_to_many)
        empty = np.zeros((0, 0, 0), self.dtype)
        return up.AdmmState(
            A=pre, Z=Z, O=o,
            L2=np.zeros_like(pre) if mode == "all" else empty,
            L3=np.zeros_like(o) if mode in ("all", "output") else empty,
            dz=dz,
        )

    def penalty(self, iteration: int | None = None) -> up.Penalty:
        """rho and nu in force at ``iteration`` (1-based; default: the next one)."""
        a: AdmmConfig = self.acfg
        k = self.iteration + 1 if iteration is None else iteration
        scale = 1.0
        if a.rho_schedule == "geometric":
            scale = min(a.rho_growth ** (k - 1), a.rho_max_scale)
        return up.Penalty(a.rho1 * scale, a.rho2 * scale, a.rho3 * scale, a.nu)

    def compute_params(self) -> Params:
        """The weights in the compute dtype (no copy when it is float64)."""
        return self.params.astype(self.dtype)

    # --------------------------------------------------------------------- reductions

    def sum_parts(self, vectors: list[np.ndarray]) -> np.ndarray:
        """Global sum of one float64 vector per local part (a collective on ``comm``)."""
        return sum_parts(self.comm, vectors, self.ordered)

    def _reduce(self, layout: Layout, local: list[dict]) -> dict:
        """The per-iteration statistics, summed by the reducer."""
        return layout.unpack(sum_parts(self.reducer, [layout.pack(v) for v in local],
                                       self.ordered))

    def _input_stats(self, p: Part, pen: up.Penalty) -> dict:
        if self.synced:  # a, s are the forward pass of the weights: no a_hat pass
            return up.input_stats_synced(self.params, p.state, p.data, pen.rho1, p.const)
        return up.input_stats(p.state, p.data, pen.rho1, p.work)

    def reduce_input(self, pen: up.Penalty) -> dict:
        return self._reduce(self.in_layout, [self._input_stats(p, pen) for p in self.parts])

    def reduce_output(self, pen: up.Penalty) -> dict:
        m2m = self.info.many_to_many
        return self._reduce(self.out_layout, [up.output_stats(p.state, m2m, pen.rho3)
                                              for p in self.parts])

    def reduce_fused(self, pen: up.Penalty) -> tuple[dict, dict]:
        """Input and output statistics in ONE reduction (the fused schedule)."""
        n_in, m2m = self.in_layout.size, self.info.many_to_many
        vectors = []
        for p in self.parts:
            buf = np.empty(n_in + self.out_layout.size)
            self.in_layout.pack(self._input_stats(p, pen), buf[:n_in])
            self.out_layout.pack(up.output_stats(p.state, m2m, pen.rho3), buf[n_in:])
            vectors.append(buf)
        total = sum_parts(self.reducer, vectors, self.ordered)
        return self.in_layout.unpack(total[:n_in]), self.out_layout.unpack(total[n_in:])

    # --------------------------------------------------------------------- blocks

    def weights_in(self, st_in: dict, pen: up.Penalty) -> None:
        self.synced = False
        up.update_input_weights(self.params, st_in, self.const, pen, self.n_global,
                                self.in_rows, self.tokens, self.acfg.weight_solve == "joint")

    def weights_out(self, st_out: dict, pen: up.Penalty) -> None:
        self.synced = False
        up.update_output_weights(self.params, st_out, pen, self.n_global, self.out_rows,
                                 self.acfg.weight_solve == "joint")

    def block_a(self, pen: up.Penalty) -> None:
        self.synced = False
        cp = self.compute_params()
        for p in self.parts:
            up.update_a(cp, p.state, p.data, pen, self.cfg.model.activation,
                        self.acfg.a_newton_steps, p.work)

    def block_s(self, pen: up.Penalty) -> None:
        self.synced = False
        cp = self.compute_params()
        inverses = up.s_system_inverses(self.params, pen, self.info.many_to_many, self.dtype)
        for p in self.parts:
            up.update_s(cp, p.state, p.data, pen, self.cfg.model.activation, inverses, p.work)

    def block_backward(self, pen: up.Penalty) -> None:
        """One backward-in-time Gauss-Seidel sweep s_T, a_T, ..., s_1, a_1."""
        self.synced = False
        cp = self.compute_params()
        inverses = up.s_system_inverses(self.params, pen, self.info.many_to_many, self.dtype)
        for p in self.parts:
            up.sweep_backward(cp, p.state, p.data, pen, self.cfg.model.activation,
                              self.acfg.a_newton_steps, inverses, p.work)

    def resync(self) -> None:
        """Auxiliaries a, s, o from a true forward pass of the current weights."""
        cp = self.compute_params()
        for p in self.parts:
            up.resync_forward(cp, p.state, p.data, self.cfg.model.activation)
        self.synced = True

    def block_aux(self, pen: up.Penalty) -> None:
        """The local blocks after the weights: ``aux_sweeps`` sweeps of (a, s), o
        (Jacobi order) or o, (s_T, a_T, ..., s_1, a_1) (backward order)."""
        for _ in range(self.acfg.aux_sweeps):
            if self.acfg.aux_order == "backward":
                self.block_o(pen)
                self.block_backward(pen)
            else:
                self.block_a(pen)
                self.block_s(pen)
                self.block_o(pen)

    def forward_loss(self, over=None) -> float:
        """Training loss sum of the auxiliaries o (after :meth:`resync`, the true loss of
        the current weights) over the ranks of ``over`` (default ``loss_comm``); one
        reduction of one number."""
        m = self.cfg.model
        local = [np.array([kernels.loss_and_correct(
            p.state.O.reshape(-1, p.state.O.shape[-1]), p.data.targets.reshape(-1),
            LOSSES[m.loss])[0]]) for p in self.parts]
        return float(sum_parts(self.loss_comm if over is None else over, local,
                               self.ordered)[0])

    def _backtrack(self, old: Params, over=None) -> None:
        """Step control: try ``old + alpha (new - old)``, starting from the last accepted
        alpha, doubled (at most 1) once ``step_grow_after`` iterations in a row took
        their first trial (doubling every iteration cost 1.9 forward passes per
        iteration on the default dataset, this 1.25-1.35, with the same accuracy),
        halving alpha (at most ``backtrack_max`` times) until the true training loss
        (forward pass, summed over ``over``, default ``loss_comm``: every rank, or in
        async runs this rank's own samples) does not increase. With the joint weight solve and
        auxiliaries from a forward pass, alpha scales 1/rho exactly (a = Theta_old z, so
        Theta_new - Theta_old is proportional to 1/rho up to the ridge term)."""
        if self._loss is None:
            self._loss = self.forward_loss(over)
        new = self.params
        grow = self.streak >= self.acfg.step_grow_after
        alpha = min(1.0, 2.0 * self.alpha) if grow else self.alpha
        mu = self.acfg.momentum if self._prev is not None else 0.0
        for trial in range(self.acfg.backtrack_max + 1):
            arrays = {}
            for k in old.names():
                o = getattr(old, k)
                x = o + alpha * (getattr(new, k) - o)
                if mu:
                    x += mu * (o - getattr(self._prev, k))
                arrays[k] = x
            self.params = Params(arrays)
            self.resync()
            loss = self.forward_loss(over)
            if loss <= self._loss or trial == self.acfg.backtrack_max:
                break
            if mu:
                mu = 0.0  # first fallback: drop the heavy-ball term, keep alpha
            else:
                alpha *= 0.5
        self.alpha, self._loss = alpha, loss
        self.streak = self.streak + 1 if trial == 0 else 0
        self.trials += trial + 1
        self.last_trials = trial + 1
        self._prev = old if self.acfg.momentum else None

    def resolve(self, start: Params, st_in: dict, st_out: dict) -> None:
        """Redo a weight solve from the weights ``start`` with the given global
        statistics, every rank at this point (async quiescent points): the step control,
        if any, sums its trial losses over every rank (``comm``), so every rank ends with
        the same weights, auxiliaries that are their forward pass and the KKT
        multipliers of that point. Without a step control, exactly the solve SP makes."""
        pen = self.penalty(self.iteration)
        self.params = start.copy()  # the weight blocks update their Params in place
        if not self.cfg.backtracking():
            self.weights_in(st_in, pen)
            self.weights_out(st_out, pen)
            return
        self.resync()
        self._loss = None
        self.weights_in(st_in, pen)
        self.weights_out(st_out, pen)
        self._backtrack(start, over=self.comm)
        if self.acfg.multiplier_update == "kkt" and self.iteration > self.acfg.warmup:
            self.block_kkt_multipliers()
        self._loss = None  # the next step control starts from this rank's own loss

    def block_kkt_multipliers(self) -> None:
        """lambda from the least-squares multiplier estimate (a backward recursion)."""
        cp = self.compute_params()
        m = self.cfg.model
        for p in self.parts:
            up.kkt_multipliers(cp, p.state, p.data, m.activation, m.loss, self.synced)

    def block_o(self, pen: up.Penalty) -> None:
        self.synced = False
        cp = self.compute_params()
        for p in self.parts:
            up.update_o(cp, p.state, p.data, pen, self.cfg.model.loss, self.acfg.o_newton_steps)

    def train_loss_sums(self) -> list[np.ndarray] | None:
        """Per part ``[loss, correct, rows]`` of the current weights on this rank's
        training samples, read off the auxiliaries o when they are the forward pass
        (``synced``, as after every iteration of the default configuration); None
        otherwise, when a true forward pass is needed."""
        if not self.synced:
            return None
        loss = LOSSES[self.cfg.model.loss]
        out = []
        for p in self.parts:
            o = p.state.O.reshape(-1, p.state.O.shape[-1])
            total, correct = kernels.loss_and_correct(o, p.data.targets.reshape(-1), loss)
            out.append(np.array([total, float(correct), float(o.shape[0])]))
        return out

    def residuals(self, pen: up.Penalty, update: tuple[bool, bool, bool]) -> list[np.ndarray]:
        """Per-part :class:`~padmmirnn.admm.blocks.Residual` sums (multipliers before),
        then the multiplier step."""
        cp = self.compute_params()
        m = self.cfg.model
        return [up.residual_sums(cp, p.state, p.data, pen, m.activation, m.loss, p.work, update,
                                 self.acfg.dual_step)
                for p in self.parts]

    def lagrangian(self, pen: up.Penalty | None = None) -> float:
        """The global augmented Lagrangian at the current point."""
        pen = pen or self.penalty(max(self.iteration, 1))
        sums = self.sum_parts(self.residuals(pen, (False, False, False)))
        return up.lagrangian_from_sums(sums, self.params, pen, self.n_global)

    # --------------------------------------------------------------------- iteration

    def iterate(self, want_sums: bool = True) -> list[np.ndarray] | None:
        """One ADMM iteration. Returns the per-part Residual sums at the new
        point (multipliers before their update) when asked or needed, else None."""
        pen = self.penalty()
        a = self.acfg
        resync = a.resync_every > 0 and self.iteration % a.resync_every == 0
        if a.schedule == "fused":
            st_in, st_out = self.reduce_fused(pen)
            old = self.params.copy() if self.cfg.backtracking() else None
            self.weights_in(st_in, pen)
            self.weights_out(st_out, pen)
            if old is not None:
                self._backtrack(old)
            elif resync:
                self.resync()
            self.block_aux(pen)
        elif a.aux_order == "jacobi" and a.aux_sweeps == 1 and not resync:
            self.weights_in(self.reduce_input(pen), pen)
            self.block_a(pen)
            self.block_s(pen)
            self.weights_out(self.reduce_output(pen), pen)
            self.block_o(pen)
        else:
            self.weights_in(self.reduce_input(pen), pen)
            self.weights_out(self.reduce_output(pen), pen)
            if resync:
                self.resync()
            self.block_aux(pen)
        self.iteration += 1
        mode = self.acfg.multipliers
        active = self.iteration > self.acfg.warmup
        if a.multiplier_update == "kkt":
            sums = None
            if want_sums:
                # after a re-synchronisation every residual is zero by construction
                # (recomputing them gives ~1e-16): only the loss term remains
                synced = self.train_loss_sums()
                sums = ([_loss_only(v[0]) for v in synced] if synced is not None
                        else self.residuals(pen, (False, False, False)))
            if active:
                self.block_kkt_multipliers()
            return sums
        update = (active and mode == "all", active and mode == "all",
                  active and mode in ("all", "output"))
        if want_sums or any(update):
            return self.residuals(pen, update)
        return None

    def summarize(self, sums: np.ndarray) -> dict[str, float]:
        """Objective and primal residual norms from globally reduced sums."""
        pen = self.penalty(self.iteration)
        n = self.n_global
        return {
            "objective": up.lagrangian_from_sums(sums, self.params, pen, n),
            "residual_a": float(np.sqrt(sums[up.Residual.R1_SQ] / n)),
            "residual_s": float(np.sqrt(sums[up.Residual.R2_SQ] / n)),
            "residual_o": float(np.sqrt(sums[up.Residual.R3_SQ] / n)),
            "rho1": pen.rho1,
        }

    # --------------------------------------------------------------------- trainer

    @property
    def model(self) -> Params:
        """The weights evaluated and saved: the iterate."""
        return self.params

    def step(self, evaluate: bool = False) -> None:
        """One iteration; with ``evaluate`` (or when the multiplier step needs them) the
        residual sums of the new point are kept for :meth:`evaluation_terms`."""
        self._sums = self.iterate(want_sums=evaluate)

    def evaluation_terms(self) -> tuple[list[np.ndarray] | None, list[np.ndarray] | None]:
        """The kept residual sums and the training loss sums, one vector per part as
        the engine was given them (its length groups added in their fixed order)."""
        return self._by_origin(self._sums), self._by_origin(self.train_loss_sums())

    def _by_origin(self, vectors: list[np.ndarray] | None) -> list[np.ndarray] | None:
        if vectors is None or len(vectors) == len(self.sizes):
            return vectors
        out = [np.zeros_like(vectors[0]) for _ in self.sizes]
        for p, v in zip(self.parts, vectors, strict=True):
            out[p.origin] += v
        return out

    def describe(self, reduced: np.ndarray | None) -> dict:
        return {} if reduced is None else self.summarize(reduced)

    def local_progress(self) -> dict:
        """This rank's step length, the forward passes its last step control ran
        (``backtrack_max + 1``: no trial decreased the loss, the last was taken) and the
        mean training loss over ``loss_comm`` at the current weights (what the step
        control compares), when it backtracks."""
        if not self.cfg.backtracking() or self._loss is None:
            return {}
        rows = sum(p.state.O.shape[0] * p.state.O.shape[1] for p in self.parts)
        return {"alpha": self.alpha, "trials": self.last_trials,
                "local_train_loss": self._loss / rows}

    def _state_arrays(self, part: Part, name: str) -> np.ndarray:
        """A state array of a part, as stored (s_0 = 0 is not state)."""
        a = getattr(part.state, name)
        return a[1:] if name == "S" else a

    def _sample_major(self, name: str, a: np.ndarray) -> np.ndarray:
        """``[n, T, h]`` / ``[n, |O|, K]`` view of a state array (the checkpoint layout)."""
        return np.moveaxis(a, 1, 0) if name in self.ROWS else a.transpose(2, 0, 1)

    def _state_major(self, name: str, a: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`_sample_major`."""
        return np.moveaxis(a, 0, 1) if name in self.ROWS else a.transpose(1, 2, 0)

    def _stored_steps(self, name: str) -> int:
        """Steps of a state array in the checkpoint: T, or 1 for a many-to-one output."""
        return 1 if name in self.ROWS and not self.info.many_to_many else self.info.steps

    def _gathered(self, name: str) -> np.ndarray:
        """This rank's samples' state array, sample-major and in sample order, the
        padded steps of the groups zero."""
        parts = [p for p in self.parts if self._state_arrays(p, name).size]
        if not parts:
            return np.zeros((0,))
        first = self._sample_major(name, self._state_arrays(parts[0], name))
        out = np.zeros((sum(self.sizes), self._stored_steps(name), first.shape[2]),
                       first.dtype)
        offsets = np.cumsum([0, *self.sizes])
        for p in parts:
            block = self._sample_major(name, self._state_arrays(p, name))
            rows = (np.arange(p.data.n) if p.positions is None else p.positions)
            out[offsets[p.origin] + rows, :block.shape[1]] = block
        return out

    def state_dict(self) -> TrainerState:
        """``per_sample``: this rank's a, s, o and multipliers, sample-major, parts in
        order; ``arrays``: the step control's scalars, whether the auxiliaries are a
        forward pass of the weights, and the previous weights (heavy ball)."""
        per_sample = {}
        for name in self.STATE:
            if self._state_arrays(self.parts[0], name).size:
                per_sample[name] = self._gathered(name)
        arrays = {"alpha": np.float64(self.alpha), "streak": np.int64(self.streak),
                  "synced": np.int64(self.synced),
                  "loss": np.float64(np.nan if self._loss is None else self._loss)}
        if self._prev is not None:
            arrays.update({f"prev.{k}": v for k, v in self._prev.arrays().items()})
        return {"iteration": self.iteration, "arrays": arrays, "per_sample": per_sample}

    def load_state_dict(self, state: TrainerState) -> None:
        arrays, per_sample = state["arrays"], state["per_sample"]
        # the restored a, s, o are the state the run had: a forward pass of the restored
        # weights only if they were one when saved
        self.synced = bool(arrays.get("synced", 0))
        self.alpha = float(arrays.get("alpha", 1.0))
        self.streak = int(arrays.get("streak", 0))
        loss = float(arrays.get("loss", np.nan))
        self._loss = None if np.isnan(loss) else loss
        if "prev.U" in arrays:
            self._prev = Params({k: np.asarray(arrays[f"prev.{k}"], np.float64)
                                 for k in self.params.names()})
        offsets = np.cumsum([0, *self.sizes])
        for part in self.parts:
            rows = offsets[part.origin] + (np.arange(part.data.n) if part.positions is None
                                           else part.positions)
            for name in self.STATE:
                target = self._state_arrays(part, name)
                if target.size:
                    block = np.asarray(per_sample[name])[rows, :self._sample_major(
                        name, target).shape[1]]
                    target[...] = self._state_major(name, block)
        self.iteration = int(state["iteration"])

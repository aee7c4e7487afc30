"""Mini-batch (online) hybrid ADMM: several weight solves per pass over the data, and
per-sample state that does not scale with the training set (docs/design.md,
section 5).

One iteration is one pass over the training set in global mini-batches, drawn from
the permutation of the global sample indices keyed by (seed, pass), as the
data-parallel gradient baselines draw theirs. For each mini-batch B:

1. the auxiliaries a, s, o of B's samples are a forward pass of the current
   weights, and their multipliers the least-squares (KKT) estimate, a backward
   recursion (``lambda1 = -dl/da``, ``lambda3 = -dl/do``), exactly as in the
   full-batch hybrid default; they live only while B is visited;
2. the Gram statistics of the weight blocks over B are formed: for the input block
   ``[U b W]`` with ``z_t = [x_t; 1; s_{t-1}]``, ``G = sum z z^T`` and
   ``D = sum lambda1 z^T``; for the output block ``[V c]`` with ``z = [s_t; 1]``
   (t in O), ``G = sum z z^T`` and ``D = sum lambda3 z^T``; one reduction sums them
   over the ranks (so a run on any rank count equals the serial one);
3. a running estimate of each block's Gram matrix is kept,
   ``C <- beta C + (1 - beta) G / rows`` (``C = I`` at the start), and each block
   solves its augmented-Lagrangian subproblem on B, in which the Gram matrix of the
   whole training set is replaced by ``C`` (a proximal term):

       Theta <- Theta + (1/rho) (D / R - nu Theta~) (C + damping I)^-1,

   ``R`` the output rows of B (``D / R`` is minus the gradient of the mean loss),
   ``Theta~`` the weights without biases, the change capped at ``trust_radius
   sqrt(|O|)`` in Frobenius norm (|O| labels per sequence); with
   ``admm.rho_schedule = geometric`` the step and its cap shrink from pass to pass by
   the factor ``rho(k) / rho``. With ``C`` the Gram matrix of the batch itself (and
   no damping or cap) this is the exact block minimiser of B's augmented Lagrangian; it is the
   full-batch hybrid's step (docs/design.md, section 4) taken once per mini-batch
   instead of once per pass: one side of a Kronecker-factored Gauss-Newton step.

With ``train.reduction = deterministic`` a mini-batch is a group of whole chunks of
``train.chunk`` samples (chosen by a permutation of the chunk indices): each chunk is
processed by the rank that holds it, and the chunks' statistics are added in global
chunk order, so the run is bitwise the same on any rank count.

Token inputs: ``x x^T`` is the diagonal of token counts, so ``C`` is held as that
diagonal, the ``[vocab, 1 + h]`` block ``sum x [1; s]^T`` and the ``(1 + h)``-square
rest, and solved through the Schur complement of the diagonal (no ``vocab``-square
matrix is formed).
"""

from __future__ import annotations

import numpy as np

from padmmirnn import kernels
from padmmirnn.config import Config
from padmmirnn.model import (
    LOSSES,
    Params,
    adjoint_into,
    forward_into,
    init_params,
    input_rows,
    outputs,
    stacked_state,
    states_of,
)
from padmmirnn.samples import LocalData
from padmmirnn.stats import Field, Layout, colsum, sum_steps
from padmmirnn.trainer import TrainerState


class RunningGram:
    """The running Gram estimate ``C`` of one weight block (a dense SPD matrix, or for
    token inputs the diagonal of counts, the cross block and the rest) and the solve
    ``X (C + damping I) = R``."""

    def __init__(self, width: int, vocab: int = 0):
        self.vocab = vocab
        rest = width - vocab
        self.diag = np.ones(vocab)  # x x^T of one-hot inputs: the token frequencies
        self.cross = np.zeros((vocab, rest))  # sum x [1; s]^T
        self.rest = np.eye(rest)  # the dense block

    def update(self, stats: dict[str, np.ndarray], rows: float, decay: float) -> None:
        """``C <- decay C + (1 - decay) G / rows`` with the batch's Gram blocks."""
        w = (1.0 - decay) / rows
        self.rest *= decay
        self.rest += w * stats["rest"]
        if self.vocab:
            self.diag *= decay
            self.diag += w * stats["diag"]
            self.cross *= decay
            self.cross += w * stats["cross"]

    def solve(self, R: np.ndarray, damping: float) -> np.ndarray:
        """X with X (C + damping I) = R (``R`` ``[m, width]``, columns in C's order)."""
        rest = self.rest + damping * np.eye(self.rest.shape[0])
        if not self.vocab:
            return _spd_solve_right(rest, R)
        d = self.diag + damping
        Rx, Rr = R[:, :self.vocab], R[:, self.vocab:]
        scaled = self.cross / d[:, None]  # D^-1 B
        Xr = _spd_solve_right(rest - self.cross.T @ scaled, Rr - Rx @ scaled)
        Xx = (Rx - Xr @ self.cross.T) / d
        return np.concatenate([Xx, Xr], axis=1)

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}.rest": self.rest}
        if self.vocab:
            out.update({f"{prefix}.diag": self.diag, f"{prefix}.cross": self.cross})
        return out

    def load(self, arrays: dict, prefix: str) -> None:
        self.rest = np.array(arrays[f"{prefix}.rest"], np.float64)
        if self.vocab:
            self.diag = np.array(arrays[f"{prefix}.diag"], np.float64)
            self.cross = np.array(arrays[f"{prefix}.cross"], np.float64)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _spd_solve_right(G: np.ndarray, R: np.ndarray) -> np.ndarray:
    """X with X G = R for a symmetric positive definite G (G X^T = R^T: one LU solve,
    cheaper here than a Cholesky factor and two general solves)."""
    return np.linalg.solve(G, R.T).T


def _side_by_side(a: np.ndarray) -> np.ndarray:
    """``[T, q, n]`` blocks side by side as one ``[q, T n]`` matrix (a view when the steps
    of a row are adjacent in memory, as in :func:`batch_statistics`), so that a sum over
    steps of products is one large product instead of T small ones."""
    steps, q, n = a.shape
    return a.transpose(1, 0, 2).reshape(q, steps * n)


def _gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a b^T`` in float64 (float32 operands: their product, in float64)."""
    return (a @ b.T).astype(np.float64, copy=False)


def batch_layout(dz: int, vocab: int, h: int, classes: int) -> Layout:
    """The packed statistics of one mini-batch (one reduction): the input block's Gram
    blocks and ``D``, the output block's, the loss sum and the two row counts."""
    width = dz + 1 + h
    fields = [Field("in.rest", (width, width), symmetric=True), Field("in.D", (h, width))]
    if vocab:
        fields += [Field("in.diag", (vocab,)), Field("in.cross", (vocab, 1 + h)),
                   Field("in.Dx", (h, vocab))]
    fields += [Field("out.rest", (h + 1, h + 1), symmetric=True),
               Field("out.D", (classes, h + 1)), Field("counts", (3,))]
    return Layout(fields)


def batch_statistics(p: Params, batch: LocalData, activation: str, loss: str,
                     dtype: np.dtype) -> dict[str, np.ndarray]:
    """Forward pass, KKT multipliers and the Gram statistics of one (local) batch, as
    the fields of :func:`batch_layout` (``counts`` = [loss sum, input rows, output
    rows]); ``p`` in ``dtype``."""
    info = batch.info
    steps, n = batch.inputs.shape[:2]
    h = p.W.shape[0]
    dz = input_rows(info)
    m2m = info.many_to_many
    # steps side by side in memory ([rows, T, n]): the sums over steps and samples
    # below are single products of [rows, T n] views
    Z = stacked_state(batch, h, dtype, rows_outer=True)
    work = np.empty((h, steps, n), dtype).transpose(1, 0, 2)  # pre-activations, lambda1
    forward_into(p, batch, activation, work, Z)
    S = states_of(Z, dz, h)
    lam3 = outputs(p, S, m2m)  # o, then lambda3 = -dl/do, rows [|O|, n, K]
    rows = lam3.shape[0] * lam3.shape[1]
    total = kernels.output_delta(lam3.reshape(rows, -1), batch.targets.reshape(-1),
                                 LOSSES[loss], -1.0)
    adjoint_into(p, S, lam3, m2m, activation, work)
    zs = Z[:steps, :dz + 1 + h]
    zc = _side_by_side(zs)
    out = {"in.rest": _gram(zc, zc), "in.D": _gram(_side_by_side(work), zc)}
    if not dz:
        vocab = info.dim
        out["in.diag"] = kernels.token_counts(batch.inputs.reshape(-1), vocab)
        out["in.cross"] = kernels.segment_sum_columns(batch.inputs, zs, vocab)
        out["in.Dx"] = kernels.segment_sum_columns(batch.inputs, work, vocab).T
    s_out = S[1:] if m2m else S[-1:]
    sc = _side_by_side(s_out)
    ss = _gram(sc, sc)
    s_sum = sum_steps(s_out)
    G_out = np.empty((h + 1, h + 1))
    G_out[:h, :h], G_out[:h, h], G_out[h, :h], G_out[h, h] = ss, s_sum, s_sum, rows
    lam_rows = lam3.reshape(rows, -1)
    D_out = np.empty((lam3.shape[-1], h + 1))
    D_out[:, :h] = _gram(lam_rows.T, sc)
    D_out[:, h] = colsum(lam_rows)
    out.update({"out.rest": G_out, "out.D": D_out,
                "counts": np.array([total, float(steps * n), float(rows)])})
    return out


class MinibatchAdmm:
    """Mini-batch hybrid ADMM on this rank's slice ``[data.start, data.stop)`` of
    ``n_global`` samples, a :class:`~padmmirnn.trainer.Trainer`; one reduction of the
    packed batch statistics per mini-batch over ``comm``."""

    unit = "iteration"

    def __init__(self, cfg: Config, data: LocalData, n_global: int, comm,
                 params: Params | None = None, parts: list[LocalData] | None = None):
        self.cfg, self.a = cfg, cfg.admm
        self.data, self.n_global, self.comm = data, n_global, comm
        self.ordered = cfg.train.reduction == "deterministic"
        self.parts = parts or [data]  # chunks in global order (deterministic reduction)
        info = data.info
        h = cfg.model.hidden
        self.params = params if params is not None else init_params(
            info.dim, h, info.classes, cfg.train.seed, cfg.model.w_init, cfg.model.init_scale)
        self.dtype = np.dtype(cfg.train.dtype)
        self.dz = input_rows(info)
        self.out_scale = float(np.sqrt(info.steps if info.many_to_many else 1))
        self.vocab = info.dim if info.kind == "tokens" else 0
        self.layout = batch_layout(self.dz, self.vocab, h, info.classes)
        self.gram_in = RunningGram(self.vocab + 1 + h if self.vocab else self.dz + 1 + h,
                                   self.vocab)
        self.gram_out = RunningGram(h + 1)
        self.iteration = 0  # passes done
        self.steps = 0  # weight updates done
        self.local = comm.size > 1 and self.a.sync_every > 1  # local steps, then an average
        if self.local:
            self.local_batch = max(1, self.a.batch_size // comm.size)
            # every rank takes the local steps of the largest slice (smaller ones wrap)
            self.local_steps = _ceil_div(_ceil_div(n_global, comm.size), self.local_batch)
            syncs = _ceil_div(self.local_steps, self.a.sync_every)
            self.bytes_per_step = 8 * self._flat().size * syncs
        else:
            batches = _ceil_div(n_global, self.a.batch_size)  # deterministic: fewer
            self.bytes_per_step = 8 * self.layout.size * batches
        self.last: dict = {}

    # ------------------------------------------------------------------ the weights

    def _theta_in(self) -> np.ndarray:
        """``[U b W]``: columns in the order of ``z_t = [x_t; 1; s_{t-1}]``."""
        p = self.params
        return np.concatenate([p.U, p.b[:, None], p.W], axis=1)

    def _update(self, st: dict[str, np.ndarray]) -> None:
        """Both weight blocks from one mini-batch's global statistics."""
        a, p = self.a, self.params
        h = p.W.shape[0]
        loss_sum, in_rows, out_rows = st["counts"]
        d = p.U.shape[1]
        self.gram_in.update({"rest": st["in.rest"], "diag": st.get("in.diag"),
                             "cross": st.get("in.cross")}, in_rows, a.cov_decay)
        D_in = st["in.D"]
        if self.vocab:  # columns of the running Gram: [x (vocab); 1; s]
            D_in = np.concatenate([st["in.Dx"], D_in], axis=1)
        theta = self._theta_in()
        grad = D_in / out_rows
        grad[:, :d] -= a.nu * p.U
        grad[:, d + 1:] -= a.nu * p.W
        step = self._capped(self.gram_in.solve(grad, a.damping) / a.rho1) / self._scale
        theta += step
        p.U, p.b, p.W = theta[:, :d].copy(), theta[:, d].copy(), theta[:, d + 1:].copy()
        self.gram_out.update({"rest": st["out.rest"]}, out_rows, a.cov_decay)
        grad = st["out.D"] / out_rows
        grad[:, :h] -= a.nu * p.V
        step = self._capped(self.gram_out.solve(grad, a.damping) / a.rho3) / self._scale
        p.V = p.V + step[:, :h]
        p.c = p.c + step[:, h]
        self.steps += 1
        self._losses.append(loss_sum / out_rows)

    def _capped(self, step: np.ndarray) -> np.ndarray:
        """The step scaled down to the trust radius, ``trust_radius sqrt(|O|)``: a sample
        with a label per step carries |O| targets, and its batch's step direction is
        correspondingly less noisy (measured: 0.25 fits one label per sequence, about
        2.5 a character model with 100 labels per sequence)."""
        norm = float(np.linalg.norm(step))
        radius = self.a.trust_radius * self.out_scale
        return step * (radius / norm) if radius and norm > radius else step

    # ------------------------------------------------------------------ the trainer

    def _statistics(self, batch: LocalData) -> dict[str, np.ndarray]:
        """This rank's statistics of its samples of a batch (zeros if none)."""
        if not batch.n:
            return self.layout.unpack(np.zeros(self.layout.size))
        m = self.cfg.model
        return batch_statistics(self.params.astype(self.dtype), batch, m.activation, m.loss,
                                self.dtype)

    def _batches(self, rng: np.random.Generator):
        """Every global mini-batch's statistics, one reduction each (none when serial):
        of the samples of a permutation of the global order, or (deterministic) of
        groups of whole chunks, added in global chunk order."""
        if not self.ordered:
            order = rng.permutation(self.n_global)
            d = self.data
            for lo in range(0, self.n_global, self.a.batch_size):
                idx = order[lo:lo + self.a.batch_size]
                stats = self._statistics(d.take(idx[(idx >= d.start) & (idx < d.stop)]
                                                - d.start))
                if self.comm.size == 1:
                    yield stats
                else:
                    yield self.layout.unpack(self.comm.allreduce_sum(self.layout.pack(stats)))
            return
        chunk = self.cfg.train.chunk
        order = rng.permutation(-(-self.n_global // chunk))
        per_batch = self.a.batch_size // chunk
        held = {p.start // chunk: p for p in self.parts}
        for lo in range(0, len(order), per_batch):
            ids = np.sort(order[lo:lo + per_batch])
            mine = [self.layout.pack(self._statistics(held[c])) for c in ids if c in held]
            rows = self.comm.allgather_rows(
                np.stack(mine) if mine else np.empty((0, self.layout.size)))
            total = rows[0].copy()
            for row in rows[1:]:
                total += row
            yield self.layout.unpack(total)

    def _local_pass(self) -> None:
        """Local steps (``admm.sync_every`` > 1 on several ranks): each rank steps on
        mini-batches of ``batch_size / ranks`` of its own samples, in an order keyed by
        (seed, pass, its first sample), and every ``sync_every`` steps and at the end of
        the pass one reduction averages the weights and the running Gram estimates."""
        d = self.data
        rng = np.random.default_rng([self.cfg.train.seed, self.iteration, d.start])
        order = rng.permutation(d.n)
        B = self.local_batch
        for k in range(self.local_steps):
            idx = np.take(order, np.arange(k * B, (k + 1) * B) % d.n)
            self._update(self._statistics(d.take(idx)))
            if (k + 1) % self.a.sync_every == 0 or k + 1 == self.local_steps:
                self._average()

    def _flat(self) -> np.ndarray:
        """The weights and the running Gram estimates in one vector."""
        parts = [self.params.flat()]
        for gram in (self.gram_in, self.gram_out):
            parts += [a.ravel() for a in gram.state("").values()]
        return np.concatenate(parts)

    def _average(self) -> None:
        """Replace the weights and running Grams by their mean over the ranks."""
        flat = self.comm.allreduce_sum(self._flat()) / self.comm.size
        n = self.params.flat().size
        self.params = Params.from_flat(flat[:n], self.params)
        lo = n
        for gram in (self.gram_in, self.gram_out):
            state = gram.state("")
            for a in state.values():
                a[...] = flat[lo:lo + a.size].reshape(a.shape)
                lo += a.size

    def step(self, evaluate: bool = False) -> None:
        """One pass over the training set: global mini-batches (one reduction each), or
        local steps with periodic averages."""
        self._losses: list[float] = []
        a = self.a
        # the penalty schedule: rho_j(k) = rho_j min(growth^(k-1), max_scale) in pass k
        self._scale = (min(a.rho_growth ** self.iteration, a.rho_max_scale)
                       if a.rho_schedule == "geometric" else 1.0)
        if self.local:
            self._local_pass()
        else:
            rng = np.random.default_rng([self.cfg.train.seed, self.iteration])
            for stats in self._batches(rng):
                self._update(stats)
        self.iteration += 1
        self.last = {"batch_loss": float(np.mean(self._losses))}

    def evaluation_terms(self) -> tuple[None, None]:
        return None, None

    def describe(self, reduced: np.ndarray | None) -> dict:
        return dict(self.last)

    def state_dict(self) -> TrainerState:
        arrays = {"steps": np.int64(self.steps), **self.gram_in.state("gram_in"),
                  **self.gram_out.state("gram_out")}
        return {"iteration": self.iteration, "arrays": arrays, "per_sample": {}}

    def load_state_dict(self, state: TrainerState) -> None:
        arrays = state["arrays"]
        self.gram_in.load(arrays, "gram_in")
        self.gram_out.load(arrays, "gram_out")
        self.steps = int(arrays["steps"])
        self.iteration = int(state["iteration"])

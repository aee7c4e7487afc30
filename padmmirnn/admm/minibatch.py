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
from padmmirnn.admm.packed import Field, Layout
from padmmirnn.config import Config
from padmmirnn.nn import LOSSES, Network, Params, outputs
from padmmirnn.nn.cells.base import side_by_side
from padmmirnn.samples import LocalData
from padmmirnn.trainer import TrainerState


class RunningGram:
    """The running Gram estimate ``C`` of one weight block (a dense SPD matrix, or for
    token inputs the diagonal of counts, the cross block and the rest) and the solve
    ``X (C + damping I) = R``, also against a principal sub-block of ``C``."""

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

    def solve(self, R: np.ndarray, damping: float, lo: int = 0, hi: int | None = None,
              vocab: bool = True) -> np.ndarray:
        """X with X (C' + damping I) = R, ``C'`` the principal sub-block of ``C`` on the
        dense columns ``[lo, hi)`` (and the token columns unless ``vocab`` is False);
        ``R`` ``[m, width']`` with its columns in that order."""
        rest = self.rest[lo:hi, lo:hi] + damping * np.eye(self.rest[lo:hi, lo:hi].shape[0])
        if not (self.vocab and vocab):
            return _spd_solve_right(rest, R)
        d = self.diag + damping
        cross = self.cross[:, lo:hi]
        Rx, Rr = R[:, :self.vocab], R[:, self.vocab:]
        scaled = cross / d[:, None]  # D^-1 B
        Xr = _spd_solve_right(rest - cross.T @ scaled, Rr - Rx @ scaled)
        Xx = (Rx - Xr @ cross.T) / d
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


def _gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a b^T`` in float64 (float32 operands: their product, in float64)."""
    return (a @ b.T).astype(np.float64, copy=False)


def batch_layout(net: Network, dz: int, vocab: int, h: int, classes: int) -> Layout:
    """The packed statistics of one mini-batch (one reduction): per layer ``l`` the Gram
    blocks of its regressors ``z_t = [x_t; 1; s_{t-1}]`` and ``D = sum delta z^T`` (the
    first layer's token blocks; a GRU's candidate bias sum), the output block's, the
    loss sum and the two row counts."""
    G = net.cell.gates
    fields = []
    for l in range(net.layers):
        dx = dz if l == 0 else h
        width = dx + 1 + h
        fields += [Field(f"l{l}.rest", (width, width), symmetric=True),
                   Field(f"l{l}.D", (G * h, width))]
        if l == 0 and vocab:
            fields += [Field("l0.diag", (vocab,)), Field("l0.cross", (vocab, 1 + h)),
                       Field("l0.Dx", (G * h, vocab))]
        if net.cell.extra_bias:
            fields.append(Field(f"l{l}.bh", (h,)))
    fields += [Field("out.rest", (h + 1, h + 1), symmetric=True),
               Field("out.D", (classes, h + 1)), Field("counts", (3,))]
    return Layout(fields)


def batch_statistics(net: Network, p: Params, batch: LocalData, loss: str,
                     dtype: np.dtype) -> dict[str, np.ndarray]:
    """Forward pass, KKT multipliers and the Gram statistics of one (local) batch, as
    the fields of :func:`batch_layout` (``counts`` = [loss sum, input rows, output
    rows]); ``p`` in ``dtype``."""
    info = batch.info
    steps, n = batch.inputs.shape[:2]
    h = p.hidden
    m2m = info.many_to_many
    # steps side by side in memory ([rows, T, n]): the sums over steps and samples
    # below are single products of [rows, T n] views
    fwd = net.forward(p, batch, side_by_side_layout=True, dtype=dtype)
    S = fwd.states
    lam3 = outputs(p, S, m2m)  # o, then lambda3 = -dl/do, rows [|O|, n, K]
    rows = lam3.shape[0] * lam3.shape[1]
    total = kernels.output_delta(lam3.reshape(rows, -1), batch.targets.reshape(-1),
                                 LOSSES[loss], -1.0)
    net.adjoint(p, fwd, lam3, m2m)  # seeds -dl/do: the multipliers lambda1 = -dl/dP
    out = {}
    for l in range(net.layers):
        zs = fwd.regressors(l)
        zc = side_by_side(zs)
        out[f"l{l}.rest"] = _gram(zc, zc)
        sums = net.layer_sums(fwd, l, info.dim)
        out[f"l{l}.D"] = sums["D"]
        if "bh" in sums:
            out[f"l{l}.bh"] = sums["bh"]
        if l == 0 and fwd.tokens is not None:
            out["l0.diag"] = kernels.token_counts(batch.inputs.reshape(-1), info.dim)
            out["l0.cross"] = kernels.segment_sum_columns(batch.inputs, zs, info.dim)
            out["l0.Dx"] = sums["Dx"]
    s_out = S[1:] if m2m else S[-1:]
    sc = side_by_side(s_out)
    ss = _gram(sc, sc)
    s_sum = sc.sum(axis=1, dtype=np.float64)
    G_out = np.empty((h + 1, h + 1))
    G_out[:h, :h], G_out[:h, h], G_out[h, :h], G_out[h, h] = ss, s_sum, s_sum, rows
    lam_rows = lam3.reshape(rows, -1)
    D_out = np.empty((lam3.shape[-1], h + 1))
    D_out[:, :h] = _gram(side_by_side(lam3.transpose(0, 2, 1)), sc)
    D_out[:, h] = lam_rows.sum(axis=0, dtype=np.float64)
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
        m = cfg.model
        self.net = Network.build(m.cell, m.activation, m.layers)
        self.params = params if params is not None else self.net.init_params(
            info.dim, h, info.classes, cfg.train.seed, m.w_init, m.init_scale)
        self.dtype = np.dtype(cfg.train.dtype)
        self.dz = 0 if info.kind == "tokens" else info.dim
        self.out_scale = float(np.sqrt(info.steps if info.many_to_many else 1))
        self.vocab = info.dim if info.kind == "tokens" else 0
        self.layout = batch_layout(self.net, self.dz, self.vocab, h, info.classes)
        # one running Gram per layer (its z_t = [x_t; 1; s_{t-1}]) and the output block's
        self.grams = [RunningGram((self.vocab or self.dz) + 1 + h, self.vocab) if l == 0
                      else RunningGram(2 * h + 1) for l in range(m.layers)]
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

    def _layer_step(self, l: int, st: dict[str, np.ndarray], out_rows: float) -> None:
        """Layer ``l``'s block ``[U b W]`` (columns in the order of ``z_t = [x_t; 1;
        s_{t-1}]``) from the batch's global statistics; a GRU's candidate rows solve their
        input part ``[U_n b_n]`` against the ``[x; 1]`` sub-block of the running Gram and
        their recurrent part ``[b_h W_n]`` against the ``[1; s]`` one."""
        a, p = self.a, self.params
        w = p.layer(l)
        gram = self.grams[l]
        gram.update({"rest": st[f"l{l}.rest"], "diag": st.get("l0.diag"),
                     "cross": st.get("l0.cross")}, st["counts"][1], a.cov_decay)
        D = st[f"l{l}.D"]
        tokens = l == 0 and self.vocab
        if tokens:  # columns of the running Gram: [x (vocab); 1; s]
            D = np.concatenate([st["l0.Dx"], D], axis=1)
        X = w.U.shape[1]  # columns of x
        grad = D / out_rows
        grad[:, :X] -= a.nu * w.U
        grad[:, X + 1:] -= a.nu * w.W
        step = np.empty_like(grad)
        split = self.net.cell.split(p.hidden)
        keep = np.ones(grad.shape[0], bool)
        if split is not None:
            keep[split] = False
        step[keep] = gram.solve(grad[keep], a.damping)
        parts = [step]
        if split is not None:
            dx = 0 if tokens else X  # where the constant column sits in the dense block
            step[split, :X + 1] = gram.solve(grad[split, :X + 1], a.damping, 0, dx + 1)
            R_h = np.concatenate([st[f"l{l}.bh"][:, None] / out_rows, grad[split, X + 1:]],
                                 axis=1)
            hidden = gram.solve(R_h, a.damping, dx, None, vocab=False)
            step[split, X + 1:] = hidden[:, 1:]
            parts.append(hidden[:, :1])
        scale = self._capped(parts, a.rho1)
        w.U = w.U + scale * step[:, :X]
        w.b = w.b + scale * step[:, X]
        w.W = w.W + scale * step[:, X + 1:]
        if split is not None:
            w.bh = w.bh + scale * parts[1][:, 0]
        p.set_layer(l, w)

    def _update(self, st: dict[str, np.ndarray]) -> None:
        """Every weight block from one mini-batch's global statistics."""
        a, p = self.a, self.params
        h = p.hidden
        loss_sum, _, out_rows = st["counts"]
        for l in range(self.net.layers):
            self._layer_step(l, st, out_rows)
        self.gram_out.update({"rest": st["out.rest"]}, out_rows, a.cov_decay)
        grad = st["out.D"] / out_rows
        grad[:, :h] -= a.nu * p.V
        step = self.gram_out.solve(grad, a.damping)
        scale = self._capped([step], a.rho3)
        p.V = p.V + scale * step[:, :h]
        p.c = p.c + scale * step[:, h]
        self.steps += 1
        self._losses.append(loss_sum / out_rows)

    def _capped(self, steps: list[np.ndarray], rho: float) -> float:
        """The factor of a block's solved direction: ``1 / (rho scale)`` (``scale`` the
        penalty schedule's), lowered so that the change stays within the trust radius,
        ``trust_radius sqrt(|O|) / scale``: a sample with a label per step carries |O|
        targets, and its batch's step direction is correspondingly less noisy
        (measured: 0.25 fits one label per sequence, about 2.5 a character model with
        100 labels per sequence)."""
        factor = 1.0 / rho
        norm = factor * float(np.sqrt(sum(np.vdot(s, s) for s in steps)))
        radius = self.a.trust_radius * self.out_scale
        if radius and norm > radius:
            factor *= radius / norm
        return factor / self._scale

    # ------------------------------------------------------------------ the trainer

    def _statistics(self, batch: LocalData) -> dict[str, np.ndarray]:
        """This rank's statistics of its samples of a batch (zeros if none)."""
        if not batch.n:
            return self.layout.unpack(np.zeros(self.layout.size))
        m = self.cfg.model
        return batch_statistics(self.net, self.params.astype(self.dtype), batch, m.loss,
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
        for gram in (*self.grams, self.gram_out):
            parts += [a.ravel() for a in gram.state("").values()]
        return np.concatenate(parts)

    def _average(self) -> None:
        """Replace the weights and running Grams by their mean over the ranks."""
        flat = self.comm.allreduce_sum(self._flat()) / self.comm.size
        n = self.params.flat().size
        self.params = Params.from_flat(flat[:n], self.params)
        lo = n
        for gram in (*self.grams, self.gram_out):
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
        arrays = {"steps": np.int64(self.steps), **self.gram_out.state("gram_out")}
        for l, gram in enumerate(self.grams):
            arrays.update(gram.state(_gram_name(l)))
        return {"iteration": self.iteration, "arrays": arrays, "per_sample": {}}

    def load_state_dict(self, state: TrainerState) -> None:
        arrays = state["arrays"]
        for l, gram in enumerate(self.grams):
            gram.load(arrays, _gram_name(l))
        self.gram_out.load(arrays, "gram_out")
        self.steps = int(arrays["steps"])
        self.iteration = int(state["iteration"])


def _gram_name(layer: int) -> str:
    """Checkpoint prefix of a layer's running Gram (``gram_in`` for the first layer)."""
    return "gram_in" if layer == 0 else f"gram_in_{layer}"

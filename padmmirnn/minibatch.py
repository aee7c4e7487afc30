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
   ``Theta~`` the weights without biases, the change capped at ``trust_radius`` in
   Frobenius norm. With ``C`` the Gram matrix of the batch itself this is the exact
   block minimiser of the full-batch default on B; it is the full-batch default's
   step (docs/design.md, section 4) taken once per mini-batch instead of once per
   pass: one side of a Kronecker-factored Gauss-Newton step.

Token inputs: ``x x^T`` is the diagonal of token counts, so ``C`` is held as that
diagonal, the ``[vocab, 1 + h]`` block ``sum x [1; s]^T`` and the ``(1 + h)``-square
rest, and solved through the Schur complement of the diagonal (no ``vocab``-square
matrix is formed).
"""

from __future__ import annotations

import numpy as np

from padmmirnn import kernels
from padmmirnn.comm import sum_parts
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
from padmmirnn.stats import Field, Layout, colsum, gram_steps, sum_steps
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


def _spd_solve_right(G: np.ndarray, R: np.ndarray) -> np.ndarray:
    """X with X G = R for a symmetric positive definite G."""
    L = np.linalg.cholesky(G)
    return np.linalg.solve(L.T, np.linalg.solve(L, R.T)).T


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
    Z = stacked_state(batch, h, dtype)
    work = np.empty((steps, h, n), dtype)  # pre-activations, then lambda1
    forward_into(p, batch, activation, work, Z)
    S = states_of(Z, dz, h)
    lam3 = outputs(p, S, m2m)  # o, then lambda3 = -dl/do, rows [|O|, n, K]
    rows = lam3.shape[0] * lam3.shape[1]
    total = kernels.output_delta(lam3.reshape(rows, -1), batch.targets.reshape(-1),
                                 LOSSES[loss], -1.0)
    adjoint_into(p, S, lam3, m2m, activation, work)
    zs = Z[:steps, :dz + 1 + h]
    out = {"in.rest": gram_steps(zs, zs), "in.D": gram_steps(work, zs)}
    if not dz:
        vocab = info.dim
        out["in.diag"] = kernels.token_counts(batch.inputs.reshape(-1), vocab)
        out["in.cross"] = kernels.segment_sum_columns(batch.inputs, zs, vocab)
        out["in.Dx"] = kernels.segment_sum_columns(batch.inputs, work, vocab).T
    s_out = S[1:] if m2m else S[-1:]
    ss = gram_steps(s_out, s_out)
    s_sum = sum_steps(s_out)
    G_out = np.empty((h + 1, h + 1))
    G_out[:h, :h], G_out[:h, h], G_out[h, :h], G_out[h, h] = ss, s_sum, s_sum, rows
    lam_rows = lam3.reshape(rows, -1)
    D_out = np.empty((lam3.shape[-1], h + 1))
    D_out[:, :h] = gram_steps(lam3.transpose(0, 2, 1), s_out)
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
                 params: Params | None = None):
        self.cfg, self.a = cfg, cfg.admm
        self.data, self.n_global, self.comm = data, n_global, comm
        info = data.info
        h = cfg.model.hidden
        self.params = params if params is not None else init_params(
            info.dim, h, info.classes, cfg.train.seed, cfg.model.w_init, cfg.model.init_scale)
        self.dtype = np.dtype(cfg.train.dtype)
        self.dz = input_rows(info)
        self.vocab = info.dim if info.kind == "tokens" else 0
        self.layout = batch_layout(self.dz, self.vocab, h, info.classes)
        self.gram_in = RunningGram(self.vocab + 1 + h if self.vocab else self.dz + 1 + h,
                                   self.vocab)
        self.gram_out = RunningGram(h + 1)
        self.iteration = 0  # passes done
        self.steps = 0  # weight updates done
        self.batches = -(-n_global // self.a.batch_size)
        self.bytes_per_step = 8 * self.layout.size * self.batches
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
        step = self._capped(self.gram_in.solve(grad, a.damping) / a.rho1)
        theta += step
        p.U, p.b, p.W = theta[:, :d].copy(), theta[:, d].copy(), theta[:, d + 1:].copy()
        self.gram_out.update({"rest": st["out.rest"]}, out_rows, a.cov_decay)
        grad = st["out.D"] / out_rows
        grad[:, :h] -= a.nu * p.V
        step = self._capped(self.gram_out.solve(grad, a.damping) / a.rho3)
        p.V = p.V + step[:, :h]
        p.c = p.c + step[:, h]
        self.steps += 1
        self._losses.append(loss_sum / out_rows)

    def _capped(self, step: np.ndarray) -> np.ndarray:
        norm = float(np.linalg.norm(step))
        radius = self.a.trust_radius
        return step * (radius / norm) if radius and norm > radius else step

    # ------------------------------------------------------------------ the trainer

    def step(self, evaluate: bool = False) -> None:
        """One pass over the training set in global mini-batches."""
        order = np.random.default_rng([self.cfg.train.seed, self.iteration]).permutation(
            self.n_global)
        d, B = self.data, self.a.batch_size
        m = self.cfg.model
        self._losses: list[float] = []
        for lo in range(0, self.n_global, B):
            idx = order[lo:lo + B]
            mine = d.take(idx[(idx >= d.start) & (idx < d.stop)] - d.start)
            if mine.n:
                stats = batch_statistics(self.params.astype(self.dtype), mine, m.activation,
                                         m.loss, self.dtype)
                buf = self.layout.pack(stats)
            else:
                buf = np.zeros(self.layout.size)
            self._update(self.layout.unpack(sum_parts(self.comm, [buf], False)))
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

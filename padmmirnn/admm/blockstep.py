"""The mini-batch hybrid ADMM step (docs/design.md, section 5), for any cell and layer
count: from a batch's statistics to new weights.

For each mini-batch B:

1. the auxiliaries of B's samples are a forward pass of the current weights and their
   multipliers the least-squares (KKT) estimate, a backward recursion (``lambda =
   -dl/dP``, ``lambda3 = -dl/do``) through the cells (:class:`~padmmirnn.nn.Network`);
2. the Gram statistics of the weight blocks over B are formed: for layer l's block
   ``[U b W]`` (all gates) with ``z_t = [x_t; 1; s_{t-1}]``, ``G = sum z z^T`` and
   ``D = sum lambda z^T``; for the output block ``[V c]`` with ``z = [s_t; 1]`` (t in
   O), ``G`` and ``D = sum lambda3 z^T``; summed over the ranks by one reduction;
3. each block keeps a running estimate of its Gram matrix, ``C <- beta C + (1 - beta)
   G / rows`` (``C = I`` at the start), and takes the step of its augmented-Lagrangian
   subproblem on B with ``C`` in place of the training set's Gram matrix:

       Theta <- Theta + (1/rho) (D / R - nu Theta~ - rho_c (Theta - A)) (C + damping I)^-1,

   ``R`` the output rows of B (``D / R`` is minus the gradient of the mean loss),
   ``Theta~`` the weights without biases, ``A`` an anchor with weight ``rho_c`` (the
   consensus modes' proximal term; none otherwise), the change capped at
   ``trust_radius sqrt(|O|)`` in Frobenius norm per block, and the whole step scaled
   by the penalty schedule. With ``C`` the batch's own Gram matrix (no damping, cap or
   anchor) this is the exact block minimiser of B's augmented Lagrangian: one side of a
   Kronecker-factored Gauss-Newton step.

A GRU's candidate rows solve their input part ``[U_n b_n]`` against the ``[x; 1]``
sub-block of the running Gram and their recurrent part ``[b_h W_n]`` against the ``[1;
s]`` sub-block (:mod:`padmmirnn.nn.cells.gru`).

Token inputs: ``x x^T`` is the diagonal of token counts, so ``C`` is held as that
diagonal, the ``[vocab, 1 + h]`` block ``sum x [1; s]^T`` and the ``(1 + h)``-square
rest, and solved through the Schur complement of the diagonal (no ``vocab``-square
matrix is formed). With ``admm.token_step = active`` (the default) the first layer's
block is solved over the columns of the tokens that occur in the batch, ``A``, and the
dense ones: the principal sub-block of ``C`` on ``[x_A; 1; s]``, a block-coordinate step
that leaves the other token columns as they are (their gradient on the batch is zero;
with weight decay they are decayed when they next occur, as sparse optimisers do). Its
cost is O(G h |A| (1 + h)) instead of O(G h vocab (1 + h)): with a word vocabulary of
19k and 1.2k distinct words per batch it is what a pass costs, not the solve. When every
token occurs in a batch (a character model), both steps are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from padmmirnn import kernels
from padmmirnn.admm.packed import Field, Layout
from padmmirnn.averaging import IterateAverage
from padmmirnn.config import AdmmConfig
from padmmirnn.nn import Network, Params, layer_name
from padmmirnn.nn.cells.base import side_by_side
from padmmirnn.nn.network import by_length, loss_delta, readout, real_rows
from padmmirnn.samples import DatasetInfo, LocalData


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
        if self.vocab:  # only the batch's tokens have nonzero rows: added there only
            seen = np.flatnonzero(stats["diag"])
            self.diag *= decay
            self.diag[seen] += w * stats["diag"][seen]
            self.cross *= decay
            self.cross[seen] += w * stats["cross"][seen]

    def solve(self, R: np.ndarray, damping: float, lo: int = 0, hi: int | None = None,
              vocab: bool = True, tokens: np.ndarray | None = None) -> np.ndarray:
        """X with X (C' + damping I) = R, ``C'`` the principal sub-block of ``C`` on the
        dense columns ``[lo, hi)`` and the token columns ``tokens`` (None: all of them;
        none if ``vocab`` is False); ``R`` ``[m, width']`` with its columns in that order.
        The cost grows with the token columns solved for: O(m |tokens| width) beside the
        dense block's solve."""
        rest = self.rest[lo:hi, lo:hi] + damping * np.eye(self.rest[lo:hi, lo:hi].shape[0])
        if not (self.vocab and vocab):
            return _spd_solve_right(rest, R)
        if tokens is None:
            d, cross = self.diag + damping, self.cross[:, lo:hi]
        else:
            d, cross = self.diag[tokens] + damping, self.cross[tokens, lo:hi]
        Rx, Rr = R[:, :len(d)], R[:, len(d):]
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

    def copy(self) -> RunningGram:
        out = RunningGram(self.vocab + self.rest.shape[0], self.vocab)
        out.diag, out.cross, out.rest = self.diag.copy(), self.cross.copy(), self.rest.copy()
        return out


def _spd_solve_right(G: np.ndarray, R: np.ndarray) -> np.ndarray:
    """X with X G = R for a symmetric positive definite G (G X^T = R^T: one LU solve,
    cheaper here than a Cholesky factor and two general solves)."""
    return np.linalg.solve(G, R.T).T


def _gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a b^T`` in float64 (float32 operands: their product, in float64)."""
    return (a @ b.T).astype(np.float64, copy=False)


def batch_layout(net: Network, dz: int, vocab: int, h: int, classes: int,
                 output_factor: bool = False) -> Layout:
    """The packed statistics of one mini-batch (one reduction): per layer ``l`` the Gram
    blocks of its regressors ``z_t = [x_t; 1; s_{t-1}]`` and ``D = sum delta z^T`` (the
    first layer's token blocks; a GRU's candidate bias sum), the output block's, the
    loss sum and the two row counts; with ``output_factor`` also every block's adjoint
    Gram ``S = sum lambda lambda^T`` (the output-side Kronecker factor)."""
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
        if output_factor:
            fields.append(Field(f"l{l}.S", (G * h, G * h), symmetric=True))
    fields += [Field("out.rest", (h + 1, h + 1), symmetric=True),
               Field("out.D", (classes, h + 1)), Field("counts", (3,))]
    if output_factor:
        fields.append(Field("out.S", (classes, classes), symmetric=True))
    return Layout(fields)


def batch_statistics(net: Network, p: Params, batch: LocalData, loss: str,
                     dtype: np.dtype, output_factor: bool = False) -> dict[str, np.ndarray]:
    """Forward pass, KKT multipliers and the Gram statistics of one (local) batch, as
    the fields of :func:`batch_layout` (``counts`` = [loss sum, input rows, output
    rows]); ``p`` in ``dtype``. With lengths every sum runs over the real steps: the
    input rows are ``sum_i L_i``, the output rows those of :func:`real_rows`."""
    info = batch.info
    batch = by_length(batch)
    steps, n = batch.inputs.shape[:2]
    h = p.hidden
    m2m = info.many_to_many
    # steps side by side in memory ([rows, T, n]): the sums over steps and samples
    # below are single products of [rows, T n] views
    fwd = net.forward(p, batch, side_by_side_layout=True, dtype=dtype)
    lam3 = fwd.outputs(p, m2m)  # o, then lambda3 = -dl/do, rows [|O|, n, K]
    mask = real_rows(batch.lengths, m2m, steps)
    rows = lam3.shape[0] * lam3.shape[1] if mask is None else int(mask.sum())
    total = loss_delta(lam3, batch.targets, loss, -1.0, mask)
    net.adjoint(p, fwd, lam3, m2m)  # seeds -dl/do: the multipliers lambda1 = -dl/dP
    out = {}
    for l in range(net.layers):
        sums = net.layer_sums(fwd, l, info.dim)  # before zc: one packed copy at a time
        zc = fwd.packed(fwd.regressors(l))
        out[f"l{l}.rest"] = _gram(zc, zc)
        out[f"l{l}.D"] = sums["D"]
        if "bh" in sums:
            out[f"l{l}.bh"] = sums["bh"]
        if output_factor:
            d_in = fwd.packed(fwd.traces[l].delta_in)
            out[f"l{l}.S"] = _gram(d_in, d_in)
        if l == 0 and fwd.tokens is not None:
            tokens = fwd.packed(fwd.tokens)
            out["l0.diag"] = kernels.token_counts(tokens, info.dim)
            out["l0.cross"] = kernels.segment_sum_columns(tokens[None], zc[None], info.dim).T
            out["l0.Dx"] = sums["Dx"]
    # many-to-many: the states and lambda3 of the padded rows are zero
    sc = side_by_side(readout(fwd.states, m2m, batch.lengths))
    ss = _gram(sc, sc)
    s_sum = sc.sum(axis=1, dtype=np.float64)
    G_out = np.empty((h + 1, h + 1))
    G_out[:h, :h], G_out[:h, h], G_out[h, :h], G_out[h, h] = ss, s_sum, s_sum, rows
    lam_rows = lam3.reshape(-1, lam3.shape[-1])
    D_out = np.empty((lam3.shape[-1], h + 1))
    D_out[:, :h] = _gram(side_by_side(lam3.transpose(0, 2, 1)), sc)
    D_out[:, h] = lam_rows.sum(axis=0, dtype=np.float64)
    inputs = float(steps * n) if batch.lengths is None else float(batch.lengths.sum())
    out.update({"out.rest": G_out, "out.D": D_out,
                "counts": np.array([total, inputs, float(rows)])})
    if output_factor:
        out["out.S"] = _gram(lam_rows.T, lam_rows.T)
    return out


def _gram_name(layer: int) -> str:
    """Checkpoint prefix of a layer's running Gram (``gram_in`` for the first layer)."""
    return "gram_in" if layer == 0 else f"gram_in_{layer}"


@dataclass
class BlockState:
    """What one (virtual) rank steps: the weights, every block's running Gram and the
    optional extras of the step (``extra``: the running output-side factors ``S.l{l}``,
    ``S.out`` and the block momentum's velocity ``v.{weight}``)."""

    params: Params
    grams: list[RunningGram]
    gram_out: RunningGram
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def _grams(self) -> list[RunningGram]:
        return [*self.grams, self.gram_out]

    def _tail(self) -> list[np.ndarray]:
        """The arrays after the weights in :meth:`flat`, in order."""
        arrays = [a for gram in self._grams() for a in gram.state("").values()]
        return arrays + [self.extra[k] for k in sorted(self.extra)]

    def flat(self) -> np.ndarray:
        """The weights, the running Gram estimates and the extras in one float64
        vector (a consensus join averages it)."""
        return np.concatenate([self.params.flat()] + [a.ravel() for a in self._tail()])

    def load_flat(self, flat: np.ndarray) -> None:
        """The inverse of :meth:`flat` (in place)."""
        n = self.params.size
        self.params = Params.from_flat(flat[:n], self.params)
        self.load_grams(flat[n:])

    def load_grams(self, flat: np.ndarray) -> None:
        """The running Grams and extras from the tail of :meth:`flat`."""
        lo = 0
        for a in self._tail():
            a[...] = flat[lo:lo + a.size].reshape(a.shape)
            lo += a.size

    def state(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The running Grams and extras as checkpoint arrays (the weights are stored
        apart)."""
        out = self.gram_out.state(f"{prefix}gram_out")
        for l, gram in enumerate(self.grams):
            out.update(gram.state(prefix + _gram_name(l)))
        out.update({f"{prefix}{k}": v for k, v in self.extra.items()})
        return out

    def load(self, arrays: dict, prefix: str = "") -> None:
        for l, gram in enumerate(self.grams):
            gram.load(arrays, prefix + _gram_name(l))
        self.gram_out.load(arrays, f"{prefix}gram_out")
        for k, v in self.extra.items():
            v[...] = arrays[f"{prefix}{k}"]

    def copy(self) -> BlockState:
        return BlockState(self.params.copy(), [g.copy() for g in self.grams],
                          self.gram_out.copy(), {k: v.copy() for k, v in self.extra.items()})


class BlockStep:
    """The step of one mini-batch for ``net`` on data like ``info`` with ``h`` units,
    under the ADMM settings ``a`` (already resolved for the batch size: see
    :meth:`padmmirnn.config.AdmmConfig.for_batch`)."""

    def __init__(self, a: AdmmConfig, net: Network, info: DatasetInfo, h: int,
                 loss: str, dtype: np.dtype):
        self.a, self.net, self.loss, self.dtype = a, net, loss, np.dtype(dtype)
        self.dz = 0 if info.kind == "tokens" else info.dim
        self.vocab = info.dim if info.kind == "tokens" else 0
        self.h = h
        self.out_scale = float(np.sqrt(info.steps if info.many_to_many else 1))
        self.factored = a.output_factor > 0
        self.layout = batch_layout(net, self.dz, self.vocab, h, info.classes,
                                   self.factored)
        self.classes = info.classes
        # a step moves only the first layer's columns of the batch's tokens
        self.sparse = bool(self.vocab and a.token_step == "active" and not a.block_momentum)

    def moved_columns(self, st: dict[str, np.ndarray]) -> np.ndarray | None:
        """The columns of ``U`` a step on the statistics ``st`` moves when it moves no
        others (:attr:`sparse`), else None (all)."""
        return np.flatnonzero(st["l0.diag"]) if self.sparse else None

    def average(self, params: Params) -> IterateAverage | None:
        """The average of the iterates from ``params`` (``admm.average``; None: off),
        lazy on the columns of ``U`` when :attr:`sparse`."""
        if not self.a.average:
            return None
        return IterateAverage(self.a.average, params, "U" if self.sparse else None)

    def initial(self, params: Params) -> BlockState:
        """``params`` with every running Gram at the identity (the output-side factors,
        if used, start from the first batch's; the velocity at 0)."""
        h, G = self.h, self.net.cell.gates
        grams = [RunningGram((self.vocab or self.dz) + 1 + h, self.vocab) if l == 0
                 else RunningGram(2 * h + 1) for l in range(self.net.layers)]
        extra = {}
        if self.factored:
            extra.update({f"S.l{l}": np.zeros((G * h, G * h)) for l in range(self.net.layers)})
            extra["S.out"] = np.zeros((self.classes, self.classes))
        if self.a.block_momentum:
            extra.update({f"v.{k}": np.zeros_like(v) for k, v in params.arrays().items()})
        return BlockState(params, grams, RunningGram(h + 1), extra)

    def statistics(self, params: Params, batch: LocalData) -> dict[str, np.ndarray]:
        """The statistics of the samples of ``batch`` (zeros if it has none)."""
        if not batch.n:
            return self.layout.unpack(np.zeros(self.layout.size))
        return batch_statistics(self.net, params.astype(self.dtype), batch, self.loss,
                                self.dtype, self.factored)

    def apply(self, state: BlockState, st: dict[str, np.ndarray], scale: float,
              anchor: Params | None = None, rho_c: float = 0.0) -> float:
        """Every block of ``state`` from one mini-batch's (global) statistics ``st``, the
        step divided by the penalty schedule's ``scale``; ``anchor``: the proximal
        point of the consensus modes, with weight ``rho_c``. Returns the batch's mean
        loss."""
        a, p = self.a, state.params
        h = self.h
        loss_sum, _, out_rows = st["counts"]
        for l in range(self.net.layers):
            self._layer_step(state, l, st, out_rows, scale,
                             None if anchor is None else anchor.layer(l), rho_c)
        state.gram_out.update({"rest": st["out.rest"]}, out_rows, a.cov_decay)
        grad = st["out.D"] / out_rows
        grad[:, :h] -= a.nu * p.V
        if anchor is not None:
            grad[:, :h] -= rho_c * (p.V - anchor.V)
            grad[:, h] -= rho_c * (p.c - anchor.c)
        step = self._left(state, "S.out", st.get("out.S"), out_rows,
                          state.gram_out.solve(grad, a.damping))
        factor = self._factor([step], a.rho3, scale, a.output_trust)
        self._move(state, "V", factor * step[:, :h])
        self._move(state, "c", factor * step[:, h])
        return float(loss_sum / out_rows)

    def _left(self, state: BlockState, name: str, batch_S: np.ndarray | None,
              out_rows: float, step: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
        """The output-side Kronecker factor (``admm.output_factor`` > 0): ``(S + k
        mean(diag S) I)^-1 step``, ``S`` the running Gram of the block's adjoints per
        output row (``S.l{l}``, ``S.out``, updated by the batch's ``batch_S``; the first
        batch's to start), ``k`` the relative damping ``admm.output_factor``; ``rows``
        the factor's rows and columns to use. Identity when off."""
        if not self.factored:
            return step
        S = state.extra[name]
        if batch_S is not None:
            new = batch_S / out_rows
            if np.any(S):
                S *= self.a.cov_decay
                S += (1.0 - self.a.cov_decay) * new
            else:
                S[...] = new
        sub = S[rows, rows]
        lam = self.a.output_factor * max(float(np.trace(sub)) / sub.shape[0], 1e-12)
        return np.linalg.solve(sub + lam * np.eye(sub.shape[0]), step)

    def _move(self, state: BlockState, name: str, delta: np.ndarray,
              cols: np.ndarray | None = None) -> None:
        """Add ``delta`` to weight ``name`` (to its columns ``cols`` only, when given: the
        others' step is zero), through the heavy-ball velocity ``v <- mu v + delta`` when
        ``admm.block_momentum`` = mu > 0 (every column of ``v`` decays)."""
        if self.a.block_momentum:
            v = state.extra[f"v.{name}"]
            v *= self.a.block_momentum
            if cols is None:
                v += delta
            else:
                v[:, cols] += delta
            delta, cols = v, None
        old = getattr(state.params, name)
        if cols is None:
            new = old + delta
        else:  # a new array, as above: the old one may be shared (anchors, snapshots)
            new = old.copy()
            new[:, cols] += delta
        setattr(state.params, name, new)

    def _layer_step(self, state: BlockState, l: int, st: dict[str, np.ndarray],
                    out_rows: float, scale: float, anchor, rho_c: float) -> None:
        """Layer ``l``'s block ``[U b W]`` (columns in the order of ``z_t = [x_t; 1;
        s_{t-1}]``); a GRU's candidate rows solve their input part ``[U_n b_n]`` against
        the ``[x; 1]`` sub-block of the running Gram and their recurrent part ``[b_h W_n]``
        against the ``[1; s]`` one."""
        a, p = self.a, state.params
        w = p.layer(l)
        gram = state.grams[l]
        gram.update({"rest": st[f"l{l}.rest"], "diag": st.get("l0.diag"),
                     "cross": st.get("l0.cross")}, st["counts"][1], a.cov_decay)
        D = st[f"l{l}.D"]
        tokens = l == 0 and self.vocab
        act = None  # the token columns stepped (None: all)
        if tokens:  # columns of the running Gram: [x (vocab); 1; s]
            Dx = st["l0.Dx"]
            if a.token_step == "active":
                act = np.flatnonzero(st["l0.diag"])
                Dx = Dx[:, act]
            D = np.concatenate([Dx, D], axis=1)
        Ux = w.U if act is None else w.U[:, act]
        X = Ux.shape[1]  # columns of x
        grad = D / out_rows
        grad[:, :X] -= a.nu * Ux
        grad[:, X + 1:] -= a.nu * w.W
        split = self.net.cell.split(self.h)
        g_bh = None if split is None else st[f"l{l}.bh"] / out_rows
        if anchor is not None:  # the proximal term -rho_c (Theta - A)
            grad[:, :X] -= rho_c * (Ux - (anchor.U if act is None else anchor.U[:, act]))
            grad[:, X] -= rho_c * (w.b - anchor.b)
            grad[:, X + 1:] -= rho_c * (w.W - anchor.W)
            if g_bh is not None:
                g_bh = g_bh - rho_c * (w.bh - anchor.bh)
        step = np.empty_like(grad)
        keep = np.ones(grad.shape[0], bool)
        if split is not None:
            keep[split] = False
        step[keep] = gram.solve(grad[keep], a.damping, tokens=act)
        parts = [step]
        if split is not None:
            dx = 0 if tokens else X  # where the constant column sits in the dense block
            step[split, :X + 1] = gram.solve(grad[split, :X + 1], a.damping, 0, dx + 1,
                                             tokens=act)
            hidden = gram.solve(np.concatenate([g_bh[:, None], grad[split, X + 1:]], axis=1),
                                a.damping, dx, None, vocab=False)
            step[split, X + 1:] = hidden[:, 1:]
            parts.append(hidden[:, :1])
        S_batch = st.get(f"l{l}.S")
        step = self._left(state, f"S.l{l}", S_batch, out_rows, step)
        parts[0] = step
        if split is not None:  # the candidate's recurrent bias: its rows of the factor
            parts[1] = self._left(state, f"S.l{l}", None, out_rows, parts[1], split)
        factor = self._factor(parts, a.rho1, scale)
        names = {k: layer_name(k, l) for k in ("U", "b", "W", "bh")}
        self._move(state, names["U"], factor * step[:, :X], act)
        self._move(state, names["b"], factor * step[:, X])
        self._move(state, names["W"], factor * step[:, X + 1:])
        if split is not None:
            self._move(state, names["bh"], factor * parts[1][:, 0])

    def _factor(self, steps: list[np.ndarray], rho: float, scale: float,
                trust: float = 1.0) -> float:
        """The factor of a block's solved direction: ``1 / (rho scale)``, lowered so that
        the change stays within the trust radius, ``trust_radius sqrt(|O|) / scale``: a
        sample with a label per step carries |O| targets, and its batch's step direction
        is correspondingly less noisy (measured: 0.25 fits one label per sequence, about
        2.5 a character model with 100 labels per sequence); ``trust`` multiplies the
        radius (``admm.output_trust`` for the output block)."""
        factor = 1.0 / rho
        norm = factor * float(np.sqrt(sum(np.vdot(s, s) for s in steps)))
        radius = self.a.trust_radius * self.out_scale * trust
        if radius and norm > radius:
            factor *= radius / norm
        return factor / scale

"""One small pure function per ADMMiRNN block update (docs/design.md, section 3).

Notation (time-major, feature-major: a state block is ``[h, n]``, the columns are
samples; "hat" variables fold in the scaled multipliers):

    a_hat_t = a_t + lambda1_t / rho1,    o_hat_t = o_t + lambda3_t / rho3.

The augmented Lagrangian, with means over the N global samples, is

    L = 1/N sum_i [ sum_{t in O} l(o_t, y_t)
                    + sum_t (lambda1.r1 + rho1/2 |r1|^2) + sum_t (lambda2.r2 + rho2/2 |r2|^2)
                    + sum_{t in O} (lambda3.r3 + rho3/2 |r3|^2) ]
        + nu/2 (|U|^2 + |W|^2 + |V|^2),
    r1 = a_t - U x_t - W s_{t-1} - b,  r2 = s_t - f(a_t),  r3 = o_t - V s_t - c.

Every update below minimises L exactly over its block (weights, s) or never
increases it (a, o: safeguarded), the property the tests check with
multipliers 'none'. Weight solves take *global* statistics (already reduced);
everything else is local to a rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from padmmirnn import kernels
from padmmirnn.admm.packed import colsum, gram, gram_steps, sum_steps
from padmmirnn.nn import LOSSES, Params, head_seeds, input_rows, outputs, states_of
from padmmirnn.nn.cells.base import stacked_weights
from padmmirnn.nn.cells.elman import activate, elman_adjoint, elman_forward
from padmmirnn.samples import LocalData

EMPTY = np.zeros((0, 0))
ACTIVATIONS = {"tanh": kernels.ACT_TANH, "relu": kernels.ACT_RELU}


def forward_into(p: Params, data: LocalData, activation: str, pre: np.ndarray,
                 Z: np.ndarray) -> None:
    """The one-layer Elman forward pass in place (the full-batch ADMM state is Elman
    only): ``pre[t] = a_t`` and the states into ``Z`` (:func:`elman_forward`)."""
    tokens = data.inputs if data.info.kind == "tokens" else None
    elman_forward(p.layer(0), Z, input_rows(data.info), tokens, activation, pre)


def adjoint_into(p: Params, states: np.ndarray, delta: np.ndarray, many_to_many: bool,
                 activation: str, out: np.ndarray, carry: np.ndarray | None = None,
                 pre: np.ndarray | None = None) -> None:
    """The Elman adjoint recursion seeded at the outputs, ``V^T delta_t``
    (:func:`elman_adjoint`)."""
    elman_adjoint(p.W, states, head_seeds(p.V, delta), many_to_many, activation, out,
                  carry, pre)


def input_projection(p: Params, data: LocalData, Z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[t] = U x_t + b`` for all t (``[T, h, n]``); token inputs gather U columns."""
    steps = out.shape[0]
    if data.info.kind == "tokens":
        out[...] = p.b[:, None]
        for t in range(steps):
            kernels.add_columns(p.U, data.inputs[t], out[t])
    else:
        dz = data.info.dim
        np.matmul(p.U, Z[:steps, :dz], out=out)
        out += p.b[:, None]
    return out


@dataclass
class AdmmState:
    """Per-sample auxiliaries and multipliers of one rank, time-major and feature-major.

    ``A`` ``[T, h, n]``; ``Z`` ``[T + 1, dz + 1 + h (+ h), n]``, the stacked ``[x_t; 1;
    s_{t-1} (; lambda1_t)]`` of :func:`padmmirnn.nn.stacked_state`, which holds the
    states ``S`` ``[T + 1, h, n]`` (a view, ``S[0] = 0``) and, with multipliers 'all',
    ``L1`` ``[T, h, n]`` (a view; empty otherwise), so that the statistics are ONE
    product of Z with its own rows per step; ``O`` ``[|O|, n, K]`` (rows: the loss
    kernels work per row); ``L2`` like ``A``, ``L3`` like ``O``, or empty arrays when
    the multiplier mode has none. (Views: update them in place, ``st.L1[...] = v``.)
    """

    A: np.ndarray
    Z: np.ndarray
    O: np.ndarray
    L2: np.ndarray
    L3: np.ndarray
    dz: int  # rows of x_t in Z (0 for token inputs)

    @property
    def S(self) -> np.ndarray:
        return states_of(self.Z, self.dz, self.A.shape[1])

    @property
    def L1(self) -> np.ndarray:
        return self.Z[:self.A.shape[0], self.dz + 1 + self.A.shape[1]:]

    def a_hat(self, rho1: float) -> np.ndarray:
        return self.A + self.L1 / rho1 if self.L1.size else self.A

    def o_hat(self, rho3: float) -> np.ndarray:
        return self.O + self.L3 / rho3 if self.L3.size else self.O

    def out_states(self, many_to_many: bool) -> np.ndarray:
        """s_t for t in O: ``[|O|, h, n]`` (a view)."""
        return self.S[1:] if many_to_many else self.S[-1:]


@dataclass(frozen=True)
class Penalty:
    rho1: float
    rho2: float
    rho3: float
    nu: float


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------- statistics


def constant_stats(data: LocalData) -> dict[str, np.ndarray]:
    """Local sums x x^T and sum x (dense) or token counts (tokens)."""
    d = data.info.dim
    if data.info.kind == "tokens":
        return {"sX": kernels.token_counts(data.inputs.reshape(-1), d)}
    x = _rows(data.inputs)
    return {"XX": gram(x, x), "sX": colsum(x)}


def _token_sums(data: LocalData, values: np.ndarray) -> np.ndarray:
    """sum over samples and steps of x_t v_t^T for one-hot x (``values`` ``[T, h, n]``)."""
    return np.ascontiguousarray(kernels.segment_sum_columns(data.inputs, values,
                                                            data.info.dim).T)


def _split(G: np.ndarray, dz: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The x, s and ones rows of ``sum_t Z[t, :dz + 1 + h] v_t^T``."""
    return G[:dz], G[dz + 1:], G[dz]


def input_stats(state: AdmmState, data: LocalData, rho1: float,
                work: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Local sums over all (i, t) of x s_{t-1}^T, x a_hat^T, s_{t-1} s_{t-1}^T,
    s_{t-1} a_hat^T, s_{t-1}, a_hat (the [U W b] block): the products
    ``sum_t z_t s_{t-1}^T`` and ``sum_t z_t a_hat_t^T`` with z_t = [x_t; 1; s_{t-1}].
    ``work`` (``[T, h, n]``), if given, holds a_hat instead of a new array."""
    steps, h = state.A.shape[:2]
    dz = state.dz
    sp, zs = state.S[:steps], state.Z[:steps, :dz + 1 + h]
    if state.L1.size and work is not None:
        for t in range(steps):
            kernels.shifted(state.A[t], state.L1[t], 1.0 / rho1, work[t])
        ah = work
    else:
        ah = state.a_hat(rho1)
    xsp, spsp, ssp = _split(gram_steps(zs[1:], sp[1:]), dz)  # s_0 = 0 adds nothing
    xa, spa, sa = _split(gram_steps(zs, ah), dz)
    if data.info.kind == "tokens":
        xsp, xa = _token_sums(data, sp), _token_sums(data, ah)
    return {"XSp": xsp, "XA": xa, "SpSp": spsp, "SpA": spa, "sSp": ssp, "sA": sa}


def input_stats_synced(p: Params, state: AdmmState, data: LocalData, rho1: float,
                       const: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`input_stats` when a, s are a forward pass of ``p`` (a_t = U x_t + W s_{t-1}
    + b exactly): the sums with a are linear in the weights,

        sum x a^T = XX U^T + sX b^T + XSp W^T,   sum s_{t-1} a^T = XSp^T U^T
        + sSp b^T + SpSp W^T,   sum a = U sX + n T b + W sSp,

    so only lambda1 / rho1 needs a pass over the samples and no a_hat array is built:
    with lambda1 in the rows of Z after s_{t-1}, ``sum_t z_t [s_{t-1}; lambda1_t]^T`` is
    ONE product per step. ``const``: this part's :func:`constant_stats`."""
    steps, h = state.A.shape[:2]
    dz = state.dz
    zs, ys = state.Z[:steps, :dz + 1 + h], state.Z[:steps, dz + 1:]  # ys: [s_{t-1}; lambda1]
    tokens = data.info.kind == "tokens"
    G = gram_steps(zs[1:], ys[1:])  # s_0 = 0: step 0 adds only to the lambda1 columns
    lam = state.L1.size > 0
    if lam:
        G[:, h:] += gram_steps(zs[:1], state.L1[:1])
    xsp, spsp, ssp = _split(G[:, :h], dz)
    if tokens:
        xsp = _token_sums(data, state.S[:steps])
        xxu = const["sX"][:, None] * p.U.T  # sum x x^T = diag(counts)
    else:
        xxu = const["XX"] @ p.U.T
    xa = xxu + np.outer(const["sX"], p.b) + xsp @ p.W.T
    spa = xsp.T @ p.U.T + np.outer(ssp, p.b) + spsp @ p.W.T
    sa = p.U @ const["sX"] + steps * zs.shape[2] * p.b + p.W @ ssp
    if lam:
        xl, spl, sl = _split(G[:, h:], dz)
        if tokens:
            xl = _token_sums(data, state.L1)
        xa += xl / rho1
        spa += spl / rho1
        sa += sl / rho1
    return {"XSp": xsp, "XA": xa, "SpSp": spsp, "SpA": spa, "sSp": ssp, "sA": sa}


def output_stats(state: AdmmState, many_to_many: bool, rho3: float) -> dict[str, np.ndarray]:
    """Local sums over (i, t in O) of s s^T, s o_hat^T, s, o_hat (the [V c] block)."""
    s = state.out_states(many_to_many)
    oh = state.o_hat(rho3)
    return {"SS": gram_steps(s, s), "SO": gram_steps(s, oh.transpose(0, 2, 1)),
            "sS": sum_steps(s), "sO": colsum(_rows(oh))}


# ----------------------------------------------------------------------------- weight blocks


def _spd_solve_right(G: np.ndarray, R: np.ndarray) -> np.ndarray:
    """X with X G = R for symmetric positive semi-definite G (minimum norm if singular)."""
    try:
        L = np.linalg.cholesky(G)
        return np.linalg.solve(L.T, np.linalg.solve(L, R.T)).T
    except np.linalg.LinAlgError:
        return R @ np.linalg.pinv(G, hermitian=True)


def solve_U(W, b, st, const, reg, tokens: bool) -> np.ndarray:
    """U (sum x x^T + reg I) = sum (a_hat - W s_{t-1} - b) x^T,  reg = N nu / rho1.

    Token inputs: sum x x^T is diag(counts), so each column solves by itself.
    A column with zero count and reg = 0 is any value: the old one is kept by
    the caller (NaN marks it here)."""
    rhs = st["XA"].T - W @ st["XSp"].T - np.outer(b, const["sX"])
    if tokens:
        den = const["sX"] + reg
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, rhs / np.where(den > 0, den, 1.0), np.nan)
    return _spd_solve_right(const["XX"] + reg * np.eye(len(const["sX"])), rhs)


def solve_W(U, b, st, reg) -> np.ndarray:
    """W (sum s_{t-1} s_{t-1}^T + reg I) = sum (a_hat - U x - b) s_{t-1}^T."""
    rhs = st["SpA"].T - U @ st["XSp"] - np.outer(b, st["sSp"])
    return _spd_solve_right(st["SpSp"] + reg * np.eye(rhs.shape[0]), rhs)


def solve_b(U, W, st, const, count: float) -> np.ndarray:
    """b = sum (a_hat - U x - W s_{t-1}) / (N T)."""
    return (st["sA"] - U @ const["sX"] - W @ st["sSp"]) / count


def solve_V(c, st, reg) -> np.ndarray:
    """V (sum s s^T + reg I) = sum (o_hat - c) s^T over t in O,  reg = N nu / rho3."""
    rhs = st["SO"].T - np.outer(c, st["sS"])
    return _spd_solve_right(st["SS"] + reg * np.eye(rhs.shape[1]), rhs)


def solve_c(V, st, count: float) -> np.ndarray:
    """c = sum (o_hat - V s) / (N |O|)."""
    return (st["sO"] - V @ st["sS"]) / count


def solve_UWb_joint(st, const, reg: float, count: float) -> tuple[np.ndarray, ...]:
    """[U W b] jointly (dense inputs): Theta G = R with z = [x; s_{t-1}; 1],

        G = sum z z^T + reg diag(1_d, 1_h, 0),   R = sum a_hat z^T,

    the exact minimiser of L over (U, W, b) together (one (d+h+1)-square SPD solve
    instead of three block solves that ignore the correlation of x and s)."""
    d, h = st["XSp"].shape
    G = np.empty((d + h + 1, d + h + 1))
    G[:d, :d] = const["XX"]
    G[:d, d:d + h] = st["XSp"]
    G[d:d + h, :d] = st["XSp"].T
    G[d:d + h, d:d + h] = st["SpSp"]
    G[:d, -1] = G[-1, :d] = const["sX"]
    G[d:d + h, -1] = G[-1, d:d + h] = st["sSp"]
    G[-1, -1] = count
    idx = np.arange(d + h)
    G[idx, idx] += reg
    R = np.concatenate([st["XA"].T, st["SpA"].T, st["sA"][:, None]], axis=1)
    theta = _spd_solve_right(G, R)
    return theta[:, :d], theta[:, d:d + h], theta[:, -1].copy()


def update_input_weights(p: Params, st, const, pen: Penalty, n_global: int, rows: float,
                         tokens: bool, joint: bool = False) -> None:
    """Blocks U, W, b one after the other (each an exact minimiser), in place;
    ``joint`` (dense inputs only): [U W b] in one exact solve. ``rows``: the
    regressor rows summed over, N T (the real sample-steps with lengths)."""
    reg = n_global * pen.nu / pen.rho1
    if joint and not tokens:
        p.U, p.W, p.b = solve_UWb_joint(st, const, reg, rows)
        return
    U = solve_U(p.W, p.b, st, const, reg, tokens)
    p.U = np.where(np.isnan(U), p.U, U)
    p.W = solve_W(p.U, p.b, st, reg)
    p.b = solve_b(p.U, p.W, st, const, rows)


def solve_Vc_joint(st, reg: float, count: float) -> tuple[np.ndarray, np.ndarray]:
    """[V c] jointly:
    Theta [[sum s s^T + reg I, sum s], [sum s^T, count]] = [sum o_hat s^T, sum o_hat]."""
    h = st["SS"].shape[0]
    G = np.empty((h + 1, h + 1))
    G[:h, :h] = st["SS"] + reg * np.eye(h)
    G[:h, -1] = G[-1, :h] = st["sS"]
    G[-1, -1] = count
    R = np.concatenate([st["SO"].T, st["sO"][:, None]], axis=1)
    theta = _spd_solve_right(G, R)
    return theta[:, :h], theta[:, -1].copy()


def update_output_weights(p: Params, st, pen: Penalty, n_global: int, rows: float,
                          joint: bool = False) -> None:
    """Blocks V, c one after the other (each an exact minimiser), in place;
    ``joint``: [V c] in one exact solve. ``rows``: the output rows, N |O|."""
    if joint:
        p.V, p.c = solve_Vc_joint(st, n_global * pen.nu / pen.rho3, rows)
        return
    p.V = solve_V(p.c, st, n_global * pen.nu / pen.rho3)
    p.c = solve_c(p.V, st, rows)


# ----------------------------------------------------------------------------- local blocks


def _preactivation(p: Params, state: AdmmState, data: LocalData, out: np.ndarray) -> np.ndarray:
    """``out[t] = U x_t + W s_{t-1} + b`` for all t with the current states."""
    if data.info.kind == "tokens":
        input_projection(p, data, state.Z, out)
        out[1:] += np.matmul(p.W, state.S[1:-1])
    else:
        np.matmul(stacked_weights(p.layer(0), False), state.Z[:-1, :state.dz + 1 + p.W.shape[0]],
                  out=out)
    return out


def update_a(p: Params, state: AdmmState, data: LocalData, pen: Penalty, act: str,
             newton_steps: int, work: np.ndarray) -> None:
    """Block a: elementwise min rho1/2 (a - m)^2 + rho2/2 (q - f(a))^2 (kernel)."""
    m = _preactivation(p, state, data, work)
    if state.L1.size:
        m -= state.L1 / pen.rho1
    lam2 = EMPTY.astype(state.A.dtype)
    for t in range(state.A.shape[0]):
        kernels.a_update(state.A[t], m[t], state.S[t + 1], state.L2[t] if state.L2.size
                         else lam2, pen.rho1, pen.rho2, ACTIVATIONS[act], newton_steps)


def _spd_inverse(M: np.ndarray) -> np.ndarray:
    L = np.linalg.cholesky(M)
    Linv = np.linalg.solve(L, np.eye(M.shape[0]))
    return Linv.T @ Linv


def s_system_inverses(p: Params, pen: Penalty, many_to_many: bool,
                      dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Inverses of the s-block matrices (the s block), float64 math, ``dtype`` out:

        t < T:  rho2 I + rho1 W^T W + rho3 V^T V [many-to-many]
        t = T:  rho2 I + rho3 V^T V
    """
    h = p.W.shape[0]
    eye = pen.rho2 * np.eye(h)
    vtv = pen.rho3 * (p.V.T @ p.V)
    mid = eye + pen.rho1 * (p.W.T @ p.W) + (vtv if many_to_many else 0.0)
    return _spd_inverse(mid).astype(dtype), _spd_inverse(eye + vtv).astype(dtype)


def update_s(p: Params, state: AdmmState, data: LocalData, pen: Penalty, act: str,
             inverses: tuple[np.ndarray, np.ndarray], work: np.ndarray) -> None:
    """Block s: separable in t; for each kind of step one SPD system

        (rho2 I + rho1 W^T W [t<T] + rho3 V^T V [t in O]) s_t
            = rho2 f(a_t) - lambda2_t + rho1 W^T (a_hat_{t+1} - U x_{t+1} - b) [t<T]
              + rho3 V^T (o_hat_t - c) [t in O],

    solved for all samples at once with the inverses of :func:`s_system_inverses`."""
    steps = state.A.shape[0]
    rhs = activate(state.A, act)
    rhs *= pen.rho2
    if state.L2.size:
        rhs -= state.L2
    if steps > 1:
        nxt = input_projection(p, data, state.Z, work)[1:]
        np.subtract(state.a_hat(pen.rho1)[1:], nxt, out=nxt)
        rhs[:-1] += np.matmul(pen.rho1 * p.W.T, nxt)
    out_rhs = rhs if data.info.many_to_many else rhs[-1:]
    out_rhs += np.matmul(pen.rho3 * p.V.T, (state.o_hat(pen.rho3) - p.c).transpose(0, 2, 1))
    mid, last = inverses
    for t in range(steps):
        np.matmul(last if t == steps - 1 else mid, rhs[t], out=state.S[t + 1])


def sweep_backward(p: Params, state: AdmmState, data: LocalData, pen: Penalty, act: str,
                   newton_steps: int, inverses: tuple[np.ndarray, np.ndarray],
                   work: np.ndarray) -> None:
    """Blocks s_T, a_T, s_{T-1}, a_{T-1}, ..., s_1, a_1 one after the other
    (Gauss-Seidel backward in time), each the exact (s) or safeguarded (a)
    minimiser of L given the others -- so L never increases (multipliers none).

    The s_t block is the system of :func:`update_s` restricted to one t (it only
    involves a_t, a_{t+1} and o_t); the a_t block is the elementwise problem of
    :func:`update_a` with ``m = U x_t + W s_{t-1} + b - lambda1_t / rho1``, where
    s_{t-1} is still the old value. Unlike the Jacobi blocks, the change of the
    output target reaches s_1 within ONE sweep: a_{t+1} has already moved when
    s_t is solved."""
    steps = state.A.shape[0]
    m2m = data.info.many_to_many
    xproj = input_projection(p, data, state.Z, work)  # U x_t + b, [T, h, n]
    mid, last = inverses
    lam2_empty = EMPTY.astype(state.A.dtype)
    a_hat_next = np.empty_like(state.A[0])
    m = np.empty_like(state.A[0])
    rhs = np.empty_like(state.A[0])
    oh = (state.o_hat(pen.rho3) - p.c).transpose(0, 2, 1)  # [|O|, K, n]
    S = state.S
    for t in range(steps - 1, -1, -1):  # array index t is time t + 1
        activate(state.A[t], act, out=rhs)
        rhs *= pen.rho2
        if state.L2.size:
            rhs -= state.L2[t]
        if t < steps - 1:
            np.subtract(state.A[t + 1], xproj[t + 1], out=a_hat_next)
            if state.L1.size:
                a_hat_next += state.L1[t + 1] / pen.rho1
            rhs += (pen.rho1 * p.W.T) @ a_hat_next
        if m2m or t == steps - 1:
            rhs += (pen.rho3 * p.V.T) @ oh[t if m2m else 0]
        np.matmul(last if t == steps - 1 else mid, rhs, out=S[t + 1])
        np.copyto(m, xproj[t])
        if t > 0:
            m += p.W @ S[t]
        if state.L1.size:
            m -= state.L1[t] / pen.rho1
        kernels.a_update(state.A[t], m, S[t + 1],
                         state.L2[t] if state.L2.size else lam2_empty,
                         pen.rho1, pen.rho2, ACTIVATIONS[act], newton_steps)


def resync_forward(p: Params, state: AdmmState, data: LocalData, act: str) -> None:
    """Auxiliaries from a true forward pass of the current weights (multipliers kept):
    every residual becomes zero. Not a minimisation of L: it may increase L."""
    forward_into(p, data, act, state.A, state.Z)
    outputs(p, state.S, data.info.many_to_many, out=state.O)


def kkt_multipliers(p: Params, state: AdmmState, data: LocalData, act: str, loss: str,
                    synced: bool = False) -> None:
    """Least-squares (first-order) multiplier estimate: the lambda that makes the
    gradient of the (plain) Lagrangian with respect to o, s and a vanish at the
    current primal point (Fletcher's estimate of augmented-Lagrangian methods).
    For the chain constraints of the RNN it is unique and a backward recursion:

        lambda3_t = -dl/do(o_t, y_t)                     (t in O)
        lambda2_t = W^T lambda1_{t+1} [t < T] + V^T lambda3_t [t in O]
        lambda1_t = f'(a_t) * lambda2_t

    that is, the model's adjoint recursion (:func:`adjoint_into`)
    seeded with -dl/do. At a feasible point (auxiliaries from a forward pass)
    lambda1_t = -dl/da_t, minus the BPTT adjoint; the weight blocks then fit
    a_hat = a - delta/rho1: a step of length 1/rho1 along the gradient,
    preconditioned by the data covariance. This IS a backward pass through time
    (no weight gradient is formed). Replaces lambda += rho r; multipliers 'all' only.
    ``synced``: s = f(a) exactly (a forward re-synchronisation), so f'(a) is read off
    s instead of recomputing it from a."""
    rows = state.L3.shape[0] * state.L3.shape[1]
    lam3 = state.L3.reshape(rows, -1)
    np.copyto(lam3, _rows(state.O))
    kernels.output_delta(lam3, data.targets.reshape(-1), LOSSES[loss], -1.0)
    adjoint_into(p, state.S, state.L3, data.info.many_to_many, act, state.L1, carry=state.L2,
                 pre=None if synced else state.A)


def update_o(p: Params, state: AdmmState, data: LocalData, pen: Penalty, loss: str,
             newton_steps: int) -> None:
    """Block o: per row min l(o, y) + rho3/2 |o - (V s + c - lambda3/rho3)|^2 (kernel)."""
    target = outputs(p, state.S, data.info.many_to_many)
    if state.L3.size:
        target -= state.L3 / pen.rho3
    kernels.o_update(_rows(state.O), _rows(target), data.targets.reshape(-1), pen.rho3,
                     LOSSES[loss], newton_steps)


# ----------------------------------------------------------------------------- residuals


class Residual(IntEnum):
    """Positions in the vector of augmented Lagrangian pieces (:func:`residual_sums`):
    the loss sum, and per constraint j the sums of |r_j|^2 and lambda_j . r_j."""

    LOSS = 0
    R1_SQ = 1
    L1_R1 = 2
    R2_SQ = 3
    L2_R2 = 4
    R3_SQ = 5
    L3_R3 = 6


def residual_sums(p: Params, state: AdmmState, data: LocalData, pen: Penalty, act: str,
                  loss: str, work: np.ndarray, update: tuple[bool, bool, bool],
                  dual_step: float = 1.0) -> np.ndarray:
    """Local sums of the augmented Lagrangian pieces (:class:`Residual`), with the
    multipliers *before* this call; then lambda_j += beta rho_j r_j where ``update[j]``
    (``beta = dual_step``; 1 is the classical ADMM multiplier step)."""
    out = np.zeros(len(Residual))
    r1 = _preactivation(p, state, data, work)
    np.subtract(state.A, r1, out=r1)
    out[Residual.R1_SQ] = np.vdot(r1, r1)
    if state.L1.size:
        out[Residual.L1_R1] = np.vdot(state.L1, r1)
        if update[0]:
            lam1 = state.L1
            lam1 += (dual_step * pen.rho1) * r1
    lam2 = EMPTY.astype(state.A.dtype)
    for t in range(state.A.shape[0]):
        sq, lin = kernels.activation_residual(state.S[t + 1], state.A[t], state.L2[t] if
                                              state.L2.size else lam2, dual_step * pen.rho2,
                                              ACTIVATIONS[act], update[1])
        out[Residual.R2_SQ] += sq
        out[Residual.L2_R2] += lin
    r3 = state.O - outputs(p, state.S, data.info.many_to_many)
    out[Residual.R3_SQ] = np.vdot(r3, r3)
    if state.L3.size:
        out[Residual.L3_R3] = np.vdot(state.L3, r3)
        if update[2]:
            state.L3 += (dual_step * pen.rho3) * r3
    out[Residual.LOSS], _ = kernels.loss_and_correct(_rows(state.O), data.targets.reshape(-1),
                                                     LOSSES[loss])
    return out


def lagrangian_from_sums(sums: np.ndarray, p: Params, pen: Penalty, n_global: int) -> float:
    """L from globally reduced :class:`Residual` sums (see module docstring)."""
    loss, r1, l1, r2, l2, r3, l3 = sums
    data_term = (loss + l1 + 0.5 * pen.rho1 * r1 + l2 + 0.5 * pen.rho2 * r2
                 + l3 + 0.5 * pen.rho3 * r3) / n_global
    reg = 0.5 * pen.nu * (np.vdot(p.U, p.U) + np.vdot(p.W, p.W) + np.vdot(p.V, p.V))
    return float(data_term + reg)

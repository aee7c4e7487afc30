"""A network: ``L`` layers of one cell and an output head (docs/design.md, section 2).

    layer 0:    s^0_t = cell(x_t, s^0_{t-1})              (x_t the data)
    layer l:    s^l_t = cell(s^{l-1}_t, s^l_{t-1})
    head:       o_t = V s^{L-1}_t + c                       (t in O)

with ``O = {T}`` (many-to-one) or ``{1..T}`` (many-to-many). With sequence lengths
``L_i`` (:attr:`LocalData.lengths`) the compute follows the real steps only: a block's
samples are ordered by decreasing length (:func:`by_length`), so the samples still
running at step t are the prefix of ``n_t = #{i: L_i > t}`` columns, step t computes
those columns only and the block runs to its longest sequence; a many-to-one output is
read at each sequence's last real step, ``o_i = V s_{L_i} + c``, and the padded targets
of a many-to-many model (t > L_i) are masked out of the loss, its adjoint and the
counts. Every sum over steps (gradients, Gram statistics) is then over the real steps
only. Arrays are time-major and
feature-major (samples as columns): a state block is ``[h, n]``; outputs are rows
``[|O|, n, K]`` (the loss kernels work per row). Each layer keeps its stacked state
``Z_l`` ``[T + 1, d_l + 1 + h, n]`` with ``Z_l[t] = [x_t; 1; s_{t-1}]``
(:func:`stacked_state`), so that its pre-activations are one product per step and every
statistic of the layer is a product of ``Z_l`` with an adjoint.

:meth:`Network.forward` runs the layers upward, :meth:`Network.adjoint` the cells'
recursions downward from the head's seeds ``V^T delta_t`` (``delta = dL/do`` gives the
BPTT adjoints, ``delta = -dl/do`` the KKT multipliers of ADMM), each layer seeding the
one below with ``U^T delta_in``. :meth:`Network.layer_sums` gives the sums of every
weight gradient, shared by BPTT (:meth:`Network.gradients`) and the ADMM block step.
Reported metrics come from :meth:`Network.loss_sums`, a forward pass of the current
weights over blocks of samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from padmmirnn import kernels
from padmmirnn.nn.cells import CELLS, Cell, cell_name
from padmmirnn.nn.cells.base import Trace, side_by_side, spans
from padmmirnn.nn.params import Layer, Params, layer_name
from padmmirnn.samples import DatasetInfo, LocalData

LOSSES = {"ce": kernels.LOSS_CE, "mse": kernels.LOSS_MSE}
# An evaluation (:meth:`Network.loss_sums`) runs forward passes over blocks of at most
# this many samples, and at most EVAL_BYTES of layer state per block.
EVAL_BLOCK = 4096
EVAL_BYTES = 256 * 2 ** 20


def input_rows(info: DatasetInfo) -> int:
    """Rows of x_t in the first layer's stacked state (0 for tokens: their U x_t is a
    gather of U's columns, not a product)."""
    return 0 if info.kind == "tokens" else info.dim


def stacked_state(data: LocalData, h: int, dtype: np.dtype, extra: int = 0,
                  rows_outer: bool = False) -> np.ndarray:
    """The first layer's ``Z`` ``[T + 1, dz + 1 + h + extra, n]``: ``Z[t] = [x_t; 1;
    s_{t-1}; e_t]`` (``dz`` = :func:`input_rows`) with the states zero (s_0 = 0) and
    ``extra`` rows ``e_t`` for the caller (the full-batch ADMM keeps lambda1 there). The
    states are the view :func:`states_of`. ``rows_outer``: the memory holds ``[rows,
    T + 1, n]`` and Z is its transposed view, so that the steps of one row are side by
    side: sums over steps of products become one product of ``[rows, T n]`` views. BLAS
    multiplies an ``[h, h]`` matrix into ``[h, n]`` blocks faster than ``[n, h]`` blocks
    into an ``[h, h]`` one (measured: 86% against 58% of the square-GEMM rate at h =
    128), hence feature-major."""
    steps, n = data.inputs.shape[:2]
    dz = input_rows(data.info)
    Z = _zeros(steps + 1, dz + 1 + h + extra, n, dtype, rows_outer)
    if dz:
        Z[:steps, :dz] = data.inputs.transpose(0, 2, 1)
    Z[:, dz] = 1.0
    return Z


def _zeros(steps: int, rows: int, n: int, dtype: np.dtype, rows_outer: bool) -> np.ndarray:
    if rows_outer:
        return np.zeros((rows, steps, n), dtype).transpose(1, 0, 2)
    return np.zeros((steps, rows, n), dtype)


def states_of(Z: np.ndarray, dz: int, h: int) -> np.ndarray:
    """The states ``s_t`` in ``Z`` (``dz`` rows of inputs): the view ``[T + 1, h, n]``."""
    return Z[:, dz + 1:dz + 1 + h]


def readout(states: np.ndarray, many_to_many: bool,
            lengths: np.ndarray | None = None) -> np.ndarray:
    """The top states at the output steps, ``[|O|, h, n]``: ``s_1..s_T`` (many-to-many),
    else ``s_T``, or with ``lengths`` each sample's last real state ``s_{L_i}``."""
    if many_to_many:
        return states[1:]
    if lengths is None:
        return states[-1:]
    return states[lengths, :, np.arange(len(lengths))].T[None]


def outputs(params: Params, states: np.ndarray, many_to_many: bool,
            out: np.ndarray | None = None, lengths: np.ndarray | None = None) -> np.ndarray:
    """``o_t = V s_t + c`` for t in O, in rows ``[|O|, n, K]`` (``states`` feature-major
    ``[T + 1, h, n]``, the top layer's; :func:`readout`)."""
    s_out = readout(states, many_to_many, lengths)
    V = params.V.astype(states.dtype)
    o = np.matmul(s_out.transpose(0, 2, 1), V.T, out=out)
    o += params.c.astype(states.dtype)
    return o


def head_seeds(V: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``V^T delta_t`` ``[|O|, h, n]`` for output rows ``delta`` ``[|O|, n, K]``: the
    top layer's seeds ``dL/ds_t``."""
    return np.matmul(np.ascontiguousarray(V.T, dtype=delta.dtype),
                     delta.transpose(0, 2, 1))


def by_length(data: LocalData) -> LocalData:
    """``data`` with its samples ordered by decreasing length (stable; unchanged when
    they already are, or without lengths) and its steps cut to the longest sequence:
    the layout the passes with lengths need (the active samples of a step are a prefix
    of the columns). Sums over samples do not depend on the order. When every sample
    has the same length the lengths are dropped (every step's columns are all active:
    the passes without lengths, with no packed copies or masks, compute the same)."""
    L = data.lengths
    if L is None or not len(L):
        return data
    steps = int(L.max())
    inputs = data.inputs[:steps]
    targets = data.targets[:steps] if data.info.many_to_many else data.targets
    if int(L.min()) == steps:
        return LocalData(data.info, inputs, targets, data.start, data.stop, None)
    if np.any(L[1:] > L[:-1]):
        order = np.argsort(-L, kind="stable")
        inputs, targets, L = (np.take(inputs, order, axis=1), np.take(targets, order, axis=1),
                              L[order])
    return LocalData(data.info, inputs, targets, data.start, data.stop, L)


def active_counts(lengths: np.ndarray | None, steps: int) -> list[int] | None:
    """``n_t = #{i: L_i > t}`` for t = 0..steps - 1 (None without lengths)."""
    if lengths is None:
        return None
    return np.count_nonzero(lengths[None, :] > np.arange(steps)[:, None], axis=1).tolist()


def real_rows(lengths: np.ndarray | None, many_to_many: bool, steps: int
              ) -> np.ndarray | None:
    """``[T, n]`` mask of the real output rows of a many-to-many model with lengths
    (``t < L_i``); None when every output row is real."""
    if lengths is None or not many_to_many:
        return None
    return np.arange(steps)[:, None] < lengths[None, :]


def loss_delta(o: np.ndarray, targets: np.ndarray, loss: str, scale: float,
               mask: np.ndarray | None = None) -> float:
    """``o`` (rows ``[|O|, n, K]``) turned into ``scale * dl/do`` in place on the real
    rows (``mask``, :func:`real_rows`; None: all) and 0 on the padded ones; returns the
    loss sum over the real rows (float64)."""
    if mask is None:
        rows = o.shape[0] * o.shape[1]
        return kernels.output_delta(o.reshape(rows, -1), targets.reshape(-1), LOSSES[loss],
                                    scale)
    real = o[mask]
    total = kernels.output_delta(real, targets[mask], LOSSES[loss], scale)
    o[...] = 0.0
    o[mask] = real
    return total


def packed(a: np.ndarray, active: list[int] | None) -> np.ndarray:
    """``[T, q, n]`` (or token ids ``[T, n]``) at the active columns of every step as one
    ``[q, R]`` (``[R]``) array, ``R = sum_t n_t``: sums over real steps become single
    products. Without lengths the steps side by side (:func:`side_by_side`)."""
    if active is None:
        return a.reshape(-1) if a.ndim == 2 else side_by_side(a)
    return np.concatenate([a[t, ..., :c] for t, c in enumerate(active)], axis=-1)


@dataclass
class Forward:
    """One forward pass: every layer's stacked state, input rows and trace; the
    token ids of the first layer (None for dense inputs); the samples' lengths
    (decreasing) and the active columns ``n_t`` of every step (None without lengths)."""

    Z: list[np.ndarray]
    dx: list[int]
    traces: list[Trace]
    tokens: np.ndarray | None
    h: int
    lengths: np.ndarray | None = None
    active: list[int] | None = None

    @property
    def states(self) -> np.ndarray:
        """The top layer's states ``[T + 1, h, n]`` (s_0 = 0)."""
        return states_of(self.Z[-1], self.dx[-1], self.h)

    def final(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Every layer's last state ``s_T`` (``s_{L_i}`` with lengths; and cell state, if
        the cell has one), to continue from with :meth:`Network.forward`'s ``start``."""
        def last(a: np.ndarray) -> np.ndarray:
            return readout(a, False, self.lengths)[0].copy()
        return [(last(states_of(Z, dx, self.h)), None if tr.cells is None else last(tr.cells))
                for Z, dx, tr in zip(self.Z, self.dx, self.traces, strict=True)]

    def outputs(self, params: Params, many_to_many: bool) -> np.ndarray:
        """The head's rows ``[|O|, n, K]`` (:func:`outputs`, read at the last real step
        of each sample with lengths)."""
        return outputs(params, self.states, many_to_many, lengths=self.lengths)

    def packed(self, a: np.ndarray) -> np.ndarray:
        """``a`` ``[T, q, n]`` at the real steps of the samples as ``[q, R]`` (:func:`packed`)."""
        return packed(a, self.active)

    def regressors(self, layer: int) -> np.ndarray:
        """``z_t`` of ``layer`` for t = 1..T, ``[T, dx + 1 + h, n]``."""
        return self.Z[layer][:-1, :self.dx[layer] + 1 + self.h]


class Gradients(NamedTuple):
    """Mean loss L over the ``rows`` output rows of a batch, its gradient (float64
    :class:`Params`) and ``step_norms[t - 1]`` = mean over samples of ``||dL_i/dP_t||``
    of the top layer (vanishing or exploding gradients)."""

    loss: float
    grads: Params
    step_norms: np.ndarray
    rows: int


def _input_seeds(U: np.ndarray, delta_in: np.ndarray, active: list[int] | None
                 ) -> np.ndarray:
    """``U^T delta_in_t`` ``[T, d, n]``, the seeds of the layer below, on the active
    columns of every step (the others are never read)."""
    UT = np.ascontiguousarray(U.T)
    if active is None:
        return np.matmul(UT, delta_in)
    seeds = np.empty((delta_in.shape[0], UT.shape[0], delta_in.shape[2]), delta_in.dtype)
    for t, a in enumerate(active):
        np.matmul(UT, delta_in[t, :, :a], out=seeds[t, :, :a])
    return seeds


def _gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a b^T`` in float64 (float32 operands: their product, in float64)."""
    return (a @ b.T).astype(np.float64, copy=False)


class Network:
    """``layers`` layers of ``cell`` and a linear output head."""

    def __init__(self, cell: Cell, layers: int = 1):
        self.cell, self.layers = cell, layers

    @classmethod
    def build(cls, cell: str, activation: str, layers: int = 1) -> Network:
        return cls(CELLS[cell](activation), layers)

    @classmethod
    def of(cls, params: Params, activation: str) -> Network:
        """The network whose weights ``params`` are (its cell read off their shapes)."""
        return cls.build(cell_name(params), activation, params.layers)

    # ------------------------------------------------------------------ weights

    def init_params(self, d: int, h: int, k: int, seed: int, w_init: str,
                    scale: float) -> Params:
        """Seeded initial weights (float64), layer by layer, then ``V ~ N(0, 1/h)`` and
        ``c = 0`` (see :meth:`Cell.init_layer`)."""
        rng = np.random.default_rng([seed, 0x5EED])
        arrays = {}
        for l in range(self.layers):
            layer = self.cell.init_layer(rng, d if l == 0 else h, h, w_init, scale)
            arrays.update({layer_name(k_, l): v for k_, v in layer.arrays().items()})
        arrays["V"] = rng.standard_normal((k, h)) / np.sqrt(h)
        arrays["c"] = np.zeros(k)
        # names in the order of docs/design.md: U, W, b (, bh) per layer, then V, c
        return Params(arrays)

    # ------------------------------------------------------------------ passes

    def forward(self, p: Params, data: LocalData, side_by_side_layout: bool = False,
                dtype: np.dtype | None = None,
                start: list[tuple[np.ndarray, np.ndarray | None]] | None = None) -> Forward:
        """The forward pass of ``p`` (in the compute dtype) over ``data``;
        ``side_by_side_layout``: stacked states and adjoints laid out so that sums over
        steps are single products (mini-batch statistics, BPTT); ``start``: every
        layer's initial state (:meth:`Forward.final` of an earlier pass), else 0. With
        lengths (``data`` as :func:`by_length` leaves it) step t computes the ``n_t``
        active columns only."""
        L = data.lengths
        if L is not None and (np.any(L[1:] > L[:-1]) or len(L) and L[0] != len(data.inputs)):
            raise ValueError("a forward pass with lengths needs the samples by decreasing "
                             "length and the steps cut to the longest (by_length)")
        dtype = np.dtype(dtype or p.W.dtype)
        steps, n = data.inputs.shape[:2]
        h = p.hidden
        tokens = data.inputs if data.info.kind == "tokens" else None
        active = active_counts(L, steps)
        Zs, dxs, traces = [], [], []
        for l in range(self.layers):
            if l == 0:
                Z = stacked_state(data, h, dtype, rows_outer=side_by_side_layout)
                dx = input_rows(data.info)
            else:
                dx = h
                Z = _zeros(steps + 1, dx + 1 + h, n, dtype, side_by_side_layout)
                Z[:steps, :h] = states_of(Zs[-1], dxs[-1], h)[1:]
                Z[:, dx] = 1.0
            trace = self.cell.trace(steps, h, n, dtype, side_by_side_layout)
            if start is not None:
                Z[0, dx + 1:dx + 1 + h] = start[l][0]
                if trace.cells is not None:
                    trace.cells[0] = start[l][1]
            self.cell.forward(p.layer(l), Z, dx, tokens if l == 0 else None, trace,
                              zero_start=start is None, active=active)
            Zs.append(Z)
            dxs.append(dx)
            traces.append(trace)
        return Forward(Zs, dxs, traces, tokens, h, L, active)

    def adjoint(self, p: Params, fwd: Forward, delta: np.ndarray, many_to_many: bool) -> None:
        """Every layer's ``delta_in``/``delta_hh`` (in its trace) for output seeds
        ``delta`` (rows ``[|O|, n, K]``, ``dL/do``; zero on padded rows), over the real
        steps of every sample."""
        seeds = head_seeds(p.V, delta)
        every = many_to_many
        for l in range(self.layers - 1, -1, -1):
            trace = fwd.traces[l]
            self.cell.adjoint(p.layer(l), fwd.Z[l], fwd.dx[l], trace, seeds, every,
                              fwd.active)
            if l:  # the seeds of the layer below: U_l^T delta_in_t, for every step
                seeds = _input_seeds(p.layer(l).U, trace.delta_in, fwd.active)
                every = True

    def layer_sums(self, fwd: Forward, l: int, vocab: int = 0,
                   columns: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The gradient sums of layer ``l`` after :meth:`adjoint` (float64):

        ``D`` ``[G h, dx + 1 + h]`` = ``sum_t delta_in_t [x_t; 1]^T`` beside
        ``sum_t delta_hh_t s_{t-1}^T`` (the columns of ``z_t``), i.e. ``[dU db dW]`` (dU
        empty for tokens); ``Dx`` ``[G h, vocab]`` the token segment sums (tokens);
        ``bh`` the candidate's recurrent bias sum (GRU). The sums run over the real
        steps of every sample (:meth:`Forward.packed`). ``columns`` (sorted token ids
        holding every token of the batch): ``Dx`` is ``[G h, len(columns)]``, the
        columns of those tokens only."""
        trace, h, dx = fwd.traces[l], fwd.h, fwd.dx[l]
        zc = fwd.packed(fwd.regressors(l))
        d_in = fwd.packed(trace.delta_in)
        D = _gram(d_in, zc)
        out = {"D": D}
        split = self.cell.split(h)
        if split is not None:  # the candidate's recurrent columns from delta_hh
            d_hh = fwd.packed(trace.delta_hh)
            D[split, dx + 1:] = _gram(d_hh, zc[dx + 1:])
            out["bh"] = d_hh.sum(axis=1, dtype=np.float64)
        if l == 0 and fwd.tokens is not None:
            tokens = fwd.packed(fwd.tokens)
            if columns is not None:
                tokens, vocab = np.searchsorted(columns, tokens), len(columns)
            out["Dx"] = kernels.segment_sum_columns(tokens[None], d_in[None], vocab)
        return out

    def gradients(self, p: Params, batch: LocalData, loss: str,
                  dtype: np.dtype = np.float64,
                  columns: np.ndarray | None = None) -> Gradients:
        """Mean loss of ``batch`` and its BPTT gradient with respect to every weight:
        ``L = 1/R sum`` over the ``R`` real output rows (``n |O|`` without lengths) of
        ``l(o_t, y_t)``, from one forward pass and one adjoint recursion seeded with
        ``delta = dL/do``; the weight gradients are :meth:`layer_sums` and ``[dV dc] =
        sum_{t in O} delta_t [s_t; 1]^T``. Computed in ``dtype``, returned in float64.
        With lengths, BPTT of every sequence over its own real steps. Token inputs with
        ``columns`` (sorted ids holding every token of the batch): the first layer's
        ``U`` gradient is ``[G h, len(columns)]``, its columns at those tokens (the
        others are zero), so that a step costs the batch's tokens, not the vocabulary."""
        info = batch.info
        batch = by_length(batch)
        steps, n = batch.inputs.shape[:2]
        outs = batch.targets.shape[0]
        if outs not in (1, steps) or batch.targets.shape[1] != n:
            raise ValueError(f"targets shape {batch.targets.shape} does not fit inputs "
                             f"{batch.inputs.shape}")
        # info.has_lengths, not batch.lengths (by_length drops equal lengths): the same
        # layout on every rank, whatever lengths its batch holds
        many = outs == steps and steps > 1 or info.many_to_many and info.has_lengths
        pc = p.astype(np.dtype(dtype))
        fwd = self.forward(pc, batch, side_by_side_layout=True)
        delta = fwd.outputs(pc, many)
        mask = real_rows(batch.lengths, many, steps)
        rows = delta.shape[0] * delta.shape[1] if mask is None else int(mask.sum())
        total = loss_delta(delta, batch.targets, loss, 1.0 / rows, mask)
        self.adjoint(pc, fwd, delta, many)
        grads = {}
        for l in range(self.layers):
            sums = self.layer_sums(fwd, l, info.dim, columns)
            D, dx = sums["D"], fwd.dx[l]
            dU = sums["Dx"] if "Dx" in sums else D[:, :dx]
            layer = Layer(np.ascontiguousarray(dU), D[:, dx + 1:].copy(), D[:, dx].copy(),
                          sums.get("bh"))
            grads.update({layer_name(k, l): v for k, v in layer.arrays().items()})
        s_out = readout(fwd.states, many, batch.lengths)
        grads["V"] = _gram(side_by_side(delta.transpose(0, 2, 1)), side_by_side(s_out))
        grads["c"] = delta.reshape(-1, delta.shape[-1]).sum(axis=0, dtype=np.float64)
        d_top = fwd.traces[-1].delta_in
        norms = np.zeros(info.steps)  # 0 past the batch's longest sequence
        if fwd.active is None:
            norms[:steps] = np.sqrt(np.einsum("thn,thn->tn", d_top, d_top)).sum(axis=1)
        else:  # the real steps' columns
            for t, (a, _) in enumerate(spans(steps, n, fwd.active)):
                d = d_top[t, :, :a]
                norms[t] = np.sqrt(np.einsum("hn,hn->n", d, d)).sum()
        return Gradients(total / rows, Params({k: grads[k] for k in p.names()}), norms, rows)

    def bytes_per_sample(self, info: DatasetInfo, h: int, itemsize: int) -> int:
        """Bytes of one sample's forward pass and adjoint (the most a mini-batch step or
        a BPTT gradient holds at once): every layer's stacked state ``[T + 1, d_l + 1 +
        h]`` and trace (``Cell.trace_blocks`` blocks of ``[T, h]``: the gated cells'
        activated gates, an LSTM's cell states and their tanh, a GRU's recurrent
        candidate product), the outputs ``[|O|, K]`` and a copy of their adjoints, the
        head's seeds ``V^T delta`` ``[|O|, h]`` and, above one layer, the seeds ``U^T
        delta_in`` ``[T, h]`` of the layer below (two alive while the next is formed).
        With lengths (at most T real steps each) also :func:`by_length`'s reordered
        inputs and the packed copies of a layer's regressors and adjoints
        (:func:`packed`)."""
        outs = info.steps if info.many_to_many else 1
        dz = input_rows(info)
        rows = (dz + 1 + h) + (self.layers - 1) * (2 * h + 1)
        trace = info.steps * self.cell.trace_blocks * h * self.layers
        seeds = outs * h + info.steps * h * min(self.layers - 1, 2)
        packed = 0
        if info.has_lengths:
            width = max(dz + 1 + h, 2 * h + 1 if self.layers > 1 else 0)
            adjoints = (self.cell.gates + (self.cell.split_rows is not None)) * h
            packed = info.steps * (max(dz, 1) + width + adjoints)
        return ((info.steps + 1) * rows + trace + 2 * outs * info.classes + seeds
                + packed) * itemsize

    def eval_block(self, info: DatasetInfo, h: int, itemsize: int) -> int:
        """Samples per forward pass of an evaluation: at most :data:`EVAL_BLOCK`, and at
        most :data:`EVAL_BYTES` of them (long sequences)."""
        return max(1, min(EVAL_BLOCK, EVAL_BYTES // self.bytes_per_sample(info, h, itemsize)))

    def loss_sums(self, params: Params, data: LocalData, loss: str,
                  dtype: np.dtype = np.float64) -> np.ndarray:
        """Local sums ``[loss, correct, count]`` over this rank's real output rows
        (float64), ready to be reduced; mean loss = loss / count, accuracy = correct /
        count. Forward passes over blocks of :meth:`eval_block` samples, so evaluating a
        large split never holds the states of all its samples."""
        n = data.inputs.shape[1]
        p = params.astype(np.dtype(dtype))
        size = self.eval_block(data.info, params.hidden, np.dtype(dtype).itemsize)
        many = data.info.many_to_many
        out = np.zeros(3)
        for lo in range(0, n, size):
            block = data if n <= size else LocalData(
                data.info, data.inputs[:, lo:lo + size], data.targets[:, lo:lo + size], 0,
                min(n - lo, size), None if data.lengths is None else data.lengths[lo:lo + size])
            block = by_length(block)
            o = self.forward(p, block).outputs(p, many)
            y = block.targets
            mask = real_rows(block.lengths, many, o.shape[0])
            o, y = (o.reshape(-1, o.shape[-1]), y.reshape(-1)) if mask is None else (o[mask],
                                                                                   y[mask])
            total, correct = kernels.loss_and_correct(o, y, LOSSES[loss])
            out += (total, float(correct), float(o.shape[0]))
        return out

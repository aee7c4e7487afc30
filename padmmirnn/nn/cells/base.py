"""What a recurrent cell offers the network, the ADMM step, BPTT, evaluation and export.

A layer with ``h`` units and a cell of ``G`` gate blocks (``Cell.gates``) computes, for
its input ``x_t`` (``d`` rows: the data, or the states of the layer below) and its
previous state ``s_{t-1}``, the gate-stacked pre-activations

    P_t = U x_t + b + W s_{t-1}          ([G h, n], one product with z_t = [x_t; 1; s_{t-1}])

and its state ``s_t`` from them (and, for an LSTM, its cell state). The layer's stacked
state ``Z`` ``[T + 1, d + 1 + h, n]`` (feature-major, samples as columns) holds
``z_t = [x_t; 1; s_{t-1}]`` in ``Z[t]`` and ``s_T`` in ``Z[T]``: the cell writes each
``s_t`` into ``Z[t + 1, d + 1:]``. Token inputs (the first layer only) have ``d = 0`` in
``Z``: ``U x_t`` is the gather of U's columns of the token ids.

The adjoint recursion runs backward in time from *seeds* ``g_t = dL/ds_t`` coming from
outside the layer (the output head, the layer above) and returns the adjoints of the
pre-activations,

    delta_in_t = dL/d(U x_t + b),    delta_hh_t = dL/d(W s_{t-1} (+ b_h)),

which are the same array except where a gate multiplies the recurrent product (the
GRU's candidate: ``Cell.split_rows``). Every weight gradient, and every statistic of the
ADMM block step, is a sum of their outer products with the regressors:

    dU = sum_t delta_in_t x_t^T,  db = sum_t delta_in_t,  dW = sum_t delta_hh_t s_{t-1}^T,

and ``x_t``'s adjoint, the seed of the layer below, is ``U^T delta_in_t``. With seeds
``-dl/ds`` the same recursion gives the KKT multipliers of docs/design.md, section 4.

A new cell is one module with a subclass of :class:`Cell`: its weight shapes and
initialisation, :meth:`Cell.forward`, :meth:`Cell.adjoint`, and which rows (if any) have
a separate recurrent adjoint (:attr:`Cell.split_rows`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from padmmirnn.nn.params import Layer


def scratch(steps: int, rows: int, n: int, dtype: np.dtype, side_by_side: bool) -> np.ndarray:
    """A ``[T, rows, n]`` work array; ``side_by_side``: memory ``[rows, T, n]``, so that
    its ``[rows, T n]`` view (a sum over steps of products as one product) is free."""
    if side_by_side:
        return np.empty((rows, steps, n), dtype).transpose(1, 0, 2)
    return np.empty((steps, rows, n), dtype)


def side_by_side(a: np.ndarray) -> np.ndarray:
    """``[T, q, n]`` steps side by side as one ``[q, T n]`` matrix (a view when the steps
    of a row are adjacent in memory, as :func:`scratch` lays them out)."""
    steps, q, n = a.shape
    return a.transpose(1, 0, 2).reshape(q, steps * n)


def spans(steps: int, n: int, active: Sequence[int] | None) -> list[tuple[int, int]]:
    """Per step t, ``(a_t, b_t)``: the columns ``[:a_t]`` are active at step t and
    ``[:b_t]`` also at t + 1 (``b_{T-1} = 0``), so ``[b_t:a_t]`` end at t. ``active``:
    ``n_t`` = the samples with ``L_i > t`` when they are ordered by decreasing length
    (a prefix of the columns), None: every column at every step."""
    counts = [n] * steps if active is None else list(active)
    return [(counts[t], counts[t + 1] if t + 1 < steps else 0) for t in range(steps)]


def gate_scale(h: int, dtype: np.dtype, gates: str = "ifgo") -> np.ndarray:
    """``[G h]`` row factors of the gate-stacked weights: 1/2 on the sigmoid gates (every
    gate but ``g`` of an LSTM, ``n`` of a GRU), 1 on the tanh ones; exact in binary
    floating point, so ``tanh`` of the scaled product is ``tanh(P / 2)`` to the bit."""
    return np.repeat(np.array([1.0 if g in "gn" else 0.5 for g in gates], dtype), h)


class Trace:
    """What one layer's forward pass keeps for its adjoint (a cell's own arrays), and
    the adjoint outputs ``delta_in`` / ``delta_hh`` ``[T, G h, n]``; ``cells`` the cell
    states ``[T + 1, h, n]`` of a cell that has them besides ``s_t`` (LSTM), whose
    ``cells[0]`` the caller may set to start from a given state (0 otherwise)."""

    delta_in: np.ndarray
    delta_hh: np.ndarray
    cells: np.ndarray | None = None


class Cell(ABC):
    """A recurrent cell: ``gates`` blocks of ``h`` rows in ``U``, ``W`` and ``b``, in
    PyTorch's gate order; ``split_rows`` the gate rows whose recurrent adjoint differs
    from the input one (``delta_hh`` != ``delta_in``), None if there are none;
    ``extra_bias`` whether the layer has ``bh`` (``[h]``, inside the candidate's reset
    product); ``trace_blocks`` the ``[T, h, n]`` blocks its :class:`Trace` holds."""

    name: ClassVar[str]
    gates: ClassVar[int]
    split_rows: ClassVar[slice | None] = None
    extra_bias: ClassVar[bool] = False
    activations: ClassVar[tuple[str, ...]] = ("tanh",)
    trace_blocks: ClassVar[int] = 1  # [T, h, n] blocks of a trace (for memory estimates)

    def __init__(self, activation: str = "tanh"):
        if activation not in self.activations:
            raise ValueError(f"model.activation = {activation!r} is not for model.cell = "
                             f"{self.name!r} (allowed: {', '.join(self.activations)})")
        self.activation = activation

    def split(self, h: int) -> slice | None:
        """The rows of :attr:`split_rows` for ``h`` units."""
        return None if self.split_rows is None else slice(self.split_rows.start * h,
                                                          self.split_rows.stop * h)

    def init_layer(self, rng: np.random.Generator, d: int, h: int, w_init: str,
                   scale: float) -> Layer:
        """Seeded initial weights: ``U ~ N(0, 1/d)``; each gate block of ``W`` orthogonal
        (or ``N(0, 1/h)``) times ``scale``; biases 0 (:meth:`initial_bias` may set
        some)."""
        G = self.gates
        U = rng.standard_normal((G * h, d)) / np.sqrt(d)
        blocks = []
        for _ in range(G):
            if w_init == "orthogonal":
                q, r = np.linalg.qr(rng.standard_normal((h, h)))
                blocks.append(q * np.sign(np.diag(r)))
            else:
                blocks.append(rng.standard_normal((h, h)) / np.sqrt(h))
        W = scale * np.concatenate(blocks, axis=0)
        return Layer(U, W, self.initial_bias(h), np.zeros(h) if self.extra_bias else None)

    def initial_bias(self, h: int) -> np.ndarray:
        return np.zeros(self.gates * h)

    @abstractmethod
    def trace(self, steps: int, h: int, n: int, dtype: np.dtype,
              side_by_side: bool) -> Trace:
        """Work arrays of one layer's forward pass and adjoint over ``n`` samples
        (``side_by_side``: the adjoints laid out for :func:`side_by_side`)."""

    @abstractmethod
    def forward(self, w: Layer, Z: np.ndarray, dx: int, tokens: np.ndarray | None,
                trace: Trace, zero_start: bool = True,
                active: Sequence[int] | None = None) -> None:
        """The layer's forward pass in place: ``Z[t + 1, dx + 1:] = s_t`` for t = 1..T
        from ``Z``'s inputs (``dx`` rows; ``tokens`` ``[T, n]`` ids when the inputs are
        tokens, ``dx = 0``) and the initial state ``Z[0, dx + 1:]`` (zero when
        ``zero_start``, which a cell may exploit), keeping in ``trace`` what
        :meth:`adjoint` needs. ``w`` in ``Z``'s dtype. ``active``: step t computes the
        columns ``[:n_t]`` only (:func:`spans`); the states of the others stay as they
        are (zero) and their trace columns are undefined."""

    @abstractmethod
    def adjoint(self, w: Layer, Z: np.ndarray, dx: int, trace: Trace, seeds: np.ndarray,
                every_step: bool, active: Sequence[int] | None = None) -> None:
        """The backward recursion: ``trace.delta_in``/``delta_hh`` from the seeds
        ``dL/ds_t`` (``seeds`` ``[T, h, n]`` if ``every_step``, else ``[1, h, n]`` at each
        sample's last step: t = T, or with ``active`` the step where its column leaves
        the active prefix, ``t = L_i``). With ``active``, step t computes the columns
        ``[:a_t]``; those that end there (``[b_t:a_t]``) start the recursion with no
        recurrent term (:func:`spans`)."""


def stacked_weights(w: Layer, tokens: bool, rows: slice = slice(None)) -> np.ndarray:
    """``[U b W]`` (``[b W]`` for token inputs) of the gate rows ``rows``: the matrix
    applied to ``z_t = Z[t, :dx + 1 + h]``."""
    cols = [w.b[rows, None], w.W[rows]]
    return np.concatenate(cols if tokens else [w.U[rows], *cols], axis=1)

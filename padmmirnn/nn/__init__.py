"""The model: cells (:mod:`.cells`), their weights (:mod:`.params`) and the network of
layers and an output head (:mod:`.network`), shared by ADMM, BPTT, evaluation, the API
and export.

The functions below take a network's weights and its activation and find the rest
(cell, layers) from the weights: ``loss_sums(params, data, "tanh", "ce")``.
"""

from __future__ import annotations

import numpy as np

from padmmirnn.nn.cells import CELLS, Cell, cell_name
from padmmirnn.nn.network import (
    LOSSES,
    Forward,
    Gradients,
    Network,
    by_length,
    head_seeds,
    input_rows,
    outputs,
    stacked_state,
    states_of,
)
from padmmirnn.nn.params import Layer, Params, layer_name
from padmmirnn.samples import LocalData


def init_params(d: int, h: int, k: int, seed: int, w_init: str, scale: float,
                cell: str = "rnn", layers: int = 1) -> Params:
    """Seeded initial weights of ``layers`` layers of ``cell`` (float64): ``U ~ N(0,
    1/d)``, ``W`` orthogonal per gate block (or ``N(0, 1/h)``) times ``scale``, ``V ~
    N(0, 1/h)``, biases 0 (an LSTM's forget gate 1)."""
    return Network.build(cell, "tanh", layers).init_params(
        d, h, k, seed, w_init, scale)


def forward(params: Params, data: LocalData, activation: str,
            dtype: np.dtype = np.float64) -> Forward:
    """The forward pass of ``params`` (cast to ``dtype``) over ``data``."""
    return Network.of(params, activation).forward(params.astype(np.dtype(dtype)), data)


def loss_sums(params: Params, data: LocalData, activation: str, loss: str,
              dtype: np.dtype = np.float64) -> np.ndarray:
    """``[loss sum, correct, rows]`` of ``params`` on ``data`` (:meth:`Network.loss_sums`)."""
    return Network.of(params, activation).loss_sums(params, data, loss, dtype)


def gradients(params: Params, batch: LocalData, activation: str, loss: str,
              dtype: np.dtype = np.float64) -> Gradients:
    """Mean loss of ``batch`` and its BPTT gradient (:meth:`Network.gradients`)."""
    return Network.of(params, activation).gradients(params, batch, loss, dtype)


__all__ = [
    "CELLS", "LOSSES", "Cell", "Forward", "Gradients", "Layer", "Network", "Params",
    "by_length", "cell_name", "forward", "gradients", "head_seeds", "init_params", "input_rows",
    "layer_name", "loss_sums", "outputs", "stacked_state", "states_of",
]

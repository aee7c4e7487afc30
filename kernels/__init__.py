"""Numba kernels of padmmirnn (imported as ``padmmirnn.kernels``).

Pure functions on NumPy arrays and scalars: no MPI, no files, no configuration
objects, no logging. Elementwise kernels take 2-D blocks of one shape (the ADMM
state is feature-major, ``[T, h, N]``: the caller passes one step ``[h, N]`` or a
reshaped view); per-row kernels (outputs, losses) take ``[rows, K]`` rows; the
gated cells' steps (``cells.py``) take a step's ``[G h, n]`` gate block and ``[h, n]``
state views. Every kernel is written for float32 and float64 alike (Numba compiles
one version per dtype) and is cached on disk.
"""

from padmmirnn.kernels.activation import (
    ACT_RELU,
    ACT_TANH,
    a_update,
    activation_residual,
)
from padmmirnn.kernels.cells import (
    gru_backward_step,
    gru_forward_gates,
    gru_forward_state,
    lstm_backward_step,
    lstm_forward_step,
)
from padmmirnn.kernels.elementwise import shifted, tanh_adjoint
from padmmirnn.kernels.output import (
    LOSS_CE,
    LOSS_MSE,
    loss_and_correct,
    o_update,
    output_delta,
)
from padmmirnn.kernels.tokens import (
    add_columns,
    segment_sum_columns,
    token_counts,
)

__all__ = [
    "ACT_RELU",
    "ACT_TANH",
    "LOSS_CE",
    "LOSS_MSE",
    "a_update",
    "activation_residual",
    "add_columns",
    "gru_backward_step",
    "gru_forward_gates",
    "gru_forward_state",
    "loss_and_correct",
    "lstm_backward_step",
    "lstm_forward_step",
    "o_update",
    "output_delta",
    "segment_sum_columns",
    "shifted",
    "tanh_adjoint",
    "token_counts",
]

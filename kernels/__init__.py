"""Numba kernels of padmmirnn (imported as ``padmmirnn.kernels``).

Pure functions on NumPy arrays and scalars: no MPI, no files, no configuration
objects, no logging. Arrays are 2-D row blocks ``[rows, features]``; the caller
reshapes its time-major ``[T, N, h]`` state into views before calling. Every
kernel is written for float32 and float64 alike (Numba compiles one version per
dtype) and is cached on disk.
"""

from padmmirnn.kernels.activation import (
    ACT_RELU,
    ACT_TANH,
    a_update,
    activation_residual,
)
from padmmirnn.kernels.elementwise import add_recurrent, shifted, tanh_adjoint
from padmmirnn.kernels.output import (
    LOSS_CE,
    LOSS_MSE,
    loss_and_correct,
    o_update,
)
from padmmirnn.kernels.tokens import gather_columns, segment_sum, token_counts

__all__ = [
    "ACT_RELU",
    "ACT_TANH",
    "LOSS_CE",
    "LOSS_MSE",
    "a_update",
    "activation_residual",
    "add_recurrent",
    "gather_columns",
    "loss_and_correct",
    "o_update",
    "segment_sum",
    "shifted",
    "tanh_adjoint",
    "token_counts",
]

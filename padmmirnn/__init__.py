"""padmmirnn: parallel ADMM training of recurrent neural networks (P-ADMMiRNN) over MPI.

Importing the package pins Numba, OpenMP and BLAS to one thread per process
unless the environment says otherwise (``PADMMIRNN_THREADS=N`` sets all of
them): MPI ranks and library threads fighting for the same cores made two ranks
nine times slower on a 2-core machine.

The Python API: ``padmmirnn.train(...)``, ``padmmirnn.load(path)`` (docs in
:mod:`padmmirnn.api`).
"""

import os as _os

from padmmirnn._version import __version__

_threads = _os.environ.get("PADMMIRNN_THREADS", "1")
for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "BLIS_NUM_THREADS"):
    _os.environ.setdefault(_var, _threads)

__all__ = ["Model", "Run", "__version__", "load", "train"]


def __getattr__(name: str):
    """The API (:mod:`padmmirnn.api`: ``train``, ``load``, ``Model``, ``Run``), imported
    on first use so that ``import padmmirnn`` stays light."""
    if name in ("Model", "Run", "load", "train"):
        from padmmirnn import api

        return getattr(api, name)
    raise AttributeError(f"module 'padmmirnn' has no attribute {name!r}")

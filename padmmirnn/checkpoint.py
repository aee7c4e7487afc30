"""HDF5 files of model state: the only module that writes weights and checkpoints.

Weights files hold ``U, W, b, V, c`` and, as attributes, what is needed to use
them again (activation, loss, input kind and sizes, the run's config and package
version). Files are written under a temporary name, fsynced and renamed, so a
reader never sees a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import h5py
import numpy as np

from padmmirnn._version import __version__
from padmmirnn.errors import PadmmError
from padmmirnn.model import Params


def _atomic_h5(path: Path, fill) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            fill(f)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(path: str | Path, params: Params, meta: dict) -> None:
    """Write the weights and ``meta`` (str/int/float/bool attributes) atomically."""
    def fill(f):
        for name, value in params.arrays().items():
            f.create_dataset(name, data=value)
        f.attrs["padmmirnn_version"] = __version__
        for key, value in meta.items():
            f.attrs[key] = value
    _atomic_h5(Path(path), fill)


def load_weights(path: str | Path) -> tuple[Params, dict]:
    """Read a weights file; raises :class:`PadmmError` with the file name if invalid."""
    p = Path(path)
    if not p.is_file():
        raise PadmmError(f"{path}: weights file not found")
    try:
        with h5py.File(p, "r") as f:
            arrays = [np.asarray(f[name][()], dtype=np.float64) for name in Params.NAMES]
            meta = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    except (OSError, KeyError) as exc:
        raise PadmmError(f"{path}: not a padmmirnn weights file ({exc})") from None
    return Params(*arrays), meta

"""HDF5 files of model state: the only module that writes weights and checkpoints.

Weights files hold the arrays of :class:`~padmmirnn.nn.Params` (``U, W, b, V, c`` for a
one-layer Elman RNN; their names in the attribute ``weight_names``) and, as attributes,
what is needed to use them again. Checkpoints (docs/design.md, section 8) add
everything needed to resume:

* ``weights/*``, ``state/*`` (per-sample ADMM arrays ``A, S, O, L1, L2, L3``,
  sample-major ``[N, ...]`` in **global sample order**, so a restart may use any
  rank count), ``ranks/*`` (per-rank arrays of the consensus modes, the duals, in rank
  order; its ``count`` the rank count they belong to), ``optimizer/*`` (gradient
  methods, the running Gram estimates of mini-batch ADMM), ``best/*`` (with a validation
  split: the weights of the best evaluation so far and, as attributes, the monitored
  metric, its value and iteration, that evaluation's metrics and the evaluations
  since it);
* attributes: iteration, elapsed seconds, config TOML and hash, package
  version, world size and the partition, and ``complete = 1`` written last.

Per-sample arrays are gathered to rank 0 one at a time (the h5py wheel has no
MPI-IO) and written into one file under a temporary name, fsynced and renamed:
a reader never sees a half-written checkpoint, and a job killed while writing
leaves the previous one intact. Every dataset carries a Fletcher-32 checksum,
so a corrupt file is detected on read; :func:`find_latest` skips it with a
warning and falls back to the previous checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np

from padmmirnn._version import __version__
from padmmirnn.atomic import atomic_h5
from padmmirnn.errors import PadmmError
from padmmirnn.logs import get_logger
from padmmirnn.nn import Params

CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{8})\.h5$")


ELMAN_NAMES = ("U", "W", "b", "V", "c")  # files written before ``weight_names``


def save_weights(path: str | Path, params: Params, meta: dict,
                 strings: dict[str, list[str]] | None = None) -> None:
    """Write the weights, ``meta`` (str/int/float/bool attributes) and ``strings``
    (string tables such as ``vocabulary`` and ``class_names``) atomically."""
    def fill(f):
        for name, value in params.arrays().items():
            f.create_dataset(name, data=value)
        f.attrs["weight_names"] = ",".join(params.names())
        f.attrs["padmmirnn_version"] = __version__
        for key, value in meta.items():
            f.attrs[key] = value
        for key, table in (strings or {}).items():
            f.create_dataset(key, data=np.array(table, dtype=h5py.string_dtype()))
    with atomic_h5(path) as f:
        fill(f)


def _attrs(f) -> dict:
    def plain(v):
        if isinstance(v, np.ndarray):
            return v.item() if v.size == 1 else v.tolist()
        return v.item() if hasattr(v, "item") else v
    return {k: plain(v) for k, v in f.attrs.items()}


def load_weights(path: str | Path) -> tuple[Params, dict]:
    """Read a weights file or a checkpoint's weights; raises :class:`PadmmError`."""
    p = Path(path)
    if not p.is_file():
        raise PadmmError(f"{path}: weights file not found")
    try:
        with h5py.File(p, "r") as f:
            group = f["weights"] if "weights" in f else f
            params = _read_params(group)
            meta = _attrs(f)
    except (OSError, KeyError) as exc:
        raise PadmmError(f"{path}: not a padmmirnn weights file or checkpoint ({exc})") from None
    return params, meta


def _read_params(group) -> Params:
    """The weight arrays of ``group``, in the order of its ``weight_names``."""
    names = str(group.attrs.get("weight_names", ",".join(ELMAN_NAMES))).split(",")
    return Params({k: np.asarray(group[k][()], np.float64) for k in names})


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_path(directory: Path, iteration: int) -> Path:
    return directory / f"ckpt-{iteration:08d}.h5"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory``, newest (highest iteration) first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def write_checkpoint(comm, directory: Path, iteration: int, *, params: Params,
                     per_sample: dict[str, np.ndarray], arrays: dict[str, np.ndarray],
                     attrs: dict, n_global: int, keep: int,
                     per_rank: dict[str, np.ndarray] | None = None, ranks: int = 0,
                     best: tuple[Params | None, dict] | None = None) -> Path:
    """Collective: write checkpoint ``iteration`` and keep the newest ``keep``.

    ``per_sample`` maps a name to this rank's sample-major block ``[n_local, ...]``
    (ranks hold consecutive blocks in rank order); ``per_rank`` likewise to the rows of
    this process's (virtual) ranks out of ``ranks`` (consensus duals, ``ranks/*``);
    ``arrays`` are small global arrays (optimizer state) identical on every rank;
    ``best`` is the best-so-far state of :class:`~padmmirnn.trainer.BestSoFar` (its
    weights, or None before the first evaluation, and attributes), also identical on
    every rank. An error on rank 0 is raised on every rank."""
    path = checkpoint_path(directory, iteration)
    error = None
    if comm.rank == 0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            error = f"cannot create checkpoint folder {directory}: {exc}"
    error = comm.bcast(error)
    if error:
        raise PadmmError(error)

    def fill(f):
        w = f.create_group("weights")
        for name, value in params.arrays().items():
            w.create_dataset(name, data=value, fletcher32=True, chunks=True)
        w.attrs["weight_names"] = ",".join(params.names())
        opt = f.create_group("optimizer")
        for name, value in arrays.items():
            if np.ndim(value):
                opt.create_dataset(name, data=value, fletcher32=True, chunks=True)
            else:
                opt.attrs[name] = value  # scalars (step counts) as attributes
        groups = {"state": f.create_group("state"), "ranks": f.create_group("ranks")}
        groups["ranks"].attrs["count"] = ranks
        for group, name, block, total in items:
            whole = comm.gather_samples(block, total)
            gathered.append(name)
            groups[group].create_dataset(name, data=whole, fletcher32=True, chunks=True)
        if best is not None:
            group = f.create_group("best")
            if best[0] is not None:
                for name, value in best[0].arrays().items():
                    group.create_dataset(name, data=value, fletcher32=True, chunks=True)
                group.attrs["weight_names"] = ",".join(best[0].names())
            for key, value in best[1].items():
                group.attrs[key] = value
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["iteration"] = iteration
        f.attrs["n_global"] = n_global
        f.attrs["padmmirnn_version"] = __version__
        f.attrs["complete"] = 1

    items = [("state", k, per_sample[k], n_global) for k in sorted(per_sample)]
    items += [("ranks", k, v, ranks) for k, v in sorted((per_rank or {}).items())]
    gathered: list[str] = []
    if comm.rank == 0:
        try:
            with atomic_h5(path) as f:
                fill(f)
            _prune(directory, iteration, keep)
        except Exception as exc:  # report on every rank, do not leave others waiting
            error = f"writing checkpoint {path} failed: {exc}"
            for _, _, block, total in items[len(gathered):]:  # the others wait in these
                comm.gather_samples(block, total)
    else:
        for _, _, block, total in items:
            comm.gather_samples(block, total)
    error = comm.bcast(error)
    if error:
        raise PadmmError(error)
    return path


def _prune(directory: Path, iteration: int, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints up to ``iteration`` (the one just written
    among them); later ones belong to a run that was resumed from an earlier point."""
    newer_first = list_checkpoints(directory)
    later = [p for p in newer_first if int(CHECKPOINT_NAME.match(p.name).group(1)) > iteration]
    earlier = [p for p in newer_first if p not in later]
    for old in later + earlier[keep:]:
        old.unlink(missing_ok=True)


def verify_checkpoint(path: Path) -> str | None:
    """None if ``path`` is a complete checkpoint whose checksums all verify, else why not."""
    try:
        with h5py.File(path, "r") as f:
            if int(f.attrs.get("complete", 0)) != 1:
                return "incomplete (no 'complete' attribute)"
            for group in ("weights", "state", "ranks", "optimizer", "best"):
                if group not in f and group in ("ranks", "best"):
                    continue
                for ds in f[group].values():
                    # reading verifies the Fletcher-32 checksum of every chunk; one chunk
                    # at a time, so a large checkpoint is not held in memory
                    for chunk in (ds.iter_chunks() if ds.chunks else [()]):
                        ds[chunk]
    except (OSError, KeyError, ValueError) as exc:
        return f"unreadable ({exc})"
    return None


def find_latest(directory: Path) -> Path | None:
    """The newest checkpoint that verifies; corrupt ones are skipped with a warning."""
    log = get_logger()
    for path in list_checkpoints(directory):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is %s: skipping it", path, problem)
    return None


def read_checkpoint(path: Path, start: int, stop: int,
                    ranks: tuple[int, range] | None = None) -> tuple[Params, dict, dict, dict]:
    """Weights, attributes, optimizer arrays and this rank's slice ``[start, stop)`` of
    every per-sample array (sample-major); with ``ranks`` = (count, this process's
    ranks), also the rows of those ranks of every per-rank array (``ranks/*``, under
    ``"per_rank"`` in the last dict) if the checkpoint has as many ranks."""
    with h5py.File(path, "r") as f:
        params = _read_params(f["weights"])
        attrs = _attrs(f)
        opt = {**_attrs(f["optimizer"]), **{k: ds[()] for k, ds in f["optimizer"].items()}}
        state = {k: ds[start:stop] for k, ds in f["state"].items()}
        group = f.get("ranks")
        if ranks is not None and group is not None and int(group.attrs["count"]) == ranks[0]:
            mine = ranks[1]
            state["per_rank"] = {k: ds[mine.start:mine.stop] for k, ds in group.items()}
    return params, attrs, opt, state


def read_best(path: Path) -> tuple[Params | None, dict] | None:
    """The best-so-far state of a checkpoint (see :func:`write_checkpoint`), or None
    when it has none (a run without a validation split)."""
    with h5py.File(path, "r") as f:
        if "best" not in f:
            return None
        group = f["best"]
        params = _read_params(group) if "weight_names" in group.attrs else None
        return params, _attrs(group)


def describe_checkpoint(path: Path) -> str:
    """A human-readable listing of what a checkpoint holds."""
    problem = verify_checkpoint(path)
    lines = [f"checkpoint {path}", f"  integrity: {'ok' if problem is None else problem}"]
    try:
        with h5py.File(path, "r") as f:
            for key, value in sorted(_attrs(f).items()):
                if key == "config_toml":
                    continue
                lines.append(f"  {key}: {value}")
            for group in ("weights", "state", "ranks", "optimizer", "best"):
                if group in f:
                    for name, ds in f[group].items():
                        lines.append(f"  {group}/{name}: {ds.shape} {ds.dtype}")
            if "config_toml" in f.attrs:
                lines.append("  config:")
                lines.extend("    " + ln for ln in str(f.attrs["config_toml"]).splitlines())
    except OSError as exc:
        lines.append(f"  cannot open: {exc}")
    return "\n".join(lines)

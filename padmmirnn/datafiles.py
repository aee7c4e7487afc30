"""Datasets in the canonical HDF5 format (docs/design.md, section 9) and rank slices.

A dataset split is one HDF5 file with

* ``inputs``: ``[N, T, d]`` float32 (dense) or ``[N, T]`` int32 tokens;
* ``targets``: ``[N]`` int (one label per sequence, output at t = T) or
  ``[N, T]`` int (a label per step);
* ``lengths`` (optional): ``[N]`` int, each in [1, T]: steps ``0 .. L_i - 1`` of
  sample i are real, the rest padding; without it every sample has length T;
* attributes ``kind`` ("dense" or "tokens"), ``classes``, ``vocab`` (tokens),
  ``source``, ``license``.

Each rank reads only its contiguous slice ``[r N / p, (r + 1) N / p)`` of the
global sample order, converted to time-major arrays for the engine.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import h5py
import numpy as np

from padmmirnn.atomic import atomic_h5
from padmmirnn.errors import DataError
from padmmirnn.samples import DatasetInfo, LocalData

BUILTIN = {
    "default": ("mnist_rows_train.h5", "mnist_rows_test.h5"),
    "mnist-rows": ("mnist_rows_train.h5", "mnist_rows_test.h5"),
}


def builtin_path(filename: str) -> Path:
    return Path(str(resources.files("padmmirnn.datasets").joinpath(filename)))


def resolve(dataset: str, test: str = "") -> tuple[str, str | None]:
    """Map a dataset name or path to (train file, test file or None).

    A path ``X_train.h5`` pairs with ``X_test.h5`` beside it when that exists and
    no test file is named.
    """
    if dataset in BUILTIN:
        train_name, test_name = BUILTIN[dataset]
        return str(builtin_path(train_name)), test or str(builtin_path(test_name))
    path = Path(dataset)
    if not path.exists():
        known = ", ".join(BUILTIN)
        raise DataError(f"dataset not found: {dataset} (not a file, nor a built-in: {known})")
    if test:
        return str(path), test
    if path.name.endswith("_train.h5"):
        sibling = path.with_name(path.name[: -len("_train.h5")] + "_test.h5")
        if sibling.exists():
            return str(path), str(sibling)
    return str(path), None


def read_info(path: str) -> DatasetInfo:
    """Open ``path`` and check its structure; raises :class:`DataError` naming it."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: dataset file not found")
    if p.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        for name in ("inputs", "targets"):
            if name not in f:
                raise DataError(f"{path}: missing dataset '{name}'")
        x, y = f["inputs"], f["targets"]
        kind = str(f.attrs.get("kind", "tokens" if x.ndim == 2 else "dense"))
        if kind not in ("dense", "tokens"):
            raise DataError(f"{path}: attribute kind must be 'dense' or 'tokens', got {kind!r}")
        want = 3 if kind == "dense" else 2
        if x.ndim != want:
            raise DataError(
                f"{path}: inputs must be {'[N, T, d]' if want == 3 else '[N, T]'} for kind "
                f"'{kind}', got shape {x.shape}"
            )
        if kind == "dense" and x.dtype.kind != "f":
            raise DataError(f"{path}: dense inputs must be floating point, got {x.dtype}")
        if kind == "tokens" and x.dtype.kind not in "iu":
            raise DataError(f"{path}: token inputs must be integers, got {x.dtype}")
        if y.dtype.kind not in "iu":
            raise DataError(f"{path}: targets must be integer class labels, got {y.dtype}")
        n, steps = x.shape[0], x.shape[1]
        if n == 0 or steps == 0:
            raise DataError(f"{path}: inputs are empty, shape {x.shape}")
        if y.shape not in ((n,), (n, steps)):
            raise DataError(
                f"{path}: targets shape {y.shape} does not match inputs {x.shape} "
                f"(expected ({n},) or ({n}, {steps}))"
            )
        has_lengths = "lengths" in f
        if has_lengths:
            check_lengths(path, f["lengths"], n, steps)
        if "classes" not in f.attrs:
            raise DataError(f"{path}: missing attribute 'classes'")
        classes = int(f.attrs["classes"])
        if kind == "tokens":
            if "vocab" not in f.attrs:
                raise DataError(f"{path}: token dataset is missing attribute 'vocab'")
            dim = int(f.attrs["vocab"])
        else:
            dim = int(x.shape[2])
        if classes < 2 or dim < 1:
            raise DataError(f"{path}: needs classes >= 2 and input size >= 1")
        return DatasetInfo(str(p), n, steps, dim, classes, kind, y.ndim == 2, has_lengths)


def check_lengths(origin: str, lengths, n: int, steps: int) -> np.ndarray:
    """The ``lengths`` dataset (or array) of a split of ``n`` sequences of ``steps``:
    shape ``[n]``, integers, every value in [1, T]. Returns it as int32; raises
    :class:`DataError` naming ``origin`` and the first bad sample. Read whole: it is
    one integer per sample, and every rank checks all of it, so a bad value stops
    every rank alike."""
    if lengths.shape != (n,):
        raise DataError(f"{origin}: lengths shape {tuple(lengths.shape)} does not match "
                        f"inputs of {n} sequences (expected ({n},))")
    if lengths.dtype.kind not in "iu":
        raise DataError(f"{origin}: lengths must be integers, got {lengths.dtype}")
    values = np.asarray(lengths)
    bad = np.flatnonzero((values < 1) | (values > steps))
    if bad.size:
        raise DataError(f"{origin}: lengths must lie in [1, {steps}] (T), found "
                        f"{int(values[bad[0]])} at sample {int(bad[0])}")
    return values.astype(np.int32)


def read_lengths(info: DatasetInfo) -> np.ndarray | None:
    """The whole ``[N]`` lengths of a checked file (int32), or None when it has none."""
    if not info.has_lengths:
        return None
    with h5py.File(info.path, "r") as f:
        return np.asarray(f["lengths"][()], np.int32)


def read_slice(info: DatasetInfo, start: int, stop: int, dtype: np.dtype) -> LocalData:
    """Read samples ``[start, stop)`` of a checked file and validate their values."""
    path = info.path
    with h5py.File(path, "r") as f:
        x = f["inputs"][start:stop]
        y = f["targets"][start:stop]
        lengths = (np.asarray(f["lengths"][start:stop], np.int32) if info.has_lengths
                   else None)
    if info.kind == "dense":
        if not np.isfinite(x).all():
            bad = start + int(np.argwhere(~np.isfinite(x))[0][0])
            raise DataError(f"{path}: inputs contain NaN or inf (first at sample {bad})")
        inputs = np.ascontiguousarray(x.transpose(1, 0, 2), dtype=dtype)
    else:
        if x.size and (x.min() < 0 or x.max() >= info.dim):
            raise DataError(f"{path}: token ids must lie in [0, {info.dim}), found "
                            f"[{x.min()}, {x.max()}]")
        inputs = np.ascontiguousarray(x.T, dtype=np.int32)
    if y.size and (y.min() < 0 or y.max() >= info.classes):
        raise DataError(
            f"{path}: labels must lie in [0, {info.classes}), found [{y.min()}, {y.max()}]"
        )
    targets = np.ascontiguousarray(y.T if y.ndim == 2 else y[None, :], dtype=np.int32)
    return LocalData(info, inputs, targets, start, stop, lengths)


def make_adding(n: int, steps: int, seed: int, classes: int = 10
                ) -> tuple[np.ndarray, np.ndarray]:
    """The adding problem (Hochreiter & Schmidhuber), as classification.

    Input ``[n, steps, 2]``: a value u_t ~ U(0, 1) and a marker that is 1 at one
    random step of the first half and one of the second half. The target sum of
    the two marked values (in [0, 2)) is quantised into ``classes`` equal bins, so
    the class depends on inputs up to ``steps`` steps back.
    """
    rng = np.random.default_rng([seed, steps, n])
    x = np.zeros((n, steps, 2), np.float32)
    x[:, :, 0] = rng.random((n, steps))
    half = steps // 2
    first = rng.integers(0, half, n)
    second = rng.integers(half, steps, n)
    rows = np.arange(n)
    x[rows, first, 1] = 1.0
    x[rows, second, 1] = 1.0
    total = x[rows, first, 0].astype(np.float64) + x[rows, second, 0]
    y = np.minimum((total / 2.0 * classes).astype(np.int32), classes - 1)
    return x, y


def write_dataset(
    path: str | Path,
    inputs: np.ndarray,
    targets: np.ndarray,
    *,
    classes: int,
    vocab: int | None = None,
    source: str = "",
    license: str = "",
    extra: dict | None = None,
    lengths: np.ndarray | None = None,
) -> None:
    """Write a split atomically (temporary file in the same folder, then rename);
    ``lengths`` (``[N]``, each in [1, T]; None: all T) is checked before anything is
    written."""
    lengths = _checked_lengths(path, inputs, lengths)
    with atomic_h5(path) as f:
        _fill_split(f, inputs, targets, classes, vocab, source, license, extra, lengths)


def write_dataset_with_names(
    path: str | Path,
    inputs: np.ndarray,
    targets: np.ndarray,
    *,
    classes: int,
    vocabulary: list[str] | None = None,
    class_names: list[str] | None = None,
    source: str = "",
    license: str = "",
    extra: dict | None = None,
    lengths: np.ndarray | None = None,
) -> None:
    """Like :func:`write_dataset`, plus the token strings (dataset ``vocabulary``, in id
    order; attribute ``vocab`` is its length) and the label names (``class_names``)."""
    vocab = None if vocabulary is None else len(vocabulary)
    lengths = _checked_lengths(path, inputs, lengths)
    with atomic_h5(path) as f:
        _fill_split(f, inputs, targets, classes, vocab, source, license, extra, lengths)
        for name, strings in (("vocabulary", vocabulary), ("class_names", class_names)):
            if strings is not None:
                f.create_dataset(name, data=np.array(strings, dtype=h5py.string_dtype()))


def _checked_lengths(path: str | Path, inputs: np.ndarray,
                     lengths: np.ndarray | None) -> np.ndarray | None:
    """``lengths`` checked against ``inputs`` before a file is opened (a bad value
    leaves nothing behind)."""
    if lengths is None:
        return None
    return check_lengths(str(path), np.asarray(lengths), len(inputs), inputs.shape[1])


def _fill_split(f: h5py.File, inputs: np.ndarray, targets: np.ndarray, classes: int,
                vocab: int | None, source: str, license: str, extra: dict | None,
                lengths: np.ndarray | None = None) -> None:
    opts = dict(compression="gzip", compression_opts=6, shuffle=True)
    f.create_dataset("inputs", data=inputs, chunks=True, **opts)
    f.create_dataset("targets", data=targets, chunks=True, **opts)
    if lengths is not None:
        f.create_dataset("lengths", data=lengths, chunks=True, **opts)
    f.attrs["kind"] = "tokens" if inputs.ndim == 2 else "dense"
    f.attrs["classes"] = int(classes)
    if vocab is not None:
        f.attrs["vocab"] = int(vocab)
    f.attrs["source"] = source
    f.attrs["license"] = license
    for key, value in (extra or {}).items():
        f.attrs[key] = value


def read_strings(path: str, name: str) -> list[str] | None:
    """The string table ``name`` (``vocabulary`` or ``class_names``) of a dataset file,
    or None when the file has none."""
    with h5py.File(path, "r") as f:
        if name not in f:
            return None
        return [s.decode() if isinstance(s, bytes) else str(s) for s in f[name][()]]


def describe(path: str) -> str:
    """A human-readable summary of a dataset file: shapes, classes and their balance,
    vocabulary, source and licence (``padmmirnn data inspect``)."""
    info = read_info(path)
    with h5py.File(path, "r") as f:
        x, y = f["inputs"], f["targets"]
        lines = [f"{path}",
                 f"  kind: {info.kind}, {'many-to-many' if info.many_to_many else 'many-to-one'}",
                 f"  inputs: {list(x.shape)} {x.dtype}   targets: {list(y.shape)} {y.dtype}",
                 f"  samples: {info.n}   steps: {info.steps}   "
                 f"{'vocab' if info.kind == 'tokens' else 'features'}: {info.dim}"]
        if info.has_lengths:
            lengths = np.asarray(f["lengths"][()])
            lines.append(f"  lengths: {lengths.min()}..{lengths.max()}, median "
                         f"{np.median(lengths):g}, mean {lengths.mean():.1f}; "
                         f"{100.0 * np.mean(lengths < info.steps):.1f}% shorter than T "
                         f"({100.0 * (1 - lengths.sum() / (info.n * info.steps)):.1f}% of "
                         f"the steps are padding)")
        counts = np.bincount(np.asarray(y[()]).ravel().clip(0), minlength=info.classes)
        attrs = {k: f.attrs[k] for k in f.attrs if k not in ("kind", "classes", "vocab")}
    names = read_strings(path, "class_names") or read_strings(path, "vocabulary")
    lines.append(f"  classes: {info.classes}")
    lines.append("  balance: " + _balance(counts, names))
    vocabulary = read_strings(path, "vocabulary")
    if vocabulary is not None:
        shown = " ".join(_show(t) for t in vocabulary[:20])
        lines.append(f"  vocabulary ({len(vocabulary)}): {shown}"
                     + (" ..." if len(vocabulary) > 20 else ""))
    for key in sorted(attrs, key=lambda k: (k not in ("source", "license"), k)):
        lines.append(f"  {key}: {attrs[key]}")
    return "\n".join(lines)


def _balance(counts: np.ndarray, names: list[str] | None, top: int = 10) -> str:
    """Share of each class (the ``top`` most frequent when there are many)."""
    total = max(int(counts.sum()), 1)
    order = np.argsort(-counts, kind="stable")[:top] if len(counts) > top else range(len(counts))
    parts = []
    for c in order:
        label = _show(names[c]) if names is not None and c < len(names) else str(c)
        parts.append(f"{label} {int(counts[c])} ({100.0 * counts[c] / total:.1f}%)")
    more = f", ... ({len(counts) - top} more classes)" if len(counts) > top else ""
    return ", ".join(parts) + more


def _show(token: str) -> str:
    """A token as printed by inspect: quoted when it is empty or holds whitespace."""
    plain = token.isprintable() and not any(c.isspace() for c in token)
    return token if plain and token else repr(token)


def builtin_listing() -> str:
    """The built-in dataset names and what they hold (``padmmirnn data list``)."""
    lines = []
    for name, (train, test) in BUILTIN.items():
        twin = next(other for other, files in BUILTIN.items()
                    if files == (train, test) and other != "default")
        if name == "default":
            lines.append(f"{name:12s} = {twin} (the embedded default)")
            continue
        a, b = read_info(str(builtin_path(train))), read_info(str(builtin_path(test)))
        lines.append(f"{name:12s} {a.kind}, {a.n} train + {b.n} test sequences of {a.steps} "
                     f"steps x {a.dim}, {a.classes} classes ({train}, {test})")
    return "\n".join(lines)

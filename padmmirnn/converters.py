"""Converters from the formats people have to the canonical dataset format.

``padmmirnn data prepare KIND`` (docs/design.md, section 9):

* ``idx``: MNIST / Fashion-MNIST IDX files (gzipped or not), images as a sequence
  of rows ``[N, rows, cols]`` or of pixels ``[N, rows * cols, 1]``;
* ``imdb``: the ``aclImdb/`` folders (train/test x pos/neg of ``.txt``);
* ``csv``: a text column and a label column;
* ``text``: a plain text corpus for language modelling, windows of T tokens with
  the next token as the target of every step;
* ``adding``: the synthetic adding problem.

Text becomes ``[N, T]`` int32 token ids with the vocabulary (id order, ``<pad>`` = 0,
``<unk>`` = 1) stored in the file. Classification texts (imdb, csv) are stored real
tokens first (``--padding post``, the default) with their ``lengths`` ``[N]``, so that a
network reading steps ``0 .. L_i - 1`` of sample i sees its tokens; ``--padding pre``
keeps the older layout (pads first, the text ending at T) and writes no lengths. When
``--steps`` is not given, T is the 99th percentile of the training texts' token counts
(:func:`choose_steps`). A language model's last window may be short: it is kept, with
its real length. Everything is read and checked before anything is written, and files
are written atomically, so bad input leaves no output behind.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from padmmirnn import datafiles
from padmmirnn.errors import DataError, PadmmError

PAD, UNK = "<pad>", "<unk>"
SPECIALS = (PAD, UNK)
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
MNIST_TERMS = ("MNIST database (Y. LeCun, C. Cortes, C. J. C. Burges)",
               "CC BY-SA 3.0 (Y. LeCun, C. Cortes)")
FASHION_TERMS = ("Fashion-MNIST (H. Xiao, K. Rasul, R. Vollgraf, Zalando Research, 2017)",
                 "MIT (Zalando SE)")
IMDB_TERMS = ("Large Movie Review Dataset v1.0 (A. L. Maas et al., ACL 2011), "
              "https://ai.stanford.edu/~amaas/data/sentiment/",
              "research use; cite Maas et al. (2011)")
WORD_RE = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


@dataclass
class PrepareOptions:
    """The options of ``padmmirnn data prepare`` (``None``: the kind's default)."""

    kind: str
    out: str
    source: str | None = None
    steps: int | None = None
    samples: int | None = None
    test_samples: int | None = None
    classes: int | None = None
    seed: int = 0
    pixels: bool = False
    level: str | None = None
    vocab_size: int | None = None
    padding: str | None = None  # imdb/csv: post (real tokens first, lengths written)
    truncating: str = "pre"
    text_column: str = "text"
    label_column: str = "label"
    labels: str | None = None
    delimiter: str = ","
    no_header: bool = False
    test_fraction: float = 0.0
    license: str | None = None
    attribution: str | None = None

    @classmethod
    def from_mapping(cls, values: dict) -> PrepareOptions:
        """Build from a mapping with (at least) these keys, e.g. ``vars(args)``."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


@dataclass
class Arrays:
    """One split, sample-major: ``inputs`` ``[N, T, d]`` or ``[N, T]``, ``targets``
    ``[N]`` or ``[N, T]``, ``lengths`` ``[N]`` in [1, T] (None: all T)."""

    inputs: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray | None = None

    def head(self, n: int | None) -> Arrays:
        if n is None:
            return self
        return Arrays(self.inputs[:n], self.targets[:n],
                      None if self.lengths is None else self.lengths[:n])


@dataclass
class Prepared:
    """A converted dataset, ready to be checked and written."""

    origin: str
    train: Arrays
    test: Arrays | None
    classes: int
    source: str
    license: str
    vocabulary: list[str] | None = None
    class_names: list[str] | None = None
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # printed before the written files


# ---------------------------------------------------------------- reading files


def read_bytes(path: Path) -> bytes:
    """A file's content, decompressed when it is gzip, bzip2 or xz."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"{path}: file is empty")
    for magic, module in ((b"\x1f\x8b", gzip), (b"BZh", bz2), (b"\xfd7zXZ", lzma)):
        if raw.startswith(magic):
            try:
                raw = module.decompress(raw)
            except (EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as exc:
                raise DataError(f"{path}: truncated or corrupt {module.__name__} data "
                                f"({exc})") from None
            if not raw:
                raise DataError(f"{path}: file is empty (after decompression)")
    return raw


def read_text(path: Path) -> str:
    """A UTF-8 text file (optionally compressed); other encodings are an error."""
    raw = read_bytes(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                        f"{exc.start}); convert it with e.g. iconv -t UTF-8") from None


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format), checked against its header."""
    raw = read_bytes(path)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_TYPES or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()}, expected "
                        f"0000 + type code + number of dimensions)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = np.dtype(IDX_TYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header announces dims {dims} ({expected} bytes of data) "
                        f"but the file holds {len(raw) - header}: truncated or corrupt")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder / (stem + '.gz')}: file not found (an IDX folder holds "
                    f"train-/t10k- images and labels, gzipped or not)")


# ---------------------------------------------------------------- idx


def idx_split(images_path: Path, labels_path: Path, classes: int, pixels: bool) -> Arrays:
    """One IDX images/labels pair as dense sequences (rows, or pixels with ``pixels``)."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected images [N, rows, cols], got dims "
                        f"{images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{labels_path}: expected integer labels [N], got {labels.dtype} "
                        f"dims {labels.shape}")
    if len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in "
                        f"{images_path.name}")
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        raise DataError(f"{labels_path}: labels must lie in [0, {classes}) (--classes), found "
                        f"{labels[bad[0]]} at index {bad[0]}")
    x = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
    check_finite(images_path, x)
    if pixels:
        x = x.reshape(len(x), -1, 1)
    return Arrays(np.ascontiguousarray(x), labels.astype(np.int32))


def convert_idx(opts: PrepareOptions) -> Prepared:
    folder = Path(opts.source)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (--source of idx is the folder of the IDX "
                        f"files)")
    classes = opts.classes or 10
    splits = {name: idx_split(_find(folder, images), _find(folder, labels), classes,
                              opts.pixels)
              for name, (images, labels) in IDX_FILES.items()}
    fashion = "fashion" in str(folder.resolve()).lower()
    source, terms = FASHION_TERMS if fashion else MNIST_TERMS
    layout = "pixel sequences" if opts.pixels else "row sequences"
    return Prepared(str(folder), splits["train"], splits["test"], classes,
                    f"{source}, IDX files from {folder}, images as {layout}, pixels / 255",
                    terms, class_names=FASHION_CLASSES if fashion and classes == 10 else None,
                    settings={"layout": layout})


# ---------------------------------------------------------------- tokenisation


def tokenize(text: str, level: str) -> list[str]:
    """Characters, or lower-cased words and punctuation marks."""
    return list(text) if level == "char" else WORD_RE.findall(text.lower())


def build_vocabulary(token_lists: Iterable[list[str]], size: int | None) -> list[str]:
    """``<pad>``, ``<unk>``, then the most frequent tokens (ties by token), at most
    ``size`` entries in all."""
    counts = Counter()
    for tokens in token_lists:
        counts.update(tokens)
    for special in SPECIALS:
        counts.pop(special, None)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))
    keep = None if size is None else size - len(SPECIALS)
    return [*SPECIALS, *ranked[:keep]]


def encode(tokens: list[str], index: dict[str, int], steps: int, padding: str,
           truncating: str) -> np.ndarray:
    """Token ids, cut to ``steps`` (``pre``: keep the end) and padded with ``<pad>`` = 0
    (``pre``: at the start, so the text ends at the output step)."""
    ids = [index.get(t, 1) for t in tokens]
    ids = ids[-steps:] if truncating == "pre" else ids[:steps]
    row = np.zeros(steps, np.int32)
    if ids:
        if padding == "pre":
            row[steps - len(ids):] = ids
        else:
            row[:len(ids)] = ids
    return row


STEPS_QUANTILE = 0.99  # T from the data: the share of training texts kept whole


def choose_steps(counts: np.ndarray) -> tuple[int, str]:
    """T for texts of ``counts`` tokens when ``--steps`` is not given: the 99th
    percentile, the smallest count T with at least 99% of the texts no longer than T
    (``inverted_cdf``: always one of the counts), and at least 1. Returns T and the
    line that reports it with the share of texts it cuts.

    Why the 99th: text lengths have a long tail, so T = the longest text pads most
    sequences for the sake of a few, while the 95th percentile cuts one text in
    twenty. With lengths stored, a sequence's
    real tokens are what it costs once the network skips padded steps, so a larger T
    is cheap where it matters; the 99th keeps 99% of the texts whole and bounds T
    against a few outliers."""
    counts = np.asarray(counts)
    steps = max(1, int(np.quantile(counts, STEPS_QUANTILE, method="inverted_cdf")))
    cut = int(np.sum(counts > steps))
    line = (f"steps: T = {steps}, the 99th percentile of the token counts of the "
            f"{len(counts):,} training texts (median {np.median(counts):g}, longest "
            f"{int(counts.max())}); it cuts {100.0 * cut / len(counts):.1f}% of them ({cut}); "
            f"--steps overrides")
    return steps, line


def encode_texts(train: list[str], test: list[str] | None, opts: PrepareOptions,
                 level: str) -> tuple[Arrays, Arrays | None, list[str], list[str]]:
    """Tokenise, build the vocabulary on the training texts, encode both splits (token
    ids in ``inputs``, no targets yet; ``lengths`` = min(tokens, T), at least 1, with
    post-padding, None with pre-padding). Returns the two splits, the vocabulary and
    notes to print (how T was chosen)."""
    train_tokens = [tokenize(t, level) for t in train]
    notes = []
    if opts.steps:
        steps = opts.steps
    else:
        steps, line = choose_steps(np.array([len(t) for t in train_tokens]))
        notes.append(line)
    vocabulary = build_vocabulary(train_tokens, opts.vocab_size)
    index = {t: i for i, t in enumerate(vocabulary)}
    padding = opts.padding or "post"

    def split(token_lists) -> Arrays:
        token_lists = list(token_lists)
        x = np.stack([encode(t, index, steps, padding, opts.truncating) for t in token_lists])
        lengths = None if padding == "pre" else np.array(
            [max(1, min(len(t), steps)) for t in token_lists], np.int32)
        return Arrays(x, np.zeros(0, np.int32), lengths)

    test_split = None if test is None else split(tokenize(t, level) for t in test)
    return split(train_tokens), test_split, vocabulary, notes


def _text_prepared(origin: str, texts: tuple[list[str], list[str] | None],
                   labels: tuple[np.ndarray, np.ndarray | None], class_names: list[str],
                   opts: PrepareOptions, terms: tuple[str, str]) -> Prepared:
    level = opts.level or "word"
    train, test, vocabulary, notes = encode_texts(texts[0], texts[1], opts, level)
    train.targets = labels[0]
    if test is not None:
        test.targets = labels[1]
    settings = {"level": level, "steps": int(train.inputs.shape[1]),
                "steps_from": "--steps" if opts.steps else "99th percentile",
                "vocab_size": len(vocabulary), "padding": opts.padding or "post",
                "truncating": opts.truncating, "lengths": train.lengths is not None,
                "seed": opts.seed}
    return Prepared(origin, train, test, len(class_names),
                    f"{terms[0]}, from {origin}, {level}-level tokens", terms[1],
                    vocabulary, class_names, settings, notes)


def _shuffled(items: list, labels: np.ndarray, seed: int) -> tuple[list, np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order], labels[order]


# ---------------------------------------------------------------- imdb


def imdb_split(folder: Path) -> tuple[list[str], np.ndarray]:
    """The reviews of one aclImdb split folder, neg (0) then pos (1)."""
    texts, labels = [], []
    for label, name in enumerate(("neg", "pos")):
        sub = folder / name
        if not sub.is_dir():
            raise DataError(f"{sub}: folder not found (an aclImdb split holds pos/ and neg/)")
        files = sorted(sub.glob("*.txt"))
        if not files:
            raise DataError(f"{sub}: no .txt reviews in this folder")
        texts.extend(read_text(f).replace("<br />", " ") for f in files)
        labels.extend([label] * len(files))
    return texts, np.array(labels, np.int32)


def convert_imdb(opts: PrepareOptions) -> Prepared:
    root = Path(opts.source)
    if (root / "aclImdb").is_dir():
        root = root / "aclImdb"
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (--source of imdb is the aclImdb folder)")
    train = _shuffled(*imdb_split(root / "train"), opts.seed)
    test = _shuffled(*imdb_split(root / "test"), opts.seed + 1)
    return _text_prepared(str(root), (train[0], test[0]), (train[1], test[1]), ["neg", "pos"],
                          opts, IMDB_TERMS)


# ---------------------------------------------------------------- csv


def read_csv_rows(path: Path, opts: PrepareOptions) -> tuple[list[str], list[str]]:
    """(texts, labels) of a CSV file; every row must have the header's field count."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=opts.delimiter)
    try:
        rows = [(reader.line_num, row) for row in reader if row]
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: file is empty")
    width = len(rows[0][1])
    header = [] if opts.no_header else rows.pop(0)[1]
    text_col, label_col = (_column(path, header, c) for c in (opts.text_column,
                                                              opts.label_column))
    for line, row in rows:
        if len(row) != width:
            raise DataError(f"{path}: line {line}: {len(row)} fields, expected {width} "
                            f"(ragged CSV)")
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    return [r[text_col] for _, r in rows], [r[label_col].strip() for _, r in rows]


def _column(path: Path, header: list[str], name: str) -> int:
    if name in header:
        return header.index(name)
    if name.isdigit() and (not header or int(name) < len(header)):
        return int(name)
    raise DataError(f"{path}: no column {name!r} (header: {', '.join(header) or 'none'})")


def label_ids(path: Path, labels: list[str], opts: PrepareOptions
              ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(rows kept, class ids, class names). ``--classes K``: labels are the integers
    0..K-1; ``--labels a,b``: only these, in this order; else all, sorted."""
    if opts.classes:
        try:
            ids = np.array([int(v) for v in labels], np.int64)
        except ValueError:
            raise DataError(f"{path}: --classes expects integer labels, found "
                            f"{next(v for v in labels if not v.lstrip('-').isdigit())!r}"
                            ) from None
        bad = np.flatnonzero((ids < 0) | (ids >= opts.classes))
        if bad.size:
            raise DataError(f"{path}: labels must lie in [0, {opts.classes}) (--classes), found "
                            f"{ids[bad[0]]} in data row {bad[0] + 1}")
        return np.arange(len(ids)), ids.astype(np.int32), [str(c) for c in range(opts.classes)]
    names = opts.labels.split(",") if opts.labels else sorted(set(labels))
    lookup = {name: i for i, name in enumerate(names)}
    keep = np.array([i for i, v in enumerate(labels) if v in lookup], np.int64)
    if keep.size == 0:
        raise DataError(f"{path}: no rows with labels {', '.join(names)}")
    return keep, np.array([lookup[labels[i]] for i in keep], np.int32), names


def convert_csv(opts: PrepareOptions) -> Prepared:
    path = Path(opts.source)
    texts, raw_labels = read_csv_rows(path, opts)
    keep, labels, names = label_ids(path, raw_labels, opts)
    if len(names) < 2:
        raise DataError(f"{path}: needs at least 2 classes, found {names}")
    texts, labels = _shuffled([texts[i] for i in keep], labels, opts.seed)
    n_test = round(opts.test_fraction * len(texts))
    if opts.test_fraction and not 0 < n_test < len(texts):
        raise DataError(f"{path}: --test-fraction {opts.test_fraction} leaves an empty split "
                        f"of {len(texts)} rows")
    cut = len(texts) - n_test
    test = (texts[cut:], labels[cut:]) if n_test else (None, None)
    terms = (opts.attribution or f"CSV file {path.name}", opts.license or "unknown")
    return _text_prepared(str(path), (texts[:cut], test[0]), (labels[:cut], test[1]), names,
                          opts, terms)


# ---------------------------------------------------------------- text (language model)


def lm_windows(path: Path, ids: np.ndarray, steps: int, part: str) -> Arrays:
    """Non-overlapping windows of ``steps`` tokens; the target of each step is the
    next token. The tokens after the last whole window (``r`` in 1 .. T - 1 of them,
    with their next tokens) make one more window of length r, padded after its end
    with ``<pad>`` = 0 in inputs and targets; ``lengths`` is then written (T for the
    others), else it is None (all full)."""
    n = (len(ids) - 1) // steps
    if n < 1:
        raise DataError(f"{path}: the {part} has {len(ids)} tokens, too short for one sequence "
                        f"of --steps {steps} (needs {steps + 1})")
    x, y = ids[:n * steps].reshape(n, steps), ids[1:n * steps + 1].reshape(n, steps)
    rest = len(ids) - 1 - n * steps
    if not rest:
        return Arrays(x, y)
    tail_x, tail_y = np.zeros((1, steps), ids.dtype), np.zeros((1, steps), ids.dtype)
    tail_x[0, :rest] = ids[n * steps:n * steps + rest]
    tail_y[0, :rest] = ids[n * steps + 1:]
    lengths = np.full(n + 1, steps, np.int32)
    lengths[-1] = rest
    return Arrays(np.concatenate([x, tail_x]), np.concatenate([y, tail_y]), lengths)


def convert_text(opts: PrepareOptions) -> Prepared:
    path = Path(opts.source)
    level, steps = opts.level or "char", opts.steps or 100
    tokens = tokenize(read_text(path), level)
    cut = len(tokens) - math.floor(opts.test_fraction * len(tokens))
    vocabulary = build_vocabulary([tokens[:cut]], opts.vocab_size)
    index = {t: i for i, t in enumerate(vocabulary)}
    ids = np.array([index.get(t, 1) for t in tokens], np.int32)
    train = lm_windows(path, ids[:cut], steps, "text")
    test = lm_windows(path, ids[cut:], steps, "test part (--test-fraction)") if cut < len(
        ids) else None
    terms = (opts.attribution or f"text corpus {path.name}", opts.license or "unknown")
    return Prepared(str(path), train, test, len(vocabulary),
                    f"{terms[0]}, {level}-level language model, next-token targets", terms[1],
                    vocabulary, None, {"level": level, "steps": steps,
                                       "vocab_size": len(vocabulary),
                                       "lengths": train.lengths is not None or (
                                           test is not None and test.lengths is not None)})


# ---------------------------------------------------------------- adding


def convert_adding(opts: PrepareOptions) -> Prepared:
    steps, classes = opts.steps or 100, opts.classes or 10
    samples = 4000 if opts.samples is None else opts.samples
    tests = 1000 if opts.test_samples is None else opts.test_samples
    for name, value in (("--steps", steps), ("--samples", samples), ("--classes", classes)):
        if value < 2:
            raise PadmmError(f"{name} must be >= 2, got {value}")
    train = Arrays(*datafiles.make_adding(samples, steps, opts.seed, classes))
    test = Arrays(*datafiles.make_adding(tests, steps, opts.seed + 1, classes)) if tests > 0 \
        else None
    return Prepared("adding", train, test, classes,
                    f"synthetic adding problem, T={steps}, seed={opts.seed} (test: seed="
                    f"{opts.seed + 1}), sum quantised into {classes} bins", "CC0-1.0 (generated)")


CONVERTERS = {"adding": convert_adding, "idx": convert_idx, "imdb": convert_imdb,
              "csv": convert_csv, "text": convert_text}


# ---------------------------------------------------------------- checking and writing


def check_finite(path: Path | str, x: np.ndarray) -> None:
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x))[0][0])
        raise DataError(f"{path}: inputs contain NaN or inf (first at sample {bad})")


def check_split(origin: str, arrays: Arrays, classes: int, vocab: int | None) -> None:
    """The invariants of the canonical format, checked before anything is written."""
    x, y = arrays.inputs, arrays.targets
    if len(x) == 0:
        raise DataError(f"{origin}: no sequences to write")
    check_finite(origin, x)
    if arrays.lengths is not None:
        datafiles.check_lengths(origin, arrays.lengths, len(x), x.shape[1])
    if vocab is not None and (x.min() < 0 or x.max() >= vocab):
        raise DataError(f"{origin}: token ids outside [0, {vocab})")
    if y.min() < 0 or y.max() >= classes:
        raise DataError(f"{origin}: labels must lie in [0, {classes}), found "
                        f"[{y.min()}, {y.max()}]")


def check_options(opts: PrepareOptions) -> None:
    """Option errors that do not depend on the data."""
    if opts.kind != "adding" and not opts.source:
        raise PadmmError(f"data prepare {opts.kind} needs --source PATH")
    if opts.padding is not None and opts.kind not in ("imdb", "csv"):
        raise PadmmError(f"--padding applies to imdb and csv; {opts.kind} sequences are "
                         f"{'windows of the text' if opts.kind == 'text' else 'full length'}")
    if opts.kind == "idx" and opts.steps is not None:
        raise PadmmError("--steps does not apply to idx (T is the number of image rows, or "
                         "of pixels with --pixels)")
    for name in ("steps", "samples", "test_samples", "classes", "vocab_size"):
        value = getattr(opts, name)
        if value is not None and opts.kind != "adding" and value < 1:
            raise PadmmError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if opts.vocab_size is not None and opts.vocab_size <= len(SPECIALS):
        raise PadmmError(f"--vocab-size must be > {len(SPECIALS)} (it counts <pad> and <unk>)")
    if opts.test_fraction and opts.kind not in ("csv", "text"):
        raise PadmmError(f"--test-fraction applies to csv and text; {opts.kind} has its own "
                         f"test split")
    if not 0.0 <= opts.test_fraction < 1.0:
        raise PadmmError(f"--test-fraction must lie in [0, 1), got {opts.test_fraction}")
    out = Path(opts.out)
    if not out.parent.is_dir():
        raise PadmmError(f"{out}: folder {out.parent} does not exist")


def output_paths(opts: PrepareOptions, has_test: bool) -> tuple[Path, Path | None]:
    """``--out NAME_train.h5`` writes the test split to ``NAME_test.h5``."""
    out = Path(opts.out)
    if not has_test:
        return out, None
    if out.name.endswith("_train.h5"):
        return out, out.with_name(out.name[: -len("_train.h5")] + "_test.h5")
    if opts.kind == "adding":
        return out, None
    raise PadmmError(f"{out}: this source has a test split; name the output NAME_train.h5 "
                     f"(the test split goes to NAME_test.h5)")


def prepare(opts: PrepareOptions) -> list[str]:
    """Convert ``opts.source``, check both splits, then write them; one summary line per
    written file."""
    check_options(opts)
    prepared = CONVERTERS[opts.kind](opts)
    splits = [prepared.train.head(opts.samples if opts.kind != "adding" else None)]
    if prepared.test is not None:
        splits.append(prepared.test.head(opts.test_samples if opts.kind != "adding" else None))
    paths = output_paths(opts, len(splits) > 1)
    vocab = None if prepared.vocabulary is None else len(prepared.vocabulary)
    for arrays in splits:
        check_split(prepared.origin, arrays, prepared.classes, vocab)
    lines = list(prepared.notes)
    for path, arrays, name in zip(paths, splits, ("train", "test"), strict=False):
        extra = {"name": f"{Path(opts.out).name.removesuffix('_train.h5')}/{name}",
                 "prepared": json.dumps({"kind": opts.kind, **prepared.settings})}
        datafiles.write_dataset_with_names(
            path, arrays.inputs, arrays.targets, classes=prepared.classes,
            vocabulary=prepared.vocabulary, class_names=prepared.class_names,
            source=prepared.source, license=prepared.license, extra=extra,
            lengths=arrays.lengths)
        shape = "x".join(str(s) for s in arrays.inputs.shape)
        real = "" if arrays.lengths is None else (
            f", lengths written: mean {arrays.lengths.mean():.1f}, "
            f"{100.0 * arrays.lengths.mean() / arrays.inputs.shape[1]:.1f}% of the steps real")
        lines.append(f"wrote {path}: {len(arrays.inputs)} sequences of "
                     f"{arrays.inputs.shape[1]} steps (inputs {shape}, {prepared.classes} "
                     f"classes{real})")
    return lines

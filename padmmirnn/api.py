"""The Python API: train from a script or an mpi4py program, then use what was trained.

    import padmmirnn
    run = padmmirnn.train(dataset="default", **{"train.iterations": 5})
    run.summary["test_accuracy"], run.metrics[-1], run.model.predict(x)
    model = padmmirnn.load("runs/default/weights.h5")   # or a checkpoint
    model.predict_proba(x); model.evaluate(x, y); model.generate("ROMEO:", 200)

:func:`train` runs the code path of ``padmmirnn train``; :class:`Model` runs the
forward pass of :mod:`padmmirnn.nn` (docs/design.md, section 2) on NumPy arrays
``[N, T, d]``, token ids ``[N, T]`` or, for token models, raw strings encoded with
the vocabulary saved when the data were prepared. Bad input raises ``ValueError``
with one sentence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from padmmirnn.checkpoint import load_weights
from padmmirnn.errors import PadmmError
from padmmirnn.nn import Network, Params, by_length, outputs
from padmmirnn.samples import DatasetInfo, LocalData

PAD, UNK = "<pad>", "<unk>"


@dataclass(frozen=True)
class Run:
    """A finished training run: its summary (``summary.json``), its metrics rows
    (``metrics.jsonl``), its output folder and the trained :class:`Model`."""

    summary: dict
    metrics: list[dict]
    out_dir: Path
    model: Model


def train(config: str | Path | None = None, dataset: str | None = None, comm=None,
          **overrides) -> Run:
    """Train as ``padmmirnn train`` does: ``config`` a preset name or TOML file,
    ``dataset`` a built-in name or a prepared ``.h5`` file, ``overrides`` dotted keys
    (``**{"train.iterations": 5}``; ``train__iterations=5`` is the same). ``comm`` an
    mpi4py communicator to run on (every rank calls ``train``); serial without one.
    Without ``output.dir`` the run goes to ``runs/<algo>-<time>`` as on the command
    line."""
    from padmmirnn.comm import MPIComm, SerialComm, SimulatedNetwork
    from padmmirnn.config import load_config
    from padmmirnn.logs import LOGGER_NAME, setup_logging
    from padmmirnn.training import default_out_dir, run_training

    settings = {key.replace("__", "."): value for key, value in overrides.items()}
    if dataset is not None:
        settings["data.dataset"] = dataset
    cfg = load_config(config, settings)
    network = SimulatedNetwork(cfg.train.net_latency_us, cfg.train.net_bandwidth_gbs)
    c = SerialComm() if comm is None else MPIComm(comm, network,
                                                  cfg.train.collective_timeout_s)
    try:
        import logging

        if not logging.getLogger(LOGGER_NAME).handlers:
            setup_logging(c.rank, c.size)
        if not cfg.output.dir:
            out = c.bcast(default_out_dir(cfg.train.algo) if c.rank == 0 else None)
            cfg = load_config(config, {**settings, "output.dir": out})
        summary = run_training(cfg, c)
        c.barrier()  # rank 0 has written the outputs every rank reads below
    finally:
        c.free()
    out_dir = Path(cfg.output.dir)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return Run(summary, rows, out_dir, load(out_dir / "weights.h5"))


def load(path: str | Path) -> Model:
    """The model of a weights file (``weights.h5``) or a checkpoint; ``ValueError`` if
    it is missing or not one."""
    try:
        params, meta = load_weights(path)
    except PadmmError as exc:
        raise ValueError(str(exc)) from None
    from padmmirnn import datafiles

    if "input_kind" in meta:  # a weights file carries everything
        tables = {name: datafiles.read_strings(str(path), name)
                  for name in ("vocabulary", "class_names")}
    else:  # a checkpoint: its training data say what the model reads
        from padmmirnn.config import load_config_text
        from padmmirnn.training import weights_meta, weights_strings

        cfg = load_config_text(meta["config_toml"])
        try:
            info = datafiles.read_info(datafiles.resolve(cfg.data.dataset)[0])
        except PadmmError as exc:
            raise ValueError(f"{path}: a checkpoint's input kind and vocabulary come from "
                             f"its training data, which cannot be read ({exc}); load the "
                             f"run's weights.h5 instead") from None
        meta, tables = weights_meta(cfg, info), weights_strings(info)
    return Model(params, meta["activation"], meta["loss"], str(meta["input_kind"]),
                 int(meta["input_dim"]), int(meta["classes"]), bool(meta["many_to_many"]),
                 tables.get("vocabulary"), tables.get("class_names"),
                 json.loads(meta.get("prepared") or "{}"), str(path))


class Model:
    """A trained network (:class:`~padmmirnn.nn.Network`: layers of an Elman, GRU or LSTM
    cell, then ``o_t = V s_t + c``), with a softmax over ``o_t`` for cross-entropy
    models. Many-to-one models answer per sequence (``[N, K]``), many-to-many ones per
    step (``[N, T, K]``)."""

    def __init__(self, params: Params, activation: str, loss: str, input_kind: str,
                 input_dim: int, classes: int, many_to_many: bool,
                 vocabulary: list[str] | None = None, class_names: list[str] | None = None,
                 prepared: dict | None = None, source: str = ""):
        self.params, self.activation, self.loss = params, activation, loss
        self.net = Network.of(params, activation)
        self.input_kind, self.input_dim, self.classes = input_kind, input_dim, classes
        self.many_to_many = many_to_many
        self.vocabulary, self.class_names = vocabulary, class_names
        self.prepared = prepared or {}
        self.source = source
        self._index = None if vocabulary is None else {t: i for i, t in enumerate(vocabulary)}

    def __repr__(self) -> str:
        inputs = (f"tokens (vocabulary {self.input_dim})" if self.input_kind == "tokens"
                  else f"dense inputs of size {self.input_dim}")
        layout = "many-to-many" if self.many_to_many else "many-to-one"
        net = self.net
        kind = {"rnn": f"{self.activation} RNN", "gru": "GRU", "lstm": "LSTM"}[net.cell.name]
        layers = f"{net.layers} layers, " if net.layers > 1 else ""
        return (f"Model({kind}, {layers}h = {self.params.hidden}, {inputs}, "
                f"{self.classes} classes, {layout})")

    # -- inputs --------------------------------------------------------------------------

    def encode(self, texts: str | list[str], steps: int | None = None) -> np.ndarray:
        """Token ids ``[N, T]`` of raw strings, tokenised as the training data were
        (character or word level), cut and padded with ``<pad>`` to ``steps`` as they
        were. Default ``steps``: a classifier's training length; for a language model the
        longest string (it reads text at any length)."""
        from padmmirnn.converters import encode, tokenize

        if self._index is None:
            raise ValueError("this model has no vocabulary: it takes arrays, not strings")
        texts = [texts] if isinstance(texts, str) else list(texts)
        level = self.prepared.get("level", "char")
        lists = [tokenize(t, level) for t in texts]
        for tokens in lists:
            unknown = next((t for t in tokens if t not in self._index), None)
            if unknown is not None and UNK not in self._index:
                raise ValueError(f"token {unknown!r} is not in the vocabulary, which has "
                                 f"no {UNK}")
        if steps is None:
            trained = None if self.many_to_many else self.prepared.get("steps")
            steps = int(trained or max(len(t) for t in lists) or 1)
        padding = self.prepared.get("padding", "pre")
        truncating = self.prepared.get("truncating", "pre")
        return np.stack([encode(t, self._index, steps, padding, truncating) for t in lists])

    def _data(self, inputs) -> LocalData:
        """Check ``inputs`` and lay them out time-major for the forward pass. Strings
        for a classifier trained on post-padded texts (real tokens first) carry their
        lengths, as its training data did: the output is read at the last real token."""
        lengths = None
        if isinstance(inputs, str) or (isinstance(inputs, list | tuple) and inputs
                                       and isinstance(inputs[0], str)):
            texts = inputs
            inputs = self.encode(texts)
            if not self.many_to_many and self.prepared.get("padding", "pre") == "post":
                from padmmirnn.converters import tokenize

                level = self.prepared.get("level", "char")
                texts = [texts] if isinstance(texts, str) else texts
                lengths = np.array([min(max(len(tokenize(t, level)), 1), inputs.shape[1])
                                    for t in texts], np.int32)
        x = np.asarray(inputs)
        if self.input_kind == "tokens":
            if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"a token model takes integer ids [N, T] (or strings); got "
                                 f"{x.dtype} {list(x.shape)}")
            if x.size and (x.min() < 0 or x.max() >= self.input_dim):
                raise ValueError(f"token ids must lie in [0, {self.input_dim}); got "
                                 f"{x.min()}..{x.max()}")
            x = np.ascontiguousarray(x.T, np.int32)
        else:
            if x.ndim != 3 or x.shape[2] != self.input_dim:
                raise ValueError(f"inputs must be [N, T, {self.input_dim}]; got {list(x.shape)}")
            if not np.issubdtype(x.dtype, np.number):
                raise ValueError(f"inputs must be numbers; got dtype {x.dtype}")
            if not np.isfinite(x).all():
                raise ValueError("inputs contain NaN or infinite values")
            x = np.ascontiguousarray(x.transpose(1, 0, 2), np.float64)
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"inputs must hold at least one sequence of one step; got "
                             f"{list(np.asarray(inputs).shape)}")
        steps, n = x.shape[:2]
        info = DatasetInfo(self.source, n, steps, self.input_dim, self.classes,
                           self.input_kind, self.many_to_many)
        targets = np.zeros((steps if self.many_to_many else 1, n), np.int32)
        return LocalData(info, x, targets, 0, n, lengths)

    # -- outputs -------------------------------------------------------------------------

    def logits(self, inputs, dtype: np.dtype = np.float64) -> np.ndarray:
        """``o_t = V s_t + c``: ``[N, K]`` (many-to-one) or ``[N, T, K]``."""
        data = self._data(inputs)
        p = self.params.astype(np.dtype(dtype))
        if data.lengths is not None:  # many-to-one: o at each sequence's last real step
            o = self.net.forward(p, by_length(data)).outputs(p, False)[0]
            out = np.empty_like(o)
            out[np.argsort(-data.lengths, kind="stable")] = o
            return out
        o = outputs(p, self.net.forward(p, data).states, self.many_to_many)  # [|O|, N, K]
        return o.transpose(1, 0, 2) if self.many_to_many else o[0]

    def predict_proba(self, inputs, dtype: np.dtype = np.float64) -> np.ndarray:
        """Class probabilities (softmax of the logits), shaped as :meth:`logits`."""
        if self.loss != "ce":
            raise ValueError("predict_proba needs a cross-entropy model; this one was "
                             "trained with squared error: use logits or predict")
        return softmax(self.logits(inputs, dtype))

    def predict(self, inputs) -> np.ndarray:
        """The most likely class of every sequence (or step)."""
        return self.logits(inputs).argmax(axis=-1)

    def evaluate(self, inputs, targets) -> dict:
        """Mean loss and accuracy against ``targets`` ``[N]`` (or ``[N, T]``)."""
        data = self._data(inputs)
        y = np.asarray(targets)
        want = (data.info.n, data.info.steps) if self.many_to_many else (data.info.n,)
        if y.shape != want or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"targets must be integer classes {list(want)}; got {y.dtype} "
                             f"{list(y.shape)}")
        if y.size and (y.min() < 0 or y.max() >= self.classes):
            raise ValueError(f"targets must lie in [0, {self.classes})")
        data.targets[...] = y.T if self.many_to_many else y[None, :]
        total, correct, rows = self.net.loss_sums(self.params, data, self.loss)
        return {"loss": float(total / rows), "accuracy": float(correct / rows),
                "samples": data.info.n}

    def generate(self, prompt: str, length: int, temperature: float = 1.0,
                 seed: int = 0) -> str:
        """Sample ``length`` tokens after ``prompt`` from a language model (a
        many-to-many token model whose classes are its vocabulary): each from the
        softmax of ``o_t / temperature`` (``temperature = 0``: the most likely), never
        ``<pad>`` or ``<unk>``; reproducible for a ``seed``. Returns prompt + sample."""
        if not (self.many_to_many and self.input_kind == "tokens" and self.vocabulary
                and self.classes == len(self.vocabulary)):
            raise ValueError("generate needs a language model: a many-to-many token model "
                             "whose targets are its own vocabulary")
        if length < 0 or temperature < 0:
            raise ValueError("length and temperature must be >= 0")
        ids = [int(i) for i in self.encode(prompt, steps=None)[0] if i] if prompt else []
        p = self.params
        state = None  # every layer's state after the tokens read so far (None: zero)
        if ids:
            state = self._advance(np.array(ids), None)
        banned = [self._index[t] for t in (PAD, UNK) if t in self._index]
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(length):
            # the next token's logits (s = 0 without a prompt)
            s = np.zeros(p.hidden) if state is None else state[-1][0][:, 0]
            o = p.V @ s + p.c
            o[banned] = -np.inf
            if temperature == 0:
                token = int(np.argmax(o))
            else:
                prob = softmax(o / temperature)
                token = int(rng.choice(len(prob), p=prob))
            out.append(token)
            state = self._advance(np.array([token]), state)
        sep = "" if self.prepared.get("level", "char") == "char" else " "
        return prompt + (sep if prompt and sep else "") + sep.join(
            self.vocabulary[t] for t in out)

    def _advance(self, ids: np.ndarray, state):
        """Every layer's state after reading the token ids ``ids`` from ``state``."""
        x = np.ascontiguousarray(ids[:, None], np.int32)
        info = DatasetInfo(self.source, 1, len(ids), self.input_dim, self.classes,
                           self.input_kind, True)
        data = LocalData(info, x, np.zeros((len(ids), 1), np.int32), 0, 1)
        return self.net.forward(self.params, data, start=state).final()


def read_inputs(path: str | Path, column: str = "text"):
    """The inputs held by a file: an HDF5 split (its ``inputs``, ``[N, T, d]`` or ids
    ``[N, T]``), a CSV file (the strings of ``column``) or a text file (one sequence per
    line); ``ValueError`` if it cannot be read."""
    import csv

    import h5py

    p = Path(path)
    if not p.is_file():
        raise ValueError("input file not found")
    if h5py.is_hdf5(p):
        with h5py.File(p, "r") as f:
            if "inputs" not in f:
                raise ValueError("an HDF5 input needs a dataset 'inputs'")
            return np.asarray(f["inputs"])
    if p.suffix.lower() == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or column not in rows[0]:
            raise ValueError(f"the CSV file has no column {column!r}")
        return [row[column] for row in rows]
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError("the text file holds no sequence")
    return lines


def softmax(o: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the last axis (shifted by the maximum)."""
    e = np.exp(o - o.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


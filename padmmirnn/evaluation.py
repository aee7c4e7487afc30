"""Loss and accuracy of weights on the ranks' slices of a split, from true forward
passes: used after training iterations and by ``padmmirnn evaluate``.

Every rank computes ``[loss sum, correct, rows]`` on its parts; one reduction (in
global part order when ``ordered``) gives the global means, identical on every rank.
"""

from __future__ import annotations

import math

import numpy as np

from padmmirnn.comm import sum_parts
from padmmirnn.config import Config
from padmmirnn.nn import Params, loss_sums
from padmmirnn.samples import LocalData
from padmmirnn.splits import Split


def split_metrics(prefix: str, sums: np.ndarray, many_to_many: bool, loss: str) -> dict:
    """``{prefix}_loss`` and ``{prefix}_accuracy`` (and, for language models with
    cross-entropy, ``{prefix}_perplexity``) from reduced ``[loss, correct, rows]``."""
    mean = sums[0] / sums[2]
    out = {f"{prefix}_loss": float(mean), f"{prefix}_accuracy": float(sums[1] / sums[2])}
    if many_to_many and loss == "ce":
        out[f"{prefix}_perplexity"] = float(math.exp(min(mean, 700.0)))
    return out


def part_sums(params: Params, parts: list[LocalData], activation: str, loss: str,
              dtype: np.dtype) -> list[np.ndarray]:
    """Per part ``[loss sum, correct, rows]`` of ``params`` (forward passes)."""
    return [loss_sums(params, part, activation, loss, dtype) for part in parts]


def evaluate_split(params: Params, parts: list[LocalData], comm, activation: str, loss: str,
                   dtype: np.dtype, ordered: bool, prefix: str) -> dict:
    """Metrics of ``params`` on a split held as ``parts`` over the ranks of ``comm``."""
    sums = sum_parts(comm, part_sums(params, parts, activation, loss, dtype), ordered)
    return split_metrics(prefix, sums, parts[0].info.many_to_many, loss)


def evaluate_run(params: Params, cfg: Config, comm, train: Split, test: Split | None,
                 extra: list[np.ndarray] | None = None,
                 train_sums: list[np.ndarray] | None = None,
                 validation: Split | None = None) -> tuple[dict, np.ndarray | None]:
    """Train/test metrics of ``params`` in a training run, the training sums reduced
    together with ``extra`` (one vector per training part, e.g. ADMM residual sums) in
    one reduction. ``train_sums`` (per part ``[loss, correct, rows]``) replaces the
    training forward pass when the trainer already holds it. With a ``validation``
    split the metrics also hold ``val_loss`` and ``val_accuracy`` (and
    ``val_perplexity`` for a language model); without one they have no ``val_`` keys.
    Returns the metrics and the reduced ``extra`` (None without)."""
    act, loss, dtype = cfg.model.activation, cfg.model.loss, np.dtype(cfg.train.dtype)
    ordered = cfg.train.reduction == "deterministic"
    vectors = train_sums or part_sums(params, train.parts, act, loss, dtype)
    if extra is not None:
        vectors = [np.concatenate([v, e]) for v, e in zip(vectors, extra, strict=True)]
    buf = sum_parts(comm, vectors, ordered)
    metrics = split_metrics("train", buf[0:3], train.info.many_to_many, loss)
    if validation:
        metrics.update(evaluate_split(params, validation.parts, comm, act, loss, dtype,
                                      ordered, "val"))
    if test:
        metrics.update(evaluate_split(params, test.parts, comm, act, loss, dtype, ordered,
                                      "test"))
    else:
        metrics.update({"test_loss": None, "test_accuracy": None})
    return metrics, (buf[3:] if extra is not None else None)

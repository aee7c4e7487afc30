"""A training run: validate, load this rank's slice, iterate, evaluate, write outputs."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from padmmirnn import data as datasets
from padmmirnn._version import __version__
from padmmirnn.admm import AdmmEngine
from padmmirnn.checkpoint import save_weights
from padmmirnn.comm import agree, sum_parts
from padmmirnn.config import Config
from padmmirnn.data_parallel import GradientTrainer
from padmmirnn.errors import DataError
from padmmirnn.logs import Progress, get_logger
from padmmirnn.model import init_params, loss_sums
from padmmirnn.outputs import RunOutput

# Iterations excluded from the timing summary (compilation, caches, first touch).
TIMING_WARMUP = 2
# Testing hook: "RANK:ITERATION" raises an exception on that rank at that iteration.
FAULT_ENV = "PADMMIRNN_FAULT_INJECT"


@dataclass
class Split:
    """A rank's slice of one split, whole and cut into the engine's parts."""

    info: datasets.DatasetInfo
    local: datasets.LocalData
    parts: list[datasets.LocalData]


def load_split(path: str, cfg: Config, comm, what: str) -> Split:
    """Check the file and read this rank's slice; a problem on any rank stops all."""
    info = agree(comm, lambda: datasets.read_info(path))
    ordered = cfg.train.reduction == "deterministic"
    units = -(-info.n // cfg.train.chunk) if ordered else info.n
    if units < comm.size:
        unit = f"chunks of {cfg.train.chunk} samples" if ordered else "samples"
        raise DataError(f"{path}: {units} {what} {unit} cannot be split over {comm.size} "
                        f"ranks (every rank needs at least one)")
    if ordered:
        start, stop = datasets.chunk_partition(info.n, cfg.train.chunk, comm.size, comm.rank)
    else:
        start, stop = datasets.partition(info.n, comm.size, comm.rank)
    dtype = np.dtype(cfg.train.dtype)
    local = agree(comm, lambda: datasets.read_slice(info, start, stop, dtype))
    return Split(info, local, datasets.split_parts(local, cfg.train.chunk if ordered else None))


def load_data(cfg: Config, comm) -> tuple[Split, Split | None]:
    train_path, test_path = agree(comm, lambda: datasets.resolve(cfg.data.dataset, cfg.data.test))
    train = load_split(train_path, cfg, comm, "training")
    test = load_split(test_path, cfg, comm, "test") if test_path else None
    if test is not None:
        a, b = train.info, test.info
        if (a.kind, a.dim, a.classes, a.many_to_many) != (b.kind, b.dim, b.classes,
                                                           b.many_to_many):
            raise DataError(f"{test_path}: test split does not match training split {train_path} "
                            f"(kind, input size, classes or target layout differ)")
    return train, test


def default_out_dir(algo: str) -> str:
    return str(Path("runs") / f"{algo}-{time.strftime('%Y%m%d-%H%M%S')}")


def _split_metrics(prefix: str, sums: np.ndarray, many_to_many: bool, loss: str) -> dict:
    mean = sums[0] / sums[2]
    out = {f"{prefix}_loss": float(mean), f"{prefix}_accuracy": float(sums[1] / sums[2])}
    if many_to_many and loss == "ce":
        out[f"{prefix}_perplexity"] = float(math.exp(min(mean, 700.0)))
    return out


def evaluate_params(params, cfg: Config, comm, train: Split, test: Split | None,
                    extra: list[np.ndarray] | None = None) -> tuple[dict, np.ndarray | None]:
    """Train/test loss and accuracy of ``params`` from true forward passes, reduced
    together with ``extra`` (one vector per training part)."""
    act, loss, dtype = cfg.model.activation, cfg.model.loss, np.dtype(cfg.train.dtype)
    ordered = cfg.train.reduction == "deterministic"
    vectors = [loss_sums(params, part, act, loss, dtype) for part in train.parts]
    if extra is not None:
        vectors = [np.concatenate([v, e]) for v, e in zip(vectors, extra, strict=True)]
    buf = sum_parts(comm, vectors, ordered)
    m2m = train.info.many_to_many
    metrics = _split_metrics("train", buf[0:3], m2m, loss)
    if test:
        tbuf = sum_parts(comm, [loss_sums(params, part, act, loss, dtype) for part in test.parts],
                         ordered)
        metrics.update(_split_metrics("test", tbuf, m2m, loss))
    else:
        metrics.update({"test_loss": None, "test_accuracy": None})
    return metrics, (buf[3:] if extra is not None else None)


class AdmmAlgorithm:
    """One iteration = one ADMM iteration; extra metrics: objective and residuals."""

    def __init__(self, cfg: Config, train: Split, comm):
        self.engine = AdmmEngine(cfg, train.parts, train.info.n, comm)
        self.bytes_per_iteration = self.engine.bytes_reduced_per_iteration

    @property
    def params(self):
        return self.engine.params

    @property
    def iteration(self) -> int:
        return self.engine.iteration

    def step(self, evaluate: bool) -> list[np.ndarray] | None:
        return self.engine.iterate(want_sums=evaluate)

    def describe(self, reduced: np.ndarray | None) -> dict:
        return self.engine.summarize(reduced)


class GradientAlgorithm:
    """One iteration = one epoch of mini-batch BPTT (data parallel or CELGC)."""

    def __init__(self, cfg: Config, train: Split, comm):
        info = train.info
        params = init_params(info.dim, cfg.model.hidden, info.classes, cfg.train.seed,
                             cfg.model.w_init, cfg.model.init_scale)
        self.trainer = GradientTrainer(cfg, train.local, info.n, comm, params)
        self.bytes_per_iteration = self.trainer.bytes_per_epoch
        self.last: dict = {}

    @property
    def params(self):
        return self.trainer.params

    @property
    def iteration(self) -> int:
        return self.trainer.epochs

    def step(self, evaluate: bool) -> None:
        self.last = self.trainer.epoch()

    def describe(self, reduced: None) -> dict:
        return dict(self.last)


def _over_budget(cfg: Config, comm, t_start: float) -> bool:
    """True on every rank once the slowest rank has used ``train.budget_seconds``."""
    if cfg.train.budget_seconds <= 0:
        return False
    elapsed = comm.allreduce_max(np.array([time.perf_counter() - t_start]))[0]
    return bool(elapsed >= cfg.train.budget_seconds)


def _fault_iteration(rank: int) -> int | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    fault_rank, iteration = (int(v) for v in spec.split(":"))
    return iteration if fault_rank == rank else None


def run_training(cfg: Config, comm) -> dict:
    """Train with ``cfg`` on ``comm``; returns the summary (identical on every rank)."""
    log = get_logger()
    train, test = load_data(cfg, comm)
    log.info("padmmirnn %s, %d rank(s); configuration:\n%s", __version__, comm.size,
             cfg.to_toml().rstrip())
    out_dir = comm.bcast(cfg.output.dir or default_out_dir(cfg.train.algo))
    info = train.info
    log.info("data: %s (%d samples, T=%d, %s input size %d, %d classes%s)%s", info.path, info.n,
             info.steps, info.kind, info.dim, info.classes,
             ", many-to-many" if info.many_to_many else "",
             f"; test: {test.info.path} ({test.info.n})" if test else "; no test split")
    algo = (AdmmAlgorithm if cfg.train.algo == "admm" else GradientAlgorithm)(cfg, train, comm)
    out = RunOutput(out_dir, comm.rank == 0)
    out.write_config(cfg.to_toml())
    log.info("output: %s", out_dir)
    total = cfg.train.iterations
    fault_at = _fault_iteration(comm.rank)
    progress = Progress(total, comm.rank, cfg.output.log_every)
    t_start = time.perf_counter()
    timed = np.zeros(3)  # compute seconds, communication seconds, iterations (after warm-up)
    metrics: dict = {}
    try:
        for k in range(1, total + 1):
            if k == fault_at:
                raise RuntimeError(f"fault injected by {FAULT_ENV} at iteration {k}")
            last = k == total or _over_budget(cfg, comm, t_start)
            evaluate = last or k % cfg.train.eval_every == 0
            comm_before = comm.timer.seconds
            t0 = time.perf_counter()
            sums = algo.step(evaluate)
            t_iter = time.perf_counter() - t0
            t_comm = comm.timer.seconds - comm_before
            if k > TIMING_WARMUP:
                timed += (t_iter - t_comm, t_comm, 1)
            if not evaluate:
                progress.update(k, "")
                continue
            metrics, reduced = evaluate_params(algo.params, cfg, comm, train, test, sums)
            metrics.update(algo.describe(reduced))
            t_max = comm.allreduce_max(np.array([t_iter - t_comm, t_comm]))
            record = {"iteration": k, "wall_time_s": time.perf_counter() - t_start, **metrics,
                      "t_compute_s": t_max[0], "t_comm_s": t_max[1]}
            out.metrics(record)
            if not np.isfinite(metrics["train_loss"]):
                log.warning("training loss is not finite at iteration %d: stopping", k)
                break
            progress.update(k, _brief(metrics))
            if last:
                break
        progress.close()
        if total == 0:
            metrics, _ = evaluate_params(algo.params, cfg, comm, train, test)
        wall = time.perf_counter() - t_start
        per_iter = comm.allreduce_max(timed[:2] / max(timed[2], 1))
        summary = {
            "algo": cfg.train.algo,
            "parallel": "sync" if comm.size > 1 else "none",
            "ranks": comm.size,
            "iterations": algo.iteration,
            **{k: metrics.get(k) for k in ("train_loss", "train_accuracy", "test_loss",
                                           "test_accuracy", "objective")},
            "wall_time_s": wall,
            "time_per_iteration_s": float(per_iter.sum()),
            "iteration_unit": "iteration" if cfg.train.algo == "admm" else "epoch",
            "t_compute_s": float(per_iter[0]),
            "t_comm_s": float(per_iter[1]),
            "bytes_reduced_per_iteration": algo.bytes_per_iteration,
            "config_hash": cfg.hash(),
        }
        if comm.rank == 0:
            save_weights(out.path("weights.h5"), algo.params, weights_meta(cfg, info))
        out.summary(summary)
        log.info("done: %d iterations in %.1f s (%.3f s/iteration, %.1f%% communication); "
                 "train accuracy %.4f, test accuracy %s", algo.iteration, wall,
                 summary["time_per_iteration_s"],
                 100 * per_iter[1] / max(per_iter.sum(), 1e-12),
                 summary["train_accuracy"], _fmt(summary["test_accuracy"]))
        return summary
    finally:
        out.close()


def weights_meta(cfg: Config, info: datasets.DatasetInfo) -> dict:
    return {
        "activation": cfg.model.activation, "loss": cfg.model.loss, "input_kind": info.kind,
        "input_dim": info.dim, "hidden": cfg.model.hidden, "classes": info.classes,
        "many_to_many": info.many_to_many, "config_toml": cfg.to_toml(),
    }


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _brief(m: dict) -> str:
    head = f"obj={m['objective']:.4g} " if "objective" in m else ""
    return (f"{head}train_loss={m['train_loss']:.4g} train_acc={m['train_accuracy']:.4f} "
            f"test_acc={_fmt(m['test_accuracy'])}")

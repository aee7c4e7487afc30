"""A training run: validate, load this rank's slice, iterate, evaluate, write outputs."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from padmmirnn import data as datasets
from padmmirnn._version import __version__
from padmmirnn.admm import AdmmEngine
from padmmirnn.checkpoint import save_weights
from padmmirnn.comm import agree
from padmmirnn.config import Config
from padmmirnn.errors import DataError
from padmmirnn.logs import Progress, get_logger
from padmmirnn.model import loss_sums
from padmmirnn.outputs import RunOutput


@dataclass
class Split:
    info: datasets.DatasetInfo
    local: datasets.LocalData


def load_split(path: str, comm, dtype: np.dtype, what: str) -> Split:
    """Check the file and read this rank's slice; a problem on any rank stops all."""
    info = agree(comm, lambda: datasets.read_info(path))
    if info.n < comm.size:
        raise DataError(f"{path}: {info.n} {what} samples cannot be split over {comm.size} "
                        f"ranks (every rank needs at least one)")
    start, stop = datasets.partition(info.n, comm.size, comm.rank)
    local = agree(comm, lambda: datasets.read_slice(info, start, stop, dtype))
    return Split(info, local)


def load_data(cfg: Config, comm) -> tuple[Split, Split | None]:
    dtype = np.dtype(cfg.train.dtype)
    train_path, test_path = agree(comm, lambda: datasets.resolve(cfg.data.dataset, cfg.data.test))
    train = load_split(train_path, comm, dtype, "training")
    test = load_split(test_path, comm, dtype, "test") if test_path else None
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
                    extra: np.ndarray | None = None) -> tuple[dict, np.ndarray | None]:
    """Train/test loss and accuracy of ``params`` from true forward passes, reduced
    together with ``extra`` local sums in one Allreduce."""
    act, loss, dtype = cfg.model.activation, cfg.model.loss, np.dtype(cfg.train.dtype)
    parts = [loss_sums(params, train.local, act, loss, dtype)]
    parts.append(loss_sums(params, test.local, act, loss, dtype) if test else np.zeros(3))
    if extra is not None:
        parts.append(extra)
    buf = comm.allreduce_sum(np.concatenate(parts))
    m2m = train.info.many_to_many
    metrics = _split_metrics("train", buf[0:3], m2m, loss)
    if test:
        metrics.update(_split_metrics("test", buf[3:6], m2m, loss))
    else:
        metrics.update({"test_loss": None, "test_accuracy": None})
    return metrics, (buf[6:] if extra is not None else None)


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
    engine = AdmmEngine(cfg, train.local, info.n, comm)
    out = RunOutput(out_dir, comm.rank == 0)
    out.write_config(cfg.to_toml())
    log.info("output: %s", out_dir)
    total = cfg.train.iterations
    progress = Progress(total, comm.rank, cfg.output.log_every)
    t_start = time.perf_counter()
    t_iter = 0.0
    metrics: dict = {}
    try:
        for k in range(1, total + 1):
            evaluate = k % cfg.train.eval_every == 0 or k == total
            t0 = time.perf_counter()
            sums = engine.iterate(want_sums=evaluate)
            t_iter += time.perf_counter() - t0
            if not evaluate:
                progress.update(k, "")
                continue
            metrics, reduced = evaluate_params(engine.params, cfg, comm, train, test, sums)
            metrics.update(engine.summarize(reduced))
            record = {"iteration": k, "wall_time_s": time.perf_counter() - t_start, **metrics}
            out.metrics(record)
            if not np.isfinite(metrics["objective"]):
                log.warning("objective is not finite at iteration %d: stopping", k)
                break
            progress.update(k, _brief(metrics))
        progress.close()
        if total == 0:
            metrics, _ = evaluate_params(engine.params, cfg, comm, train, test)
        wall = time.perf_counter() - t_start
        summary = {
            "algo": cfg.train.algo,
            "parallel": "sync" if comm.size > 1 else "none",
            "ranks": comm.size,
            "iterations": engine.iteration,
            **{k: metrics.get(k) for k in ("train_loss", "train_accuracy", "test_loss",
                                           "test_accuracy", "objective")},
            "wall_time_s": wall,
            "time_per_iteration_s": t_iter / max(engine.iteration, 1),
            "config_hash": cfg.hash(),
        }
        if comm.rank == 0:
            save_weights(out.path("weights.h5"), engine.params, weights_meta(cfg, info))
        out.summary(summary)
        log.info("done: %d iterations in %.1f s (%.3f s/iteration); train accuracy %.4f, "
                 "test accuracy %s", engine.iteration, wall, summary["time_per_iteration_s"],
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
    return (f"obj={m['objective']:.4g} train_acc={m['train_accuracy']:.4f} "
            f"test_acc={_fmt(m['test_accuracy'])}")

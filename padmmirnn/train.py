"""A training run: validate, load this rank's slice, iterate, evaluate, write outputs."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from padmmirnn import datafiles, samples
from padmmirnn._version import __version__
from padmmirnn.admm import AdmmEngine
from padmmirnn.checkpoint import (
    find_latest,
    read_checkpoint,
    save_weights,
    verify_checkpoint,
    write_checkpoint,
)
from padmmirnn.comm import RmaStatsExchange, SerialComm, agree, sum_parts
from padmmirnn.config import Config, straggler_rank_factor
from padmmirnn.data_parallel import GradientTrainer
from padmmirnn.errors import DataError, PadmmError
from padmmirnn.logs import Progress, get_logger
from padmmirnn.model import Params, init_params, loss_sums
from padmmirnn.outputs import TIMING_WARMUP, RunOutput

# Testing hook: "RANK:ITERATION" raises an exception on that rank at that iteration.
FAULT_ENV = "PADMMIRNN_FAULT_INJECT"


@dataclass
class Split:
    """A rank's slice of one split, whole and cut into the engine's parts."""

    info: samples.DatasetInfo
    local: samples.LocalData
    parts: list[samples.LocalData]


def load_split(path: str, cfg: Config, comm, what: str) -> Split:
    """Check the file and read this rank's slice; a problem on any rank stops all."""
    info = agree(comm, lambda: datafiles.read_info(path))
    ordered = cfg.train.reduction == "deterministic"
    units = -(-info.n // cfg.train.chunk) if ordered else info.n
    if units < comm.size:
        unit = f"chunks of {cfg.train.chunk} samples" if ordered else "samples"
        raise DataError(f"{path}: {units} {what} {unit} cannot be split over {comm.size} "
                        f"ranks (every rank needs at least one)")
    if ordered:
        start, stop = samples.chunk_partition(info.n, cfg.train.chunk, comm.size, comm.rank)
    else:
        start, stop = samples.partition(info.n, comm.size, comm.rank)
    dtype = np.dtype(cfg.train.dtype)
    local = agree(comm, lambda: datafiles.read_slice(info, start, stop, dtype))
    return Split(info, local, samples.split_parts(local, cfg.train.chunk if ordered else None))


def load_data(cfg: Config, comm) -> tuple[Split, Split | None]:
    train_path, test_path = agree(comm, lambda: datafiles.resolve(cfg.data.dataset, cfg.data.test))
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
                    extra: list[np.ndarray] | None = None,
                    train_sums: list[np.ndarray] | None = None) -> tuple[dict, np.ndarray | None]:
    """Train/test loss and accuracy of ``params`` from true forward passes, reduced
    together with ``extra`` (one vector per training part). ``train_sums`` (per part
    ``[loss, correct, rows]``) replaces the training forward pass when the caller
    already holds it (ADMM auxiliaries that are the forward pass)."""
    act, loss, dtype = cfg.model.activation, cfg.model.loss, np.dtype(cfg.train.dtype)
    ordered = cfg.train.reduction == "deterministic"
    vectors = train_sums or [loss_sums(params, part, act, loss, dtype) for part in train.parts]
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

    STATE = ("A", "S", "O", "L1", "L2", "L3")
    ROWS = ("O", "L3")  # state kept in rows [|O|, n, K]; the rest is [T, h, n]

    def __init__(self, cfg: Config, train: Split, comm, params=None):
        self.engine = AdmmEngine(cfg, train.parts, train.info.n, comm, params)
        self.bytes_per_iteration = self.engine.bytes_reduced_per_iteration
        self.comm = comm
        self.exchange = None
        self.before_solve = None  # async: the weights the last weight solve started from
        if cfg.train.parallel == "async" and comm.size > 1:
            # the engine's one statistics reduction per iteration becomes the RMA exchange
            size = self.engine.in_layout.size + self.engine.out_layout.size
            self.exchange = RmaStatsExchange(comm, size, cfg.train.staleness,
                                             kind=cfg.train.staleness_kind)
            self.engine.comm = self.exchange
            # the step control sums its trial losses over this rank alone -- except with
            # tau = 0 (iteration gap), where every rank runs every iteration in lockstep
            # and a reduction per trial is safe: then AP reproduces SP
            t = cfg.train
            lockstep = t.staleness == 0 and t.staleness_kind == "iterations"
            self.engine.loss_comm = comm if lockstep else SerialComm()

    def quiesce(self) -> None:
        """Async: once every rank has published its last iteration, the window holds
        the sum of every worker's latest contribution; all ranks solve the weights
        from it, so they hold the same weights (before checkpoints and at the end).
        With staleness 0 this is exactly the last weight solve of SP."""
        if self.exchange is None or self.before_solve is None:
            return
        engine = self.engine
        self.comm.barrier()
        snapshot = self.exchange.window_sum()
        self.comm.barrier()  # nobody publishes again before every rank has read
        # the weight blocks are solved one after the other (U from the previous W, b):
        # redo the last solve from rank 0's starting weights and the final statistics
        scalars = [engine.iteration, engine.alpha, engine.streak]
        flat = self.comm.bcast_array(np.append(self.before_solve.flat(), scalars))
        # rank 0's iteration (bounded-delay ranks differ) and step control
        engine.iteration, engine.alpha, engine.streak = int(flat[-3]), flat[-2], int(flat[-1])
        n_in = engine.in_layout.size
        engine.resolve(Params.from_flat(flat[:-3], self.before_solve),
                       engine.in_layout.unpack(snapshot[:n_in]),
                       engine.out_layout.unpack(snapshot[n_in:]), self.comm)

    def local_progress(self) -> dict:
        """Async rank logs: this rank's step length, the forward passes its step control
        ran (``backtrack_max + 1``: no trial decreased the loss, the last one was taken)
        and the mean training loss on its own samples at its current weights (what its
        local step control compares), when it backtracks."""
        e = self.engine
        if not e.cfg.backtracking() or e._loss is None:
            return {}
        rows = sum(p.state.O.shape[0] * p.state.O.shape[1] for p in e.parts)
        return {"alpha": e.alpha, "trials": e.last_trials, "local_train_loss": e._loss / rows}

    def close(self) -> None:
        if self.exchange is not None:
            self.exchange.free()
            self.exchange = None

    @property
    def params(self):
        return self.engine.params

    @property
    def iteration(self) -> int:
        return self.engine.iteration

    def step(self, evaluate: bool) -> list[np.ndarray] | None:
        if self.exchange is not None:
            self.before_solve = self.engine.params.copy()
        return self.engine.iterate(want_sums=evaluate)

    def describe(self, reduced: np.ndarray | None) -> dict:
        return {} if reduced is None else self.engine.summarize(reduced)

    def train_sums(self) -> list[np.ndarray] | None:
        return self.engine.train_loss_sums()

    def _arrays(self, part, name: str) -> np.ndarray:
        """A time-major state array of a part (s_0 = 0 is not state)."""
        a = getattr(part.state, name)
        return a[1:] if name == "S" else a

    def _sample_major(self, name: str, a: np.ndarray) -> np.ndarray:
        """``[n, T, h]`` / ``[n, |O|, K]`` view of a state array (the checkpoint layout)."""
        return np.moveaxis(a, 1, 0) if name in self.ROWS else a.transpose(2, 0, 1)

    def _state_major(self, name: str, a: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`_sample_major`."""
        return np.moveaxis(a, 0, 1) if name in self.ROWS else a.transpose(1, 2, 0)

    def per_sample(self) -> dict[str, np.ndarray]:
        """This rank's state, sample-major ``[n_local, ...]``, parts in order."""
        out = {}
        for name in self.STATE:
            blocks = [self._arrays(p, name) for p in self.engine.parts]
            if blocks[0].size:
                out[name] = np.concatenate([self._sample_major(name, b) for b in blocks])
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """Engine scalars: the step control's (admm.step_control = backtrack) and whether
        the auxiliaries are a forward pass of the weights."""
        e = self.engine
        out = {"alpha": np.float64(e.alpha), "streak": np.int64(e.streak),
               "synced": np.int64(e.synced),
               "loss": np.float64(np.nan if e._loss is None else e._loss)}
        if e._prev is not None:
            out.update({f"prev.{k}": v for k, v in e._prev.arrays().items()})
        return out

    def restore(self, iteration: int, per_sample: dict, arrays: dict) -> None:
        e = self.engine
        # the restored a, s, o are the state the run had: a forward pass of the restored
        # weights only if they were one when saved
        e.synced = bool(arrays.get("synced", 0))
        e.alpha = float(arrays.get("alpha", 1.0))
        e.streak = int(arrays.get("streak", 0))
        loss = float(arrays.get("loss", np.nan))
        e._loss = None if np.isnan(loss) else loss
        if "prev.U" in arrays:
            e._prev = Params(*(np.asarray(arrays[f"prev.{k}"], np.float64)
                               for k in Params.NAMES))
        lo = 0
        for part in self.engine.parts:
            n = part.data.n
            for name in self.STATE:
                target = self._arrays(part, name)
                if target.size:
                    target[...] = self._state_major(name, per_sample[name][lo:lo + n])
            lo += n
        self.engine.iteration = iteration


class GradientAlgorithm:
    """One iteration = one epoch of mini-batch BPTT (data parallel or CELGC)."""

    exchange = None  # gradient methods have no asynchronous mode

    def __init__(self, cfg: Config, train: Split, comm, params=None):
        info = train.info
        if params is None:
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

    def train_sums(self) -> None:
        return None  # gradient methods keep no forward pass of the full training set

    def per_sample(self) -> dict[str, np.ndarray]:
        return {}

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.trainer.optimizer.state_dict().items()}

    def restore(self, iteration: int, per_sample: dict, arrays: dict) -> None:
        self.trainer.optimizer.load_state_dict(arrays)
        self.trainer.epochs = iteration

    def quiesce(self) -> None:
        pass

    def close(self) -> None:
        pass


class StopSignals:
    """SIGTERM/SIGUSR1 (Slurm --signal) set a flag; the loop acts on it at the next
    iteration boundary, when all ranks agree (max over ranks)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int = 0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _fault_iteration(rank: int) -> int | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    fault_rank, iteration = (int(v) for v in spec.split(":"))
    return iteration if fault_rank == rank else None


def _checkpoint_dir(cfg: Config, out_dir: str) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(out_dir) / "checkpoints"


def _choose_resume(cfg: Config, comm, ckpt_dir: Path) -> Path | None:
    """Rank 0 picks the checkpoint to resume from (verified) and tells every rank."""
    choice = cfg.checkpoint.resume
    result: tuple[str | None, str | None] = (None, None)
    if comm.rank == 0 and choice != "none":
        if choice == "latest":
            found = find_latest(ckpt_dir)
            if found is None:
                get_logger().info("no usable checkpoint in %s: starting from scratch", ckpt_dir)
            result = (str(found) if found else None, None)
        else:
            problem = verify_checkpoint(Path(choice)) if Path(choice).is_file() else "not found"
            result = (choice, None) if problem is None else (None, f"checkpoint {choice} is "
                                                                   f"{problem}")
    path, error = comm.bcast(result)
    if error:
        raise PadmmError(error)
    return Path(path) if path else None


def _load_resume(cfg: Config, comm, path: Path, n_global: int, local) -> tuple:
    params, attrs, arrays, per_sample = read_checkpoint(path, local.start, local.stop)
    if attrs.get("config_hash") != cfg.hash() and not cfg.checkpoint.force:
        raise PadmmError(f"checkpoint {path} was written with a different configuration "
                         f"(hash {str(attrs.get('config_hash'))[:12]}..., this run "
                         f"{cfg.hash()[:12]}...); resume with the same settings or pass --force")
    if attrs.get("n_global") != n_global or attrs.get("algo") != cfg.train.algo:
        raise PadmmError(f"checkpoint {path} is for {attrs.get('algo')} on "
                         f"{attrs.get('n_global')} samples, not {cfg.train.algo} on {n_global}")
    return params, attrs, arrays, per_sample


def run_training(cfg: Config, comm) -> dict:
    """Train with ``cfg`` on ``comm``; returns the summary (identical on every rank).
    SIGTERM/SIGUSR1 are caught for the whole run: during the iterations they lead to
    a checkpoint and a clean exit; before or after them the run just ends normally."""
    with StopSignals() as signals:
        return _run(cfg, comm, signals)


def _run(cfg: Config, comm, signals: StopSignals) -> dict:
    log = get_logger()
    train, test = load_data(cfg, comm)
    out_dir = comm.bcast(cfg.output.dir or default_out_dir(cfg.train.algo))
    ckpt_dir = _checkpoint_dir(cfg, out_dir)
    info = train.info
    resume = _choose_resume(cfg, comm, ckpt_dir)
    if resume is not None:
        params, attrs, arrays, per_sample = agree(
            comm, lambda: _load_resume(cfg, comm, resume, info.n, train.local))
    log.info("padmmirnn %s, %d rank(s); configuration:\n%s", __version__, comm.size,
             cfg.to_toml().rstrip())
    log.info("data: %s (%d samples, T=%d, %s input size %d, %d classes%s)%s", info.path, info.n,
             info.steps, info.kind, info.dim, info.classes,
             ", many-to-many" if info.many_to_many else "",
             f"; test: {test.info.path} ({test.info.n})" if test else "; no test split")
    kind = AdmmAlgorithm if cfg.train.algo == "admm" else GradientAlgorithm
    elapsed_before = 0.0
    if resume is not None:
        algo = kind(cfg, train, comm, params)
        algo.restore(int(attrs["iteration"]), per_sample, arrays)
        elapsed_before = float(attrs.get("elapsed_s", 0.0))
        log.info("resumed from %s (iteration %d, written by %s rank(s))", resume,
                 algo.iteration, attrs.get("world_size"))
    else:
        algo = kind(cfg, train, comm)
    out = RunOutput(out_dir, comm.rank == 0, resume_after=algo.iteration if resume else None)
    out.write_config(cfg.to_toml())
    log.info("output: %s", out_dir)
    total = cfg.train.iterations
    fault_at = _fault_iteration(comm.rank)
    progress = Progress(total, comm.rank, cfg.output.log_every)
    t_start = time.perf_counter() - elapsed_before
    timed = np.zeros(3)  # compute seconds, communication seconds, iterations (after warm-up)
    metrics: dict = {}
    evaluated_at = -1  # the iteration the metrics belong to
    stopped = None
    ran = 0  # iterations run by this process (the first TIMING_WARMUP are not timed)

    starts = comm.allgather(train.local.start)
    straggler = straggler_rank_factor(cfg.train.straggler)
    slow_factor = straggler[1] if straggler and straggler[0] == comm.rank else 1.0
    rank_log = None
    if algo.exchange is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        rank_log = open(Path(out_dir) / f"async_rank{comm.rank}.jsonl", "w", buffering=1)

    def save_checkpoint() -> Path:
        t0 = time.perf_counter()
        path = write_checkpoint(
            comm, ckpt_dir, algo.iteration, params=algo.params, per_sample=algo.per_sample(),
            arrays=algo.arrays(), n_global=info.n, keep=cfg.checkpoint.keep,
            attrs={"algo": cfg.train.algo, "config_toml": cfg.to_toml(),
                   "config_hash": cfg.hash(), "world_size": comm.size,
                   "partition": np.array(starts + [info.n]),
                   "elapsed_s": time.perf_counter() - t_start})
        log.info("checkpoint %s written in %.2f s", path, time.perf_counter() - t0)
        return path

    try:
        for k in range(algo.iteration + 1, total + 1):
            if k == fault_at:
                raise RuntimeError(f"fault injected by {FAULT_ENV} at iteration {k}")
            if algo.exchange is not None:
                ended, stopped = _control_async(cfg, algo.exchange, k, t_start, signals)
                if ended or stopped:
                    break
                last = False  # the final evaluation follows the loop
                evaluate = bool(cfg.train.eval_every) and k % cfg.train.eval_every == 0
            else:
                over_budget, stopped = _control(cfg, comm, t_start, signals)
                if stopped:
                    break
                last = k == total or over_budget
                evaluate = last or k % max(cfg.train.eval_every, 1) == 0
            comm_before = comm.timer.seconds
            wait_before = algo.exchange.wait_seconds if algo.exchange is not None else 0.0
            t0 = time.perf_counter()
            sums = algo.step(evaluate)
            t_iter = time.perf_counter() - t0
            t_comm = comm.timer.seconds - comm_before
            if slow_factor > 1.0:  # a straggler: its compute takes FACTOR times longer
                time.sleep((slow_factor - 1.0) * (t_iter - t_comm))
                t_iter = time.perf_counter() - t0
            if rank_log is not None:
                rank_log.write(json.dumps({
                    "iteration": k, "wall_time_s": time.perf_counter() - t_start,
                    "iteration_s": t_iter, "comm_s": t_comm,
                    "wait_s": algo.exchange.wait_seconds - wait_before,
                    "staleness": algo.exchange.staleness, **algo.local_progress()}) + "\n")
            ran += 1
            if ran > TIMING_WARMUP:
                timed += (t_iter - t_comm, t_comm, 1)
            if cfg.checkpoint.every and k % cfg.checkpoint.every == 0:
                algo.quiesce()
                save_checkpoint()
            if not evaluate:
                progress.update(k, "")
                continue
            metrics, reduced = evaluate_params(algo.params, cfg, comm, train, test, sums,
                                               algo.train_sums())
            metrics.update(algo.describe(reduced))
            t_max = comm.allreduce_max(np.array([t_iter - t_comm, t_comm,
                                                 t_comm - t_iter]))
            record = {"iteration": k, "wall_time_s": time.perf_counter() - t_start,
                      **metrics, "t_compute_s": t_max[0], "t_comm_s": t_max[1],
                      "t_imbalance_s": t_max[0] + t_max[2]}
            out.metrics(record)
            evaluated_at = k
            if not np.isfinite(metrics["train_loss"]):
                log.warning("training loss is not finite at iteration %d: stopping", k)
                break
            progress.update(k, _brief(metrics))
            if last:
                break
        else:
            if algo.exchange is not None and algo.exchange.kind == "publishes":
                algo.exchange.propose_stop(-1, 1)  # the fastest rank ends the run
        progress.close()
        per_rank = comm.allgather(algo.iteration)  # before quiesce adopts rank 0's count
        algo.quiesce()
        if algo.exchange is not None or evaluated_at != algo.iteration:
            metrics, _ = evaluate_params(algo.params, cfg, comm, train, test)
            metrics.update(algo.describe(None) if algo.exchange is None else {})
            out.metrics({"iteration": algo.iteration,
                         "wall_time_s": time.perf_counter() - t_start, **metrics})
        if stopped:
            path = save_checkpoint()
            log.warning("stopped by %s at iteration %d; checkpoint %s. Resume with the same "
                        "command plus: --resume latest --out %s%s", stopped, algo.iteration,
                        path, out_dir, "" if ckpt_dir == Path(out_dir) / "checkpoints"
                        else f" --checkpoint-dir {ckpt_dir}")
        wall = time.perf_counter() - t_start
        mean = timed[:2] / max(timed[2], 1)
        per_iter = comm.allreduce_max(np.array([mean[0], mean[1], -mean[0]]))
        summary = {
            "algo": cfg.train.algo,
            "parallel": ("async" if algo.exchange is not None else "sync") if comm.size > 1
            else "none",
            **({"staleness": cfg.train.staleness, "staleness_kind": cfg.train.staleness_kind,
                "wait_s_per_iteration": algo.exchange.wait_seconds / max(ran, 1)}
               if algo.exchange is not None else {}),
            "ranks": comm.size,
            "iterations": algo.iteration,
            "iterations_per_rank": per_rank,
            **{k: metrics.get(k) for k in ("train_loss", "train_accuracy", "test_loss",
                                           "test_accuracy", "objective")},
            "wall_time_s": wall,
            "time_per_iteration_s": float(per_iter[0] + per_iter[1]),
            "iteration_unit": "iteration" if cfg.train.algo == "admm" else "epoch",
            "t_compute_s": float(per_iter[0]),
            "t_comm_s": float(per_iter[1]),
            "t_imbalance_s": float(per_iter[0] + per_iter[2]),
            "bytes_reduced_per_iteration": algo.bytes_per_iteration,
            "config_hash": cfg.hash(),
            "stopped": stopped,
            "resumed_from": str(resume) if resume else None,
        }
        if comm.rank == 0:
            save_weights(out.path("weights.h5"), algo.params, weights_meta(cfg, info))
        out.summary(summary)
        log.info("done: %d iterations in %.1f s (%.3f s/iteration, %.1f%% communication); "
                 "train accuracy %.4f, test accuracy %s", algo.iteration, wall,
                 summary["time_per_iteration_s"],
                 100 * per_iter[1] / max(per_iter[0] + per_iter[1], 1e-12),
                 summary["train_accuracy"], _fmt(summary["test_accuracy"]))
        algo.close()
        return summary
    except PadmmError:
        algo.close()  # raised on every rank alike (agreed errors): freeing is collective
        raise
    finally:
        # any other exception ends the job through MPI_Abort: freeing the windows here
        # (a collective) would leave this rank waiting for ranks that never come
        out.close()
        if rank_log is not None:
            rank_log.close()


def _stop_reason(cfg: Config, elapsed: float, signum: int) -> tuple[int, str | None]:
    """(code, text) of a reason to end the run: 3 a signal, 2 the walltime (both end
    with a checkpoint), 1 the training budget (a normal end), 0 none (text None)."""
    if signum:
        return 3, signal.Signals(int(signum)).name
    wall = cfg.checkpoint.max_walltime
    if wall and elapsed >= wall:
        return 2, f"--max-walltime {wall:g} s"
    if cfg.train.budget_seconds and elapsed >= cfg.train.budget_seconds:
        return 1, None
    return 0, None


def _control_async(cfg: Config, exchange, k: int, t_start: float,
                   signals: StopSignals) -> tuple[bool, str | None]:
    """Async runs agree on when to stop through the RMA window (no collective): a rank
    with a reason proposes the last iteration, and every rank stops before the first
    iteration past the agreed one. Returns (ended normally, stop reason)."""
    code, _ = _stop_reason(cfg, time.perf_counter() - t_start, signals.received)
    if code:
        # iteration gap: k + tau is the first iteration no worker can have started;
        # bounded delay: iteration counts differ anyway, everybody stops now
        exchange.propose_stop(k + exchange.tau if exchange.kind == "iterations" else -1, code)
    last, agreed = exchange.agreed_stop()
    if last is None or k <= last:
        return False, None
    return agreed == 1, {3: "signal", 2: "--max-walltime"}.get(agreed)


def _control(cfg: Config, comm, t_start: float, signals: StopSignals) -> tuple[bool, str | None]:
    """Decisions all ranks must take together, from one max-reduction: is the
    training budget used up, and must the run stop (signal on any rank, walltime)?"""
    elapsed, signum = comm.allreduce_max(np.array([time.perf_counter() - t_start,
                                                   float(signals.received)]))
    code, text = _stop_reason(cfg, elapsed, int(signum))
    return code == 1, text


def weights_meta(cfg: Config, info: samples.DatasetInfo) -> dict:
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

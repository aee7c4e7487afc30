"""A training run: read this rank's data, build the trainer, iterate, evaluate,
checkpoint, write the outputs under ``--out``.

The loop knows a training algorithm only through the
:class:`~padmmirnn.trainer.Trainer` interface, and ranks agree on when to stop
through a run control: :class:`SyncControl` (one max-reduction per iteration) or,
in asynchronous runs, :class:`~padmmirnn.admm.asynchronous.AsyncControl` (the RMA
window). A :class:`~padmmirnn.trainer.Schedule` says when to evaluate and
checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np

from padmmirnn import balance, datafiles
from padmmirnn._version import __version__
from padmmirnn.admm import AdmmEngine, asynchronous
from padmmirnn.admm.consensus import ConsensusAdmm
from padmmirnn.admm.minibatch import MinibatchAdmm
from padmmirnn.checkpoint import (
    find_latest,
    read_best,
    read_checkpoint,
    save_weights,
    verify_checkpoint,
    write_checkpoint,
)
from padmmirnn.comm import agree
from padmmirnn.comm.virtual import VirtualRanks
from padmmirnn.config import Config, check_for_ranks, straggler_rank_factor
from padmmirnn.errors import PadmmError
from padmmirnn.evaluation import evaluate_run, split_metrics
from padmmirnn.gradient.trainer import GradientTrainer
from padmmirnn.logs import Progress, get_logger
from padmmirnn.memory import check_fits
from padmmirnn.nn import Params, loss_sums
from padmmirnn.outputs import TIMING_WARMUP, RunOutput
from padmmirnn.samples import DatasetInfo
from padmmirnn.signals import Stop, StopSignals, stop_reason
from padmmirnn.splits import Split, load_data, reslice
from padmmirnn.trainer import BestSoFar, Decision, Schedule, Trainer

# Testing hook: "RANK:ITERATION" raises an exception on that rank at that iteration;
# "RANK:ITERATION:kill" kills the process there with SIGKILL (a lost node: no Python
# exception, no MPI_Abort); "RANK:ITERATION:hang" stops it there for good without
# exiting (a node that stopped answering: its process never ends, so the launcher does
# not notice).
FAULT_ENV = "PADMMIRNN_FAULT_INJECT"


class SyncControl:
    """The run control of serial and synchronous runs: before every iteration one
    max-reduction of (elapsed time, signal received) decides, identically on every
    rank, whether the run stops (signal, walltime) or this iteration is the last
    (budget, iteration count)."""

    asynchronous = False
    evaluates_alone = False  # evaluations are collective

    def __init__(self, cfg: Config, comm):
        self.cfg, self.comm = cfg, comm

    def decide(self, k: int, elapsed: float, job_elapsed: float, signum: int) -> Decision:
        elapsed, job_elapsed, signum = self.comm.allreduce_max(
            np.array([elapsed, job_elapsed, float(signum)]))
        reason, text = stop_reason(self.cfg, elapsed, job_elapsed, int(signum))
        if reason in (Stop.SIGNAL, Stop.WALLTIME):
            return Decision(stopped=text)
        return Decision(last=k == self.cfg.train.iterations or reason == Stop.BUDGET)

    def before_step(self) -> None:
        pass

    def rank_record(self) -> dict:
        return {}

    def loop_completed(self) -> None:
        pass

    def quiesce(self) -> None:
        pass

    def summary(self, ran: int) -> dict:
        return {}

    def close(self) -> None:
        pass


def build_trainer(cfg: Config, train: Split, comm, params: Params | None = None,
                  ranks: VirtualRanks | None = None):
    """The trainer of ``cfg.train.algo`` on this rank's training slice, and its run
    control; ``ranks``: the (virtual) ranks of the mini-batch ADMM trainers."""
    if cfg.train.algo != "admm":
        return GradientTrainer(cfg, train.local, train.info.n, comm, params,
                               lengths=train.lengths), \
            SyncControl(cfg, comm)
    if cfg.train.parallel == "async" and comm.size > 1:
        return asynchronous.build(cfg, train.parts, train.info.n, comm, params)
    if cfg.consensus() != "none":
        return ConsensusAdmm(cfg, train.local, train.info.n, comm, params, ranks), \
            SyncControl(cfg, comm)
    if cfg.admm.batch_size:
        return MinibatchAdmm(cfg, train.local, train.info.n, comm, params, train.parts,
                             ranks, train.lengths), SyncControl(cfg, comm)
    return AdmmEngine(cfg, train.parts, train.info.n, comm, params), SyncControl(cfg, comm)


def default_out_dir(algo: str) -> str:
    return str(Path("runs") / f"{algo}-{time.strftime('%Y%m%d-%H%M%S')}")


def weights_meta(cfg: Config, info: DatasetInfo) -> dict:
    """The attributes of ``weights.h5``: what is needed to use the weights again (the
    training file's ``prepared`` settings, such as the tokenisation level, included)."""
    with h5py.File(info.path, "r") as f:
        prepared = str(f.attrs.get("prepared", "{}"))
    return {
        "cell": cfg.model.cell, "layers": cfg.model.layers,
        "activation": cfg.model.activation, "loss": cfg.model.loss, "input_kind": info.kind,
        "input_dim": info.dim, "hidden": cfg.model.hidden, "classes": info.classes,
        "many_to_many": info.many_to_many, "config_toml": cfg.to_toml(),
        "prepared": prepared,
    }


def weights_strings(info: DatasetInfo) -> dict[str, list[str]]:
    """The string tables of the training file that ``weights.h5`` carries along: the
    vocabulary (to encode raw text) and the class names."""
    tables = {name: datafiles.read_strings(info.path, name)
              for name in ("vocabulary", "class_names")}
    return {name: table for name, table in tables.items() if table is not None}


def _fault(rank: int) -> tuple[int | None, str]:
    """The iteration of an injected fault on this rank, and its kind: ``raise``,
    ``kill`` or ``hang``."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None, "raise"
    fault_rank, iteration, *kind = spec.split(":")
    return (int(iteration) if int(fault_rank) == rank else None), (kind or ["raise"])[0]


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


def _load_resume(cfg: Config, path: Path, n_global: int, local,
                 ranks: VirtualRanks) -> tuple:
    params, attrs, arrays, per_sample = read_checkpoint(path, local.start, local.stop,
                                                        (ranks.size, ranks.local))
    attrs["best"] = read_best(path)
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
        return TrainingRun(cfg, comm, signals).run()


class TrainingRun:
    """One run, from reading the data to the summary. Every rank builds one."""

    def __init__(self, cfg: Config, comm, signals: StopSignals):
        self.cfg, self.comm, self.signals = cfg, comm, signals
        self.log = get_logger()
        check_for_ranks(cfg, comm.size)
        self.ranks = VirtualRanks(comm, cfg.train.virtual_ranks or comm.size)
        d = cfg.data
        self.train, self.test, self.val = load_data(
            d.dataset, d.test, comm, np.dtype(cfg.train.dtype), self._chunk(),
            d.validation, d.validation_fraction, cfg.train.seed)
        if self.ranks.size > self.train.info.n:
            raise PadmmError(f"train.virtual_ranks = {self.ranks.size} is more than the "
                             f"{self.train.info.n} training samples (every rank needs one)")
        # the best evaluation on the validation split, early stopping
        self.best = BestSoFar(cfg.train.monitor, cfg.train.early_stopping) if self.val \
            else None
        on_node = comm.ranks_on_node()  # every rank's state must fit, before any output
        agree(comm, lambda: check_fits(self.train.info, cfg, self.train.local.n, on_node))
        self.out_dir = comm.bcast(cfg.output.dir or default_out_dir(cfg.train.algo))
        self.ckpt_dir = (Path(cfg.checkpoint.dir) if cfg.checkpoint.dir
                         else Path(self.out_dir) / "checkpoints")
        self.resumed = _choose_resume(cfg, comm, self.ckpt_dir)
        self.elapsed_before = 0.0  # of the run a checkpoint resumes
        saved = None if self.resumed is None else agree(comm, lambda: _load_resume(
            cfg, self.resumed, self.train.info.n, self.train.local, self.ranks))
        self._log_start()
        self.trainer: Trainer
        self.trainer, self.control = self._build(saved)
        self._log_rules()
        self.schedule = Schedule.from_config(cfg, self.control.asynchronous)
        self.out = RunOutput(self.out_dir, comm.rank == 0,
                             resume_after=self.trainer.iteration if self.resumed else None)
        self.out.write_config(cfg.to_toml())
        self.log.info("output: %s", self.out_dir)
        self.starts = comm.allgather(self.train.local.start)
        self.straggler = straggler_rank_factor(cfg.train.straggler)
        self.rank_log = None
        self.timed = np.zeros(3)  # compute s, communication s, iterations (after warm-up)
        self.timed_all = np.zeros(3)  # the same over every iteration (a run too short
        # to have any past the warm-up reports these)
        self.ledger = np.zeros(2)  # synchronisations and bytes of the steps (this rank)
        self.ran = 0  # iterations run by this process
        self.metrics: dict = {}
        self.evaluated_at = -1  # the iteration the metrics belong to
        self.stopped: str | None = None
        self.reached_target: int | None = None  # iteration that reached a target
        self.early_stopped: int | None = None  # iteration after which patience ran out
        self.full_test = None  # AP consensus: rank 0's copy of the whole test split
        self.last_compute_s = 0.0  # of the last iteration (rebalancing)

    def _chunk(self) -> int | None:
        return self.cfg.train.chunk if self.cfg.train.reduction == "deterministic" else None

    def _log_start(self) -> None:
        info, test = self.train.info, self.test
        self.log.info("padmmirnn %s, %d rank(s); configuration:\n%s", __version__,
                      self.comm.size, self.cfg.to_toml().rstrip())
        val = self.val
        self.log.info("data: %s (%d samples, T=%d, %s input size %d, %d classes%s%s)%s%s",
                      info.path, info.n, info.steps, info.kind, info.dim, info.classes,
                      ", many-to-many" if info.many_to_many else "",
                      ", with lengths (the passes skip padded steps)" if info.has_lengths
                      else "",
                      f"; validation: {val.info.path} ({val.info.n}"
                      f"{', held out of the training file' if val.info.path == info.path else ''})"
                      if val else "",
                      f"; test: {test.info.path} ({test.info.n})" if test else
                      "; no test split")

    def _log_rules(self) -> None:
        """The values in force of the ADMM settings that default to a rule (``auto``)."""
        rule = getattr(self.trainer, "a", None) or getattr(self.trainer, "acfg", None)
        if rule is None:
            return
        if rule.batch_size:
            local = self.ranks.size if self.cfg.consensus() != "none" else 1
            self.log.info("mini-batch ADMM at global batch %d%s: cov_decay %.3g, trust_radius "
                          "%.3g, output_factor %.3g, block_momentum %.3g, output_trust %.3g, "
                          "average %.3g "
                          "(auto: the batch rule)", min(rule.batch_size, self.train.info.n),
                          f" ({local} ranks' local steps)" if local > 1 else "",
                          rule.cov_decay, rule.trust_radius, rule.output_factor,
                          rule.block_momentum, rule.output_trust, rule.average)
        self.log.info("ADMM weight decay nu = %.3g%s", rule.nu,
                      " (auto: the decay rule)" if self.cfg.admm.nu == "auto" else "")
        if rule.rho_schedule == "geometric":
            self.log.info("ADMM penalty growth %.4g per pass%s", rule.rho_growth,
                          " (auto: the growth rule)" if self.cfg.admm.rho_growth == "auto"
                          else "")

    def _build(self, saved: tuple | None):
        """The trainer and its control, from the checkpoint's contents when resuming."""
        cfg, comm = self.cfg, self.comm
        if saved is None:
            return build_trainer(cfg, self.train, comm, ranks=self.ranks)
        params, attrs, arrays, per_sample = saved
        per_rank = per_sample.pop("per_rank", None)
        trainer, control = build_trainer(cfg, self.train, comm, params, self.ranks)
        if getattr(trainer, "mode", None) == "duals" and per_rank is None:
            self.log.warning("%s holds no duals for %d ranks: the consensus duals start "
                             "from 0 (resume with train.virtual_ranks = the rank count that "
                             "wrote it to continue exactly)", self.resumed, self.ranks.size)
        trainer.load_state_dict({"iteration": int(attrs["iteration"]), "arrays": arrays,
                                 "per_sample": per_sample, "per_rank": per_rank or {}})
        if self.best is not None and attrs.get("best") is not None:
            self.best.load(*attrs["best"])
        self.elapsed_before = float(attrs.get("elapsed_s", 0.0))
        self.log.info("resumed from %s (iteration %d, written by %s rank(s))", self.resumed,
                      trainer.iteration, attrs.get("world_size"))
        return trainer, control

    # ------------------------------------------------------------------------ the run

    def run(self) -> dict:
        self.t_job = time.perf_counter()
        self.t_start = self.t_job - self.elapsed_before
        try:
            if self.control.asynchronous:
                Path(self.out_dir).mkdir(parents=True, exist_ok=True)
                self.rank_log = open(Path(self.out_dir) / f"async_rank{self.comm.rank}.jsonl",
                                     "w", buffering=1)
            self._loop()
            summary = self._finish()
            self.control.close()
            return summary
        except PadmmError:
            self.control.close()  # raised on every rank alike (agreed errors): collective
            raise
        finally:
            # any other exception ends the job through MPI_Abort: freeing the windows here
            # (a collective) would leave this rank waiting for ranks that never come
            self.out.close()
            if self.rank_log is not None:
                self.rank_log.close()

    def _elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def _loop(self) -> None:
        total = self.cfg.train.iterations
        fault_at, fault = _fault(self.comm.rank)
        progress = Progress(total, self.comm.rank, self.cfg.output.log_every)
        for k in range(self.trainer.iteration + 1, total + 1):
            if k == fault_at and fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            while k == fault_at and fault == "hang":
                time.sleep(60)
            if k == fault_at:
                raise RuntimeError(f"fault injected by {FAULT_ENV} at iteration {k}")
            decision = self.control.decide(k, self._elapsed(),
                                           time.perf_counter() - self.t_job,
                                           self.signals.received)
            if decision.end or decision.stopped:
                self.stopped = decision.stopped
                break
            if self.cfg.train.rebalance and self.comm.size > 1 and self.ran >= TIMING_WARMUP:
                self._rebalance(self.last_compute_s)
            evaluate = self.schedule.evaluate_at(k, decision.last)
            t_iter, t_comm = self._step(k, evaluate)
            self.last_compute_s = t_iter - t_comm
            alone = evaluate and self.control.evaluates_alone
            if alone:  # AP consensus: rank 0, no collective
                self._evaluate_snapshot(k)
            elif evaluate:  # before the checkpoint, which holds the best-so-far state
                self._evaluate(k, t_iter, t_comm)
            if self.schedule.checkpoint.due(k):
                self.control.quiesce()
                self.save_checkpoint()
            if not evaluate:
                progress.update(k, "")
                continue
            if alone:
                progress.update(k, "")
                continue
            if not np.isfinite(self.metrics["train_loss"]):
                self.log.warning("training loss is not finite at iteration %d: stopping", k)
                break
            progress.update(k, _brief(self.metrics))
            if decision.last or self._reached_target() or self._patience_spent(k):
                break
        else:
            self.control.loop_completed()
        progress.close()

    def _step(self, k: int, evaluate: bool) -> tuple[float, float]:
        """One iteration, timed: returns its wall and communication seconds."""
        ledger = self.comm.ledger
        before = (ledger.seconds, ledger.syncs, ledger.bytes)
        self.control.before_step()
        t0 = time.perf_counter()
        self.trainer.step(evaluate)
        t_iter = time.perf_counter() - t0
        t_comm = ledger.seconds - before[0]
        self.ledger += (ledger.syncs - before[1], ledger.bytes - before[2])
        slow = self.straggler.slows(self.comm.rank, k) if self.straggler else 1.0
        if slow > 1.0:  # a straggler: its compute takes FACTOR times longer
            time.sleep((slow - 1.0) * (t_iter - t_comm))
            t_iter = time.perf_counter() - t0
        if self.rank_log is not None:
            self.rank_log.write(json.dumps({
                "iteration": k, "wall_time_s": self._elapsed(), "iteration_s": t_iter,
                "comm_s": t_comm, **self.control.rank_record()}) + "\n")
        self.ran += 1
        self.timed_all += (t_iter - t_comm, t_comm, 1)
        if self.ran > TIMING_WARMUP:
            self.timed += (t_iter - t_comm, t_comm, 1)
        return t_iter, t_comm

    def _rebalance(self, compute_s: float) -> None:
        """Before an iteration, re-cut the training samples over the ranks towards the
        speeds of the last one (:mod:`padmmirnn.balance`; not after the first, which
        compiles kernels) and rebuild the trainer on the new slices from its state: the
        batches, and so the iterates, do not change."""
        n_local = self.train.local.n
        speeds = np.array(self.comm.allgather(n_local / max(compute_s, 1e-9)))
        old = [*self.starts, self.train.info.n]
        new = balance.boundaries(self.train.info.n, speeds, old)
        if not balance.worth_moving(old, new, self.train.info.n):
            return
        r = self.comm.rank
        self.train = reslice(self.train, self.comm, new[r], new[r + 1],
                             np.dtype(self.cfg.train.dtype))
        state = self.trainer.state_dict()
        self.trainer, self.control = build_trainer(self.cfg, self.train, self.comm,
                                                   self.trainer.params, self.ranks)
        self.trainer.load_state_dict(state)
        self.starts = new[:-1]
        self.log.info("rebalanced: rank blocks %s (speeds %s samples/s)", new,
                      np.array2string(speeds, precision=0))

    def _evaluate(self, k: int, t_iter: float, t_comm: float) -> None:
        extra, train_sums = self.trainer.evaluation_terms()
        self.metrics, reduced = evaluate_run(self.trainer.model, self.cfg, self.comm,
                                             self.train, self.test, extra, train_sums,
                                             self.val)
        self.metrics.update(self.trainer.describe(reduced))
        if self.best is not None:
            self.best.update(k, self.metrics, self.trainer.model)
        t_max = self.comm.allreduce_max(np.array([t_iter - t_comm, t_comm, t_comm - t_iter,
                                                  *self.ledger]))
        self.out.metrics({"iteration": k, "wall_time_s": self._elapsed(), **self.metrics,
                          "t_compute_s": t_max[0], "t_comm_s": t_max[1],
                          "t_imbalance_s": t_max[0] + t_max[2],
                          "syncs": int(t_max[3]), "bytes": int(t_max[4])})
        self.evaluated_at = k

    def _evaluate_snapshot(self, k: int) -> None:
        """Asynchronous consensus: rank 0 evaluates the consensus of the latest window
        snapshot on the whole test split (and its own training samples), with no
        collective, and proposes to stop once it reaches the target."""
        if self.comm.rank != 0:
            return
        if self.full_test is None and self.test is not None:
            info = self.test.info
            self.full_test = datafiles.read_slice(info, 0, info.n,
                                                  np.dtype(self.cfg.train.dtype))
        params = self.control.snapshot_params()
        m = self.cfg.model
        metrics = split_metrics("train", loss_sums(params, self.train.local, m.activation,
                                                   m.loss), self.train.info.many_to_many,
                                m.loss)
        if self.full_test is not None:
            metrics.update(split_metrics("test", loss_sums(params, self.full_test,
                                                           m.activation, m.loss),
                                         self.train.info.many_to_many, m.loss))
        else:
            metrics.update({"test_loss": None, "test_accuracy": None})
        self.metrics = metrics
        self.out.metrics({"iteration": k, "wall_time_s": self._elapsed(), **metrics,
                          "evaluated": "rank 0: window snapshot; train metrics of its own "
                                       "samples"})
        if self._reached_target():
            self.control.propose(k, Stop.BUDGET)

    def _reached_target(self) -> bool:
        """Whether this evaluation reached ``train.target_accuracy`` or
        ``train.target_loss`` (on the test split, else the validation one, else the
        training one; the metrics are reduced, so every rank decides the same)."""
        t = self.cfg.train
        split = next((s for s in ("test", "val", "train")
                      if self.metrics.get(f"{s}_accuracy") is not None), None)
        if split is None:
            return self.reached_target is not None
        accuracy, loss = self.metrics[f"{split}_accuracy"], self.metrics[f"{split}_loss"]
        if self.reached_target is None and (
                (t.target_accuracy and accuracy >= t.target_accuracy)
                or (t.target_loss and loss <= t.target_loss)):
            self.reached_target = self.trainer.iteration
        return self.reached_target is not None

    def _patience_spent(self, k: int) -> bool:
        """Early stopping: ``train.early_stopping`` evaluations without a better
        validation metric (reduced, so every rank decides the same)."""
        if self.best is not None and self.best.exhausted():
            self.early_stopped = k
            self.log.info("early stopping after iteration %d: %s has not improved in %d "
                          "evaluations (best %.6g at iteration %d)", k, self.best.monitor,
                          self.best.since, self.best.value, self.best.iteration)
        return self.early_stopped is not None

    def _finish(self) -> dict:
        """After the loop: final evaluation, stop checkpoint, weights and summary."""
        comm, trainer = self.comm, self.trainer
        per_rank = comm.allgather(trainer.iteration)  # before quiesce adopts rank 0's count
        if self.control.evaluates_alone:  # rank 0 alone saw the target
            self.reached_target = comm.bcast(self.reached_target)
        self.control.quiesce()
        asynchronous_run = self.control.asynchronous
        if asynchronous_run or self.evaluated_at != trainer.iteration:
            # not a scheduled evaluation: it does not count for the best-so-far state
            # (a run resumed from the stop checkpoint must pick what an uninterrupted
            # run picks)
            self.metrics, _ = evaluate_run(trainer.model, self.cfg, comm, self.train,
                                           self.test, validation=self.val)
            if not asynchronous_run:
                self.metrics.update(trainer.describe(None))
            self.out.metrics({"iteration": trainer.iteration,
                              "wall_time_s": self._elapsed(), **self.metrics})
        if self.stopped:
            path = self.save_checkpoint()
            resume_dir = ("" if self.ckpt_dir == Path(self.out_dir) / "checkpoints"
                          else f" --checkpoint-dir {self.ckpt_dir}")
            self.log.warning("stopped by %s at iteration %d; checkpoint %s. Resume with the "
                             "same command plus: --resume latest --out %s%s", self.stopped,
                             trainer.iteration, path, self.out_dir, resume_dir)
        summary = self._summary(per_rank)
        if comm.rank == 0:
            save_weights(self.out.path("weights.h5"), self._final_params(),
                         weights_meta(self.cfg, self.train.info),
                         weights_strings(self.train.info))
        self.out.summary(summary)
        self.log.info("done: %d iterations in %.1f s (%.3f s/iteration, %.1f%% "
                      "communication); train accuracy %.4f, test accuracy %s",
                      trainer.iteration, summary["wall_time_s"],
                      summary["time_per_iteration_s"], 100 * summary["t_comm_s"]
                      / max(summary["time_per_iteration_s"], 1e-12),
                      summary["train_accuracy"], _fmt(summary["test_accuracy"]))
        if self.best is not None and self.best.iteration is not None:
            self.log.info("best %s %.6g at iteration %d (test accuracy %s)%s", self.best.monitor,
                          self.best.value, self.best.iteration,
                          _fmt(summary["best_test_accuracy"]),
                          "; weights.h5 holds its weights" if summary["weights_from"] == "best"
                          else "")
        return summary

    def _final_params(self) -> Params:
        """What ``weights.h5`` holds: the best evaluation's weights with a validation
        split and ``train.restore_best`` (when there was one), else the last."""
        best = self.best
        if best is not None and self.cfg.train.restore_best and best.params is not None:
            return best.params
        return self.trainer.model

    def _best_summary(self) -> dict:
        """The summary keys of the validation split: the best evaluation (iteration,
        validation and test metrics of its weights), which weights ``weights.h5``
        holds, and where early stopping ended the run."""
        best = self.best
        if best is None:
            return {}
        m = best.metrics
        restored = self.cfg.train.restore_best and best.params is not None
        return {"monitor": best.monitor, "best_iteration": best.iteration,
                **{f"best_{k}": m.get(k) for k in ("val_loss", "val_accuracy", "test_loss",
                                                    "test_accuracy", "train_loss",
                                                    "train_accuracy")},
                "weights_from": "best" if restored else "last",
                "early_stopped_at": self.early_stopped,
                "val_loss": self.metrics.get("val_loss"),
                "val_accuracy": self.metrics.get("val_accuracy")}

    def _summary(self, per_rank: list[int]) -> dict:
        cfg, comm, trainer = self.cfg, self.comm, self.trainer
        wall = self._elapsed()
        timed = self.timed if self.timed[2] else self.timed_all
        mean = timed[:2] / max(timed[2], 1)
        per_iter = comm.allreduce_max(np.array([mean[0], mean[1], -mean[0], *self.ledger]))
        parallel = "none" if comm.size == 1 else (
            "async" if self.control.asynchronous else "sync")
        return {
            "algo": cfg.train.algo,
            "parallel": parallel,
            **self.control.summary(self.ran),
            "ranks": comm.size,
            **({"virtual_ranks": self.ranks.size, "ledger": "counted"}
               if self.ranks.counted else {}),
            "iterations": trainer.iteration,
            "iterations_per_rank": per_rank,
            **{k: self.metrics.get(k) for k in ("train_loss", "train_accuracy", "test_loss",
                                                "test_accuracy", "objective")},
            "wall_time_s": wall,
            "time_per_iteration_s": float(per_iter[0] + per_iter[1]),
            "iteration_unit": trainer.unit,
            "t_compute_s": float(per_iter[0]),
            "t_comm_s": float(per_iter[1]),
            "t_imbalance_s": float(per_iter[0] + per_iter[2]),
            **({"simulated_network": comm.network.describe()} if comm.network.active
               else {}),
            "bytes_reduced_per_iteration": trainer.bytes_per_step,
            "syncs": int(per_iter[3]),
            "bytes": int(per_iter[4]),
            "config_hash": cfg.hash(),
            "stopped": self.stopped,
            "target_reached_at": self.reached_target,
            **self._best_summary(),
            "resumed_from": str(self.resumed) if self.resumed else None,
        }

    def save_checkpoint(self) -> Path:
        cfg, info = self.cfg, self.train.info
        t0 = time.perf_counter()
        state = self.trainer.state_dict()
        path = write_checkpoint(
            self.comm, self.ckpt_dir, state["iteration"], params=self.trainer.params,
            per_sample=state["per_sample"], arrays=state["arrays"], n_global=info.n,
            keep=cfg.checkpoint.keep, per_rank=state.get("per_rank"),
            ranks=self.ranks.size, best=None if self.best is None else self.best.state(),
            attrs={"algo": cfg.train.algo, "config_toml": cfg.to_toml(),
                   "config_hash": cfg.hash(), "world_size": self.comm.size,
                   "partition": np.array(self.starts + [info.n]),
                   "elapsed_s": self._elapsed()})
        self.log.info("checkpoint %s written in %.2f s", path, time.perf_counter() - t0)
        return path


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _brief(m: dict) -> str:
    head = f"obj={m['objective']:.4g} " if "objective" in m else ""
    val = f"val_acc={m['val_accuracy']:.4f} " if "val_accuracy" in m else ""
    return (f"{head}train_loss={m['train_loss']:.4g} train_acc={m['train_accuracy']:.4f} "
            f"{val}test_acc={_fmt(m['test_accuracy'])}")

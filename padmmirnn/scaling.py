"""Strong and weak scaling studies: plan Slurm jobs, run them locally, report and model.

A study lives in one folder::

    DIR/manifest.json          the points (one per rank count) and how to run them
    DIR/train.sbatch           a copy of slurm/train.sbatch, which every point script runs
    DIR/{kind}-{P}r-{M}n.sbatch one Slurm batch script per point, from
                               slurm/scaling-point.sbatch.in
    DIR/data/*_train.h5        the datasets the points need (N samples each)
    DIR/runs/{name}/           each point's training output (summary.json, metrics.jsonl, ...)
    DIR/logs/                  Slurm and local-run logs
    DIR/scaling.csv, model.json, scaling-{kind}.png   written by the report

Weak scaling keeps the samples per rank fixed, so every rank count needs its own
dataset of N = n * P samples; strong scaling uses one dataset of N samples for all
rank counts. The plan writes those datasets from a source dataset (the built-in default
unless ``--dataset`` names another): its first N samples, repeated cyclically when N is
larger than the source (the cost of an ADMM iteration depends on the sample count, not
on the values, so repeated samples time the same; their accuracy means nothing).

Timings come from the runs' own records. Synchronous runs: ``metrics.jsonl`` holds, for
every iteration, the compute and communication seconds of the slowest rank (max over
ranks); the first ``TIMING_WARMUP`` iterations (compilation, first touch) are dropped
and the median over the remaining iterations is taken. Asynchronous runs: the per-rank
logs ``async_rank{r}.jsonl``; the median over iterations per rank, then the slowest rank.

The model fitted to the measured points (oversubscribed points excluded) is::

    t_iteration(P, N) = c * (N / P) * T + d  +  alpha * ceil(log2 P) + beta * 2 (P - 1) / P * B

with T the sequence length, B the bytes of the per-iteration reduction, c the compute
seconds per sample-step, d the per-iteration compute that does not shrink with P (the
replicated weight solves), alpha the latency of one reduction stage and beta the
seconds per byte (1 / bandwidth) of a bandwidth-optimal Allreduce. The reduction time is
measured as the time in the collective, so alpha also absorbs waiting for the slowest
rank (load imbalance, a shared machine's noise).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import h5py
import numpy as np

from padmmirnn import datafiles
from padmmirnn._version import __version__
from padmmirnn.errors import PadmmError
from padmmirnn.outputs import TIMING_WARMUP

MANIFEST = "manifest.json"
KINDS = ("strong", "weak")
SOURCE_ROOT = Path(__file__).resolve().parents[1]
THREAD_VARIABLES = ("PADMMIRNN_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS",
                    "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
CSV_COLUMNS = ("source", "kind", "name", "parallel", "git_revision", "launcher", "nodes",
               "ranks", "threads", "oversubscribed", "samples", "steps", "hidden",
               "iterations", "timed_iterations", "t_iter_median_s", "t_iter_max_s",
               "t_compute_s", "t_comm_s", "bytes_reduced_per_iteration", "samples_per_s",
               "speedup", "efficiency", "model_t_iter_s", "stopped")


def parse_int_list(text: str, what: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; every entry a positive integer."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PadmmError(f"{what} needs comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise PadmmError(f"{what} needs positive integers, got {text!r}")
    return values


def git_revision() -> str:
    """The source tree's commit (``-dirty`` with uncommitted changes), else ``unknown``."""
    if not (SOURCE_ROOT / ".git").exists():
        return "unknown"
    try:
        head = subprocess.run(["git", "-C", str(SOURCE_ROOT), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=20, check=True)
        status = subprocess.run(["git", "-C", str(SOURCE_ROOT), "status", "--porcelain",
                                 "--untracked-files=no"],
                                capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PlanOptions:
    """What ``padmmirnn scaling plan`` was asked for (validated by :meth:`validate`)."""

    kind: str
    ranks: tuple[int, ...]
    nodes: tuple[int, ...]
    samples: int | None
    samples_per_rank: int | None
    dataset: str
    algo: str
    parallel: str
    iterations: int
    threads: int
    sets: tuple[str, ...]
    time_limit: str
    signal_seconds: int
    partition: str | None
    account: str | None
    overcommit: bool
    launcher: str
    slurm_dir: str | None
    out: str

    @classmethod
    def from_text(cls, ranks: str, nodes: str | None, **kwargs) -> PlanOptions:
        """Options with ``--ranks``/``--nodes`` given as comma-separated text."""
        rank_list = parse_int_list(ranks, "--ranks")
        node_list = parse_int_list(nodes, "--nodes") if nodes else [1]
        if len(node_list) == 1:
            node_list *= len(rank_list)
        if len(node_list) != len(rank_list):
            raise PadmmError(f"--nodes needs one value, or one per rank count "
                             f"({len(rank_list)}); got {nodes!r}")
        return cls(ranks=tuple(rank_list), nodes=tuple(node_list), **kwargs).validate()

    def validate(self) -> PlanOptions:
        if self.kind not in KINDS:
            raise PadmmError(f"--kind must be strong or weak, got {self.kind!r}")
        if self.kind == "weak" and not self.samples_per_rank:
            raise PadmmError("weak scaling keeps the samples per rank fixed: pass "
                             "--samples-per-rank n")
        if self.kind == "strong" and self.samples_per_rank:
            raise PadmmError("strong scaling keeps the total fixed: pass --samples N (or "
                             "nothing for the whole dataset), not --samples-per-rank")
        for name, value in (("--samples", self.samples),
                            ("--samples-per-rank", self.samples_per_rank)):
            if value is not None and value < 1:
                raise PadmmError(f"{name} must be positive, got {value}")
        if self.parallel not in ("sync", "async"):
            raise PadmmError(f"--parallel must be sync or async, got {self.parallel!r}")
        if self.launcher not in ("srun", "mpiexec"):
            raise PadmmError(f"--launcher must be srun or mpiexec, got {self.launcher!r}")
        if self.iterations < 1 or self.threads < 1 or self.signal_seconds < 0:
            raise PadmmError("--iterations and --threads must be positive, --signal-seconds "
                             "not negative")
        if len(set(zip(self.ranks, self.nodes, strict=True))) != len(self.ranks):
            raise PadmmError(f"--ranks lists a point twice: {self.ranks}")
        for ranks, nodes in zip(self.ranks, self.nodes, strict=True):
            if nodes > ranks:
                raise PadmmError(f"{ranks} rank(s) cannot fill {nodes} nodes")
        return self


@dataclass(frozen=True)
class Point:
    """One job of a study, as recorded in the manifest (paths relative to the study)."""

    name: str
    kind: str
    ranks: int
    nodes: int
    threads: int
    samples: int
    steps: int
    hidden: int
    parallel: str
    dataset: str
    out: str
    script: str
    train_args: tuple[str, ...]
    git_revision: str


def _slurm_files(folder: str | None) -> tuple[Path, Path]:
    """``train.sbatch`` and ``scaling-point.sbatch.in`` of ``folder`` (default: the
    installed templates, ``padmmirnn.slurm`` = the source tree's ``slurm/``)."""
    root = Path(folder) if folder else Path(str(resources.files("padmmirnn.slurm")))
    files = root / "train.sbatch", root / "scaling-point.sbatch.in"
    for f in files:
        if not f.is_file():
            raise PadmmError(f"{f}: not found; pass --slurm-dir DIR (the slurm/ folder of "
                             "the padmmirnn source tree)")
    return files


def _source_stem(path: str) -> str:
    name = Path(path).name
    for suffix in ("_train.h5", ".h5"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def prepare_dataset(source: str, samples: int, path: Path) -> None:
    """Write ``samples`` training sequences to ``path``: the first ones of ``source``,
    repeated cyclically when the source has fewer. No test split (no test evaluation)."""
    info = datafiles.read_info(source)
    take = min(samples, info.n)
    with h5py.File(source, "r") as f:
        inputs, targets = f["inputs"][:take], f["targets"][:take]
        licence = str(f.attrs.get("license", ""))
        vocab = int(f.attrs["vocab"]) if info.kind == "tokens" else None
    how = f"the first {take} samples of {source}"
    if samples > take:
        index = np.arange(samples) % take
        inputs, targets = inputs[index], targets[index]
        how += f", repeated cyclically to {samples}"
    datafiles.write_dataset(path, inputs, targets, classes=info.classes, vocab=vocab,
                           source=f"padmmirnn scaling plan: {how}", license=licence,
                           extra={"scaling_source": source})


def _sbatch_script(template: str, opts: PlanOptions, point: Point, root: Path) -> str:
    """Fill the ``{{NAME}}`` fields of ``slurm/scaling-point.sbatch.in`` for one point."""
    extra = [f"#SBATCH --{flag}" + (f"={value}" if value is not True else "")
             for flag, value in (("overcommit", opts.overcommit), ("partition", opts.partition),
                                 ("account", opts.account)) if value]
    fields = {
        "NAME": point.name,
        "DESCRIPTION": f"{point.kind} scaling, {point.ranks} rank(s) on {point.nodes} "
                       f"node(s), {point.samples} samples",
        "VERSION": __version__, "GIT_REVISION": point.git_revision, "STUDY": str(root),
        "NODES": str(point.nodes), "RANKS": str(point.ranks), "THREADS": str(point.threads),
        "TIME": opts.time_limit, "SIGNAL_SECONDS": str(opts.signal_seconds),
        "LOG": f"{root / 'logs' / point.name}-%j.out",
        "PYTHON": sys.executable, "LAUNCHER": opts.launcher,
        "TRAIN_SCRIPT": shlex.quote(str(root / "train.sbatch")),
        "TRAIN_ARGS": shlex.join(_absolute_args(point, root)),
    }
    # the optional #SBATCH lines replace their field's whole line (none: no blank line)
    text = template.replace("{{EXTRA_SBATCH}}\n", "".join(f"{line}\n" for line in extra))
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        unknown = text[text.index("{{"):].split("}}")[0] + "}}"
        raise PadmmError(f"scaling-point.sbatch.in: unknown field {unknown}")
    return text


def _absolute_args(point: Point, root: Path) -> list[str]:
    """The point's ``padmmirnn train`` options with the study's paths made absolute."""
    args = list(point.train_args)
    for flag, rel in (("--dataset", point.dataset), ("--out", point.out)):
        args[args.index(flag) + 1] = str(root / rel)
    return args


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise PadmmError(f"{path}: no scaling study here (write one with padmmirnn scaling plan)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PadmmError(f"{path}: unreadable manifest ({exc})") from None


def _points(manifest: dict) -> list[Point]:
    return [Point(**{**p, "train_args": tuple(p["train_args"])}) for p in manifest["points"]]


def plan(opts: PlanOptions) -> list[str]:
    """Write the datasets, one sbatch script per point and the manifest; an existing
    study in the same folder keeps its other points (e.g. strong, then weak)."""
    from padmmirnn.config import load_config, parse_override

    overrides = dict(parse_override(s) for s in opts.sets)
    overrides.update({"train.algo": opts.algo, "train.iterations": opts.iterations})
    cfg = load_config(None, overrides)  # a bad --set fails here, before any file is written
    source = datafiles.resolve(opts.dataset)[0]
    info = datafiles.read_info(source)
    train_script, template = _slurm_files(opts.slurm_dir)
    sizes = [opts.samples_per_rank * ranks if opts.kind == "weak" else (opts.samples or info.n)
             for ranks in opts.ranks]
    for ranks, samples in zip(opts.ranks, sizes, strict=True):
        if samples < ranks:
            raise PadmmError(f"{samples} samples cannot be split over {ranks} ranks")
    root = Path(opts.out).resolve()
    for sub in ("data", "logs", "runs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(root) if (root / MANIFEST).exists() else {"points": []}
    shutil.copyfile(train_script, root / "train.sbatch")
    point_template = template.read_text()
    revision = git_revision()
    lines, new = [], []
    for ranks, nodes, samples in zip(opts.ranks, opts.nodes, sizes, strict=True):
        data_rel = f"data/{_source_stem(source)}-{samples}_train.h5"
        if not (root / data_rel).is_file() or datafiles.read_info(str(root / data_rel)).n \
                != samples:
            prepare_dataset(source, samples, root / data_rel)
            lines.append(f"wrote {root / data_rel} ({samples} samples from {source})")
        name = f"{opts.kind}-{ranks}r-{nodes}n"
        parallel = "none" if ranks == 1 else opts.parallel
        train_args = ["--dataset", data_rel, "--algo", opts.algo, "--parallel", parallel,
                      "--iterations", str(opts.iterations)]
        for s in opts.sets:
            train_args += ["--set", s]
        train_args += ["--resume", "none", "--out", f"runs/{name}"]
        point = Point(name=name, kind=opts.kind, ranks=ranks, nodes=nodes,
                      threads=opts.threads, samples=samples, steps=info.steps,
                      hidden=cfg.model.hidden, parallel=parallel, dataset=data_rel,
                      out=f"runs/{name}", script=f"{name}.sbatch",
                      train_args=tuple(train_args), git_revision=revision)
        (root / point.script).write_text(_sbatch_script(point_template, opts, point, root))
        new.append(point)
        lines.append(f"wrote {root / point.script}")
    names = {p.name for p in new}
    kept = [p for p in _points(manifest) if p.name not in names]
    manifest = {"format": 1, "padmmirnn_version": __version__, "updated": time.strftime(
        "%Y-%m-%dT%H:%M:%S%z"), "points": [asdict(p) for p in kept + new]}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    lines.append(f"wrote {root / MANIFEST} ({len(kept) + len(new)} points). Submit: for f in "
                 f"{root}/{opts.kind}-*.sbatch; do sbatch \"$f\"; done   or run here: "
                 f"padmmirnn scaling run {root}")
    return lines


# --------------------------------------------------------------------------- run


def _find_mpiexec(path: str | None) -> str:
    found = path or shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or \
        shutil.which("mpiexec")
    if not found:
        raise PadmmError("mpiexec not found: pass --mpiexec PATH")
    return found


def _write_launch_env(out: Path, values: dict) -> None:
    with open(out / "launch.env", "a") as f:
        f.writelines(f"{k}={v}\n" for k, v in values.items())


def run_points(directory: str, only: str | None = None, mpiexec: str | None = None,
               timeout: float = 900.0, say: Callable[[str], None] = print) -> list[str]:
    """Run the study's points one after another on this machine with ``mpiexec -n P``
    (a workstation, or inside an interactive allocation), each under ``timeout``;
    ``say`` gets one line per finished point. Returns the closing lines."""
    root = Path(directory).resolve()
    points = _points(_read_manifest(root))
    if only:
        wanted = {n.strip() for n in only.split(",") if n.strip()}
        unknown = wanted - {p.name for p in points}
        if unknown:
            raise PadmmError(f"no such point(s): {', '.join(sorted(unknown))}")
        points = [p for p in points if p.name in wanted]
    launcher = _find_mpiexec(mpiexec)
    (root / "logs").mkdir(exist_ok=True)
    failed = []
    for point in points:
        out = root / point.out
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        env = {**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(point.threads))}
        _write_launch_env(out, {"launcher": "mpiexec", "job_id": "", "nodes": 1,
                                "ranks": point.ranks, "threads": point.threads,
                                "cpus_on_node": len(os.sched_getaffinity(0)),
                                "node_list": os.uname().nodename,
                                "git_revision": git_revision(),
                                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        cmd = [launcher, "-n", str(point.ranks), sys.executable, "-P", "-m", "padmmirnn",
               "train", *_absolute_args(point, root)]
        log = root / "logs" / f"{point.name}-local.out"
        t0 = time.monotonic()
        code = _run_with_timeout(cmd, env, log, timeout)
        _write_launch_env(out, {"exit_code": code})
        summary = out / "summary.json"
        if code == 0 and summary.is_file():
            s = json.loads(summary.read_text())
            say(f"{point.name}: {s['iterations']} iterations, "
                f"{s['time_per_iteration_s']:.3f} s/iteration "
                f"({time.monotonic() - t0:.0f} s with start-up)")
        else:
            failed.append(point.name)
            say(f"{point.name}: FAILED (exit {code}), see {log}")
    if failed:
        raise PadmmError(f"{len(failed)} point(s) failed: {', '.join(failed)}")
    return [f"ran {len(points)} point(s); next: padmmirnn scaling report {root}"]


def _run_with_timeout(cmd: list[str], env: dict, log: Path, timeout: float) -> int:
    """Run ``cmd`` in its own process group, output to ``log``; on timeout the whole
    group (mpiexec and its ranks) is killed and -9 returned."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\nscaling run: killed after {timeout:.0f} s\n")
            return -9


# --------------------------------------------------------------------------- measure


@dataclass
class Measured:
    """One point's timings, read back from its outputs."""

    point: Point
    parallel: str
    launcher: str
    cpus_on_node: int
    git_revision: str
    iterations: int
    timed_iterations: int
    t_iter_median_s: float
    t_iter_max_s: float
    t_compute_s: float
    t_comm_s: float
    bytes_reduced_per_iteration: int
    stopped: str | None

    @property
    def oversubscribed(self) -> bool:
        """More threads on a node than it has CPUs."""
        per_node = math.ceil(self.point.ranks / self.point.nodes) * self.point.threads
        return per_node > self.cpus_on_node


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_launch_env(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k: v for k, v in pairs}


@dataclass(frozen=True)
class Timings:
    """Seconds per timed iteration of the slowest rank: median and maximum over
    iterations, and the medians of its compute and communication parts."""

    median_s: float
    max_s: float
    compute_s: float
    comm_s: float
    timed: int


def iteration_timings(out: Path, warmup: int) -> Timings | None:
    """The timings of a run folder after dropping ``warmup`` iterations, or None when
    nothing is left. Synchronous runs: per iteration the slowest rank (metrics.jsonl),
    then the median. Asynchronous runs: per rank the median (async_rank*.jsonl), then
    the slowest rank."""
    rank_logs = sorted(out.glob("async_rank*.jsonl"))
    if rank_logs:
        per_rank = []
        for log in rank_logs:
            rows = _jsonl(log)[warmup:]
            if rows:
                it = np.array([r["iteration_s"] for r in rows])
                comm = np.array([r["comm_s"] for r in rows])
                per_rank.append(Timings(float(np.median(it)), float(it.max()),
                                        float(np.median(it - comm)), float(np.median(comm)),
                                        len(rows)))
        if not per_rank:
            return None
        slowest = max(per_rank, key=lambda t: t.median_s)
        return Timings(slowest.median_s, max(t.max_s for t in per_rank), slowest.compute_s,
                       slowest.comm_s, min(t.timed for t in per_rank))
    rows = [r for r in _jsonl(out / "metrics.jsonl")
            if "t_compute_s" in r and r["iteration"] > warmup]
    if not rows:
        return None
    compute = np.array([r["t_compute_s"] for r in rows])
    comm = np.array([r["t_comm_s"] for r in rows])
    total = compute + comm
    return Timings(float(np.median(total)), float(total.max()), float(np.median(compute)),
                   float(np.median(comm)), len(rows))


def measure(root: Path, point: Point) -> Measured | None:
    """The point's timings, or None if it has not run (no summary.json)."""

    out = root / point.out
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    launch = _read_launch_env(out / "launch.env")
    t = iteration_timings(out, TIMING_WARMUP)
    if t is None:  # too few iterations to drop the warm-up: the run's own mean
        mean = summary["time_per_iteration_s"]
        t = Timings(mean, mean, summary["t_compute_s"], summary["t_comm_s"], 0)
    return Measured(point=point, parallel=summary.get("parallel", point.parallel),
                    launcher=launch.get("launcher", "unknown"),
                    cpus_on_node=int(launch.get("cpus_on_node") or os.cpu_count() or 1),
                    git_revision=launch.get("git_revision", point.git_revision),
                    iterations=int(summary["iterations"]), timed_iterations=t.timed,
                    t_iter_median_s=t.median_s, t_iter_max_s=t.max_s,
                    t_compute_s=t.compute_s, t_comm_s=t.comm_s,
                    bytes_reduced_per_iteration=int(summary["bytes_reduced_per_iteration"]),
                    stopped=summary.get("stopped"))


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Model:
    """Seconds per iteration as compute + reduction (see the module docstring)."""

    compute_per_sample_step_s: float
    compute_fixed_s: float
    latency_s: float
    seconds_per_byte: float
    bytes_per_iteration: int

    def compute(self, ranks: int, samples: int, steps: int) -> float:
        return self.compute_per_sample_step_s * samples / ranks * steps + self.compute_fixed_s

    def comm(self, ranks: int) -> float:
        if ranks == 1:
            return 0.0
        return (self.latency_s * math.ceil(math.log2(ranks))
                + self.seconds_per_byte * 2 * (ranks - 1) / ranks * self.bytes_per_iteration)

    def time(self, ranks: int, samples: int, steps: int) -> float:
        return self.compute(ranks, samples, steps) + self.comm(ranks)


def _nonnegative_fit(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0 for two unknowns: the best of the full fit (if
    non-negative) and each one-unknown fit."""
    candidates = []
    if np.linalg.matrix_rank(a) == a.shape[1]:
        x = np.linalg.lstsq(a, b, rcond=None)[0]
        if (x >= 0).all():
            candidates.append(x)
    for j in range(a.shape[1]):
        col = a[:, j]
        if col @ col > 0:
            x = np.zeros(a.shape[1])
            x[j] = max(col @ b / (col @ col), 0.0)
            candidates.append(x)
    if not candidates:
        return np.zeros(a.shape[1])
    return min(candidates, key=lambda x: float(np.sum((a @ x - b) ** 2)))


def fit_model(points: list[Measured], latency_s: float | None = None,
              bandwidth: float | None = None) -> tuple[Model, list[str]]:
    """Fit compute (c, d) and reduction (alpha, beta) to the points that are not
    oversubscribed; ``latency_s``/``bandwidth`` (bytes/s) replace the fitted values
    (e.g. the target cluster's interconnect). Returns the model and notes on the fit."""
    usable = [m for m in points if not m.oversubscribed] or points
    notes = [f"fitted to {len(usable)} of {len(points)} measured points"
             + (" (oversubscribed points excluded)" if len(usable) < len(points) else "")]
    work = np.array([m.point.samples / m.point.ranks * m.point.steps for m in usable], float)
    t_comp = np.array([m.t_compute_s for m in usable])
    c, d = _nonnegative_fit(np.column_stack([work, np.ones_like(work)]), t_comp)
    if len(set(work)) < 2:
        notes.append("one work size per rank only: all compute is taken as per-sample (d=0)")
    nbytes = max(m.bytes_reduced_per_iteration for m in points)
    multi = [m for m in usable if m.point.ranks > 1]
    stages = np.array([math.ceil(math.log2(m.point.ranks)) for m in multi], float)
    volume = np.array([2 * (m.point.ranks - 1) / m.point.ranks * m.bytes_reduced_per_iteration
                       for m in multi], float)
    t_comm = np.array([m.t_comm_s for m in multi])
    if not multi:
        alpha = beta = 0.0
        notes.append("no multi-rank point: the reduction cost is unknown (taken as 0)")
    else:
        design = np.column_stack([stages, volume])
        if np.linalg.matrix_rank(design) < 2:
            notes.append("latency and bandwidth cannot be told apart from these points (one "
                         "rank count, one message size): the reduction time is fitted as "
                         "latency; pass --bandwidth-gbs for a bandwidth term")
            design[:, 1] = 0.0
            if bandwidth:
                t_comm = t_comm - volume / bandwidth
        alpha, beta = _nonnegative_fit(design, t_comm)
    if latency_s is not None:
        alpha = latency_s
        notes.append(f"latency set to {latency_s * 1e6:g} us (not fitted)")
    if bandwidth:
        beta = 1.0 / bandwidth
        notes.append(f"bandwidth set to {bandwidth / 1e9:g} GB/s (not fitted)")
    return Model(float(c), float(d), float(alpha), float(beta), nbytes), notes


# --------------------------------------------------------------------------- report


def _row(m: Measured) -> dict:
    p = m.point
    return {"source": "measured", "kind": p.kind, "name": p.name, "parallel": m.parallel,
            "git_revision": m.git_revision, "launcher": m.launcher, "nodes": p.nodes,
            "ranks": p.ranks, "threads": p.threads, "oversubscribed": m.oversubscribed,
            "samples": p.samples, "steps": p.steps, "hidden": p.hidden,
            "iterations": m.iterations, "timed_iterations": m.timed_iterations,
            "t_iter_median_s": m.t_iter_median_s, "t_iter_max_s": m.t_iter_max_s,
            "t_compute_s": m.t_compute_s, "t_comm_s": m.t_comm_s,
            "bytes_reduced_per_iteration": m.bytes_reduced_per_iteration,
            "samples_per_s": p.samples / m.t_iter_median_s, "stopped": m.stopped or ""}


def _scale(rows: list[dict], kind: str, base_ranks: int, base_time: float,
           key: str = "t_iter_median_s") -> None:
    """Speedup and efficiency against the smallest rank count (ideal: P / P0 and 1).
    Weak scaling: the speedup is the scaled one (throughput ratio)."""
    for r in rows:
        factor = r["ranks"] / base_ranks
        ratio = base_time / r[key]
        r["speedup"] = ratio * factor if kind == "weak" else ratio
        r["efficiency"] = r["speedup"] / factor


def _projection(model: Model, kind: str, base: Measured, ranks_per_node: int,
                max_nodes: int) -> list[dict]:
    rows = []
    nodes = 1
    while nodes <= max_nodes:
        ranks = nodes * ranks_per_node
        samples = base.point.samples // base.point.ranks * ranks if kind == "weak" else \
            base.point.samples
        t = model.time(ranks, samples, base.point.steps)
        rows.append({"source": "projected", "kind": kind, "name": f"{kind}-{ranks}r-{nodes}n",
                     "parallel": base.parallel, "git_revision": base.git_revision,
                     "launcher": "model", "nodes": nodes, "ranks": ranks,
                     "threads": base.point.threads, "oversubscribed": False,
                     "samples": samples, "steps": base.point.steps, "hidden": base.point.hidden,
                     "t_iter_median_s": t, "model_t_iter_s": t,
                     "t_compute_s": model.compute(ranks, samples, base.point.steps),
                     "t_comm_s": model.comm(ranks),
                     "bytes_reduced_per_iteration": model.bytes_per_iteration,
                     "samples_per_s": samples / t})
        nodes *= 2
    return rows


def report(directory: str, plots: bool = True, ranks_per_node: int | None = None,
           project_nodes: int = 64, latency_us: float | None = None,
           bandwidth_gbs: float | None = None) -> list[str]:
    """Collect the measured points into ``scaling.csv`` next to the model's projection,
    write ``model.json`` and (with matplotlib) ``scaling-{kind}.png``; returns a
    Markdown summary."""
    if plots:
        from padmmirnn.plots import require_matplotlib

        require_matplotlib()
    root = Path(directory).resolve()
    points = _points(_read_manifest(root))
    measured = [m for m in (measure(root, p) for p in points) if m is not None]
    missing = sorted({p.name for p in points} - {m.point.name for m in measured})
    if not measured:
        raise PadmmError(f"{root}: no point has run yet (no runs/*/summary.json)")
    model, notes = fit_model(measured, None if latency_us is None else latency_us * 1e-6,
                             None if bandwidth_gbs is None else bandwidth_gbs * 1e9)
    fitted = [m for m in measured if not m.oversubscribed] or measured
    rpn = ranks_per_node or max(math.ceil(m.point.ranks / m.point.nodes) for m in fitted)
    rows: list[dict] = []
    for kind in KINDS:
        group = sorted((m for m in measured if m.point.kind == kind),
                       key=lambda m: (m.point.ranks, m.point.nodes))
        if not group:
            continue
        base = group[0]
        measured_rows = [_row(m) for m in group]
        for m, r in zip(group, measured_rows, strict=True):
            r["model_t_iter_s"] = model.time(m.point.ranks, m.point.samples, m.point.steps)
        _scale(measured_rows, kind, base.point.ranks, base.t_iter_median_s)
        projected = _projection(model, kind, base, rpn, project_nodes)
        _scale(projected, kind, base.point.ranks,
               model.time(base.point.ranks, base.point.samples, base.point.steps))
        rows += measured_rows + projected
    with open(root / "scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({k: _csv_value(r.get(k)) for k in CSV_COLUMNS} for r in rows)
    params = {"compute_per_sample_step_s": model.compute_per_sample_step_s,
              "compute_fixed_s": model.compute_fixed_s, "latency_s": model.latency_s,
              "bandwidth_bytes_per_s": (1.0 / model.seconds_per_byte
                                        if model.seconds_per_byte else None),
              "bytes_per_iteration": model.bytes_per_iteration,
              "ranks_per_node_projected": rpn, "notes": notes}
    (root / "model.json").write_text(json.dumps(params, indent=2) + "\n")
    lines = _markdown(rows, params)
    lines.append(f"\nwrote {root / 'scaling.csv'}, {root / 'model.json'}")
    if missing:
        lines.append(f"not run yet: {', '.join(missing)}")
    if plots:
        written = [plot_scaling([r for r in rows if r["kind"] == kind], kind, rpn,
                                root / f"scaling-{kind}.png")
                   for kind in KINDS if any(r["kind"] == kind for r in rows)]
        lines.append("wrote " + ", ".join(str(p) for p in written))
    return lines


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _markdown(rows: list[dict], params: dict) -> list[str]:
    head = ("| source | kind | nodes | ranks | samples | t/iter median [s] | t/iter max [s] | "
            "compute [s] | comm [s] | samples/s | speedup | efficiency | model [s] |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        source = r["source"] + (" (oversubscribed)" if r.get("oversubscribed") else "")
        lines.append("| " + " | ".join([
            source, r["kind"], str(r["nodes"]), str(r["ranks"]), str(r["samples"]),
            f"{r['t_iter_median_s']:.4g}",
            f"{r['t_iter_max_s']:.4g}" if r.get("t_iter_max_s") is not None else "",
            f"{r['t_compute_s']:.4g}", f"{r['t_comm_s']:.3g}", f"{r['samples_per_s']:.4g}",
            f"{r['speedup']:.3g}", f"{r['efficiency']:.3g}", f"{r['model_t_iter_s']:.4g}"])
            + " |")
    bw = params["bandwidth_bytes_per_s"]
    lines += ["", f"model: compute {params['compute_per_sample_step_s'] * 1e6:.4g} us per "
              f"sample-step per rank + {params['compute_fixed_s'] * 1e3:.4g} ms per iteration; "
              f"reduction latency {params['latency_s'] * 1e3:.4g} ms per stage, bandwidth "
              + (f"{bw / 1e9:.4g} GB/s" if bw else "not modelled")
              + f"; {params['bytes_per_iteration']} bytes reduced per iteration; projected "
              f"with {params['ranks_per_node_projected']} ranks per node"]
    lines += [f"  - {n}" for n in params["notes"]]
    return lines


def plot_scaling(rows: list[dict], kind: str, ranks_per_node: int, path: Path) -> Path:
    """Speedup and efficiency against ranks: measured points (hollow when
    oversubscribed), the model's projection (dashed) and the ideal (dotted)."""
    from padmmirnn.plots import require_matplotlib

    plt = require_matplotlib()
    measured = [r for r in rows if r["source"] == "measured"]
    projected = [r for r in rows if r["source"] == "projected"]
    base = measured[0]["ranks"]
    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = sorted({r["ranks"] for r in rows})
    ideal = [x / base for x in xs]
    ax_s.plot(xs, ideal, ":", color="gray", label="ideal")
    ax_e.plot(xs, [1.0] * len(xs), ":", color="gray", label="ideal")
    for ax, key in ((ax_s, "speedup"), (ax_e, "efficiency")):
        ax.plot([r["ranks"] for r in projected], [r[key] for r in projected], "--",
                color="C1", marker=".", label=f"projected by the model ({ranks_per_node} "
                "ranks/node)")
        for over in (False, True):
            pts = [r for r in measured if bool(r["oversubscribed"]) == over]
            if pts:
                ax.plot([r["ranks"] for r in pts], [r[key] for r in pts], "o", color="C0",
                        markerfacecolor="none" if over else "C0", markersize=8,
                        label="measured, oversubscribed" if over else "measured")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"MPI ranks (nodes = ranks / {ranks_per_node} when projected)")
        ax.grid(alpha=0.3, which="both")
    ax_s.set_yscale("log", base=2)
    ax_s.set_ylabel("scaled speedup" if kind == "weak" else "speedup")
    ax_e.set_ylabel("parallel efficiency")
    ax_e.set_ylim(0, 1.2)
    ax_s.legend(fontsize=8)
    m0 = measured[0]
    what = (f"{m0['samples'] // m0['ranks']} samples per rank" if kind == "weak"
            else f"{m0['samples']} samples")
    fig.suptitle(f"{kind} scaling, {what}, T={m0['steps']}, hidden={m0['hidden']} "
                 f"({m0['parallel'] if m0['ranks'] > 1 else measured[-1]['parallel']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

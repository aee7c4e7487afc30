"""Plan a scaling study: the datasets, one Slurm batch script per point and the manifest.

Every point script is filled in from ``slurm/scaling-point.sbatch.in`` and runs the
study's copy of ``slurm/train.sbatch``; the manifest records the points (one per rank
count) and how to run them.

Weak scaling keeps the samples per rank fixed, so every rank count needs its own
dataset of N = n * P samples; strong scaling uses one dataset of N samples for all
rank counts. The plan writes those datasets from a source dataset (the built-in default
unless ``--dataset`` names another): its first N samples, repeated cyclically when N is
larger than the source (the cost of an ADMM iteration depends on the sample count, not
on the values, so repeated samples time the same; their accuracy means nothing).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import h5py
import numpy as np

from padmmirnn import datafiles
from padmmirnn._version import __version__
from padmmirnn.errors import PadmmError
from padmmirnn.scaling.accuracy import accuracy_runs
from padmmirnn.scaling.manifest import MANIFEST, Point, manifest_points, read_manifest

KINDS = ("strong", "weak")  # scaling kinds; "accuracy" points train to a target instead
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def _split(text: str, what: str, convert: type, noun: str) -> list:
    try:
        return [convert(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PadmmError(f"{what} needs comma-separated {noun}, got {text!r}") from None


def parse_float_list(text: str, what: str) -> list[float]:
    """``"0,50.5"`` -> ``[0.0, 50.5]``."""
    return _split(text, what, float, "numbers")


def parse_int_list(text: str, what: str, low: int = 1) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; every entry an integer of at least ``low``."""
    values = _split(text, what, int, "integers")
    if not values or min(values) < low:
        kind = "positive" if low == 1 else f">= {low}"
        raise PadmmError(f"{what} needs {kind} integers, got {text!r}")
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
    # --kind accuracy (padmmirnn.scaling.accuracy)
    target: float = 0.85
    admm_batches: tuple[int, ...] = (16, 32, 64, 128, 256, 1024, 0)
    adam_batches: tuple[int, ...] = (64, 128, 256, 1024, 0)
    adam_lr_scaling: str = "sqrt"
    validate_latency_us: tuple[float, ...] = (0.0, 5000.0)
    max_units: int = 200

    @classmethod
    def from_text(cls, ranks: str | None, nodes: str | None, **kwargs) -> PlanOptions:
        """Options with ``--ranks``/``--nodes`` given as comma-separated text."""
        if kwargs.get("kind") == "accuracy":  # its points fix their own rank counts
            return cls(ranks=(1,), nodes=(1,), **kwargs).validate()
        if not ranks:
            raise PadmmError("--ranks is needed for strong and weak scaling")
        rank_list = parse_int_list(ranks, "--ranks")
        node_list = parse_int_list(nodes, "--nodes") if nodes else [1]
        if len(node_list) == 1:
            node_list *= len(rank_list)
        if len(node_list) != len(rank_list):
            raise PadmmError(f"--nodes needs one value, or one per rank count "
                             f"({len(rank_list)}); got {nodes!r}")
        return cls(ranks=tuple(rank_list), nodes=tuple(node_list), **kwargs).validate()

    def validate(self) -> PlanOptions:
        if self.kind not in (*KINDS, "accuracy"):
            raise PadmmError(f"--kind must be strong, weak or accuracy, got {self.kind!r}")
        if self.kind == "accuracy":
            if not 0 < self.target <= 1:
                raise PadmmError(f"--target is a test accuracy in (0, 1], got {self.target}")
            if self.adam_lr_scaling not in ("none", "sqrt", "linear"):
                raise PadmmError("--adam-lr-scaling must be none, sqrt or linear, got "
                                 f"{self.adam_lr_scaling!r}")
            if (min(self.admm_batches, default=-1) < 0 or min(self.adam_batches, default=-1) < 0
                    or min(self.validate_latency_us, default=0) < 0 or self.max_units < 1):
                raise PadmmError("--admm-batches and --adam-batches must not be negative "
                                 "(0: the whole dataset), --validate-latency-us not negative "
                                 "and --max-units positive")
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


def plan(opts: PlanOptions) -> list[str]:
    """Write the datasets, one sbatch script per point and the manifest; an existing
    study in the same folder keeps its other points (e.g. strong, then weak)."""
    from padmmirnn.config import load_config, parse_override

    overrides = dict(parse_override(s) for s in opts.sets)
    overrides.update({"train.algo": opts.algo, "train.iterations": opts.iterations})
    # a bad --set fails here, before any file is written
    full = opts.algo == "admm" and opts.kind != "accuracy"  # accuracy: mini-batch ADMM
    cfg = load_config("fullbatch" if full else None, overrides)
    source = datafiles.resolve(opts.dataset)[0]
    info = datafiles.read_info(source)
    train_script, template = _slurm_files(opts.slurm_dir)
    if opts.kind == "accuracy":
        return _plan_accuracy(opts, cfg, source, info, train_script, template)
    sizes = [opts.samples_per_rank * ranks if opts.kind == "weak" else (opts.samples or info.n)
             for ranks in opts.ranks]
    for ranks, samples in zip(opts.ranks, sizes, strict=True):
        if samples < ranks:
            raise PadmmError(f"{samples} samples cannot be split over {ranks} ranks")
    root = Path(opts.out).resolve()
    for sub in ("data", "logs", "runs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(root) if (root / MANIFEST).exists() else {"points": []}
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
        if opts.algo == "admm":  # the model: one reduction per iteration (full batch)
            train_args += ["--config", "fullbatch"]
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
    return lines + _write_manifest(root, manifest, new, opts.kind)


def _write_manifest(root: Path, manifest: dict, new: list[Point], kind: str,
                    extra: dict | None = None) -> list[str]:
    """Merge ``new`` into the study's manifest (points of the same name replaced)."""
    names = {p.name for p in new}
    kept = [p for p in manifest_points(manifest) if p.name not in names]
    manifest = {**manifest, **(extra or {}), "format": 1, "padmmirnn_version": __version__,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "points": [asdict(p) for p in kept + new]}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return [f"wrote {root / MANIFEST} ({len(kept) + len(new)} points). Submit: for f in "
            f"{root}/{kind}-*.sbatch; do sbatch \"$f\"; done   or run here: "
            f"padmmirnn scaling run {root}"]


def _plan_accuracy(opts: PlanOptions, cfg, source: str, info, train_script: Path,
                   template: Path) -> list[str]:
    """The points of ``--kind accuracy`` (:mod:`padmmirnn.scaling.accuracy`): on the
    source dataset itself (its test split decides when the target is reached)."""
    root = Path(opts.out).resolve()
    for sub in ("logs", "runs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(root) if (root / MANIFEST).exists() else {"points": []}
    shutil.copyfile(train_script, root / "train.sbatch")
    point_template, revision, lines, new = template.read_text(), git_revision(), [], []
    for name, ranks, args in accuracy_runs(opts, cfg, info.n):
        parallel = "none" if ranks == 1 else "sync"
        train_args = ["--dataset", str(Path(source).resolve()), "--parallel", parallel, *args]
        for s in opts.sets:
            train_args += ["--set", s]
        train_args += ["--resume", "none", "--out", f"runs/{name}"]
        point = Point(name=name, kind="accuracy", ranks=ranks, nodes=1, threads=opts.threads,
                      samples=info.n, steps=info.steps, hidden=cfg.model.hidden,
                      parallel=parallel, dataset=str(Path(source).resolve()),
                      out=f"runs/{name}", script=f"{name}.sbatch",
                      train_args=tuple(train_args), git_revision=revision)
        (root / point.script).write_text(_sbatch_script(point_template, opts, point, root))
        new.append(point)
        lines.append(f"wrote {root / point.script}")
    settings = {"accuracy": {"target": opts.target, "admm_batch": cfg.admm.batch_size,
                             "adam_batch": cfg.optim.batch_size,
                             "adam_lr_scaling": opts.adam_lr_scaling}}
    return lines + _write_manifest(root, manifest, new, "accuracy", settings)

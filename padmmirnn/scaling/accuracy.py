"""Time to an accuracy against rank count: ADMM against data-parallel Adam.

``padmmirnn scaling plan --kind accuracy`` writes points that train to a target test
accuracy (``train.target_accuracy``) on the real dataset with its test split:

* ``accuracy-admm-b{b}``: mini-batch ADMM at global batch b (0: the whole set), one
  process, its batch-dependent settings from the batch rule (``config.batch_rule``).
  SP equals serial, so the passes it needs at a global batch do not depend on the rank
  count: ADMM on P ranks with 64 samples per rank is ADMM at global batch 64 P.
* ``accuracy-adam-b{B}``: Adam at global batch B, one process, learning rate scaled with
  the batch (``--adam-lr-scaling``). Data-parallel Adam on P ranks with per-rank batch
  64 *is* Adam at global batch 64 P (the gradient of one global batch, averaged), so
  these runs measure how its epochs to the target grow when users scale it that way.
* ``accuracy-{admm,adam}-...-2r-a{alpha}us``: the same on 2 ranks over a simulated
  interconnect (``train.net_latency_us``), to check the projection against.

The report takes, per method, the measured seconds of one step ``t(b)`` at each batch
``b`` of its one-process runs (the samples' work and the fixed cost of a step: the
replicated weight solves of ADMM, the optimiser update of Adam), interpolated linearly
in ``b`` between measured batches and scaled with ``b`` outside them. A line
``c * b + d`` through all of them does not do: the cost per sample grows with the batch
once its states leave the cache (on full Fashion-MNIST 35 us at batch 64 against 57 us
at 60,000 for Adam), and such a fit over-predicted the batch-64 runs by 40-70%. On P
ranks the step costs ``t`` of the busiest rank's share, so it projects::

    T(P) = s + units(B) * ceil(N / B) * (t(E[max_r n_r(B, P)]) + allreduce(P, bytes))
    allreduce(P, bytes) = alpha * ceil(log2 P) + 2 (P - 1) / P * bytes / bandwidth

with s the start-up (what a run's first unit takes beyond the others), B the global
batch (each method at 64 P, or fixed at its default 64), units
(B) the passes or epochs to the target measured at B (log-log interpolation between
measured batches), ``E[max_r n_r]`` the expected largest share of one random batch on a
rank (a batch is drawn from all samples; each rank holds a contiguous N / P of them)
and an alpha-beta fabric. Evaluation is not counted, in the projection or in the
measured times (the training steps' compute and communication seconds, summed).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from padmmirnn.errors import PadmmError
from padmmirnn.scaling.manifest import Point
from padmmirnn.scaling.measure import _jsonl
from padmmirnn.scaling.model import allreduce_seconds

FABRICS = "2:100,50:10,5000:1"  # alpha in us : bandwidth in Gbit/s (the three)


@dataclass(frozen=True)
class Fabric:
    """An interconnect: ``alpha_s`` per reduction stage, ``bytes_per_s`` bandwidth
    (``inf``: none modelled)."""

    alpha_s: float
    bytes_per_s: float

    @property
    def name(self) -> str:
        bw = "inf" if math.isinf(self.bytes_per_s) else f"{self.bytes_per_s * 8 / 1e9:g} Gb/s"
        return f"{self.alpha_s * 1e6:g} us / {bw}"

    def allreduce(self, ranks: int, nbytes: float) -> float:
        return allreduce_seconds(ranks, nbytes, self.alpha_s, 1.0 / self.bytes_per_s)


def parse_fabrics(text: str) -> list[Fabric]:
    """``"2:100,50:10"`` (latency in microseconds : bandwidth in Gbit/s) -> fabrics."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            alpha, bw = (float(v) for v in item.split(":"))
        except ValueError:
            raise PadmmError(f"--fabrics needs LATENCY_US:GBIT_S pairs, got {item!r}") from None
        if alpha < 0 or bw <= 0:
            raise PadmmError(f"--fabrics: latency must be >= 0 and bandwidth > 0, got {item!r}")
        out.append(Fabric(alpha * 1e-6, bw * 1e9 / 8))
    if not out:
        raise PadmmError("--fabrics is empty")
    return out


@dataclass(frozen=True)
class Reached:
    """One accuracy point, read back from its run folder."""

    name: str
    algo: str
    batch: int
    ranks: int
    samples: int
    fabric: Fabric
    units: int | None  # passes (ADMM) or epochs (Adam) to the target; None: not reached
    seconds: float | None  # training seconds (compute + communication) to the target
    unit_s: tuple[float, ...]  # compute seconds of each pass or epoch (slowest rank)
    bytes_per_step: float

    @property
    def steps_per_unit(self) -> int:
        return math.ceil(self.samples / self.batch)

    @property
    def startup_s(self) -> float | None:
        """What the first unit took beyond the later ones' median (loading compiled
        kernels, first touch of memory); None with one unit."""
        if len(self.unit_s) < 2:
            return None
        return max(self.unit_s[0] - float(np.median(self.unit_s[1:])), 0.0)

    def step_s(self, startup_s: float) -> float:
        """Compute seconds of one step: the median unit after the first, else the first
        unit less ``startup_s``."""
        unit = (float(np.median(self.unit_s[1:])) if len(self.unit_s) > 1
                else max(self.unit_s[0] - startup_s, 0.0))
        return unit / self.steps_per_unit


def measure_point(root: Path, point: Point) -> Reached | None:
    """The point's units and seconds to its target, or None if it has not run."""
    out = root / point.out
    if not (out / "summary.json").is_file():
        return None
    summary = json.loads((out / "summary.json").read_text())
    cfg = tomllib.loads((out / "config.toml").read_text())
    algo = cfg["train"]["algo"]
    batch = cfg["admm"]["batch_size"] if algo == "admm" else cfg["optim"]["batch_size"]
    batch = min(batch, point.samples)
    rows = [r for r in _jsonl(out / "metrics.jsonl") if "t_compute_s" in r]
    target = cfg["train"]["target_accuracy"]
    units = seconds = None
    total = 0.0
    for r in rows:
        total += r["t_compute_s"] + r["t_comm_s"]
        acc = r.get("test_accuracy")
        if acc is not None and acc >= target:
            units, seconds = r["iteration"], total
            break
    bw = cfg["train"]["net_bandwidth_gbs"]
    fabric = Fabric(cfg["train"]["net_latency_us"] * 1e-6,
                    bw * 1e9 / 8 if bw else math.inf)
    return Reached(point.name, algo, batch, point.ranks, point.samples, fabric, units,
                   seconds, tuple(r["t_compute_s"] for r in rows),
                   summary["bytes_reduced_per_iteration"] / math.ceil(point.samples / batch))


@functools.cache
def busiest_share(batch: int, ranks: int, samples: int, draws: int = 256) -> float:
    """E[max over ranks of the samples of one random batch a rank holds], each rank
    holding a contiguous block of ``samples / ranks`` (seeded Monte Carlo)."""
    if batch >= samples:
        return float(math.ceil(samples / ranks))
    if ranks == 1:
        return float(batch)
    rng = np.random.default_rng(0)
    owner = np.arange(samples) * ranks // samples
    return float(np.mean([np.bincount(owner[rng.choice(samples, batch, replace=False)],
                                      minlength=ranks).max() for _ in range(draws)]))


@dataclass(frozen=True)
class Method:
    """A method's measured step cost and its units to the target against global batch."""

    algo: str
    step_by_batch: dict[int, float]  # measured seconds of one step at each batch
    bytes_per_step: float
    units_by_batch: dict[int, int]  # serial points that reached the target
    samples: int
    startup_s: float = 0.0  # once per run: the first unit's extra time

    def units(self, batch: int) -> float | None:
        """Units to the target at global ``batch``: measured, interpolated in log-log
        between measured batches, or the full-batch value beyond the dataset."""
        known = sorted(self.units_by_batch.items())
        batch = min(batch, self.samples)
        if batch in self.units_by_batch:
            return float(self.units_by_batch[batch])
        for (b0, u0), (b1, u1) in zip(known, known[1:], strict=False):
            if b0 <= batch <= b1:
                w = math.log(batch / b0) / math.log(b1 / b0)
                return math.exp((1 - w) * math.log(u0) + w * math.log(u1))
        return None

    def step(self, batch: int, ranks: int) -> float:
        """Seconds of one step at global ``batch`` on ``ranks`` ranks: the measured step
        cost at the busiest rank's share of the batch."""
        return self.step_at(busiest_share(batch, ranks, self.samples))

    def step_at(self, share: float) -> float:
        """The step cost at ``share`` samples: linear between the measured batches,
        proportional to the samples beyond them."""
        b, t = zip(*sorted(self.step_by_batch.items()), strict=True)
        if share <= b[0]:
            return t[0] * share / b[0]
        if share >= b[-1]:
            return t[-1] * share / b[-1]
        return float(np.interp(share, b, t))

    def time(self, batch: int, ranks: int, fabric: Fabric) -> tuple[float, float] | None:
        """(units, seconds) to the target at global ``batch`` on ``ranks`` ranks."""
        units = self.units(batch)
        if units is None or batch < ranks:
            return None
        steps = math.ceil(self.samples / min(batch, self.samples))
        per_step = self.step(min(batch, self.samples), ranks) + fabric.allreduce(
            ranks, self.bytes_per_step)
        return units, self.startup_s + units * steps * per_step


def fit_method(points: list[Reached], algo: str) -> Method | None:
    """The step cost at each batch of the method's one-process points (the median over
    points of one batch), and the units to the target of those that reached it."""
    serial = [p for p in points if p.algo == algo and p.ranks == 1]
    if not serial:
        return None
    extra = [p.startup_s for p in serial if p.startup_s is not None]
    startup = float(np.median(extra)) if extra else 0.0
    steps: dict[int, list[float]] = {}
    for p in serial:
        steps.setdefault(p.batch, []).append(p.step_s(startup))
    return Method(algo, {b: float(np.median(t)) for b, t in steps.items()},
                  max(p.bytes_per_step for p in serial),
                  {p.batch: p.units for p in serial if p.units is not None},
                  serial[0].samples, startup)


def project(admm: Method, adam: Method, admm_batch: int, adam_batch: int,
            fabrics: list[Fabric], max_ranks: int) -> list[dict]:
    """Rows (fabric, ranks, method, global batch, units, seconds) for P = 1, 2, 4, ...:
    each method at global batch 64 P (its default batch per rank: ``admm_batch * P``,
    ``adam_batch * P``) and fixed at its default."""
    rows = []
    for fabric in fabrics:
        ranks = 1
        while ranks <= max_ranks:
            for method, label, batch in ((admm, "ADMM, global batch 64 P",
                                          admm_batch * ranks),
                                         (admm, "ADMM, global batch 64", admm_batch),
                                         (adam, "Adam, global batch 64 P",
                                          adam_batch * ranks),
                                         (adam, "Adam, global batch 64", adam_batch)):
                got = method.time(batch, ranks, fabric)
                rows.append({"fabric": fabric.name, "ranks": ranks, "method": label,
                             "global_batch": min(batch, method.samples),
                             "units": None if got is None else got[0],
                             "seconds": None if got is None else got[1]})
            ranks *= 2
    return rows


def crossovers(rows: list[dict]) -> dict[str, str]:
    """Per fabric: where the faster of ADMM and Adam, both at global batch 64 P, changes."""
    out = {}
    for fabric in dict.fromkeys(r["fabric"] for r in rows):
        winners = []
        for r in (r for r in rows if r["fabric"] == fabric
                  and r["method"] == "ADMM, global batch 64 P"):
            adam = next(x for x in rows if x["fabric"] == fabric and x["ranks"] == r["ranks"]
                        and x["method"] == "Adam, global batch 64 P")
            if r["seconds"] is None or adam["seconds"] is None:
                continue
            winners.append((r["ranks"], "ADMM" if r["seconds"] <= adam["seconds"] else "Adam",
                            adam["seconds"] / r["seconds"]))
        if not winners:
            out[fabric] = "not comparable (a method has no projection)"
            continue
        first = winners[0][1]
        flip = next((w for w in winners if w[1] != first), None)
        last = winners[-1]
        out[fabric] = (f"{first} faster from P = {winners[0][0]}"
                       + (f"; {flip[1]} faster from P = {flip[0]}" if flip else
                          f", at every P up to {last[0]} (Adam / ADMM time {last[2]:.2g} there)"))
    return out


def check(points: list[Reached], methods: dict[str, Method]) -> list[dict]:
    """The projection at each measured point's own rank count and fabric, against its
    measured units and seconds to the target."""
    rows = []
    for p in points:
        method = methods.get(p.algo)
        got = method.time(p.batch, p.ranks, p.fabric) if method else None
        err = (got[1] / p.seconds - 1) if got and p.seconds else None
        rows.append({"point": p.name, "ranks": p.ranks, "fabric": p.fabric.name,
                     "measured_units": p.units, "projected_units": got and got[0],
                     "measured_s": p.seconds, "projected_s": got and got[1], "error": err})
    return rows


def _fmt(v, spec: str = ".3g") -> str:
    return "" if v is None else format(v, spec)


def report_accuracy(root: Path, points: list[Point], settings: dict, fabrics: list[Fabric],
                    max_ranks: int) -> list[str]:
    """Write ``time_to_accuracy.csv``, ``accuracy_model.json``; return Markdown lines.
    ``settings``: the plan's reference batches (``admm_batch``, ``adam_batch``)."""
    reached = [m for m in (measure_point(root, p) for p in points) if m is not None]
    if not reached:
        return ["accuracy points: none has run yet"]
    methods = {a: m for a in ("admm", "adam") if (m := fit_method(reached, a))}
    lines = ["", "## Time to the target accuracy", ""]
    if set(methods) != {"admm", "adam"}:
        return lines + ["needs one-process runs of both ADMM and Adam"]
    admm, adam = methods["admm"], methods["adam"]
    admm_batch, adam_batch = settings["admm_batch"], settings["adam_batch"]
    rows = project(admm, adam, admm_batch, adam_batch, fabrics, max_ranks)
    checks = check(reached, methods)
    with open(root / "time_to_accuracy.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: _fmt(v, ".4g") if isinstance(v, float) else v
                          for k, v in r.items()} for r in rows)
    cross = crossovers(rows)
    model = {"admm": asdict(admm), "adam": asdict(adam),
             "admm_batch": admm_batch, "adam_batch_per_rank": adam_batch,
             "crossovers": cross, "checks": checks}
    (root / "accuracy_model.json").write_text(json.dumps(model, indent=2, default=str) + "\n")
    lines += ["step cost (measured, us per sample at each batch): " + "; ".join(
                  f"{name} " + ", ".join(f"{t / b * 1e6:.3g} at {b}" for b, t in
                                         sorted(m.step_by_batch.items()))
                  + f", {m.bytes_per_step:.0f} bytes reduced per step, start-up "
                  f"{m.startup_s:.2f} s" for name, m in (("ADMM", admm), ("Adam", adam))),
              "units to the target: ADMM passes " + ", ".join(
                  f"{u} at batch {b}" for b, u in sorted(admm.units_by_batch.items()))
              + "; Adam epochs " + ", ".join(
                  f"{u} at batch {b}" for b, u in sorted(adam.units_by_batch.items())), ""]
    fabric_names = list(dict.fromkeys(r["fabric"] for r in rows))
    head = "| ranks | method | " + " | ".join(fabric_names) + " |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for ranks in dict.fromkeys(r["ranks"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            cells = [next(r for r in rows if r["fabric"] == f and r["ranks"] == ranks
                          and r["method"] == method) for f in fabric_names]
            lines.append(f"| {ranks} | {method} (batch {cells[0]['global_batch']}, "
                         f"{_fmt(cells[0]['units'], '.3g')} units) | "
                         + " | ".join(_fmt(c["seconds"], ".3g") + " s" if c["seconds"]
                                      is not None else "n/a" for c in cells) + " |")
    lines += ["", "crossover (ADMM against Adam, both at global batch 64 P):"]
    lines += [f"  - {f}: {text}" for f, text in cross.items()]
    lines += ["", "| point | ranks | fabric | units measured / projected | seconds measured "
              "/ projected | error |", "|---|---|---|---|---|---|"]
    lines += [f"| {c['point']} | {c['ranks']} | {c['fabric']} | {c['measured_units']} / "
              f"{_fmt(c['projected_units'], '.3g')} | {_fmt(c['measured_s'])} / "
              f"{_fmt(c['projected_s'])} | {_fmt(c['error'], '+.0%')} |" for c in checks]
    lines.append(f"\nwrote {root / 'time_to_accuracy.csv'}, {root / 'accuracy_model.json'}")
    return lines


def lr_for(base: float, batch: int, reference: int, scaling: str) -> float:
    """Adam's learning rate at ``batch``: ``base`` at ``reference``, scaled by
    sqrt(batch / reference) (``sqrt``), batch / reference (``linear``) or not (``none``)."""
    ratio = batch / reference
    return base * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[scaling]


def accuracy_runs(opts, cfg, samples: int) -> list[tuple[str, int, list[str]]]:
    """The accuracy points of a plan as (name, ranks, ``padmmirnn train`` options without
    dataset and output): ADMM at each ``opts.admm_batches``, Adam at each
    ``opts.adam_batches`` (0: the whole dataset), one process each; then for each
    ``opts.validate_latency_us`` ADMM at its default batch and Adam at twice its default
    batch on 2 ranks over that simulated latency."""
    from padmmirnn.gradient.trainer import DEFAULT_LR

    base_lr = cfg.optim.lr or DEFAULT_LR["adam"]
    ref_admm, ref_adam = cfg.admm.batch_size, cfg.optim.batch_size
    if not ref_admm:
        raise PadmmError("--kind accuracy compares mini-batch ADMM: admm.batch_size must be > 0")
    common = ["--set", f"train.target_accuracy={opts.target:g}",
              "--iterations", str(opts.max_units)]

    def admm(batch: int) -> list[str]:
        return ["--algo", "admm", "--set", f"admm.batch_size={batch}", *common]

    def adam(batch: int) -> list[str]:
        lr = lr_for(base_lr, batch, ref_adam, opts.adam_lr_scaling)
        return ["--algo", "adam", "--set", f"optim.batch_size={batch}",
                "--set", f"optim.lr={lr:.6g}", *common]

    admm_batches = sorted({min(b, samples) if b else samples for b in opts.admm_batches})
    runs = [(f"accuracy-admm-b{b}", 1, admm(b)) for b in admm_batches]
    adam_batches = sorted({min(b, samples) if b else samples for b in opts.adam_batches})
    runs += [(f"accuracy-adam-b{b}", 1, adam(b)) for b in adam_batches]
    for alpha in opts.validate_latency_us:
        net = ["--set", f"train.net_latency_us={alpha:g}"]
        runs += [(f"accuracy-admm-b{ref_admm}-2r-a{alpha:g}us", 2, admm(ref_admm) + net),
                 (f"accuracy-adam-b{2 * ref_adam}-2r-a{alpha:g}us", 2,
                  adam(2 * ref_adam) + net)]
    return runs

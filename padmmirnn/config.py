"""The run configuration: frozen dataclasses, loaded from TOML, validated on load.

One :class:`Config` is the single source of truth of a run. It is built from
defaults, an optional TOML file and ``--set section.key=value`` overrides, in that
order, validated before any work starts (identically on every rank, so a bad
value fails everywhere at once), printed at start and saved with every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from padmmirnn.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    hidden: int = 64
    activation: str = "tanh"
    loss: str = "ce"
    w_init: str = "orthogonal"
    init_scale: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "default"
    test: str = ""


@dataclass(frozen=True)
class TrainConfig:
    algo: str = "admm"
    iterations: int = 60
    seed: int = 0
    dtype: str = "float64"
    parallel: str = "auto"
    reduction: str = "fast"
    chunk: int = 250
    eval_every: int = 0  # 0: every iteration (serial, sync); at the end only (async)
    budget_seconds: float = 0.0  # 0: no limit; else stop at the first iteration past it
    staleness: int = 1  # async: tau, counted as below
    # async: "iterations" (no worker more than tau iterations ahead of the slowest) or
    # "publishes" (bounded delay: no contribution read is more than tau publishes old;
    # fast ranks do more iterations, train.iterations bounds the fastest)
    staleness_kind: str = "iterations"
    straggler: str = ""  # "RANK:FACTOR": slow that rank's compute by FACTOR (experiments)


@dataclass(frozen=True)
class AdmmConfig:
    """ADMM settings. The defaults are the *hybrid* configuration that trains
    (docs/admm-convergence.md): auxiliaries re-synchronised by a forward pass,
    multipliers from their least-squares (KKT) estimate -- a backward recursion in
    time, so not back-propagation free -- joint weight solves and a backtracking
    step. ``--config faithful`` selects the back-propagation-free formulation of
    DESIGN.md section 3 (multiplier ascent, a/s/o block updates)."""

    rho1: float = 1.0
    rho2: float = 1.0
    rho3: float = 1.0
    nu: float = 1e-3
    multipliers: str = "all"
    warmup: int = 0
    rho_schedule: str = "constant"
    rho_growth: float = 1.1
    rho_max_scale: float = 100.0
    schedule: str = "fused"
    a_newton_steps: int = 3
    o_newton_steps: int = 20
    aux_order: str = "jacobi"
    aux_sweeps: int = 0
    dual_step: float = 1.0
    resync_every: int = 1
    multiplier_update: str = "kkt"
    weight_solve: str = "joint"
    step_control: str = "auto"
    backtrack_max: int = 4
    step_grow_after: int = 3
    momentum: float = 0.0

    # Options beyond the faithful formulation (docs/admm-convergence.md):
    #   aux_order      "jacobi": blocks a, s, o; "backward": o, then s_T, a_T, ..., s_1, a_1
    #   aux_sweeps     sweeps of the auxiliary blocks per weight solve (0: none)
    #   dual_step      beta in lambda += beta rho r (multiplier_update "ascent")
    #   resync_every   K > 0: a, s, o from a forward pass of the new weights every K
    #                  iterations (not a minimisation: L may increase there)
    #   multiplier_update  "ascent" (lambda += beta rho r) or "kkt" (least-squares
    #                  multiplier estimate = a backward recursion; multipliers "all")
    #   weight_solve   "blocks" (U, W, b then V, c) or "joint" ([U W b], [V c])
    #   step_control   "backtrack": weights old + alpha (new - old), alpha halved until the
    #                  true training loss does not increase (needs resync_every = 1, fused)
    #   backtrack_max  halvings per iteration;  momentum  heavy-ball mu in [0, 1) on the
    #                  weights (with step_control "backtrack")
    #   step_grow_after  the step length doubles (at most 1) after this many iterations
    #                  in a row took their first trial (0: every iteration)

    def __post_init__(self) -> None:
        if self.multiplier_update == "kkt" and self.multipliers != "all":
            raise ConfigError("config key 'admm.multiplier_update' = 'kkt' needs "
                              f"admm.multipliers = 'all'; got {self.multipliers!r}")
        if self.step_control == "backtrack" and (self.resync_every != 1
                                                 or self.schedule != "fused"):
            raise ConfigError("config key 'admm.step_control' = 'backtrack' needs "
                              "admm.resync_every = 1 and admm.schedule = 'fused'")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"config key 'admm.momentum' must be in [0, 1); "
                              f"got {self.momentum!r}")
        if not 0.0 < self.dual_step <= 2.0:
            raise ConfigError(f"config key 'admm.dual_step' must be in (0, 2]; "
                              f"got {self.dual_step!r}")


@dataclass(frozen=True)
class OptimConfig:
    """Gradient baselines (``train.algo`` other than admm); one iteration is one epoch."""

    lr: float = 0.0  # 0: the algorithm's default (padmmirnn.data_parallel.DEFAULT_LR)
    batch_size: int = 64
    momentum: float = 0.9
    schedule: str = "constant"
    step_every: int = 10
    step_factor: float = 0.5
    clip_norm: float = 0.0  # 0: no clipping
    celgc_gamma: float = 1.0
    celgc_period: int = 4


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # iterations between checkpoints; 0: only on a graceful stop
    dir: str = ""  # default: OUTPUT/checkpoints
    keep: int = 3
    resume: str = "none"  # none | latest | PATH of a checkpoint file
    force: bool = False  # resume even if the checkpoint's configuration differs
    max_walltime: float = 0.0  # seconds; checkpoint and exit 0 once past it (0: off)


@dataclass(frozen=True)
class OutputConfig:
    dir: str = ""
    log_every: int = 10


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    admm: AdmmConfig = field(default_factory=AdmmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def backtracking(self) -> bool:
        """The step control in force: ``auto`` backtracks where it can (weights from a
        fused solve, auxiliaries re-synchronised every iteration) except in async runs,
        where each trial would need a global training loss (a synchronisation point)."""
        a = self.admm
        if a.step_control != "auto":
            return a.step_control == "backtrack"
        return a.resync_every == 1 and a.schedule == "fused"

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    def hash(self) -> str:
        """SHA-256 of what determines the iterates: the configuration without the
        output, checkpoint and run-control settings (a resumed run may change those)."""
        d = self.to_dict()
        for section in ("output", "checkpoint"):
            d.pop(section)
        for key in RUN_CONTROL:
            d["train"].pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


# train.* keys a resumed run may change: how long and how it runs. The async ones
# (parallel, staleness, staleness_kind, straggler) do change the iterates -- an async
# run is not deterministic anyway -- but resuming a run in another mode is allowed.
RUN_CONTROL = ("iterations", "parallel", "eval_every", "budget_seconds", "staleness",
               "staleness_kind", "straggler")

CHOICES: dict[str, tuple[str, ...]] = {
    "model.activation": ("tanh", "relu"),
    "model.loss": ("ce", "mse"),
    "model.w_init": ("orthogonal", "gaussian"),
    "train.algo": ("admm", "sgd", "momentum", "adam", "rmsprop", "adagrad", "celgc"),
    "optim.schedule": ("constant", "step", "cosine"),
    "train.dtype": ("float64", "float32"),
    "train.parallel": ("auto", "none", "sync", "async"),
    "train.reduction": ("fast", "deterministic"),
    "train.staleness_kind": ("iterations", "publishes"),
    "admm.multipliers": ("all", "output", "none"),
    "admm.rho_schedule": ("constant", "geometric"),
    "admm.schedule": ("fused", "paper"),
    "admm.aux_order": ("jacobi", "backward"),
    "admm.multiplier_update": ("ascent", "kkt"),
    "admm.weight_solve": ("blocks", "joint"),
    "admm.step_control": ("auto", "none", "backtrack"),
}

# (minimum, strict): a value must be > minimum when strict, >= minimum otherwise.
BOUNDS: dict[str, tuple[float, bool]] = {
    "model.hidden": (1, False),
    "model.init_scale": (0.0, True),
    "train.iterations": (0, False),
    "train.seed": (0, False),
    "train.eval_every": (0, False),
    "train.staleness": (0, False),
    "train.chunk": (1, False),
    "train.budget_seconds": (0.0, False),
    "admm.rho1": (0.0, True),
    "admm.rho2": (0.0, True),
    "admm.rho3": (0.0, True),
    "admm.nu": (0.0, False),
    "admm.warmup": (0, False),
    "admm.rho_growth": (1.0, False),
    "admm.rho_max_scale": (1.0, False),
    "admm.a_newton_steps": (0, False),
    "admm.o_newton_steps": (0, False),
    "admm.aux_sweeps": (0, False),
    "admm.dual_step": (0.0, True),
    "admm.resync_every": (0, False),
    "admm.backtrack_max": (0, False),
    "admm.step_grow_after": (0, False),
    "admm.momentum": (0.0, False),
    "output.log_every": (1, False),
    "checkpoint.every": (0, False),
    "checkpoint.keep": (1, False),
    "checkpoint.max_walltime": (0.0, False),
    "optim.lr": (0.0, False),
    "optim.batch_size": (1, False),
    "optim.momentum": (0.0, False),
    "optim.step_every": (1, False),
    "optim.step_factor": (0.0, True),
    "optim.clip_norm": (0.0, False),
    "optim.celgc_gamma": (0.0, True),
    "optim.celgc_period": (1, False),
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _sections() -> dict[str, type]:
    return {f.name: globals()[f.type] if isinstance(f.type, str) else f.type
            for f in fields(Config)}


def _coerce(key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(
        f"config key '{key}' must be of type {kind.__name__}, got {type(value).__name__} {value!r}"
    )


def _validate(cfg: Config) -> None:
    d = cfg.to_dict()
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        if d[section][name] not in allowed:
            raise ConfigError(
                f"config key '{key}' must be one of {', '.join(allowed)}; got {d[section][name]!r}"
            )
    straggler_rank_factor(cfg.train.straggler)
    t = cfg.train
    if t.parallel == "async" and (cfg.admm.schedule != "fused" or t.reduction != "fast"):
        raise ConfigError("train.parallel = async needs admm.schedule = fused and "
                          "train.reduction = fast (one statistics exchange per iteration)")
    if t.staleness_kind == "publishes" and (t.parallel != "async" or t.eval_every
                                             or cfg.checkpoint.every):
        raise ConfigError("train.staleness_kind = publishes is for train.parallel = async, "
                          "without train.eval_every or checkpoint.every (ranks reach a given "
                          "iteration at very different times; evaluation and checkpoints "
                          "happen at the end and on a stop)")
    if cfg.admm.momentum and not cfg.backtracking():
        raise ConfigError("config key 'admm.momentum' > 0 needs backtracking (admm.step_control "
                          "backtrack, or auto with resync_every = 1)")
    if t.parallel == "async" and cfg.admm.momentum:
        raise ConfigError("train.parallel = async needs admm.momentum = 0 (each worker's "
                          "heavy-ball term would follow its own stale weights)")
    if t.parallel == "async" and t.algo != "admm":
        raise ConfigError("train.parallel = async is for train.algo = admm (gradient methods "
                          "run sync, or CELGC for local steps)")
    for key, (low, strict) in BOUNDS.items():
        section, name = key.split(".")
        v = d[section][name]
        if v != v or (v <= low if strict else v < low):
            rel = ">" if strict else ">="
            raise ConfigError(f"config key '{key}' must be {rel} {low}; got {v!r}")


def straggler_rank_factor(text: str) -> tuple[int, float] | None:
    """Parse ``train.straggler`` ("RANK:FACTOR", FACTOR >= 1) or None when empty."""
    if not text:
        return None
    try:
        rank, factor = text.split(":")
        result = int(rank), float(factor)
    except ValueError:
        raise ConfigError(f"config key 'train.straggler' must be RANK:FACTOR, got {text!r}") \
            from None
    if result[0] < 0 or not result[1] >= 1.0:
        raise ConfigError(f"config key 'train.straggler' needs RANK >= 0 and FACTOR >= 1, "
                          f"got {text!r}")
    return result


def build_config(
    mapping: dict[str, dict[str, Any]] | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Build a validated :class:`Config` from a nested mapping and dotted overrides."""
    merged: dict[str, dict[str, Any]] = {}
    for section, values in (mapping or {}).items():
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a table")
        merged.setdefault(section, {}).update(values)
    for dotted, value in (overrides or {}).items():
        if "." not in dotted:
            raise ConfigError(f"config key '{dotted}' must be written section.key")
        section, name = dotted.split(".", 1)
        merged.setdefault(section, {})[name] = value
    sections = _sections()
    built = {}
    for section, values in merged.items():
        if section not in sections:
            raise ConfigError(
                f"unknown config section '{section}' (known: {', '.join(sections)})"
            )
        defaults = sections[section]()
        known = {f.name: getattr(defaults, f.name) for f in fields(defaults)}
        kwargs = {}
        for name, value in values.items():
            if name not in known:
                raise ConfigError(
                    f"unknown config key '{section}.{name}' (known in [{section}]: "
                    f"{', '.join(known)})"
                )
            kwargs[name] = _coerce(f"{section}.{name}", value, known[name])
        built[section] = sections[section](**kwargs)
    cfg = Config(**built)
    _validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value``; the value is read as a TOML value, else a string."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def load_config_text(text: str) -> Config:
    """A configuration from TOML text (as saved in outputs and checkpoints)."""
    return build_config(tomllib.loads(text))


def preset_path(name: str) -> Path | None:
    """The packaged preset ``padmmirnn/presets/NAME.toml``, if there is one."""
    candidate = Path(str(resources.files("padmmirnn").joinpath("presets", f"{name}.toml")))
    return candidate if candidate.is_file() else None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a TOML file or a packaged preset name (optional) and apply overrides;
    raises :class:`ConfigError`."""
    mapping: dict[str, dict[str, Any]] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            p = preset_path(str(path)) or p
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            mapping = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    return build_config(mapping, overrides)

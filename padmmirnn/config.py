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
import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from padmmirnn.errors import ConfigError


def opt(default: Any, doc: str, *, choices: tuple[str, ...] | None = None,
        low: float | None = None, strict: bool = False, auto: bool = False) -> Any:
    """A config option: its default, one line of documentation, and its allowed
    values (``choices``, or a lower bound ``low``, exclusive when ``strict``). ``auto``:
    a float that may also be ``"auto"`` (its value then follows from other options by a
    documented rule, e.g. :func:`batch_rule`). The CLI help (``padmmirnn config
    options``) and docs/options.md are generated from these."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "low": low,
                                            "strict": strict, "auto": auto})


BATCH_RULE_REFERENCE = 64  # the batch the mini-batch defaults were tuned at
NU_RULE_MAX = 3e-3  # the weight decay of an over-parameterised model (size_rule)
RHO_GROWTH = 1.05  # the penalty's growth per pass with one label per sequence
NU_FEW_STEPS = 6e-4  # the least weight decay of a pass of at most FEW_STEPS block steps
FEW_STEPS = 4
AVERAGE_DECAY = 0.99  # the iterate average's decay cap (a window of about 100 steps)
AVERAGE_MIN_STEPS = 16  # block steps per pass from which the iterates are averaged


def size_rule(weights: int, rows: int) -> float:
    """The ``auto`` weight decay of ADMM (``admm.nu``) for a model whose first layer has
    ``p`` = ``weights`` input weights (``U``: G h d, d the input size or the vocabulary)
    trained on ``R`` = ``rows`` output rows (labelled targets):

        nu = 3e-3 min(1, p / R)^2

    The decay is relative to the mean loss per target. The input weights are the part of
    the model that grows with the data's vocabulary, and with it the room to memorise:
    a model with fewer of them than targets gets almost no decay, one with as many or
    more the full 3e-3. The recurrent and output weights are set by h and are not
    counted: counting them gave the LSTM on the adding problem (p / R = 1.8 with them,
    0.05 without) the full decay, and that decay on W erased the long-range memory the
    task needs (docs/admm-convergence.md, "Weight decay from the model's size", has the
    five tasks the rule comes from)."""
    return NU_RULE_MAX * min(1.0, weights / max(rows, 1)) ** 2


def growth_rule(labels: float) -> float:
    """``admm.rho_growth = auto``: the geometric penalty schedule's growth per pass for
    ``|O|`` = ``labels`` labelled targets per training sequence,

        growth = 1.05^(1 / sqrt(|O|))

    The growing penalty is a decaying step that averages the noise of the mini-batch
    directions (on Fashion-MNIST's 938 batches per pass a constant step wanders around
    86%, 1.05 reaches 87.9%; the adding problem's seeds fall to the class prior with
    less decay). A sequence with a label per step averages that noise over its |O|
    labels, as the trust radius's ``sqrt(|O|)`` assumes, and its step needs less decay:
    on the character model (|O| = 100) a constant penalty gained the LSTM 0.020 nats of
    validation loss after 24 passes and the GRU 0.008; the Elman cell's validation loss
    is unchanged, its test loss after 40 passes 0.014 worse (docs/admm-convergence.md,
    "Gated cells on the character model"). With one label it is 1.05 exactly."""
    return RHO_GROWTH ** (1.0 / math.sqrt(max(labels, 1.0)))


def decay_rule(weights: int, rows: int, steps_per_pass: float) -> float:
    """``admm.nu = auto``: :func:`size_rule`, and at least 6e-4 when a pass has at most
    4 block steps (``k = N / B <= 4``: a global batch of a quarter of the training set
    or more, full batch included):

        nu = max(3e-3 min(1, p / R)^2, 6e-4 [k <= 4])

    Few steps per pass fit the weights to a large batch nearly exactly each time, and
    the decay is then what holds the step back from the directions the data barely
    determine: on full Fashion-MNIST at B = 16,384 (k = 3.7) the size rule's 3e-6
    peaks at 86.7% in 40 passes, 6e-4 reaches 87% at pass 28 and 1e-3 at pass 24; on
    the default dataset (whose size rule already gives 6e-4) 1e-3 costs a pass at the
    full batch, 11 against 10 (docs/scaling.md, "Batch-aware defaults")."""
    few = NU_FEW_STEPS if steps_per_pass <= FEW_STEPS else 0.0
    return max(size_rule(weights, rows), few)


def batch_rule(batch: int, n_train: int) -> dict[str, float]:
    """The mini-batch ADMM settings that follow from the batch ``B`` of one block step
    and the ``N`` samples it is drawn from (the ``auto`` values of ``admm.cov_decay``,
    ``trust_radius``, ``output_factor``, ``block_momentum``, ``output_trust`` and
    ``average``; docs/admm-convergence.md, "Large batches" and "The average of the
    iterates", has the sweeps they come from). With ``k = max(1, N / B)`` the steps per
    pass:

        cov_decay      = min(0.95, max(0.3, 1 - 3 / k))   the running Gram remembers
                                                          about a third of a pass
        trust_radius   = min(0.5, max(0.25, 0.25 sqrt(16 / k)))   the cap widens
                                                          when a pass has few steps
        output_factor  = 1 if B > 64 else 0               the two-sided (K-FAC-like) step
        block_momentum = 0.5 if B > 64 else 0             heavy ball on the block step
        output_trust   = 2 if B >= 2048 else 1            the output block's larger cap
        average        = 0.99 if k >= 16 else 0           the evaluated weights average
                                                          the iterates of the last ~100
                                                          steps (:mod:`padmmirnn.averaging`)

    With B = 64 and N >= 4000 these are the defaults tuned there (0.95, 0.25, off, off,
    1, 0.99). The average filters mini-batch noise; with few steps per pass there is
    little to filter and its window lags: at k = 4 on the default dataset it cost a pass
    to 85% (4 against 3), at k = 16 it was neutral."""
    k = max(1.0, n_train / max(batch, 1))
    large = batch > BATCH_RULE_REFERENCE
    return {"cov_decay": min(0.95, max(0.3, 1.0 - 3.0 / k)),
            "trust_radius": min(0.5, max(0.25, 0.25 * (16.0 / k) ** 0.5)),
            "output_factor": 1.0 if large else 0.0, "block_momentum": 0.5 if large else 0.0,
            "output_trust": 2.0 if batch >= 32 * BATCH_RULE_REFERENCE else 1.0,
            "average": AVERAGE_DECAY if k >= AVERAGE_MIN_STEPS else 0.0}


@dataclass(frozen=True)
class ModelConfig:
    cell: str = opt("rnn", "the recurrent cell: Elman (nn.RNN), GRU (nn.GRU) or LSTM "
                    "(nn.LSTM), in PyTorch's gate order", choices=("rnn", "gru", "lstm"))
    layers: int = opt(1, "stacked recurrent layers (layer l reads layer l-1's states)",
                      low=1)
    hidden: int = opt(64, "hidden units h (every layer)", low=1)
    activation: str = opt("tanh", "f in s_t = f(a_t) of the Elman cell (gated cells: tanh)",
                          choices=("tanh", "relu"))
    loss: str = opt("ce", "softmax cross-entropy or squared error", choices=("ce", "mse"))
    w_init: str = opt("orthogonal", "initial recurrent weights W",
                      choices=("orthogonal", "gaussian"))
    init_scale: float = opt(1.0, "scale of the initial W (spectral radius if orthogonal)",
                            low=0.0, strict=True)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = opt("default", "built-in dataset name or path of a NAME_train.h5 file")
    test: str = opt("", "test split (default: NAME_test.h5 beside the training file)")
    # -- validation (issue 25) --
    validation: str = opt("", "validation split file (same kind, input size, classes and "
                          "target layout as the training file; empty: none)")
    validation_fraction: float = opt(0.0, "hold this share of the training file out for "
                                     "validation, in (0, 1): the samples of a permutation "
                                     "seeded by train.seed, the same for any rank count "
                                     "(0: none)", low=0.0)


@dataclass(frozen=True)
class TrainConfig:
    algo: str = opt("admm", "training algorithm",
                    choices=("admm", "sgd", "momentum", "adam", "rmsprop", "adagrad", "celgc"))
    iterations: int = opt(60, "ADMM iterations or gradient epochs", low=0)
    seed: int = opt(0, "random seed (initial weights, mini-batch order)", low=0)
    dtype: str = opt("float64", "compute dtype of the per-sample state",
                     choices=("float64", "float32"))
    parallel: str = opt("auto", "auto: sync under MPI with several ranks, else none",
                        choices=("auto", "none", "sync", "async"))
    reduction: str = opt("fast", "fast: one Allreduce; deterministic: fixed chunks summed "
                         "in global order (bitwise equal for any rank count)",
                         choices=("fast", "deterministic"))
    chunk: int = opt(250, "samples per chunk of the deterministic reduction", low=1)
    eval_every: int = opt(0, "iterations between evaluations (0: every one; async: at the "
                          "end)", low=0)
    budget_seconds: float = opt(0.0, "stop at the first iteration past this many seconds "
                                "(0: no limit)", low=0.0)
    target_accuracy: float = opt(0.0, "stop after the first evaluation whose test accuracy "
                                 "(without a test split: validation, else train accuracy) "
                                 "reaches this (0: off; async: consensus runs with "
                                 "train.eval_every, on rank 0's snapshot evaluations)",
                                 low=0.0)
    target_loss: float = opt(0.0, "stop after the first evaluation whose test loss (without a "
                             "test split: validation, else train loss) is at most this, "
                             "e.g. nats per character (0: off)", low=0.0)
    staleness: int = opt(1, "async: tau, counted as staleness_kind says", low=0)
    staleness_kind: str = opt("iterations", "async: no worker more than tau iterations ahead "
                              "of the slowest, or no contribution read more than tau "
                              "publishes old (fast ranks run more iterations; tau >= ranks - 1)",
                              choices=("iterations", "publishes"))
    straggler: str = opt("", "RANK:FACTOR slows that rank's compute by FACTOR (experiments); "
                         "RANK:FACTOR:FIRST-LAST only in those iterations (a transient "
                         "straggler)")
    net_latency_us: float = opt(0.0, "simulated interconnect (studies): alpha in "
                                "microseconds added to every collective and one-sided round "
                                "trip; 0 with net_bandwidth_gbs = 0 is off", low=0.0)
    net_bandwidth_gbs: float = opt(0.0, "simulated interconnect: beta in Gbit/s, adding "
                                   "bytes / beta (0: infinite)", low=0.0)
    rebalance: bool = opt(False, "synchronous runs with global mini-batches (mini-batch ADMM, "
                          "gradient methods but CELGC): after every iteration re-cut the "
                          "samples over the ranks in proportion to each rank's measured "
                          "samples per second; the batches stay the same, so the run still "
                          "equals the serial one (a straggler's remedy that keeps SP exact)")
    virtual_ranks: int = opt(0, "run the algorithm of this many ranks on the job's processes "
                             "(a multiple of them), each process running its share in turn, "
                             "for studies that count passes, synchronisations and bytes (0: "
                             "the job's ranks)", low=0)
    collective_timeout_s: float = opt(600.0, "end the job when a rank has waited this long in "
                                      "one collective: MPI over TCP does not report a lost "
                                      "node (0: wait for ever)", low=0.0)
    progress_thread: bool = opt(True, "async: the rank hosting the windows runs a thread "
                                "that enters MPI every millisecond, so the others' one-sided "
                                "operations complete while it computes (between nodes)")
    # -- validation, early stopping and bucketed batches (issue 25) --
    early_stopping: int = opt(0, "patience: stop after this many evaluations in a row "
                              "without an improvement of train.monitor on the validation "
                              "split (0: off; needs a validation split)", low=0)
    monitor: str = opt("val_loss", "the validation metric that picks the best evaluation "
                       "(lower loss or higher accuracy; ties are no improvement)",
                       choices=("val_loss", "val_accuracy"))
    restore_best: bool = opt(True, "with a validation split, weights.h5 holds the weights "
                             "of the best evaluation by train.monitor (false: the last)")
    bucket: bool = opt(True, "data with lengths: mini-batches of sequences of similar "
                       "length (each window of bucket_window batches of the seeded "
                       "permutation sorted by length; the same for any rank count), for "
                       "the gradient baselines and the mini-batch ADMM (consensus: within "
                       "each rank's samples; not the fixed chunks of reduction = "
                       "deterministic)")
    bucket_window: int = opt(50, "batches per window of the bucketed permutation", low=1)


@dataclass(frozen=True)
class AdmmConfig:
    """ADMM settings. The default is mini-batch hybrid ADMM (docs/design.md, section 5):
    several weight solves per pass, each on a mini-batch whose auxiliaries are a
    forward pass and whose multipliers are the least-squares (KKT) estimate -- a
    backward recursion in time, so not back-propagation free. ``--config fullbatch``
    is the full-batch hybrid (one solve per iteration, backtracking step;
    docs/admm-convergence.md), ``--config faithful`` the back-propagation-free
    formulation (docs/design.md, section 3: multiplier ascent, a/s/o block updates)."""

    rho1: float = opt(0.5, "penalty of a_t = U x_t + W s_{t-1} + b (an inverse step size)",
                      low=0.0, strict=True)
    rho2: float = opt(1.0, "penalty of s_t = f(a_t)", low=0.0, strict=True)
    rho3: float = opt(0.5, "penalty of o_t = V s_t + c (an inverse step size)", low=0.0,
                      strict=True)
    nu: float | str = opt("auto", "weight decay nu/2 (|U|^2 + |W|^2 + |V|^2), relative to "
                          "the mean loss per target (auto: 3e-3 min(1, p / R)^2 for p "
                          "first-layer input weights and R training targets, at least 6e-4 "
                          "when a pass has at most 4 block steps; 6e-4 at the default "
                          "dataset)", low=0.0, auto=True)
    multipliers: str = opt("all", "which constraints carry multipliers (none: pure penalty)",
                           choices=("all", "output", "none"))
    warmup: int = opt(0, "iterations without a multiplier update", low=0)
    rho_schedule: str = opt("geometric", "rho_j(k) = rho_j min(growth^(k-1), max_scale) "
                            "in iteration/pass k if geometric (a decaying step)",
                            choices=("constant", "geometric"))
    rho_growth: float | str = opt("auto", "growth of the geometric rho schedule per "
                                  "iteration/pass (auto: 1.05^(1/sqrt(|O|)) for |O| "
                                  "labels per training sequence, 1.05 with one label, "
                                  "1.005 for a character model's 100)", low=1.0, auto=True)
    rho_max_scale: float = opt(10.0, "cap of the geometric rho schedule", low=1.0)
    schedule: str = opt("fused", "fused: one statistics reduction per iteration; paper: U, "
                        "W, b, a, s, then V, c, o (two)", choices=("fused", "paper"))
    a_newton_steps: int = opt(3, "Newton steps of the elementwise a-update", low=0)
    o_newton_steps: int = opt(20, "Newton steps of the o-update (cross-entropy)", low=0)
    aux_order: str = opt("jacobi", "local blocks a, s, o, or o then s_T, a_T, ..., s_1, a_1",
                         choices=("jacobi", "backward"))
    aux_sweeps: int = opt(0, "sweeps of the local blocks per weight solve", low=0)
    dual_step: float = opt(1.0, "beta in lambda += beta rho r (ascent), in (0, 2]", low=0.0,
                           strict=True)
    resync_every: int = opt(1, "a, s, o from a forward pass every K iterations (0: never)",
                            low=0)
    multiplier_update: str = opt("kkt", "ascent (lambda += beta rho r) or the least-squares "
                                 "(KKT) estimate, a backward recursion",
                                 choices=("ascent", "kkt"))
    weight_solve: str = opt("joint", "U, W, b then V, c, or [U W b] and [V c] in one solve",
                            choices=("blocks", "joint"))
    step_control: str = opt("auto", "backtrack: old + alpha (new - old), alpha halved until "
                            "the training loss does not increase; auto: where it applies",
                            choices=("auto", "none", "backtrack"))
    backtrack_max: int = opt(4, "halvings of the step per iteration", low=0)
    step_grow_after: int = opt(3, "the step doubles (at most 1) after this many first-trial "
                               "acceptances in a row", low=0)
    momentum: float = opt(0.0, "heavy-ball mu on the weights, in [0, 1) (with backtracking)",
                          low=0.0)
    batch_size: int = opt(64, "mini-batch ADMM: samples per global mini-batch, several weight "
                          "solves per pass (0: one full-batch solve per iteration, the "
                          "fullbatch preset)", low=0)
    cov_decay: float | str = opt("auto", "mini-batch: C <- decay C + (1 - decay) G / rows, the "
                                 "running Gram estimate of each weight block (auto: the "
                                 "batch rule, 0.95 at batch 64)", low=0.0, auto=True)
    damping: float = opt(0.01, "mini-batch: the solve uses C + damping I", low=0.0)
    token_step: str = opt("active", "mini-batch, token inputs: the first layer's block step "
                          "solves for the token columns of the batch's tokens only, the "
                          "others keep their weights (active: a block-coordinate step whose "
                          "cost follows the batch, not the vocabulary) or for every token "
                          "column (all: the exact coupled solve, O(vocab) per step)",
                          choices=("active", "all"))
    trust_radius: float | str = opt("auto", "mini-batch: cap of each block's change per step "
                                    "(Frobenius norm), times sqrt(|O|) with a label per "
                                    "step (0: none; auto: the batch rule, 0.25 at batch 64)",
                                    low=0.0, auto=True)
    output_factor: float | str = opt("auto", "mini-batch: the output-side Kronecker factor: "
                                     "each block's direction is also left-solved with the "
                                     "running Gram S of its adjoints per output row, plus "
                                     "this times mean(diag S) (0: off; a two-sided, "
                                     "K-FAC-like step; auto: the batch rule, off at batch 64)",
                                     low=0.0, auto=True)
    block_momentum: float | str = opt("auto", "mini-batch: heavy-ball mu on each block's "
                                      "change, v <- mu v + step, in [0, 1) (0: off; auto: "
                                      "the batch rule, off at batch 64)", low=0.0, auto=True)
    output_trust: float | str = opt("auto", "mini-batch: the output block's trust radius, a "
                                    "multiple of the input blocks' (auto: the batch rule, "
                                    "1 at batch 64)", low=0.0, strict=True, auto=True)
    average: float | str = opt("auto", "mini-batch: the weights evaluated "
                               "and saved (weights.h5, the best so far) are the moving "
                               "average of the iterates, decay min(average, (1 + t) / (10 + t)) "
                               "after block step t, in [0, 1) (0: the last iterate; auto: "
                               "the batch rule, 0.99 when a pass has at least 16 steps; 0 "
                               "in the consensus modes and AP)",
                               low=0.0, auto=True)
    consensus: str = opt("auto", "mini-batch: none: every mini-batch is global (one "
                         "reduction each; equals the serial run); average, duals or outer: "
                         "each (virtual) rank takes local steps on batch_size / ranks of its "
                         "own samples and a join every sync_every steps averages them, corrects "
                         "their drift with per-rank duals (consensus ADMM), or takes an outer "
                         "Nesterov step on the averaged change (docs/design.md, section 5); "
                         "auto: none, or average for train.parallel = async",
                         choices=("auto", "none", "average", "duals", "outer"))
    sync_every: int = opt(0, "consensus modes: local steps between joins (0: one join per "
                          "pass, at its end)", low=0)
    consensus_rho: float = opt(1.0, "consensus = duals: rho_c of the proximal term "
                               "rho_c/2 |theta - z + u_r|^2 of the local steps", low=0.0)
    outer_lr: float = opt(0.7, "consensus = outer: the outer step on the averaged change",
                          low=0.0, strict=True)
    outer_momentum: float = opt(0.9, "consensus = outer: its Nesterov momentum mu, in [0, 1)",
                                low=0.0)

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
        if self.block_momentum != "auto" and not 0.0 <= self.block_momentum < 1.0:
            raise ConfigError(f"config key 'admm.block_momentum' must be in [0, 1); "
                              f"got {self.block_momentum!r}")
        if self.average != "auto" and not 0.0 <= self.average < 1.0:
            raise ConfigError(f"config key 'admm.average' must be in [0, 1); "
                              f"got {self.average!r}")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ConfigError(f"config key 'admm.outer_momentum' must be in [0, 1); "
                              f"got {self.outer_momentum!r}")
        if not 0.0 < self.dual_step <= 2.0:
            raise ConfigError(f"config key 'admm.dual_step' must be in (0, 2]; "
                              f"got {self.dual_step!r}")

    def for_batch(self, n_train: int, *, weights: int, rows: int, ranks: int = 1,
                  consensus: bool = False) -> AdmmConfig:
        """These settings with every ``auto`` replaced: the block step's by
        :func:`batch_rule` for the samples of one block step, the global batch
        ``min(batch_size, n_train)`` (a batch is at most the training set) from the
        ``n_train`` samples, both divided by ``ranks`` for the local steps of the
        consensus modes; ``nu`` by :func:`decay_rule` for the model's first-layer input
        ``weights`` (``U``'s size), the training set's ``rows`` output rows (global:
        the same on every rank) and the block steps per pass; ``rho_growth`` by
        :func:`growth_rule` for the labels per sequence, ``rows / n_train``; with
        ``consensus`` (the local steps of the consensus modes and AP) ``average`` is 0:
        their joins already average the ranks' weights, and averaging the local iterates
        as well cost a pass to 85% on the default dataset (3 against 2 on 2 ranks)."""
        batch = min(self.batch_size, n_train) if self.batch_size else n_train
        rule = batch_rule(max(1, batch // ranks), max(1, n_train // ranks))
        rule["nu"] = decay_rule(weights, rows, n_train / batch)
        rule["rho_growth"] = growth_rule(rows / n_train)
        if consensus:
            rule["average"] = 0.0
        return dataclasses.replace(self, **{k: v for k, v in rule.items()
                                            if getattr(self, k) == "auto"})


@dataclass(frozen=True)
class OptimConfig:
    """Gradient baselines (``train.algo`` other than admm); one iteration is one epoch."""

    lr: float = opt(0.0, "learning rate (0: the algorithm's default, "
                    "padmmirnn.gradient.trainer.DEFAULT_LR)", low=0.0)
    batch_size: int = opt(64, "samples per (global) mini-batch", low=1)
    momentum: float = opt(0.9, "heavy-ball mu of the momentum method", low=0.0)
    schedule: str = opt("constant", "learning-rate schedule",
                        choices=("constant", "step", "cosine"))
    step_every: int = opt(10, "epochs between decays of the step schedule", low=1)
    step_factor: float = opt(0.5, "decay factor of the step schedule", low=0.0, strict=True)
    clip_norm: float = opt(1.0, "clip the (averaged) gradient to this global norm (0: no "
                           "clipping)", low=0.0)
    token_update: str = opt("lazy", "token inputs: the optimizer updates the first layer's "
                            "input columns of the batch's tokens only, the other columns "
                            "and their moments wait until their token comes back (lazy: "
                            "torch's SparseAdam, a step's cost follows the batch, not the "
                            "vocabulary; exact for sgd and adagrad) or every column, the "
                            "moments of absent tokens decaying (dense: nn.Embedding with "
                            "Adam); CELGC's local steps are always dense",
                            choices=("lazy", "dense"))
    celgc_gamma: float = opt(1.0, "CELGC clipping threshold gamma", low=0.0, strict=True)
    celgc_period: int = opt(4, "CELGC local steps between weight averages", low=1)
    average: float = opt(0.0, "evaluate and save the moving average of the iterates, decay "
                         "min(average, (1 + t) / (10 + t)) after step t, in [0, 1), as "
                         "admm.average does for ADMM (0: the last iterate; not for CELGC)",
                         low=0.0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.average < 1.0:
            raise ConfigError(f"config key 'optim.average' must be in [0, 1); "
                              f"got {self.average!r}")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = opt(0, "iterations between checkpoints (0: only on a graceful stop)", low=0)
    dir: str = opt("", "checkpoint folder (default: OUT/checkpoints)")
    keep: int = opt(3, "newest checkpoints kept", low=1)
    resume: str = opt("none", "none, latest, or the PATH of a checkpoint file")
    force: bool = opt(False, "resume even if the checkpoint's configuration differs")
    max_walltime: float = opt(0.0, "seconds of this job after which it checkpoints and exits "
                              "0 (0: off)", low=0.0)


@dataclass(frozen=True)
class OutputConfig:
    dir: str = opt("", "output folder (default runs/ALGO-TIMESTAMP)")
    log_every: int = opt(10, "iterations between progress log lines", low=1)


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

    def consensus(self) -> str:
        """The consensus mode in force (``admm.consensus``; ``auto``: SP, or averaging in
        asynchronous runs); ``none`` for everything but mini-batch ADMM."""
        a = self.admm
        if self.train.algo != "admm" or not a.batch_size:
            return "none"
        if a.consensus != "auto":
            return a.consensus
        return "average" if self.train.parallel == "async" else "none"

    def backtracking(self) -> bool:
        """The step control in force: ``auto`` backtracks where it can (weights from a
        fused solve, auxiliaries re-synchronised every iteration); async runs backtrack
        on each rank's own training loss (docs/async.md)."""
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
RUN_CONTROL = ("iterations", "parallel", "eval_every", "budget_seconds", "target_accuracy",
               "target_loss", "rebalance",
               "staleness", "staleness_kind", "straggler", "progress_thread",
               "collective_timeout_s",
               "net_latency_us", "net_bandwidth_gbs",
               "early_stopping", "restore_best")

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _sections() -> dict[str, type]:
    return {f.name: globals()[f.type] if isinstance(f.type, str) else f.type
            for f in fields(Config)}


def _coerce(key: str, value: Any, default: Any, auto: bool = False) -> Any:
    if auto and value == "auto":
        return value
    kind = float if auto else type(default)
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
    either = " or 'auto'" if auto else ""
    raise ConfigError(f"config key '{key}' must be of type {kind.__name__}{either}, got "
                      f"{type(value).__name__} {value!r}")


def options() -> list[tuple[str, Any, dict]]:
    """Every option as (``section.key``, default, metadata of :func:`opt`), in order."""
    out = []
    for section, kind in _sections().items():
        for f in fields(kind):
            out.append((f"{section}.{f.name}", getattr(kind(), f.name), f.metadata))
    return out


def describe_options(markdown: bool = False) -> str:
    """Every option with its default, allowed values and documentation: plain lines
    for ``padmmirnn config options``, or the markdown table of docs/options.md."""
    rows = []
    for key, default, meta in options():
        if meta["choices"]:
            allowed = ", ".join(meta["choices"])
        elif meta["low"] is not None:
            allowed = f"{'>' if meta['strict'] else '>='} {meta['low']:g}"
            if meta["auto"]:
                allowed = f"auto or {allowed}"
        else:
            allowed = type(default).__name__
        rows.append((key, _toml_value(default), allowed, meta["doc"]))
    if not markdown:
        return "\n".join(f"{k} = {d}  [{a}]  {doc}" for k, d, a, doc in rows)
    lines = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{k}` | `{d}` | {a} | {doc} |" for k, d, a, doc in rows]
    return "\n".join(lines)


def _validate(cfg: Config) -> None:
    d = cfg.to_dict()
    for key, _, meta in options():
        section, name = key.split(".")
        allowed = meta["choices"]
        if allowed and d[section][name] not in allowed:
            raise ConfigError(
                f"config key '{key}' must be one of {', '.join(allowed)}; got {d[section][name]!r}"
            )
    m = cfg.model
    if m.cell != "rnn" and m.activation != "tanh":
        raise ConfigError(f"model.activation = {m.activation!r} is for model.cell = 'rnn'; "
                          f"a {m.cell.upper()} uses sigmoid gates and tanh (PyTorch's cell)")
    if (m.cell != "rnn" or m.layers > 1) and cfg.train.algo == "admm" \
            and not cfg.admm.batch_size:
        raise ConfigError(f"model.cell = {m.cell!r} with model.layers = {m.layers} needs "
                          "mini-batch ADMM (admm.batch_size > 0): the full-batch presets "
                          "(fullbatch, faithful) keep per-sample auxiliaries of a one-layer "
                          "Elman RNN")
    straggler_rank_factor(cfg.train.straggler)
    t = cfg.train
    if t.parallel == "async" and (cfg.admm.schedule != "fused" or t.reduction != "fast"):
        raise ConfigError("train.parallel = async needs admm.schedule = fused and "
                          "train.reduction = fast (one statistics exchange per iteration)")
    if t.target_accuracy > 1:
        raise ConfigError(f"train.target_accuracy is a fraction (0.85 for 85%), got "
                          f"{t.target_accuracy}")
    if (t.target_accuracy or t.target_loss) and t.parallel == "async" and not (
            cfg.admm.batch_size and t.eval_every):
        raise ConfigError("train.target_accuracy and target_loss need evaluations during the "
                          "run: asynchronous consensus (admm.batch_size > 0) evaluates on rank "
                          "0 every train.eval_every passes (set it); the full-batch engine "
                          "evaluates at its end only (use train.parallel = sync or none)")
    if t.staleness_kind == "publishes" and (
            t.parallel != "async" or cfg.checkpoint.every
            or (t.eval_every and not cfg.admm.batch_size)):
        raise ConfigError("train.staleness_kind = publishes is for train.parallel = async, "
                          "without checkpoint.every, nor train.eval_every with the full-batch "
                          "engine (ranks reach a given iteration at very different times; "
                          "collective evaluations and checkpoints "
                          "happen at the end and on a stop)")
    if cfg.admm.momentum and not cfg.backtracking():
        raise ConfigError("config key 'admm.momentum' > 0 needs backtracking (admm.step_control "
                          "backtrack, or auto with resync_every = 1)")
    if t.parallel == "async" and cfg.admm.momentum:
        raise ConfigError("train.parallel = async needs admm.momentum = 0 (each worker's "
                          "heavy-ball term would follow its own stale weights)")
    if cfg.admm.batch_size and t.parallel == "async" and t.algo == "admm" and (
            cfg.consensus() not in ("average", "duals") or cfg.admm.sync_every):
        raise ConfigError("train.parallel = async runs mini-batch ADMM as consensus with one "
                          "join per pass: admm.consensus = average (auto) or duals, "
                          "admm.sync_every = 0 (or the full-batch engine: --config fullbatch)")
    if cfg.admm.batch_size and t.reduction == "deterministic" and cfg.admm.batch_size % t.chunk:
        raise ConfigError(f"admm.batch_size = {cfg.admm.batch_size} must be a multiple of "
                          f"train.chunk = {t.chunk} with train.reduction = deterministic "
                          "(a mini-batch is a group of whole chunks)")
    if cfg.admm.consensus not in ("none", "auto") and (
            not cfg.admm.batch_size or t.algo != "admm" or t.reduction == "deterministic"):
        raise ConfigError(f"admm.consensus = {cfg.admm.consensus!r} is for mini-batch ADMM "
                          "(train.algo = admm, admm.batch_size > 0, train.reduction = fast)")
    if t.rebalance and (t.parallel == "async" or t.reduction == "deterministic"
                        or t.virtual_ranks or t.algo == "celgc"
                        or (t.algo == "admm" and (not cfg.admm.batch_size
                                                  or cfg.consensus() != "none"))):
        raise ConfigError("train.rebalance is for synchronous runs with global mini-batches: "
                          "mini-batch ADMM without consensus, or a gradient method other than "
                          "CELGC, with train.reduction = fast and no virtual ranks")
    if cfg.optim.average and t.algo == "celgc":
        raise ConfigError("optim.average is for the synchronous gradient methods (CELGC's "
                          "ranks hold different weights between their averages)")
    if t.virtual_ranks and t.parallel == "async":
        raise ConfigError("train.virtual_ranks is for synchronous runs (async ranks run "
                          "at their own pace: run real ranks)")
    if t.parallel == "async" and t.algo != "admm":
        raise ConfigError("train.parallel = async is for train.algo = admm (gradient methods "
                          "run sync, or CELGC for local steps)")
    _validate_sequences(cfg)
    for key, _, meta in options():
        low, strict = meta["low"], meta["strict"]
        if low is None:
            continue
        section, name = key.split(".")
        v = d[section][name]
        if v == "auto":
            continue
        if v != v or (v <= low if strict else v < low):
            rel = ">" if strict else ">="
            raise ConfigError(f"config key '{key}' must be {rel} {low}; got {v!r}")


def _validate_sequences(cfg: Config) -> None:
    """Validation split and early stopping (issue 25)."""
    data, t = cfg.data, cfg.train
    f = data.validation_fraction
    if f != f or not 0.0 <= f < 1.0:
        raise ConfigError(f"config key 'data.validation_fraction' must lie in (0, 1) (0: no "
                          f"validation split); got {f!r}")
    if f and data.validation:
        raise ConfigError("data.validation (a file) and data.validation_fraction (a share of "
                          "the training file) are two ways to the same split: give one")
    if t.early_stopping and not (f or data.validation):
        raise ConfigError("train.early_stopping needs a validation split: set "
                          "data.validation_fraction (e.g. 0.1) or data.validation (a file)")
    if t.early_stopping and t.parallel == "async":
        raise ConfigError("train.early_stopping needs evaluations during the run: async runs "
                          "evaluate at their end only (use train.parallel = sync or none)")


def check_for_ranks(cfg: Config, ranks: int) -> None:
    """What only the rank count can rule out; the same on every rank, so it is raised
    everywhere before the first collective."""
    t = cfg.train
    if (t.parallel == "async" and t.staleness_kind == "publishes" and ranks > 1
            and t.staleness < ranks - 1):
        raise ConfigError(
            f"train.staleness = {t.staleness} with staleness_kind = publishes needs at least "
            f"ranks - 1 = {ranks - 1} on {ranks} ranks: one round of publishes makes the "
            f"first contribution {ranks - 1} publishes old, and every rank would wait")
    if t.virtual_ranks and t.virtual_ranks % ranks:
        raise ConfigError(f"train.virtual_ranks = {t.virtual_ranks} must be a multiple of the "
                          f"job's {ranks} rank(s): each process runs the same number")
    straggler = straggler_rank_factor(t.straggler)
    if straggler and straggler.rank >= ranks:
        raise ConfigError(f"config key 'train.straggler' names rank {straggler.rank}, but the "
                          f"job has {ranks} rank(s)")


@dataclass(frozen=True)
class Straggler:
    """``train.straggler``: ``rank``'s compute takes ``factor`` times longer in the
    iterations ``first..last`` (inclusive; all of them by default)."""

    rank: int
    factor: float
    first: int = 1
    last: int | None = None

    def slows(self, rank: int, iteration: int) -> float:
        """The factor of ``rank`` in ``iteration`` (1: not slowed)."""
        inside = self.first <= iteration and (self.last is None or iteration <= self.last)
        return self.factor if rank == self.rank and inside else 1.0


def straggler_rank_factor(text: str) -> Straggler | None:
    """Parse ``train.straggler`` ("RANK:FACTOR" or "RANK:FACTOR:FIRST-LAST", FACTOR >= 1)
    or None when empty."""
    if not text:
        return None
    try:
        rank, factor, *span = text.split(":")
        first, last = (int(v) for v in span[0].split("-")) if span else (1, None)
        if len(span) > 1:
            raise ValueError
        result = Straggler(int(rank), float(factor), first, last)
    except ValueError:
        raise ConfigError(f"config key 'train.straggler' must be RANK:FACTOR or "
                          f"RANK:FACTOR:FIRST-LAST, got {text!r}") from None
    if result.rank < 0 or not result.factor >= 1.0 or result.first < 1 or (
            result.last is not None and result.last < result.first):
        raise ConfigError(f"config key 'train.straggler' needs RANK >= 0, FACTOR >= 1 and "
                          f"1 <= FIRST <= LAST, got {text!r}")
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
        autos = {f.name for f in fields(defaults) if f.metadata.get("auto")}
        kwargs = {}
        for name, value in values.items():
            if name not in known:
                raise ConfigError(
                    f"unknown config key '{section}.{name}' (known in [{section}]: "
                    f"{', '.join(known)})"
                )
            kwargs[name] = _coerce(f"{section}.{name}", value, known[name], name in autos)
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

"""The ADMMiRNN iteration: block order, rho schedule, multipliers, one reduction.

Schedules (DESIGN.md section 3):

* ``fused``: statistics of [x, s_{t-1}, 1, a_hat] and [s, 1, o_hat] are taken
  before the weight blocks (a, s, o, lambda do not change while the weights are
  solved), so ONE reduction per iteration; then U, W, b, V, c, a, s, o, lambda.
* ``paper``: U, W, b, a, s, V, c, o, lambda -- a second reduction for V, c.

Multiplier modes: ``all`` (lambda1..3), ``output`` (lambda3 only), ``none``
(pure penalty: the iteration never increases the augmented Lagrangian). No
multiplier update happens during the first ``warmup`` iterations. rho follows
``rho_j(k) = rho_j * min(growth^(k-1), max_scale)`` for the geometric schedule.
"""

from __future__ import annotations

import numpy as np

from padmmirnn import admm_updates as up
from padmmirnn.config import AdmmConfig, Config
from padmmirnn.data import LocalData
from padmmirnn.model import Params, forward, init_params, outputs
from padmmirnn.stats import constant_layout, input_layout, output_layout


class AdmmEngine:
    """ADMMiRNN on one rank's slice; ``comm.allreduce_sum`` joins the statistics."""

    def __init__(self, cfg: Config, data: LocalData, n_global: int, comm,
                 params: Params | None = None):
        self.cfg, self.acfg = cfg, cfg.admm
        self.data, self.n_global, self.comm = data, n_global, comm
        self.dtype = np.dtype(cfg.train.dtype)
        info = data.info
        self.tokens = info.kind == "tokens"
        self.steps = info.steps
        self.out_steps = info.steps if info.many_to_many else 1
        h = cfg.model.hidden
        self.params = params if params is not None else init_params(
            info.dim, h, info.classes, cfg.train.seed, cfg.model.w_init, cfg.model.init_scale)
        self.iteration = 0
        self.state = self._initial_state()
        self.work = np.empty_like(self.state.A)
        self.in_layout = input_layout(info.dim, h)
        self.out_layout = output_layout(h, info.classes)
        self.fused_size = self.in_layout.size + self.out_layout.size
        const_layout = constant_layout(info.dim, self.tokens)
        buf = comm.allreduce_sum(const_layout.pack(up.constant_stats(data)))
        self.const = const_layout.unpack(buf)

    # --------------------------------------------------------------------- state

    def _initial_state(self) -> up.AdmmState:
        """Auxiliaries from a forward pass of the initial weights, multipliers zero."""
        states, pre = forward(self.params, self.data, self.cfg.model.activation, self.dtype)
        o = outputs(self.params, states, self.data.info.many_to_many)
        mode = self.acfg.multipliers
        empty = np.zeros((0, 0, 0), self.dtype)
        return up.AdmmState(
            A=pre, S=states, O=np.ascontiguousarray(o),
            L1=np.zeros_like(pre) if mode == "all" else empty,
            L2=np.zeros_like(pre) if mode == "all" else empty,
            L3=np.zeros_like(o) if mode in ("all", "output") else empty,
        )

    def penalty(self, iteration: int | None = None) -> up.Penalty:
        """rho and nu in force at ``iteration`` (1-based; default: the next one)."""
        a: AdmmConfig = self.acfg
        k = self.iteration + 1 if iteration is None else iteration
        scale = 1.0
        if a.rho_schedule == "geometric":
            scale = min(a.rho_growth ** (k - 1), a.rho_max_scale)
        return up.Penalty(a.rho1 * scale, a.rho2 * scale, a.rho3 * scale, a.nu)

    def compute_params(self) -> Params:
        """The weights in the compute dtype (a view when it is float64)."""
        return self.params.astype(self.dtype)

    # --------------------------------------------------------------------- blocks

    def _reduce_input_output(self, pen: up.Penalty, with_output: bool) -> tuple[dict, dict | None]:
        local_in = up.input_stats(self.state, self.data, pen.rho1)
        if with_output:
            local_out = up.output_stats(self.state, self.data.info.many_to_many, pen.rho3)
            buf = np.empty(self.fused_size)
            self.in_layout.pack(local_in, buf[: self.in_layout.size])
            self.out_layout.pack(local_out, buf[self.in_layout.size:])
            self.comm.allreduce_sum(buf)
            return (self.in_layout.unpack(buf[: self.in_layout.size]),
                    self.out_layout.unpack(buf[self.in_layout.size:]))
        buf = self.comm.allreduce_sum(self.in_layout.pack(local_in))
        return self.in_layout.unpack(buf), None

    def _reduce_output(self, pen: up.Penalty) -> dict:
        local = up.output_stats(self.state, self.data.info.many_to_many, pen.rho3)
        return self.out_layout.unpack(self.comm.allreduce_sum(self.out_layout.pack(local)))

    def weights_in(self, st_in: dict, pen: up.Penalty) -> None:
        up.update_input_weights(self.params, st_in, self.const, pen, self.n_global, self.steps,
                                self.tokens)

    def weights_out(self, st_out: dict, pen: up.Penalty) -> None:
        up.update_output_weights(self.params, st_out, pen, self.n_global, self.out_steps)

    def block_a(self, pen: up.Penalty) -> None:
        up.update_a(self.compute_params(), self.state, self.data, pen, self.cfg.model.activation,
                    self.acfg.a_newton_steps, self.work)

    def block_s(self, pen: up.Penalty) -> None:
        up.update_s(self.compute_params(), self.state, self.data, pen, self.cfg.model.activation,
                    self.work)

    def block_o(self, pen: up.Penalty) -> None:
        up.update_o(self.compute_params(), self.state, self.data, pen, self.cfg.model.loss,
                    self.acfg.o_newton_steps)

    def residuals(self, pen: up.Penalty, update: tuple[bool, bool, bool]) -> np.ndarray:
        """Local RESIDUAL_FIELDS sums (multipliers before), then the multiplier step."""
        return up.residual_sums(self.compute_params(), self.state, self.data, pen,
                                self.cfg.model.activation, self.cfg.model.loss, self.work, update)

    def lagrangian(self, pen: up.Penalty | None = None) -> float:
        """The global augmented Lagrangian at the current point (one reduction)."""
        pen = pen or self.penalty(max(self.iteration, 1))
        sums = self.comm.allreduce_sum(self.residuals(pen, (False, False, False)))
        return up.lagrangian_from_sums(sums, self.params, pen, self.n_global)

    # --------------------------------------------------------------------- iteration

    def iterate(self, want_sums: bool = True) -> np.ndarray | None:
        """One ADMM iteration. Returns the local RESIDUAL_FIELDS sums at the new point
        (multipliers before their update) when asked or needed, else None."""
        pen = self.penalty()
        if self.acfg.schedule == "fused":
            st_in, st_out = self._reduce_input_output(pen, with_output=True)
            self.weights_in(st_in, pen)
            self.weights_out(st_out, pen)
            self.block_a(pen)
            self.block_s(pen)
        else:
            st_in, _ = self._reduce_input_output(pen, with_output=False)
            self.weights_in(st_in, pen)
            self.block_a(pen)
            self.block_s(pen)
            self.weights_out(self._reduce_output(pen), pen)
        self.block_o(pen)
        self.iteration += 1
        mode = self.acfg.multipliers
        active = self.iteration > self.acfg.warmup
        update = (active and mode == "all", active and mode == "all",
                  active and mode in ("all", "output"))
        if want_sums or any(update):
            return self.residuals(pen, update)
        return None

    def summarize(self, sums: np.ndarray) -> dict[str, float]:
        """Objective and primal residual norms from globally reduced sums."""
        pen = self.penalty(self.iteration)
        n = self.n_global
        return {
            "objective": up.lagrangian_from_sums(sums, self.params, pen, n),
            "residual_a": float(np.sqrt(sums[1] / n)),
            "residual_s": float(np.sqrt(sums[3] / n)),
            "residual_o": float(np.sqrt(sums[5] / n)),
            "rho1": pen.rho1,
        }

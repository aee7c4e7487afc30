"""Performance of one ADMM iteration against the machine and against BPTT (issue 10).

In one run: the GEMM rate of this machine's BLAS (float64 and float32, one
thread); the analytic floating-point work of one fused iteration of the full-batch
hybrid (``--config fullbatch``; dense products only); median times of each block of
an iteration on the default dataset at several hidden sizes and on a token task; one
epoch of the Adam baseline on the same data; the ratios achieved/GEMM FLOP/s, ADMM
iteration / BPTT epoch, the share of time in Numba kernels, and the bytes of ADMM
state per training sample. Run it with the thread count of one rank (the default: 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.common import table


def gemm_rate(dtype, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matrix product (best of ``repeats``)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2.0 * n ** 3 / best


def step_gemm_rate(dtype, n: int, h: int, steps: int, column: bool = True,
                   repeats: int = 5) -> float:
    """FLOP/s of the products the recursions are made of: ``steps`` products one after
    the other (best of ``repeats``), ``[h, h] x [h, n]`` (``column``: the feature-major
    state the engine keeps) or ``[n, h] x [h, h]`` (the row form it kept before) -- what
    BLAS itself reaches on the iteration's own shapes, against the square rate."""
    rng = np.random.default_rng(0)
    shape = (steps, h, n) if column else (steps, n, h)
    a = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((h, h)).astype(dtype)
    out = np.empty(shape[1:], dtype)

    def run():
        for t in range(steps):
            if column:
                np.matmul(w, a[t], out=out)
            else:
                np.matmul(a[t], w, out=out)

    run()
    best = min(_timed(run) for _ in range(repeats))
    return 2.0 * steps * n * h * h / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _stats_flops(n: int, steps: int, out_steps: int, d: int, h: int, k: int,
                 tokens: bool) -> float:
    """Executed work of the statistics that is not a product with zeros: x s_{t-1}^T and
    x a^T (dense inputs), s_{t-1} a^T, s o^T and the symmetric s_{t-1} s_{t-1}^T and
    s s^T counted as SYRKs (h (h + 1) per column, half a GEMM's, although the default
    takes s_{t-1} s_{t-1}^T as part of one GEMM with x and the ones), s_0 = 0 not
    counted. The sums (products with the ones row) are not counted."""
    rows, prev, orows = n * steps, n * (steps - 1), n * out_steps
    x_side = 0.0 if tokens else 2.0 * (prev + rows) * d * h
    return (x_side + 2.0 * prev * h * h + prev * h * (h + 1)
            + orows * h * (h + 1) + 2.0 * orows * h * k)


def admm_flops(n: int, steps: int, d: int, h: int, k: int, out_steps: int,
               tokens: bool) -> float:
    """Dense floating-point work of one fused iteration (with the residual pass):
    statistics, the pre-activation and s-update products, the s solve, the outputs."""
    rows, orows = n * steps, n * out_steps
    proj = 0.0 if tokens else 2.0 * rows * d * h  # U x (a gather for tokens)
    stats = _stats_flops(n, steps, out_steps, d, h, k, tokens)
    a_block = proj + 2.0 * rows * h * h
    s_block = proj + 2.0 * rows * h * h + 2.0 * orows * k * h + 2.0 * rows * h * h
    o_block = 2.0 * orows * h * k
    residual = proj + 2.0 * rows * h * h + 2.0 * orows * h * k
    return stats + a_block + s_block + o_block + residual


WARMUP_DEFAULT = 10


def time_default(local, n_global: int, hidden: int, repeats: int,
                 dtype: str = "float64") -> dict:
    """Mean seconds of one iteration of the full-batch hybrid (``--config fullbatch``) over
    ``repeats`` iterations after ``WARMUP_DEFAULT``, the forward passes its step control
    ran per iteration, and the share of its time in Numba kernels (timed by wrapping
    them)."""
    from padmmirnn import kernels
    from padmmirnn.admm import AdmmEngine
    from padmmirnn.comm import SerialComm
    from padmmirnn.config import build_config, load_config

    preset = load_config("fullbatch").to_dict()
    cfg = build_config({**preset, "model": {"hidden": hidden},
                        "train": {**preset["train"], "dtype": dtype}})
    eng = AdmmEngine(cfg, [local], n_global, SerialComm())
    for _ in range(WARMUP_DEFAULT):  # past the first steps, into the step control's regime
        eng.iterate(want_sums=False)
    spent = {"numba": 0.0}
    originals = {}
    targets = [(kernels, n) for n in ("loss_and_correct", "add_columns",
                                      "segment_sum_columns", "token_counts", "o_update",
                                      "a_update", "activation_residual", "shifted",
                                      "tanh_adjoint", "output_delta")]
    for module, name in targets:
        fn = getattr(module, name)
        originals[(module, name)] = fn

        def wrapped(*args, _fn=fn):
            t0 = time.perf_counter()
            try:
                return _fn(*args)
            finally:
                spent["numba"] += time.perf_counter() - t0
        setattr(module, name, wrapped)
    # the machine's rate under the same conditions as the iterations (the rate of this
    # shared VM drifts by 20% between minutes): measured right before them
    square = gemm_rate(np.dtype(dtype))
    step = step_gemm_rate(np.dtype(dtype), local.info.n, hidden, local.info.steps)
    step_rows = step_gemm_rate(np.dtype(dtype), local.info.n, hidden, local.info.steps, False)
    try:
        times = []
        trials = eng.trials
        for _ in range(repeats):
            times.append(_timed(lambda: eng.iterate(want_sums=False)))
        numba_share = spent["numba"] / sum(times)
        forwards = (eng.trials - trials) / repeats
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)
    # the mean, not the median: iterations whose step control ran a second forward pass
    # are part of the cost (and of the FLOPs counted with forwards_per_iteration)
    return {"iteration": statistics.mean(times), "numba_share": numba_share,
            "gemm_rate": square, "step_gemm_rate": step, "step_gemm_rate_rows": step_rows,
            "forwards_per_iteration": forwards,
            "state_bytes_per_sample": _state_bytes(eng)}


def hybrid_flops(n: int, steps: int, d: int, h: int, k: int, out_steps: int,
                 tokens: bool, forwards: float = 1.0) -> float:
    """Dense work of one full-batch hybrid iteration: the statistics, ``forwards``
    forward re-synchronisations (one per backtracking trial) and the KKT backward
    recursion, each recurrent product over the T - 1 steps that have one (s_0 = 0, and
    lambda2_T has no W^T lambda1_{T+1}); the joint h x h solves are negligible."""
    rows, prev, orows = n * steps, n * (steps - 1), n * out_steps
    proj = 0.0 if tokens else 2.0 * rows * d * h
    stats = _stats_flops(n, steps, out_steps, d, h, k, tokens)
    forward = proj + 2.0 * prev * h * h + 2.0 * orows * h * k
    backward = 2.0 * prev * h * h + 2.0 * orows * k * h
    return stats + forwards * forward + backward


def minibatch_flops(n: int, steps: int, d: int, h: int, k: int, out_steps: int,
                    tokens: bool, batch: int, gates: int = 1) -> float:
    """Dense work of one pass of mini-batch ADMM over ``n`` samples in batches of
    ``batch``, for a cell of ``gates`` gate blocks (1: Elman; 3: GRU; 4: LSTM): per sample
    the forward pass and the KKT adjoint (as BPTT's, each recurrent product ``[G h, h]``
    over the T - 1 steps that have one), the statistics (the regressor Gram ``z z^T``,
    ``z = [x; 1; s_{t-1}]``, as a SYRK, and ``lambda1 z^T`` ``[G h, dz]``; the output
    block's), and per batch the two block solves against the running Grams (a Cholesky
    factorisation and its two triangular solves, ``G h`` right-hand sides). The gates'
    pointwise algebra is not counted."""
    rows, prev, orows = n * steps, n * (steps - 1), n * out_steps
    gh = gates * h
    dz = (0 if tokens else d) + 1 + h
    forward = (0.0 if tokens else 2.0 * rows * d * gh) + 2.0 * prev * gh * h \
        + 2.0 * orows * h * k
    adjoint = 2.0 * prev * gh * h + 2.0 * orows * k * h
    stats = rows * dz * (dz + 1) + 2.0 * rows * gh * dz \
        + orows * (h + 1) * (h + 2) + 2.0 * orows * k * (h + 1)
    batches = -(-n // batch)
    solves = batches * (dz ** 3 / 3 + 2.0 * gh * dz * dz
                        + (h + 1) ** 3 / 3 + 2.0 * k * (h + 1) ** 2)
    return forward + adjoint + stats + solves


def adam_flops(n: int, steps: int, d: int, h: int, k: int, out_steps: int,
               tokens: bool, gates: int = 1) -> float:
    """Dense work of one epoch of BPTT + Adam for a cell of ``gates`` gate blocks: the
    forward pass, the backward recursion and the weight gradients ``sum e z^T`` (the
    optimiser's elementwise update and the gates' pointwise algebra are not counted)."""
    rows, prev, orows = n * steps, n * (steps - 1), n * out_steps
    gh = gates * h
    forward = (0.0 if tokens else 2.0 * rows * d * gh) + 2.0 * prev * gh * h \
        + 2.0 * orows * h * k
    backward = 2.0 * prev * gh * h + 2.0 * orows * k * h
    grads = (0.0 if tokens else 2.0 * rows * d * gh) + 2.0 * prev * gh * h \
        + 2.0 * orows * h * (k + 1)
    return forward + backward + grads


def _state_bytes(eng) -> float:
    """Bytes of ADMM state per sample: A, the stacked [x; 1; s; lambda1] (which holds S
    and L1), O, the other multipliers and the work buffer."""
    part = eng.parts[0]
    st = part.state
    return sum(a.nbytes for a in (st.A, st.Z, st.O, st.L2, st.L3, part.work)) / part.data.n


def time_blocks(local, n_global: int, hidden: int, repeats: int) -> dict:
    """Median seconds of each block of a faithful fused iteration (after two warm-up
    iterations)."""
    from padmmirnn.admm import AdmmEngine
    from padmmirnn.comm import SerialComm
    from padmmirnn.config import build_config, load_config

    cfg = build_config({**load_config("faithful").to_dict(), "model": {"hidden": hidden}})
    eng = AdmmEngine(cfg, [local], n_global, SerialComm())
    eng.iterate(want_sums=False)
    eng.iterate(want_sums=False)
    samples: dict[str, list[float]] = {}
    square = gemm_rate(np.float64)  # under the same conditions, as in time_default
    for _ in range(repeats):
        pen = eng.penalty()
        t = {}
        t0 = time.perf_counter()
        st = eng.reduce_fused(pen)
        t["statistics"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        eng.weights_in(st[0], pen)
        eng.weights_out(st[1], pen)
        t["weight_solves"] = time.perf_counter() - t0
        for name, fn in (("a_block", eng.block_a), ("s_block", eng.block_s),
                         ("o_block", eng.block_o)):
            t0 = time.perf_counter()
            fn(pen)
            t[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        eng.residuals(pen, (False, False, False))
        t["residuals"] = time.perf_counter() - t0
        eng.iteration += 1
        for key, value in t.items():
            samples.setdefault(key, []).append(value)
    med = {key: statistics.median(v) for key, v in samples.items()}
    med["iteration"] = sum(med.values())
    med["state_bytes_per_sample"] = _state_bytes(eng)
    med["gemm_rate"] = square
    return med


def adam_epoch(local, n_global: int, hidden: int, repeats: int) -> float:
    from padmmirnn.comm import SerialComm
    from padmmirnn.config import build_config
    from padmmirnn.gradient.trainer import GradientTrainer
    from padmmirnn.nn import init_params

    cfg = build_config(overrides={"model.hidden": hidden, "train.algo": "adam"})
    p = init_params(local.info.dim, hidden, local.info.classes, 0, "orthogonal", 1.0)
    tr = GradientTrainer(cfg, local, n_global, SerialComm(), p)
    tr.step()
    return statistics.median(_timed(tr.step) for _ in range(repeats))


def token_task(n: int = 4000, steps: int = 28, vocab: int = 1000, seed: int = 0):
    """A random token classification task of the default dataset's size."""
    from padmmirnn.samples import DatasetInfo, LocalData

    rng = np.random.default_rng(seed)
    info = DatasetInfo("tokens", n, steps, vocab, 10, "tokens", False)
    x = rng.integers(0, vocab, (steps, n)).astype(np.int32)
    y = rng.integers(0, 10, (1, n)).astype(np.int32)
    return LocalData(info, x, y, 0, n)


def _default_row(task: str, config: str, local, h: int, default: dict,
                 bptt_s: float | None) -> dict:
    """One table row of the full-batch hybrid; FLOP/s against the GEMM rate of its
    dtype measured with it, with the forward passes the step control ran and with one."""
    rate = default["gemm_rate"]
    info = local.info
    shape = (info.n, info.steps, info.dim, h, info.classes, 1, info.kind == "tokens")
    flops = hybrid_flops(*shape, forwards=default["forwards_per_iteration"])
    t = default["iteration"]
    step_rate = default["step_gemm_rate"]
    return {
        "task": task, "config": config, "hidden": h, "iteration_s": t,
        "gemm_gflops": rate / 1e9,
        "gflop_per_iteration": flops / 1e9,
        "forwards_per_iteration": default["forwards_per_iteration"],
        "achieved_over_gemm": flops / t / rate,
        "achieved_over_gemm_one_forward": hybrid_flops(*shape) / t / rate,
        "step_gemm_over_gemm": step_rate / rate,
        "row_form_step_gemm_over_gemm": default["step_gemm_rate_rows"] / rate,
        "achieved_over_step_gemm": flops / t / step_rate,
        "admm_iteration_over_bptt_epoch": None if bptt_s is None else t / bptt_s,
        "numba_kernel_share": default["numba_share"], "a_block_share": 0.0,
        "state_bytes_per_sample": default["state_bytes_per_sample"], "bptt_epoch_s": bptt_s,
    }


def main() -> int:
    from padmmirnn import datafiles

    p = argparse.ArgumentParser(prog="python -m benchmarks kernels")
    p.add_argument("--out", default="runs/bench-kernels")
    p.add_argument("--hidden", default="64,128,256")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--float32-hidden", default="128",
                   help="hidden sizes also timed in float32 (full-batch hybrid)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rate64, rate32 = gemm_rate(np.float64), gemm_rate(np.float32)
    train, _ = datafiles.resolve("default")
    info = datafiles.read_info(train)
    dense = datafiles.read_slice(info, 0, info.n, np.float64)
    tasks = [("mnist-rows", dense, int(h)) for h in a.hidden.split(",")]
    tasks.append(("tokens-1000", token_task(), 64))
    rows = []
    bptt = {}
    for name, local, h in tasks:
        key = (name, h)
        if key not in bptt:
            bptt[key] = adam_epoch(local, local.info.n, h, a.repeats)
        default = time_default(local, local.info.n, h, 2 * a.repeats)
        rows.append(_default_row(name, "fullbatch (hybrid)", local, h, default, bptt[key]))
        blocks = time_blocks(local, local.info.n, h, a.repeats)
        flops = admm_flops(local.info.n, local.info.steps, local.info.dim, h, local.info.classes,
                           1, local.info.kind == "tokens")
        kernels = blocks["a_block"] + blocks["o_block"]
        rows.append({
            "task": name, "config": "faithful", "hidden": h, "iteration_s": blocks["iteration"],
            "gemm_gflops": blocks["gemm_rate"] / 1e9,
            "gflop_per_iteration": flops / 1e9, "forwards_per_iteration": 0.0,
            "achieved_over_gemm": flops / blocks["iteration"] / blocks["gemm_rate"],
            "achieved_over_gemm_one_forward": None, "step_gemm_over_gemm": None,
            "row_form_step_gemm_over_gemm": None,
            "achieved_over_step_gemm": None,
            "admm_iteration_over_bptt_epoch": blocks["iteration"] / bptt[key],
            "numba_kernel_share": kernels / blocks["iteration"],
            "a_block_share": blocks["a_block"] / blocks["iteration"],
            "state_bytes_per_sample": blocks["state_bytes_per_sample"],
            "bptt_epoch_s": bptt[key],
        })
    single = datafiles.read_slice(info, 0, info.n, np.float32)
    for h in (int(v) for v in a.float32_hidden.split(",") if v):
        default = time_default(single, info.n, h, 2 * a.repeats, "float32")
        rows.append(_default_row("mnist-rows", "fullbatch, float32", single, h, default, None))
    result = {"gemm_gflops_float64": rate64 / 1e9, "gemm_gflops_float32": rate32 / 1e9,
              "rows": rows}
    print(f"GEMM (1024^3, one thread) at the start: float64 {rate64 / 1e9:.1f} GFLOP/s, "
          f"float32 {rate32 / 1e9:.1f} GFLOP/s; each row's ratios use the rate measured "
          "right before its timing (gemm_gflops)")
    print(table(rows))
    (out / "kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0

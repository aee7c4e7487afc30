"""Long-range dependencies on the adding problem (issue 26): test accuracy against passes
and time of the Elman cell and the LSTM (h = 64), each trained by the mini-batch ADMM
(the default) and by Adam, over seeds and sequence lengths T.

For every T of ``--steps`` and seed S of ``--seeds`` the data are ``padmmirnn data
prepare adding --steps T --samples N --test-samples M --seed S`` (two marked values
among T steps, the class their sum quantised into 10 bins; the most frequent class
holds about 18% of the sequences). Every run is a serial ``padmmirnn train`` (a
subprocess under a timeout) with ``--set model.hidden=64 --set model.cell=CELL --seed
S``, evaluated after every pass; its ``metrics.jsonl`` gives the test accuracy and the
training seconds (``t_compute_s``, the pass without its evaluation) of every pass.
Adam runs at the project's defaults (``optim.lr`` 1e-3, ``optim.clip_norm`` 1, batch
64) for ``--epochs`` epochs, and with ``--adam-lr`` once more at that rate (the tuned
setting of the PyTorch reference: 3e-3). With ``--torch-python`` (PyTorch is never a
dependency of the project) ``torch.nn.RNN`` and ``torch.nn.LSTM`` + Adam (lr 3e-3,
gradient clipping by global norm at 1, batch 64, h = 64, float32, one thread, the
many-to-one head on the last step) train on the same HDF5 files for ``--epochs``
epochs, timed the same way (an epoch without its evaluation); ``torch-adam-avg`` is
the same run evaluated on the moving average of Adam's iterates with the rule of
padmmirnn's ``admm.average`` (decay min(0.99, (1 + t) / (10 + t)) after step t), so
that the two methods are compared with the same filter on their iterates.

Per run the table gives the test accuracy after pass 1, 5, 10, 20 (40), the best, the
first pass reaching the class prior + 10 points (the prior: the share of the test
split's most frequent class) and the seconds per pass; ``--report`` prints the means
and ranges over the seeds of every (T, cell, method) found under ``--out`` without
running anything. Runs already present under ``--out`` are not repeated.

``--explain T`` measures, for seed 0 at that T, why the block step carries the signal
where the gradient step does not: in one process it trains the LSTM and the Elman cell
by ADMM and by Adam, and at a few passes takes a fixed probe batch through the BPTT
adjoint of each method's own weights and reports (a) ||dL/da_1|| / ||dL/da_T||, (b) the
size of the early half of the steps' terms of the input block's gradient ``D = sum_t
delta_t z_t^T`` against the late half, raw, after the block step's preconditioner
``(C + damping I)^-1`` (``C`` the run's running Gram of ``z_t = [x_t; 1; s_{t-1}]``) and
after Adam's ``1 / (sqrt(v_hat) + eps)``, (c) the spectrum of ``C`` and the share of the
early and late terms in its small-eigenvalue directions; and it runs the ADMM without
its preconditioner (``admm.damping`` 1000 with rho scaled by 1/2000, so that the step is
the plain gradient step of the same length, trust radius and schedule).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

CELLS = ("rnn", "lstm")
CHECKPOINTS = (1, 5, 10, 20, 40)
# the step of the ADMM with its preconditioner removed: C + 1000 I ~ 1000 I, and rho1 =
# rho3 = 0.5 / 1000 keep the step length 2 D / R, capped and decayed as the default's
NO_PRECONDITIONER = ["--set", "admm.damping=1000", "--set", "admm.rho1=0.0005",
                     "--set", "admm.rho3=0.0005"]

TORCH_SCRIPT = r"""
import sys, time, json
import h5py, numpy as np, torch
torch.set_num_threads(1)
train, test, cell, epochs, seed, out, average, ramp = sys.argv[1:9]
epochs, seed, average, ramp = int(epochs), int(seed), float(average), float(ramp)
def load(path):
    with h5py.File(path) as f:
        return (torch.tensor(np.asarray(f["inputs"], np.float32)),
                torch.tensor(np.asarray(f["targets"], np.int64)).reshape(-1))
x, y = load(train)
xt, yt = load(test)
torch.manual_seed(seed)
kind = torch.nn.LSTM if cell == "lstm" else torch.nn.RNN
rnn = kind(x.shape[2], 64, batch_first=True)
head = torch.nn.Linear(64, 10)
params = list(rnn.parameters()) + list(head.parameters())
opt = torch.optim.Adam(params, lr=3e-3)
loss_fn = torch.nn.CrossEntropyLoss()
# the moving average of the iterates, as padmmirnn's admm.average: decay
# min(average, (1 + t) / (1 + ramp + t)) after step t (0: the last iterate)
mean = [p.detach().clone() for p in params]
steps = 0
spent = 0.0
with open(out, "w") as f:
    for k in range(epochs):
        t0 = time.perf_counter()
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed * 1000 + k))
        for lo in range(0, x.shape[0], 64):
            idx = order[lo:lo + 64]
            o, _ = rnn(x[idx])
            loss = loss_fn(head(o[:, -1]), y[idx])
            opt.zero_grad(); loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            steps += 1
            if average:
                d = min(average, (1 + steps) / (1 + ramp + steps))
                with torch.no_grad():
                    for m, p in zip(mean, params):
                        m.mul_(d).add_(p, alpha=1 - d)
        dt = time.perf_counter() - t0
        spent += dt
        with torch.no_grad():
            if average:  # evaluate the average: swap it in, and the iterate back after
                last = [p.detach().clone() for p in params]
                for m, p in zip(mean, params):
                    p.copy_(m)
            o, _ = rnn(xt)
            acc = float((head(o[:, -1]).argmax(1) == yt).float().mean())
            if average:
                for q, p in zip(last, params):
                    p.copy_(q)
        f.write(json.dumps({"iteration": k + 1, "test_accuracy": acc, "t_compute_s": dt,
                            "wall_time_s": spent}) + "\n")
        f.flush()
"""


def prepare(out: Path, steps: int, samples: int, tests: int, seed: int) -> Path:
    """``padmmirnn data prepare adding`` into ``out`` (kept if already there)."""
    path = out / f"add{steps}_n{samples}_s{seed}_train.h5"
    if not path.exists():
        cmd = [sys.executable, "-P", "-m", "padmmirnn", "data", "prepare", "adding",
               "--steps", str(steps), "--samples", str(samples), "--test-samples",
               str(tests), "--seed", str(seed), "--out", str(path)]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    return path


def test_path(train: Path) -> Path:
    return Path(str(train).replace("_train.h5", "_test.h5"))


def class_prior(test: Path) -> float:
    """The share of the test split's most frequent class."""
    import h5py

    with h5py.File(test) as f:
        y = np.asarray(f["targets"]).ravel()
    return float(np.bincount(y).max() / len(y))


def read_curve(path: Path) -> list[dict]:
    """The evaluated passes of a ``metrics.jsonl``: ``iteration``, ``test_accuracy`` and
    ``seconds`` (training seconds so far, the evaluations left out)."""
    curve, spent = [], 0.0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if "test_accuracy" not in r:
            continue
        spent += r["t_compute_s"]
        curve.append({"iteration": int(r["iteration"]),
                      "test_accuracy": float(r["test_accuracy"]), "seconds": spent})
    return curve


def summarise(curve: list[dict], prior: float, margin: float = 0.10) -> dict:
    """What the tables report of one run's curve: the accuracy after the passes of
    CHECKPOINTS (None past the run's end), the best and last accuracy, the first pass
    at or above ``prior + margin`` (None: never) and the median seconds per pass."""
    acc = {r["iteration"]: r["test_accuracy"] for r in curve}
    reach = next((r["iteration"] for r in curve if r["test_accuracy"] >= prior + margin),
                 None)
    per_pass = [b["seconds"] - a["seconds"] for a, b in zip([{"seconds": 0.0}] + curve[:-1],
                                                           curve, strict=True)]
    return {"passes": len(curve), **{f"acc@{k}": acc.get(k) for k in CHECKPOINTS},
            "best": max(acc.values()), "last": curve[-1]["test_accuracy"],
            "reach_pass": reach,
            "reach_s": None if reach is None else curve[reach - 1]["seconds"],
            "s_per_pass": statistics.median(per_pass)}


def methods(a) -> list[tuple[str, str]]:
    """(method name, kind) of the runs: padmmirnn admm, adam (defaults), adam at
    ``--adam-lr``, torch."""
    out = [("admm", "project"), ("adam", "project")]
    if a.adam_lr:
        out.append((f"adam-lr{a.adam_lr:g}", "project"))
    if a.torch_python:
        out += [("torch-adam", "torch"), ("torch-adam-avg", "torch")]
    if a.no_precond:
        out.append(("admm-noprecond", "project"))
    return [m for m in out if m[0] in a.methods or not a.methods]


def run_one(a, out: Path, train: Path, steps: int, samples: int, seed: int, cell: str,
            method: str, kind: str) -> Path | None:
    """One run; returns its metrics file (None if it failed or timed out)."""
    name = f"T{steps}-n{samples}-{cell}-{method}-s{seed}"
    run = out / "runs" / name
    metrics = run / "metrics.jsonl"
    done = run / "done"
    if done.exists():
        return metrics
    run.mkdir(parents=True, exist_ok=True)
    test = test_path(train)
    if kind == "torch":
        from padmmirnn.averaging import RAMP
        from padmmirnn.config import AVERAGE_DECAY

        cmd = [a.torch_python, "-c", TORCH_SCRIPT, str(train), str(test), cell,
               str(a.epochs), str(seed), str(metrics),
               str(AVERAGE_DECAY if method.endswith("-avg") else 0.0), str(RAMP)]
    else:
        algo = "admm" if method.startswith("admm") else "adam"
        cmd = [sys.executable, "-P", "-m", "padmmirnn", "train", "--algo", algo,
               "--dataset", str(train), "--set", f"data.test={test}", "--seed", str(seed),
               "--set", "model.hidden=64", "--set", f"model.cell={cell}",
               "--set", "train.eval_every=1", "--iterations",
               str(a.passes if algo == "admm" else a.epochs), "--out", str(run)]
        if method.startswith("adam-lr"):
            cmd += ["--set", f"optim.lr={method[7:]}"]
        if method == "admm-noprecond":
            cmd += NO_PRECONDITIONER
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        print(f"{name}: timed out after {a.timeout:.0f} s (kept its passes so far)",
              flush=True)
        return metrics if metrics.exists() else None
    if proc.returncode != 0:
        print(f"{name} failed:\n{proc.stderr[-2000:]}", flush=True)
        return None
    done.write_text(f"{time.perf_counter() - t0:.1f}\n")
    return metrics


def parse_name(name: str) -> dict:
    """``T100-n10000-lstm-admm-s0`` -> its fields."""
    parts = name.split("-")
    return {"T": int(parts[0][1:]), "N": int(parts[1][1:]), "cell": parts[2],
            "method": "-".join(parts[3:-1]), "seed": int(parts[-1][1:])}


def collect(out: Path) -> list[dict]:
    """Every run under ``out/runs``, summarised (the class prior of its own test split)."""
    rows = []
    for run in sorted((out / "runs").glob("T*")):
        metrics = run / "metrics.jsonl"
        if not metrics.exists():
            continue
        curve = read_curve(metrics)
        if not curve:
            continue
        f = parse_name(run.name)
        test = out / f"add{f['T']}_n{f['N']}_s{f['seed']}_test.h5"
        prior = class_prior(test)
        rows.append({**f, "prior": prior, "complete": (run / "done").exists(),
                     **summarise(curve, prior), "curve": curve})
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and range over the seeds of every (T, N, cell, method)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["T"], r["N"], r["cell"], r["method"]), []).append(r)

    def span(vals: list) -> str:
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        if len(vals) == 1:
            return f"{vals[0]:.3f}"
        return f"{statistics.mean(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]"

    out = []
    for (T, N, cell, method), rs in sorted(groups.items()):
        reach = [r["reach_pass"] for r in rs]
        out.append({"T": T, "N": N, "cell": cell, "method": method, "seeds": len(rs),
                    **{f"acc@{k}": span([r[f"acc@{k}"] for r in rs]) for k in CHECKPOINTS},
                    "best": span([r["best"] for r in rs]),
                    "reach_pass": ",".join("-" if v is None else str(v) for v in reach),
                    "s_per_pass": statistics.mean(r["s_per_pass"] for r in rs)})
    return out


# ---------------------------------------------------------------- --explain


def step_terms(tr, batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At ``tr``'s weights, over ``batch``: the per-step terms' halves of the first
    layer's gradient sums ``D = sum_t delta_t z_t^T`` (``delta = dL/da``, the BPTT
    adjoint of the mean loss: early = the steps of the first half, late = the rest) and
    the per-step adjoint norms ``mean_i ||dL_i/da_t||``."""
    from padmmirnn.nn.network import by_length, loss_delta

    net, p = tr.net, tr.params
    batch = by_length(batch)
    fwd = net.forward(p, batch, side_by_side_layout=True, dtype=np.float64)
    delta = fwd.outputs(p, False)
    loss_delta(delta, batch.targets, "ce", 1.0 / delta.shape[1], None)
    net.adjoint(p, fwd, delta, False)
    d = np.asarray(fwd.traces[0].delta_in)  # [T, G h, n]
    z = np.asarray(fwd.regressors(0))  # [T, dx + 1 + h, n]
    steps = d.shape[0]
    half = steps // 2
    early = sum(d[t] @ z[t].T for t in range(half))
    late = sum(d[t] @ z[t].T for t in range(half, steps))
    norms = np.sqrt(np.einsum("thn,thn->tn", d, d)).mean(axis=1) * delta.shape[1]
    return early, late, norms


def preconditioned(tr, D: np.ndarray) -> np.ndarray:
    """``D`` as the method's step direction: ``D (C + damping I)^-1`` for the ADMM,
    ``D / (sqrt(v_hat) + eps)`` (columns of [U b W]) for Adam."""
    if hasattr(tr, "block"):
        return tr.state.grams[0].solve(D, tr.a.damping)
    opt = tr.optimizer
    v = opt.state["v"].layer(0)
    corr = 1.0 - opt.beta2 ** max(opt.t, 1)
    V = np.concatenate([v.U, v.b[:, None], v.W], axis=1) / corr
    return D / (np.sqrt(V) + opt.eps)


def explain(a, out: Path, steps: int) -> list[dict]:
    """The measurements of ``--explain`` at ``steps`` (seed 0); rows of a table."""
    from padmmirnn import datafiles
    from padmmirnn.admm.minibatch import MinibatchAdmm
    from padmmirnn.comm import SerialComm
    from padmmirnn.config import build_config
    from padmmirnn.gradient.trainer import GradientTrainer

    train = prepare(out, steps, a.samples, a.test_samples, 0)
    info = datafiles.read_info(str(train))
    local = datafiles.read_slice(info, 0, info.n, np.float64)
    probe = local.take(np.arange(512))
    at = [int(v) for v in a.explain_passes.split(",")]
    rows = []
    for cell in CELLS:
        for algo in ("admm", "adam"):
            cfg = build_config(overrides={"train.algo": algo, "model.cell": cell,
                                          "model.hidden": 64, "train.seed": 0,
                                          "train.iterations": max(at)})
            kind = MinibatchAdmm if algo == "admm" else GradientTrainer
            tr = kind(cfg, local, info.n, SerialComm())
            done = 0
            for k in at:
                while done < k:
                    tr.step()
                    done += 1
                early, late, norms = step_terms(tr, probe)
                pe, pl = preconditioned(tr, early), preconditioned(tr, late)
                raw = np.linalg.norm(early) / np.linalg.norm(late)
                pre = np.linalg.norm(pe) / np.linalg.norm(pl)
                row = {"cell": cell, "method": algo, "pass": k,
                       "adj_1_over_T": float(norms[0] / norms[-1]),
                       "adj_half_over_T": float(norms[steps // 2 - 1] / norms[-1]),
                       "early_over_late_raw": float(raw),
                       "early_over_late_step": float(pre), "gain": float(pre / raw)}
                if algo == "admm":
                    C = tr.state.grams[0].rest
                    lam, Q = np.linalg.eigh(C)
                    small = lam < np.quantile(lam, 0.5)  # the lower half of the spectrum

                    def share(D, Q=Q, small=small):
                        E = (D @ Q) ** 2  # row space of D on C's eigenvectors
                        return float(E[:, small].sum() / E.sum())

                    row.update({"C_eig_min": float(lam[0]), "C_eig_max": float(lam[-1]),
                                "cond_C_damped": float((lam[-1] + tr.a.damping)
                                                       / (lam[0] + tr.a.damping)),
                                "early_in_low_half": share(early),
                                "late_in_low_half": share(late)})
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def dynamics(net, p, batch) -> dict:
    """What sets how far the backward signal reaches, at the weights ``p`` over
    ``batch``: for the LSTM the mean forget gate and the carry of the cell state over
    the whole sequence, ``exp(sum_t mean log f_t)`` (the adjoint of ``c_T`` reaches
    ``c_1`` times the product of the forget gates); for the Elman cell the spectral
    radius of ``W`` and the mean of ``tanh'(a_t)``."""
    from padmmirnn.nn.network import by_length

    batch = by_length(batch)
    fwd = net.forward(p, batch, side_by_side_layout=True, dtype=np.float64)
    h = p.hidden
    if net.cell.gates == 4:
        f = np.asarray(fwd.traces[0].gates)[:, h:2 * h]  # [T, h, n], sigma(P_f)
        logf = np.log(np.maximum(f, 1e-300)).mean(axis=(1, 2))
        return {"forget_mean": float(f.mean()), "carry_T": float(np.exp(logf.sum())),
                "forget_bias_mean": float(p.layer(0).b[h:2 * h].mean())}
    s = np.asarray(fwd.states)[1:]
    return {"W_radius": float(np.max(np.abs(np.linalg.eigvals(p.layer(0).W)))),
            "tanh_prime_mean": float((1.0 - s * s).mean())}


def explain_final(a, out: Path, steps: int) -> list[dict]:
    """At the final weights of the seed-0 runs at ``steps`` (ADMM, Adam; no training):
    the adjoint ratios, the early/late share of the gradient, :func:`dynamics` and the
    distance moved from the initial weights."""
    from padmmirnn import datafiles
    from padmmirnn.checkpoint import load_weights
    from padmmirnn.nn import Network

    rows = []
    train = prepare(out, steps, a.samples, a.test_samples, 0)
    info = datafiles.read_info(str(train))
    probe = datafiles.read_slice(info, 0, 512, np.float64)
    for cell in CELLS:
        for method in ("init", "admm", "adam", "admm-noprecond"):
            run = out / "runs" / f"T{steps}-n{a.samples}-{cell}-{method}-s0"
            net = Network.build(cell, "tanh")
            p0 = net.init_params(info.dim, 64, info.classes, 0, "orthogonal", 1.0)
            if method == "init":
                p = p0
            elif (run / "weights.h5").exists():
                p, _ = load_weights(run / "weights.h5")
            else:
                continue

            early, late, norms = step_terms(SimpleNamespace(net=net, params=p), probe)
            moved = np.linalg.norm(p.flat() - p0.flat())
            passes = 0 if method == "init" else len(read_curve(run / "metrics.jsonl"))
            row = {"cell": cell, "method": method, "pass": passes,
                   "adj_1_over_T": float(norms[0] / norms[-1]),
                   "adj_half_over_T": float(norms[steps // 2 - 1] / norms[-1]),
                   "early_over_late_raw": float(np.linalg.norm(early) / np.linalg.norm(late)),
                   "moved_from_init": float(moved), **dynamics(net, p, probe)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    from benchmarks.common import table

    p = argparse.ArgumentParser(prog="python -m benchmarks adding")
    p.add_argument("--out", default="runs/bench-adding")
    p.add_argument("--steps", default="50,100,200,400", help="sequence lengths T")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--cells", default="rnn,lstm")
    p.add_argument("--methods", default="", help="only these methods (comma-separated: "
                   "admm, adam, adam-lrX, torch-adam, torch-adam-avg, admm-noprecond; "
                   "default: all given)")
    p.add_argument("--samples", type=int, default=10000, help="training sequences")
    p.add_argument("--test-samples", type=int, default=1000)
    p.add_argument("--passes", type=int, default=20, help="ADMM passes")
    p.add_argument("--epochs", type=int, default=20, help="Adam and PyTorch epochs")
    p.add_argument("--adam-lr", type=float, default=0.0, help="also the project's Adam at "
                   "this learning rate (0: only its default)")
    p.add_argument("--no-precond", action="store_true", help="also the ADMM without its "
                   "preconditioner (the ablation of --explain)")
    p.add_argument("--torch-python", help="a Python with torch and h5py installed")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--report", action="store_true", help="only summarise the runs under "
                   "--out")
    p.add_argument("--explain", type=int, default=0, metavar="T", help="the measurements "
                   "of the explanation at this T (seed 0) instead of the runs")
    p.add_argument("--explain-passes", default="1,3,6")
    p.add_argument("--explain-final", action="store_true", help="with --explain: measure "
                   "the final weights of the seed-0 runs at that T instead (no training)")
    a = p.parse_args()
    a.methods = [m for m in a.methods.split(",") if m]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.explain:
        rows = (explain_final if a.explain_final else explain)(a, out, a.explain)
        keys = dict.fromkeys(k for r in rows for k in r)
        print(table([{k: r.get(k) for k in keys} for r in rows]))
        name = f"explain{'-final' if a.explain_final else ''}-T{a.explain}.json"
        (out / name).write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    if not a.report:
        for steps in (int(v) for v in a.steps.split(",")):
            for seed in (int(v) for v in a.seeds.split(",")):
                train = prepare(out, steps, a.samples, a.test_samples, seed)
                for cell in a.cells.split(","):
                    for method, kind in methods(a):
                        metrics = run_one(a, out, train, steps, a.samples, seed, cell,
                                          method, kind)
                        if metrics is None or not metrics.exists():
                            continue
                        s = summarise(read_curve(metrics), class_prior(test_path(train)))
                        print(table([{"T": steps, "seed": seed, "cell": cell,
                                      "method": method, **s}]), flush=True)
    rows = collect(out)
    if not rows:
        print("no runs under", out)
        return 1
    print(table(aggregate(rows)))
    (out / "adding.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0

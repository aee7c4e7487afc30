"""Time per pass over the default dataset, measured in one run: the project's Adam
(float64, float32), the mini-batch ADMM default (float64, float32), and, when a Python
with PyTorch is given (``--torch-python``; PyTorch is never a dependency of the
project), ``torch.nn.RNN`` + Adam on the same files, float32, one thread.

Every method does the same work per pass: h = 64, tanh, batch 64, one pass over the
4,000 training sequences, no evaluation. The figure is the median over ``--repeats``
passes after one warm-up pass. Each row also gives the pass's dense work, counted
analytically (``benchmarks.kernels.minibatch_flops``, ``adam_flops``; PyTorch's epoch
as Adam's), and the rate it achieves as a share of this machine's square GEMM rate in
its dtype, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

TORCH_SCRIPT = r"""
import sys, time, statistics, json
import h5py, numpy as np, torch
torch.set_num_threads(1)
path, hidden, batch, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with h5py.File(path) as f:
    x = torch.tensor(np.asarray(f["inputs"], np.float32))
    y = torch.tensor(np.asarray(f["targets"], np.int64))
torch.manual_seed(0)
rnn = torch.nn.RNN(x.shape[2], hidden, nonlinearity="tanh", batch_first=True)
head = torch.nn.Linear(hidden, int(y.max()) + 1)
opt = torch.optim.Adam(list(rnn.parameters()) + list(head.parameters()), lr=3e-3)
loss_fn = torch.nn.CrossEntropyLoss()
def epoch(k):
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(k))
    for lo in range(0, x.shape[0], batch):
        idx = order[lo:lo + batch]
        out, _ = rnn(x[idx])
        loss = loss_fn(head(out[:, -1]), y[idx])
        opt.zero_grad(); loss.backward(); opt.step()
epoch(0)
times = []
for k in range(repeats):
    t0 = time.perf_counter(); epoch(k + 1); times.append(time.perf_counter() - t0)
print(json.dumps({"epoch_s": statistics.median(times)}))
"""


def _median_pass(trainer, repeats: int) -> float:
    trainer.step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def project_pass(local, n: int, algo: str, dtype: str, repeats: int) -> float:
    from padmmirnn.admm.minibatch import MinibatchAdmm
    from padmmirnn.comm import SerialComm
    from padmmirnn.config import build_config
    from padmmirnn.gradient.trainer import GradientTrainer

    cfg = build_config(overrides={"train.algo": algo, "train.dtype": dtype})
    data = local if dtype == "float64" else type(local)(
        local.info, local.inputs.astype(np.float32), local.targets, local.start, local.stop)
    kind = MinibatchAdmm if algo == "admm" else GradientTrainer
    return _median_pass(kind(cfg, data, n, SerialComm()), repeats)


def main() -> int:
    from benchmarks.common import default_training_set, table
    from benchmarks.kernels import adam_flops, gemm_rate, minibatch_flops

    p = argparse.ArgumentParser(prog="python -m benchmarks baselines")
    p.add_argument("--out", default="runs/bench-baselines")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--torch-python", help="a Python with torch and h5py installed")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    local = default_training_set()
    rows = []
    for algo, dtype in (("adam", "float64"), ("adam", "float32"), ("admm", "float64"),
                        ("admm", "float32")):
        rows.append({"method": f"padmmirnn {algo} (mini-batch)" if algo == "admm"
                     else f"padmmirnn {algo}", "dtype": dtype,
                     "pass_s": project_pass(local, local.n, algo, dtype, a.repeats)})
    if a.torch_python:
        proc = subprocess.run([a.torch_python, "-c", TORCH_SCRIPT, local.info.path, "64", "64",
                               str(a.repeats)], capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"the PyTorch reference failed:\n{proc.stderr[-2000:]}")
        rows.append({"method": "torch.nn.RNN + Adam", "dtype": "float32",
                     "pass_s": json.loads(proc.stdout.splitlines()[-1])["epoch_s"]})
    base = rows[0]["pass_s"]
    info = local.info
    shape = (local.n, info.steps, info.dim, 64, info.classes,
             info.steps if info.many_to_many else 1, info.kind == "tokens")
    rates = {dt: gemm_rate(np.dtype(dt)) for dt in ("float64", "float32")}
    for r in rows:
        r["over_padmmirnn_adam_float64"] = r["pass_s"] / base
        flops = (minibatch_flops(*shape, batch=64) if "admm (" in r["method"]
                 else adam_flops(*shape))
        r["gflop"] = flops / 1e9
        r["achieved_over_gemm"] = flops / r["pass_s"] / rates[r["dtype"]]
    print(table(rows))
    (out / "baselines.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0

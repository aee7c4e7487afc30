"""Time per pass over the default dataset, measured in one run: the mini-batch ADMM
default and the project's Adam, for every cell, hidden size, batch and dtype asked for
(``--cells``, ``--hidden``, ``--batch``, ``--dtypes``; by default the Elman cell at h =
64, batch 64, float64 and float32), and, when a Python with PyTorch is given
(``--torch-python``; PyTorch is never a dependency of the project), ``torch.nn.RNN`` +
Adam on the same files, float32, one thread, at h = 64 and batch 64.

ADMM and Adam do the same data per pass: one pass over the 4,000 training sequences in
batches of the row's size, no evaluation. The figure is the median over ``--repeats``
passes after one warm-up pass, taken in interleaved rounds (every configuration once per
round), so that a change of the shared machine's load shifts them all alike. Each row
also gives the pass's dense work, counted analytically
(``benchmarks.kernels.minibatch_flops``, ``adam_flops``; PyTorch's epoch as Adam's), the
rate it achieves as a share of this machine's square GEMM rate in its dtype, measured in
the same run, and the ratio to the project's Adam in the same configuration and dtype
(``over_adam``) and to its float64 Adam at h = 64, batch 64 (``over_adam_float64``).
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


GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def trainer(local, algo: str, cell: str, hidden: int, batch: int, dtype: str):
    """A serial trainer of ``algo`` (admm: the mini-batch default; adam) on ``local``."""
    from padmmirnn.admm.minibatch import MinibatchAdmm
    from padmmirnn.comm import SerialComm
    from padmmirnn.config import build_config
    from padmmirnn.gradient.trainer import GradientTrainer

    size = "admm.batch_size" if algo == "admm" else "optim.batch_size"
    cfg = build_config(overrides={"train.algo": algo, "train.dtype": dtype,
                                  "model.cell": cell, "model.hidden": hidden, size: batch})
    data = local if dtype == "float64" else type(local)(
        local.info, local.inputs.astype(np.float32), local.targets, local.start, local.stop)
    kind = MinibatchAdmm if algo == "admm" else GradientTrainer
    return kind(cfg, data, local.n, SerialComm())


def median_passes(trainers: dict, repeats: int) -> dict:
    """Median seconds per pass of every trainer, after a warm-up pass, in rounds."""
    for tr in trainers.values():
        tr.step()
    times: dict = {k: [] for k in trainers}
    for _ in range(repeats):
        for key, tr in trainers.items():
            t0 = time.perf_counter()
            tr.step()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> int:
    from benchmarks.common import default_training_set, table
    from benchmarks.kernels import adam_flops, gemm_rate, minibatch_flops

    p = argparse.ArgumentParser(prog="python -m benchmarks baselines")
    p.add_argument("--out", default="runs/bench-baselines")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cells", default="rnn", help="comma-separated: rnn, gru, lstm")
    p.add_argument("--hidden", default="64", help="comma-separated hidden sizes")
    p.add_argument("--batch", default="64", help="comma-separated batch sizes")
    p.add_argument("--dtypes", default="float64,float32")
    p.add_argument("--torch-python", help="a Python with torch and h5py installed")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    local = default_training_set()
    configs = [(algo, cell, h, b, dt) for cell in a.cells.split(",")
               for h in _ints(a.hidden) for b in _ints(a.batch)
               for dt in a.dtypes.split(",") for algo in ("adam", "admm")]
    if ("adam", "rnn", 64, 64, "float64") not in configs:  # the reference row
        configs.insert(0, ("adam", "rnn", 64, 64, "float64"))
    times = median_passes({c: trainer(local, *c) for c in configs}, a.repeats)
    rates = {dt: gemm_rate(np.dtype(dt)) for dt in ("float64", "float32")}
    info = local.info
    shape = (local.n, info.steps, info.dim, None, info.classes,
             info.steps if info.many_to_many else 1, info.kind == "tokens")
    base = times["adam", "rnn", 64, 64, "float64"]
    rows = []
    for (algo, cell, h, b, dt), t in times.items():
        dims = (*shape[:3], h, *shape[4:])
        flops = (minibatch_flops(*dims, batch=b, gates=GATES[cell]) if algo == "admm"
                 else adam_flops(*dims, gates=GATES[cell]))
        rows.append({"method": "padmmirnn admm (mini-batch)" if algo == "admm"
                     else "padmmirnn adam", "cell": cell, "hidden": h, "batch": b,
                     "dtype": dt, "pass_s": t,
                     "over_adam": t / times["adam", cell, h, b, dt],
                     "over_adam_float64": t / base, "gflop": flops / 1e9,
                     "achieved_over_gemm": flops / t / rates[dt]})
    if a.torch_python:
        proc = subprocess.run([a.torch_python, "-c", TORCH_SCRIPT, local.info.path, "64", "64",
                               str(a.repeats)], capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"the PyTorch reference failed:\n{proc.stderr[-2000:]}")
        t = json.loads(proc.stdout.splitlines()[-1])["epoch_s"]
        flops = adam_flops(*shape[:3], 64, *shape[4:])
        rows.append({"method": "torch.nn.RNN + Adam", "cell": "rnn", "hidden": 64, "batch": 64,
                     "dtype": "float32", "pass_s": t, "over_adam": None,
                     "over_adam_float64": t / base, "gflop": flops / 1e9,
                     "achieved_over_gemm": flops / t / rates["float32"]})
    print(f"GEMM rate, one thread: {rates['float64'] / 1e9:.1f} GFLOP/s float64, "
          f"{rates['float32'] / 1e9:.1f} float32")
    print(table(rows))
    (out / "baselines.json").write_text(json.dumps({"gemm_flops": rates, "rows": rows},
                                                   indent=2) + "\n")
    return 0

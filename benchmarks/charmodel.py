"""Test loss at equal training time on a character model (issue 26): padmmirnn's default
mini-batch ADMM with the Elman, GRU and LSTM cells against PyTorch's ``nn.RNN`` /
``nn.GRU`` / ``nn.LSTM`` + Adam, on the same token files, on the same cores: serially
and one thread each, or ``--ranks R``: padmmirnn on R ranks (SP) and PyTorch with R
threads.

The inputs are a many-to-many token split (``padmmirnn data prepare text``: every
sequence's next-character targets). Each padmmirnn run is ``padmmirnn train --set
model.cell=C`` with every other setting at its default (h = 64) for ``--passes`` passes;
its curve is the test loss after each pass against the cumulative training seconds,
``t_compute_s + t_comm_s`` of metrics.jsonl (evaluation excluded; on several ranks the
slowest rank's compute plus the longest communication, at least the pass's time).

The PyTorch reference (a separate Python with torch and h5py, never a dependency) is the
cell (``h``, one layer, batch-first) on one-hot inputs with a linear head at every step,
cross-entropy over every character, Adam at each rate of ``--torch-lr`` with gradient
clipping by global norm at 1, batch 64 drawn by a seeded permutation, float32, one
thread (``--ranks``: threads), for ``--epochs`` epochs; its training seconds exclude
the evaluation too. Each epoch it is evaluated twice: its last iterate, and the moving
average of its iterates by the rule of padmmirnn's ``admm.average`` (decay min(0.99, (1
+ t) / (10 + t)) after step t), the filter padmmirnn's ADMM evaluates by default; both
count as PyTorch references (runs of an earlier version hold the first only).

The equal-time table reads every run at its last evaluation within each of
``--budgets`` training seconds, and names at each budget the best PyTorch gated run
(``nn.GRU`` or ``nn.LSTM``, any rate) and the gap of padmmirnn's LSTM to it.

    python -m benchmarks charmodel --train data/shakes_train.h5 --test data/shakes_test.h5 \\
        --torch-python /path/to/torch/bin/python --out runs/bench-charmodel
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TORCH_SCRIPT = r"""
import sys, json, time
import h5py, numpy as np, torch
train, test, cell, lr, epochs, h, seed, threads, out, average, ramp = sys.argv[1:12]
lr, epochs, h, seed = float(lr), int(epochs), int(h), int(seed)
average, ramp = float(average), float(ramp)
torch.set_num_threads(int(threads))
def load(path):
    with h5py.File(path) as f:
        return (np.asarray(f["inputs"], np.int64), np.asarray(f["targets"], np.int64),
                int(f.attrs["vocab"]))
x, y, vocab = load(train)
xt, yt, _ = load(test)
torch.manual_seed(seed)
rng = np.random.default_rng(seed)
kind = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell]
rnn = kind(vocab, h, batch_first=True)
head = torch.nn.Linear(h, vocab)
params = [*rnn.parameters(), *head.parameters()]
opt = torch.optim.Adam(params, lr=lr)
loss_fn = torch.nn.CrossEntropyLoss()
def loss(X, Y):
    z, _ = rnn(torch.nn.functional.one_hot(torch.tensor(X), vocab).float())
    return loss_fn(head(z).reshape(-1, vocab), torch.tensor(Y).reshape(-1))
def test_loss():
    with torch.no_grad():
        total = sum(float(loss(xt[lo:lo + 500], yt[lo:lo + 500])) * len(xt[lo:lo + 500])
                    for lo in range(0, len(xt), 500))
    return total / len(xt)
def averaged_test_loss():
    with torch.no_grad():
        last = [q.detach().clone() for q in params]
        for m, q in zip(mean, params):
            q.copy_(m)
        out = test_loss()
        for p, q in zip(last, params):
            q.copy_(p)
    return out
# the moving average of the iterates, as padmmirnn's admm.average: decay
# min(average, (1 + t) / (1 + ramp + t)) after step t
mean = [q.detach().clone() for q in params]
steps = 0
curve, spent = [], 0.0
for epoch in range(1, epochs + 1):
    t0 = time.perf_counter()
    order = rng.permutation(len(x))
    for lo in range(0, len(order), 64):
        idx = order[lo:lo + 64]
        opt.zero_grad()
        loss(x[idx], y[idx]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        steps += 1
        d = min(average, (1 + steps) / (1 + ramp + steps))
        with torch.no_grad():
            for m, q in zip(mean, params):
                m.mul_(d).add_(q, alpha=1 - d)
    spent += time.perf_counter() - t0
    curve.append({"pass": epoch, "test_loss": test_loss(),
                  "test_loss_avg": averaged_test_loss(), "seconds": spent})
json.dump(curve, open(out, "w"))
"""


def padmmirnn_run(cell: str, args, out: Path) -> list[dict]:
    """A default ``padmmirnn train`` with ``model.cell = cell`` on ``args.ranks``
    processes (SP: the serial run's passes); its curve."""
    run = out / f"padmmirnn-{cell}-s{args.seed}{suffix(args)}"
    if not (run / "summary.json").exists():
        from benchmarks.common import run_job

        run_job(["--dataset", str(args.train), "--iterations", str(args.passes),
                 "--seed", str(args.seed), "--set", f"data.test={args.test}",
                 "--set", f"model.cell={cell}", "--set", f"model.hidden={args.hidden}"],
                args.ranks, run, args.timeout)
    curve, spent = [], 0.0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        spent += m["t_compute_s"] + m["t_comm_s"]
        if m.get("test_loss") is not None:
            curve.append({"pass": m["iteration"], "test_loss": m["test_loss"],
                          "seconds": spent})
    return curve


def torch_run(cell: str, lr: float, args, out: Path) -> list[dict]:
    """The PyTorch reference on the same files; its curve."""
    result = out / f"torch-{cell}-lr{lr:g}-s{args.seed}{suffix(args)}.json"
    if not result.exists():
        from padmmirnn.averaging import RAMP
        from padmmirnn.config import AVERAGE_DECAY

        script = out / "torch_charmodel.py"
        script.write_text(TORCH_SCRIPT)
        subprocess.run([args.torch_python, str(script), str(args.train), str(args.test),
                        cell, str(lr), str(args.epochs), str(args.hidden), str(args.seed),
                        str(args.ranks), str(result), str(AVERAGE_DECAY), str(RAMP)],
                       check=True, timeout=args.timeout)
    return json.loads(result.read_text())


def suffix(args) -> str:
    """Result names of runs on more than one core carry their count."""
    return "" if args.ranks == 1 else f"-p{args.ranks}"


def at(curve: list[dict], budget: float) -> dict | None:
    """The last evaluation within ``budget`` training seconds (None: the first pass took
    longer)."""
    within = [m for m in curve if m["seconds"] <= budget * (1 + 1e-9)]
    return within[-1] if within else None


def main() -> int:
    from benchmarks.common import table

    p = argparse.ArgumentParser(prog="python -m benchmarks charmodel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, type=Path, help="a many-to-many token split")
    p.add_argument("--test", required=True, type=Path)
    p.add_argument("--out", default="runs/bench-charmodel", type=Path)
    p.add_argument("--cells", default="rnn,gru,lstm")
    p.add_argument("--passes", type=int, default=40, help="padmmirnn ADMM passes")
    p.add_argument("--torch-python", help="a Python with torch and h5py installed "
                   "(without it only padmmirnn runs)")
    p.add_argument("--torch-lr", default="3e-3,1e-2,3e-2", help="Adam rates searched")
    p.add_argument("--epochs", type=int, default=100, help="PyTorch epochs")
    p.add_argument("--budgets", default="30,60,90", help="training seconds compared")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", type=int, default=1, help="cores of each run: padmmirnn's "
                   "ranks (SP) and PyTorch's threads")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.train, args.test = args.train.resolve(), args.test.resolve()
    cells = args.cells.split(",")
    runs = {f"padmmirnn ADMM {c}": padmmirnn_run(c, args, args.out) for c in cells}
    gated = []
    if args.torch_python:
        for c in cells:
            for lr in (float(v) for v in args.torch_lr.split(",")):
                name = f"PyTorch nn.{c.upper()} + Adam lr {lr:g}"
                runs[name] = curve = torch_run(c, lr, args, args.out)
                names = [name]
                if all("test_loss_avg" in m for m in curve):  # the same run, averaged
                    names.append(f"{name}, averaged iterates")
                    runs[names[-1]] = [{**m, "test_loss": m["test_loss_avg"]} for m in curve]
                if c != "rnn":
                    gated += names
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = []
    for name, curve in runs.items():
        row = {"run": name, "final_pass": curve[-1]["pass"],
               "final_test_loss": curve[-1]["test_loss"], "seconds": curve[-1]["seconds"]}
        for b in budgets:
            then = at(curve, b)
            row[f"at_{b:g}s"] = then and {"pass": then["pass"], "test_loss": then["test_loss"]}
        rows.append(row)
    best = {}
    for b in budgets:
        read = [(r[f"at_{b:g}s"]["test_loss"], r["run"]) for r in rows
                if r["run"] in gated and r[f"at_{b:g}s"]]
        best[f"{b:g}"] = min(read) if read else None
    report = {"budgets_s": budgets, "best_torch_gated": best, "rows": rows, "curves": runs}
    (args.out / f"charmodel{suffix(args)}.json").write_text(json.dumps(report, indent=1))
    print("test loss (nats/char) at equal training seconds (pass or epoch; ended: the run "
          "stopped before this budget and is read at its end)")
    print(table([{"run": r["run"],
                  **{f"{b:g} s": None if r[f"at_{b:g}s"] is None else
                     f"{r[f'at_{b:g}s']['test_loss']:.3f} ({r[f'at_{b:g}s']['pass']}"
                     f"{', ended' if r['seconds'] < b else ''})" for b in budgets},
                  "final (pass, seconds)": f"{r['final_test_loss']:.3f} ({r['final_pass']}, "
                                           f"{r['seconds']:.0f} s)"} for r in rows]))
    lstm = next((r for r in rows if r["run"] == "padmmirnn ADMM lstm"), None)
    for b in budgets:
        ref = best[f"{b:g}"]
        mine = lstm and lstm[f"at_{b:g}s"]
        if ref and mine:
            print(f"{b:g} s: padmmirnn ADMM lstm {mine['test_loss']:.3f}, best PyTorch gated "
                  f"{ref[0]:.3f} ({ref[1]}): gap {mine['test_loss'] - ref[0]:+.3f} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())

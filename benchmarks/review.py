"""Validation-selected test accuracy on real text (issue 25): the review snippets (or any
token split with lengths), trained by padmmirnn's default ADMM and default Adam, and with
``--torch-python`` by PyTorch references on the same files and the same validation rows.

Every run holds out ``--validation-fraction`` of the training file, the rows
``padmmirnn.samples.validation_rows`` draws for ``train.seed`` (so the PyTorch runs see
exactly padmmirnn's split), evaluates after every pass, and reports the test accuracy
at its best validation accuracy (``train.monitor = val_accuracy``; padmmirnn's runs stop
after ``--patience`` passes without a better one, ``train.early_stopping``, and their
summary names the pass they restored).

The PyTorch reference (PyTorch is never a dependency: a separate Python with torch and
h5py) is ``nn.Embedding(vocab, h)`` into ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (``h``,
tanh, one layer, batch-first) and a linear head on the state at each text's last real
word (``pack_padded_sequence`` with the file's ``lengths``), cross-entropy, Adam at each
rate of ``--torch-lr`` with gradient clipping by global norm at 1, batch 64, float32, one
thread, for ``--epochs`` epochs, seeded by ``--seed``; the best validation epoch gives
the reported test accuracy. The embedding is a second input matrix that padmmirnn's
token input (``U``'s columns are the words' input weights) does not have; the cell is
otherwise the same.

    python -m benchmarks review --train data/rt_post_train.h5 --test data/rt_post_test.h5 \\
        --torch-python /path/to/torch/bin/python --out runs/bench-review
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

TORCH_SCRIPT = r"""
import sys, json, time
import h5py, numpy as np, torch
torch.set_num_threads(1)
train, test, rows, cell, lr, epochs, h, seed, out = sys.argv[1:10]
lr, epochs, h, seed = float(lr), int(epochs), int(h), int(seed)
def load(path):
    with h5py.File(path) as f:
        return (np.asarray(f["inputs"], np.int64), np.asarray(f["targets"], np.int64).reshape(-1),
                np.asarray(f["lengths"], np.int64), int(f.attrs["vocab"]) if "vocab" in f.attrs
                else int(np.asarray(f["inputs"]).max()) + 1, int(f.attrs["classes"]))
x, y, L, vocab, classes = load(train)
xt, yt, Lt, _, _ = load(test)
split = np.load(rows)
fit, val = split["train"], split["val"]
torch.manual_seed(seed)
rng = np.random.default_rng(seed)
emb = torch.nn.Embedding(vocab, h)
kind = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell]
rnn = kind(h, h, batch_first=True)
head = torch.nn.Linear(h, classes)
params = [*emb.parameters(), *rnn.parameters(), *head.parameters()]
opt = torch.optim.Adam(params, lr=lr)
loss_fn = torch.nn.CrossEntropyLoss()
def logits(idx, X, Y, Ls):
    steps = int(Ls[idx].max())
    xb = emb(torch.tensor(X[idx, :steps]))
    packed = torch.nn.utils.rnn.pack_padded_sequence(xb, torch.tensor(Ls[idx]),
                                                     batch_first=True, enforce_sorted=False)
    _, state = rnn(packed)
    last = state[0] if cell == "lstm" else state
    return head(last[-1]), torch.tensor(Y[idx])
def accuracy(idx, X, Y, Ls):
    with torch.no_grad():
        hits = 0
        for lo in range(0, len(idx), 1024):
            z, t = logits(idx[lo:lo + 1024], X, Y, Ls)
            hits += int((z.argmax(1) == t).sum())
    return hits / len(idx)
curve, spent = [], 0.0
for epoch in range(1, epochs + 1):
    t0 = time.perf_counter()
    order = fit[rng.permutation(len(fit))]
    for lo in range(0, len(order), 64):
        z, t = logits(order[lo:lo + 64], x, y, L)
        opt.zero_grad()
        loss_fn(z, t).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    spent += time.perf_counter() - t0
    curve.append({"pass": epoch, "val_accuracy": accuracy(val, x, y, L),
                  "test_accuracy": accuracy(np.arange(len(yt)), xt, yt, Lt), "seconds": spent})
json.dump(curve, open(out, "w"))
"""


def padmmirnn_run(train: Path, test: Path, algo: str, args, out: Path) -> list[dict]:
    """A serial ``padmmirnn train`` with the validation split and early stopping; its
    metrics.jsonl as the curve."""
    run = out / f"padmmirnn-{algo}-s{args.seed}"
    if not (run / "summary.json").exists():
        cmd = [sys.executable, "-P", "-m", "padmmirnn", "train", "--dataset", str(train),
               "--algo", algo, "--iterations", str(args.epochs), "--seed", str(args.seed),
               "--out", str(run), "--set", f"data.test={test}",
               "--set", f"data.validation_fraction={args.validation_fraction}",
               "--set", f"train.early_stopping={args.patience}",
               "--set", "train.monitor=val_accuracy"]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=args.timeout)
    curve = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if m.get("val_accuracy") is not None:
            curve.append({"pass": m["iteration"], "val_accuracy": m["val_accuracy"],
                          "test_accuracy": m["test_accuracy"], "seconds": m.get("wall_time_s")})
    return curve


def torch_run(train: Path, test: Path, cell: str, lr: float, args, out: Path) -> list[dict]:
    """The PyTorch reference on the same files and validation rows."""
    from padmmirnn.datafiles import read_info
    from padmmirnn.samples import validation_rows

    result = out / f"torch-{cell}-lr{lr:g}-s{args.seed}.json"
    if not result.exists():
        rows = out / f"rows-s{args.seed}.npz"
        fit, val = validation_rows(read_info(str(train)).n, args.validation_fraction,
                                   args.seed)
        np.savez(rows, train=fit, val=val)
        script = out / "torch_review.py"
        script.write_text(TORCH_SCRIPT)
        subprocess.run([args.torch_python, str(script), str(train), str(test), str(rows),
                        cell, str(lr), str(args.epochs), str(args.hidden), str(args.seed),
                        str(result)], check=True, timeout=args.timeout)
    return json.loads(result.read_text())


def selected(curve: list[dict]) -> dict:
    """The first pass of best validation accuracy, and its test accuracy."""
    best = max(curve, key=lambda m: (m["val_accuracy"], -m["pass"]))
    return {"pass": best["pass"], "val_accuracy": best["val_accuracy"],
            "test_accuracy": best["test_accuracy"], "passes_run": len(curve),
            "best_test_accuracy": max(m["test_accuracy"] for m in curve)}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks review", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="a token split with lengths")
    p.add_argument("--test", required=True)
    p.add_argument("--out", default="runs/bench-review")
    p.add_argument("--methods", default="admm,adam,torch", help="admm, adam, torch")
    p.add_argument("--torch-python", help="a Python with torch and h5py installed")
    p.add_argument("--torch-cells", default="rnn,gru,lstm")
    p.add_argument("--torch-lr", default="1e-3,3e-3", help="Adam rates of the reference")
    p.add_argument("--epochs", type=int, default=30, help="passes (epochs) at most")
    p.add_argument("--hidden", type=int, default=64, help="h of the PyTorch reference "
                   "(padmmirnn's runs take model.hidden from its defaults, 64)")
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = Path(args.train).resolve(), Path(args.test).resolve()
    methods = args.methods.split(",")
    rows = []
    for algo in ("admm", "adam"):
        if algo in methods:
            rows.append({"method": f"padmmirnn {algo} (defaults)",
                         **selected(padmmirnn_run(train, test, algo, args, out))})
    if "torch" in methods:
        if not args.torch_python:
            raise SystemExit("torch: give --torch-python")
        for cell in args.torch_cells.split(","):
            for lr in (float(v) for v in args.torch_lr.split(",")):
                rows.append({"method": f"PyTorch nn.{cell.upper()} + Adam lr {lr:g}",
                             **selected(torch_run(train, test, cell, lr, args, out))})
    (out / "review.json").write_text(json.dumps(rows, indent=1))
    print("| method | best validation accuracy (pass) | its test accuracy | passes run | "
          "best test accuracy of any pass |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['val_accuracy']:.1%} ({r['pass']}) | "
              f"{r['test_accuracy']:.1%} | {r['passes_run']} | {r['best_test_accuracy']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

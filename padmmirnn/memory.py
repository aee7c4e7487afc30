"""Will a run's state fit in memory? Estimated before anything large is allocated and
checked on every rank alike, so a run that cannot fit stops at once with one line
that says how much it needs and what to change, instead of being killed by the
kernel (or by Slurm) halfway through.
"""

from __future__ import annotations

import os
from pathlib import Path

from padmmirnn.config import Config
from padmmirnn.errors import PadmmError
from padmmirnn.nn import Network
from padmmirnn.samples import DatasetInfo

GIB = 1024 ** 3


def admm_state_bytes(info: DatasetInfo, cfg: Config, n_local: int) -> int:
    """Bytes of the full-batch ADMM state of ``n_local`` samples: the stacked state
    ``[T + 1, dz + 1 + h (+ h), n]``, a, lambda2 and a scratch block ``[T, h, n]``,
    o and lambda3 ``[|O|, n, K]`` (docs/performance.md gives measured figures)."""
    h, steps, k = cfg.model.hidden, info.steps, info.classes
    dz = 0 if info.kind == "tokens" else info.dim
    outs = steps if info.many_to_many else 1
    every = cfg.admm.multipliers == "all"
    per_sample = ((steps + 1) * (dz + 1 + h + (h if every else 0))
                  + steps * h * (3 if every else 2) + outs * k * 2)
    return per_sample * n_local * _itemsize(cfg)


def _network(cfg: Config) -> Network:
    m = cfg.model
    return Network.build(m.cell, m.activation, m.layers)


def batch_bytes(info: DatasetInfo, cfg: Config, samples: int) -> int:
    """Bytes of the forward pass and adjoint of ``samples`` samples at once (a
    mini-batch or an evaluation block)."""
    return _network(cfg).bytes_per_sample(info, cfg.model.hidden, _itemsize(cfg)) * samples


def _itemsize(cfg: Config) -> int:
    return 4 if cfg.train.dtype == "float32" else 8


def available_bytes() -> tuple[int | None, str]:
    """Memory this node can still give (bytes, and where the figure comes from): the
    smallest of MemAvailable, the cgroup's limit (which Slurm enforces) and Slurm's
    per-node memory; None when none is known."""
    found: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            found.append((int(limit) - used, "the cgroup's memory.max"))
    except (OSError, ValueError):
        pass
    if os.environ.get("SLURM_MEM_PER_NODE", "").isdigit():
        found.append((int(os.environ["SLURM_MEM_PER_NODE"]) * 1024 ** 2, "Slurm's --mem"))
    if not found:
        return None, "unknown"
    return min(found)


def check_fits(info: DatasetInfo, cfg: Config, n_local: int, ranks_on_node: int) -> None:
    """Raise :class:`PadmmError` when this rank's training state cannot fit in its share
    of the node's available memory."""
    if cfg.train.algo != "admm":
        return
    evaluation = batch_bytes(info, cfg, _network(cfg).eval_block(info, cfg.model.hidden,
                                                                 _itemsize(cfg)))
    if cfg.admm.batch_size:
        need = batch_bytes(info, cfg, min(cfg.admm.batch_size, n_local)) + evaluation
        what = "the mini-batch ADMM workspace"
    else:
        need = admm_state_bytes(info, cfg, n_local) + evaluation
        what = f"the ADMM state of {n_local} samples"
    free, source = available_bytes()
    if free is None or need * ranks_on_node <= free:
        return
    share = free / ranks_on_node
    remedies = ("more ranks or nodes (the state is split over ranks)",
                "train.dtype = float32 (half the bytes)",
                "mini-batch ADMM, admm.batch_size > 0 (state per mini-batch, not per sample)")
    if cfg.admm.batch_size:
        remedies = ("a smaller admm.batch_size", "train.dtype = float32 (half the bytes)")
    raise PadmmError(f"{what} needs {need / GIB:.1f} GiB on each rank, but {share / GIB:.1f} "
                     f"GiB are available per rank ({source} {free / GIB:.1f} GiB shared by "
                     f"{ranks_on_node} rank(s) on this node): use " + ", or ".join(remedies))

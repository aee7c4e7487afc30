"""Re-cutting the samples over the ranks by measured speed (``train.rebalance``).

A synchronous run with global mini-batches waits, at every reduction, for the rank that
takes longest over its share of the batch. With rank ``r`` holding the contiguous block
``[b_r, b_{r+1})`` of the global order, its share of a random batch is proportional to
``n_r = b_{r+1} - b_r``, so the step takes ``max_r n_r / v_r`` for speeds ``v_r``
(samples per second). The blocks that balance it are proportional to the speeds:

    b_r = round(N sum_{q < r} v_q / sum_q v_q),   every block at least one sample.

The speeds are measured per iteration as samples over compute seconds, which also
hold each rank's fixed cost per step (the replicated block solves), so the proportional
cut overshoots; each re-cut moves halfway to it (``damping``), and the blocks settle
where the ranks' times meet.

The batches are drawn from the global order whatever the blocks are, so the iterates
are those of the serial run (to the rounding of the reduction): an exact remedy for a
straggler, against AP's inexact one.
"""

from __future__ import annotations

import numpy as np


def boundaries(n: int, speeds: np.ndarray, old: list[int] | None = None,
               damping: float = 0.5) -> list[int]:
    """Block boundaries ``[b_0 = 0, ..., b_p = n]`` proportional to ``speeds`` (moved
    ``damping`` of the way from ``old``), every block non-empty (needs ``n >= p``)."""
    p = len(speeds)
    share = np.asarray(speeds, float) / float(np.sum(speeds))
    if old is not None:
        share = (1 - damping) * np.diff(old) / n + damping * share
    cuts = np.round(n * np.cumsum(share)[:-1]).astype(int)
    out = [0]
    for r, c in enumerate(cuts, start=1):
        out.append(int(min(max(c, out[-1] + 1), n - (p - r))))
    return out + [n]


def worth_moving(old: list[int], new: list[int], n: int, tolerance: float = 0.02) -> bool:
    """Whether ``new`` moves a boundary by more than ``tolerance`` of the samples."""
    return max(abs(a - b) for a, b in zip(old, new, strict=True)) > tolerance * n

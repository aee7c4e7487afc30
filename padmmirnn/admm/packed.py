"""Sufficient statistics of the weight blocks, packed for one reduction.

The weight blocks (docs/design.md, section 3) need only sums over samples
of outer products, so each rank computes its local sums, they are packed into
one contiguous float64 buffer (symmetric blocks as upper triangles), summed over
ranks, and every rank unpacks the same global sums and solves the same systems.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Field:
    name: str
    shape: tuple[int, ...]
    symmetric: bool = False

    @property
    def size(self) -> int:
        if self.symmetric:
            n = self.shape[0]
            return n * (n + 1) // 2
        return int(np.prod(self.shape, dtype=np.int64))


class Layout:
    """Ordered named fields of one packed float64 buffer."""

    def __init__(self, fields: list[Field]):
        self.fields = fields
        self.offsets = np.cumsum([0] + [f.size for f in fields])

    @property
    def size(self) -> int:
        return int(self.offsets[-1])

    def pack(self, values: dict[str, np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        buf = np.empty(self.size) if out is None else out
        for f, lo, hi in zip(self.fields, self.offsets[:-1], self.offsets[1:], strict=True):
            v = values[f.name]
            buf[lo:hi] = v[np.triu_indices(f.shape[0])] if f.symmetric else v.reshape(-1)
        return buf

    def unpack(self, buf: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for f, lo, hi in zip(self.fields, self.offsets[:-1], self.offsets[1:], strict=True):
            if f.symmetric:
                n = f.shape[0]
                m = np.zeros((n, n))
                m[np.triu_indices(n)] = buf[lo:hi]
                out[f.name] = m + np.triu(m, 1).T
            else:
                out[f.name] = buf[lo:hi].reshape(f.shape).copy()
        return out


def input_layout(d: int, h: int) -> Layout:
    """Statistics of [x_t, s_{t-1}, 1, a_hat_t] over all t (minus the constant x x^T)."""
    return Layout([
        Field("XSp", (d, h)),
        Field("XA", (d, h)),
        Field("SpSp", (h, h), symmetric=True),
        Field("SpA", (h, h)),
        Field("sSp", (h,)),
        Field("sA", (h,)),
    ])


def output_layout(h: int, k: int) -> Layout:
    """Statistics of [s_t, 1, o_hat_t] over t in O."""
    return Layout([
        Field("SS", (h, h), symmetric=True),
        Field("SO", (h, k)),
        Field("sS", (h,)),
        Field("sO", (k,)),
    ])


def constant_layout(d: int, tokens: bool) -> Layout:
    """Input statistics that never change: x x^T (dense) and sum x (token counts)."""
    if tokens:
        return Layout([Field("sX", (d,))])
    return Layout([Field("XX", (d, d), symmetric=True), Field("sX", (d,))])


def gram(a: np.ndarray, b: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """``a^T b`` in float64; float32 inputs are multiplied in row chunks and the
    chunk products accumulated in float64."""
    if a.dtype == np.float64 and b.dtype == np.float64:
        return a.T @ b
    out = np.zeros((a.shape[1], b.shape[1]))
    for lo in range(0, a.shape[0], chunk):
        out += a[lo:lo + chunk].T @ b[lo:lo + chunk]
    return out


def colsum(a: np.ndarray) -> np.ndarray:
    """Column sums in float64 (a matrix-vector product for float64: about 2x faster
    than ``sum(axis=0)`` on ``[N T, h]`` blocks)."""
    if a.dtype == np.float64:
        return np.ones(a.shape[0]) @ a
    return a.sum(axis=0, dtype=np.float64)


def gram_steps(a: np.ndarray, b: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """``sum_t a[t] b[t]^T`` in float64 for feature-major blocks ``a`` ``[T, p, n]`` and
    ``b`` ``[T, q, n]`` (the sum over samples and steps of outer products); float32
    products over at most ``chunk`` samples are accumulated in float64."""
    out = np.zeros((a.shape[1], b.shape[1]))
    n = a.shape[2]
    step = n if a.dtype == np.float64 and b.dtype == np.float64 else chunk
    for t in range(a.shape[0]):
        for lo in range(0, n, step):
            out += a[t, :, lo:lo + step] @ b[t, :, lo:lo + step].T
    return out


def sum_steps(a: np.ndarray) -> np.ndarray:
    """``sum_t a[t] 1`` in float64 for feature-major blocks ``[T, p, n]``: the sum over
    samples and steps."""
    if a.dtype == np.float64:
        ones = np.ones(a.shape[2])
        return sum(a[t] @ ones for t in range(a.shape[0]))
    return a.sum(axis=(0, 2), dtype=np.float64)

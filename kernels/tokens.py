"""Kernels of the token-input path: U x_t = U[:, token], so sums over samples of
x_t z^T become per-token segment sums and sum x x^T is the diagonal of counts."""

import numba as nb
import numpy as np


@nb.njit(cache=True)
def segment_sum_columns(tokens, values, vocab):
    """``out[:, j] = sum of values[t, :, i] over (t, i) with tokens[t, i] == j``
    (float64): sum over samples of z x^T for one-hot x, feature-major.

    ``tokens`` is ``[T, n]`` integer, ``values`` is ``[T, h, n]``; returns ``[h, vocab]``
    (the accumulator itself: a transposed copy in Numba cost 25 ms at h = 65, vocab =
    18,962, five times the sums; callers that need ``[vocab, h]`` take NumPy's ``.T``).
    """
    steps, h, n = values.shape
    acc = np.zeros((h, vocab))  # row k stays in cache while the samples stream by
    for t in range(steps):
        for k in range(h):
            for i in range(n):
                acc[k, tokens[t, i]] += values[t, k, i]
    return acc


@nb.njit(cache=True)
def token_counts(tokens, vocab):
    """Number of occurrences of each token id in ``tokens`` (float64 ``[vocab]``)."""
    out = np.zeros(vocab)
    for i in range(tokens.shape[0]):
        out[tokens[i]] += 1.0
    return out


@nb.njit(cache=True)
def add_columns(table, tokens, out):
    """``out[:, i] += table[:, tokens[i]]`` (``table`` ``[h, vocab]``, ``out`` ``[h, n]``):
    U x_t for one-hot x_t, feature-major."""
    h, n = out.shape
    for k in range(h):
        for i in range(n):
            out[k, i] += table[k, tokens[i]]

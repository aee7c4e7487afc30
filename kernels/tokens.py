"""Kernels of the token-input path: U x_t = U[:, token], so sums over samples of
x_t z^T become per-token segment sums and sum x x^T is the diagonal of counts."""

import numba as nb
import numpy as np


@nb.njit(cache=True)
def segment_add(tokens, values, out):
    """``out[j] += sum of values[i] over rows i with tokens[i] == j`` (``out`` is
    ``[vocab, h]``, ``values`` ``[R, h]``)."""
    rows, cols = values.shape
    for i in range(rows):
        j = tokens[i]
        for k in range(cols):
            out[j, k] += values[i, k]


@nb.njit(cache=True)
def segment_sum(tokens, values, vocab):
    """``out[j] = sum of values[i] over rows i with tokens[i] == j`` (float64).

    ``tokens`` is ``[R]`` integer, ``values`` is ``[R, h]``; returns ``[vocab, h]``.
    """
    out = np.zeros((vocab, values.shape[1]))
    segment_add(tokens, values, out)
    return out


@nb.njit(cache=True)
def token_counts(tokens, vocab):
    """Number of occurrences of each token id in ``tokens`` (float64 ``[vocab]``)."""
    out = np.zeros(vocab)
    for i in range(tokens.shape[0]):
        out[tokens[i]] += 1.0
    return out


@nb.njit(cache=True)
def gather_columns(table, tokens, out):
    """``out[i] = table[tokens[i]]`` for a ``[vocab, h]`` table (the rows of U^T)."""
    rows, cols = out.shape
    for i in range(rows):
        j = tokens[i]
        for k in range(cols):
            out[i, k] = table[j, k]

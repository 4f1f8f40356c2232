"""RegMean: regression-mean merging of Dense kernels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kmerge.errors import InvalidArgumentError
from kmerge.weights.methods import merge_methods


@merge_methods.register("regmean")
def regmean(tensors: Sequence[np.ndarray], *, weights: Sequence[float],
            grams: Sequence[np.ndarray] | None = None, alpha: float = 0.9,
            samples: int = 256) -> np.ndarray:
    """W* = (sum_i G_i)^-1 sum_i G_i W_i (Jin et al., 2023, "Dataless knowledge fusion by merging weights").

    For a Dense kernel (Keras layout ``(in, out)``), ``G_i = X_i^T X_i`` is the Gram matrix of
    that layer's inputs in model ``i``; its off-diagonal entries are scaled by ``alpha``.
    Every other variable (``grams=None``) gets the weighted average. Inputs that never fire
    (all-zero Gram rows) fall back to the average through a tiny ridge towards it.

    Args:
        tensors: The same variable from each source.
        weights: Per-model weights, summing to 1 (they scale each ``G_i``).
        grams: One ``(in, in)`` Gram matrix per model for Dense kernels (supplied by
            ``merge_weights`` from ``data``), None for other variables.
        alpha: Off-diagonal scale in [0, 1] (default 0.9; 0 gives a per-input weighted average).
        samples: Number of examples of ``data`` used for the Gram matrices (default 256; read
            by ``merge_weights``).

    >>> regmean([np.array([[1.0]]), np.array([[3.0]])], weights=[.5, .5],
    ...         grams=[np.array([[1.0]]), np.array([[3.0]])]).round(6)
    array([[2.5]])
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise InvalidArgumentError(f"regmean: alpha must be in [0, 1]; received {alpha!r} "
                                   "(default 0.9)")
    w = np.asarray(weights, dtype=np.float64)
    ts = np.stack([np.asarray(t, dtype=np.float64) for t in tensors])
    avg = np.tensordot(w, ts, axes=1)
    if grams is None:
        return avg
    if ts.ndim != 3:
        raise InvalidArgumentError(f"regmean: Gram matrices apply to 2-D Dense kernels; the "
                                   f"tensor has shape {ts.shape[1:]}")
    gs = []
    for g in grams:
        g = np.asarray(g, dtype=np.float64)
        d = np.diag(np.diag(g))
        gs.append(float(alpha) * (g - d) + d)
    g_sum = np.tensordot(w, np.stack(gs), axes=1)
    rhs = sum(wi * g @ t for wi, g, t in zip(w, gs, ts))
    # A tiny ridge towards the average keeps dead inputs (zero rows) at the average.
    eps = 1e-8 * max(float(np.trace(g_sum)) / g_sum.shape[0], 1e-12)
    lhs = g_sum + eps * np.eye(g_sum.shape[0])
    return np.linalg.solve(lhs, rhs + eps * avg)

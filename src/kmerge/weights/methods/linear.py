"""Weighted average of the sources (a uniform model soup when weights are equal)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kmerge.weights.methods import merge_methods


@merge_methods.register("linear")
def linear(tensors: Sequence[np.ndarray], *, weights: Sequence[float]) -> np.ndarray:
    """Weighted average sum_i w_i theta_i (Wortsman et al., 2022, "Model soups").

    Args:
        tensors: The same variable from each source.
        weights: Per-source weights, summing to 1.

    >>> linear([np.zeros(2), np.ones(2)], weights=[0.25, 0.75])
    array([0.75, 0.75])
    """
    # Accumulate instead of stacking: streaming merges keep only a few tensors in memory.
    out = np.zeros(np.shape(tensors[0]), dtype=np.float64)
    for w, t in zip(weights, tensors):
        out += np.float64(w) * np.asarray(t)
    return out

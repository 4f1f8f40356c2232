"""Fisher-weighted averaging."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kmerge.errors import InvalidArgumentError
from kmerge.weights.methods import merge_methods


@merge_methods.register("fisher")
def fisher(tensors: Sequence[np.ndarray], *, weights: Sequence[float],
           fishers: Sequence[np.ndarray], floor: float = 1e-6,
           samples: int = 256) -> np.ndarray:
    """theta* = sum_i w_i F_i theta_i / sum_i w_i F_i (Matena & Raffel, 2022, "Merging models with Fisher-weighted averaging").

    ``F_i`` is the diagonal Fisher of model ``i`` for this variable, computed by
    :func:`kmerge.merge_weights` from ``data`` (exact expectation over the model's predicted
    label distribution) and clipped below at ``floor``.

    Args:
        tensors: The same variable from each source.
        weights: Per-model weights, summing to 1.
        fishers: Diagonal Fisher of each model for this variable (same shapes as ``tensors``).
        floor: Lower bound on every Fisher entry (default 1e-6; keeps the average defined
            where no model has information).
        samples: Number of examples of ``data`` used to estimate the Fisher (default 256;
            read by ``merge_weights``, not here).

    >>> fisher([np.array([0.0]), np.array([1.0])], weights=[.5, .5],
    ...        fishers=[np.array([1.0]), np.array([3.0])])
    array([0.75])
    """
    if not float(floor) > 0:
        raise InvalidArgumentError(f"fisher: floor must be > 0; received {floor!r} "
                                   "(default 1e-6)")
    w = np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * np.ndim(tensors[0]))
    f = np.maximum(np.stack([np.asarray(x, dtype=np.float64) for x in fishers]), float(floor))
    t = np.stack([np.asarray(x, dtype=np.float64) for x in tensors])
    return np.sum(w * f * t, axis=0) / np.sum(w * f, axis=0)

"""Fisher-weighted averaging."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kmerge.errors import InvalidArgumentError
from kmerge.weights.methods import merge_methods


@merge_methods.register("fisher")
def fisher(tensors: Sequence[np.ndarray], *, weights: Sequence[float],
           fishers: Sequence[np.ndarray], floor: float = 1e-6,
           samples: int = 256, outputs: str | None = None, normalize: bool = False,
           favor_target: bool = False) -> np.ndarray:
    """theta* = sum_i w_i F_i theta_i / sum_i w_i F_i (Matena & Raffel, 2022, "Merging models with Fisher-weighted averaging").

    ``F_i`` is the diagonal Fisher of model ``i`` for this variable, computed by
    :func:`kmerge.merge_weights` from ``data`` (exact expectation over the model's predicted
    label distribution) and clipped below at ``floor``.

    Args:
        tensors: The same variable from each source.
        weights: Per-model weights, summing to 1 (with ``normalize``, already divided by
            each model's Fisher norm by ``merge_weights``; only their ratios matter).
        fishers: Diagonal Fisher of each model for this variable (same shapes as ``tensors``).
        floor: Lower bound on the Fisher entries (default 1e-6; keeps the average defined
            where no model has information).
        samples: Number of examples of ``data`` used to estimate the Fisher (default 256;
            read by ``merge_weights``, not here).
        outputs: ``"logits"`` or ``"probabilities"``: what the models' output holds; default
            None: decided from each model's final activation or compiled loss (read by
            ``merge_weights``; see :func:`kmerge.weights.statistics.output_kind`).
        normalize: Divide each model's weight by the L2 norm of its whole Fisher (over every
            merged variable), as mmatena/model_merging does by default (read by
            ``merge_weights``). Default False: the paper's formula.
        favor_target: Floor only the first (target) model's Fisher, as mmatena/model_merging
            does by default: where the other models have zero Fisher the target's value is
            kept. Default False: every Fisher is floored. Needs a positive first weight.

    >>> fisher([np.array([0.0]), np.array([1.0])], weights=[.5, .5],
    ...        fishers=[np.array([1.0]), np.array([3.0])])
    array([0.75])
    """
    if not float(floor) > 0:
        raise InvalidArgumentError(f"fisher: floor must be > 0; received {floor!r} "
                                   "(default 1e-6)")
    if outputs not in (None, "logits", "probabilities"):
        raise InvalidArgumentError(f"fisher: outputs must be 'logits' or 'probabilities' (or "
                                   f"None: decided from the model); received {outputs!r}")
    w = np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * np.ndim(tensors[0]))
    if favor_target and not w.reshape(-1)[0] > 0:
        raise InvalidArgumentError("fisher: favor_target=True floors only the first model's "
                                   "Fisher, so the first model needs a weight > 0; received "
                                   f"weights {np.asarray(weights).tolist()}")
    f = np.stack([np.asarray(x, dtype=np.float64) for x in fishers])
    if favor_target:
        f[0] = np.maximum(f[0], float(floor))
        f[1:] = np.maximum(f[1:], 0.0)
    else:
        f = np.maximum(f, float(floor))
    t = np.stack([np.asarray(x, dtype=np.float64) for x in tensors])
    return np.sum(w * f * t, axis=0) / np.sum(w * f, axis=0)

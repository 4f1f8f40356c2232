"""TIES-merging: trim, elect sign, disjoint mean."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kmerge.errors import InvalidArgumentError
from kmerge.weights.methods import merge_methods
from kmerge.weights.methods.sparse import (
    check_fraction,
    disjoint_mean,
    elect_sign,
    task_vectors,
    trim_below,
    trim_top_k,
)

#: Where TIES's top-``density`` trim is counted: each tensor, or the whole task vector.
SCOPES = ("tensor", "model")


@merge_methods.register("ties")
def ties(tensors: Sequence[np.ndarray], *, weights: Sequence[float], base: np.ndarray,
         density: float = 0.2, scale: float = 1.0, scope: str = "tensor",
         thresholds: Sequence[float] | None = None) -> np.ndarray:
    """TIES-merging (Yadav et al., 2023): trim, elect sign by mass, disjoint mean.

    Each task vector keeps its ``density`` fraction of largest-magnitude entries; the sign
    of each entry is elected by the weighted sum of the trimmed task vectors (+1 where it is
    0); the merged task vector is the weighted mean of the entries that agree with the
    elected sign.

    Args:
        tensors: The same variable from each fine-tuned model.
        weights: Per-model weights, summing to 1.
        base: The variable in the pretrained model.
        density: Fraction of each task vector kept, in (0, 1] (default 0.2: the paper's k=20%).
            ``ceil(density * size)`` entries are kept, plus any tied with the last one.
        scale: lambda, the factor on the merged task vector (default 1.0).
        scope: ``"tensor"`` (default): the top ``density`` of each tensor (mergekit, peft);
            ``"model"``: the top ``density`` of each model's whole task vector, over every
            merged tensor (the TIES authors' code), so layers that moved more keep more.
        thresholds: For ``scope="model"``: each model's magnitude threshold over its whole
            task vector, computed by ``merge_weights`` (not a user parameter).

    >>> ties([np.array([3.0, 0.1]), np.array([-1.0, 0.2])], weights=[.5, .5],
    ...      base=np.zeros(2), density=0.5)
    array([3., 0.])
    """
    density = check_fraction("density", density, method="ties", low_open=True, high_open=False,
                             hint="pass density=0.2 (keep the top 20% of each task vector) or "
                                  "density=1 to skip trimming")
    if scope not in SCOPES:
        raise InvalidArgumentError(f"ties: scope must be one of {', '.join(SCOPES)}; received "
                                   f"{scope!r} ('tensor': trim each tensor; 'model': trim each "
                                   "model's whole task vector)")
    w = np.asarray(weights, dtype=np.float64)
    taus = task_vectors(tensors, base)
    if scope == "model":
        if thresholds is None:
            raise InvalidArgumentError(
                "ties: scope='model' trims each model's whole task vector, which needs every "
                "tensor first: kmerge.merge_weights computes it; merge_weights_files (streaming "
                "one tensor at a time) supports scope='tensor' only")
        taus = trim_below(taus, np.asarray(thresholds, dtype=np.float64))
    else:
        taus = trim_top_k(taus, density)
    merged = disjoint_mean(taus, w, elect_sign(taus, w))
    return np.asarray(base, dtype=np.float64) + float(scale) * merged

"""DARE: drop and rescale task vectors, then task arithmetic or TIES."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from kmerge.errors import InvalidArgumentError
from kmerge.weights.methods import merge_methods
from kmerge.weights.methods.sparse import (
    check_fraction,
    disjoint_mean,
    elect_sign,
    random_drop,
    task_vectors,
)

THEN = ("task_arithmetic", "ties")


@merge_methods.register("dare")
def dare(tensors: Sequence[np.ndarray], *, weights: Sequence[float], base: np.ndarray,
         path: str = "", p: float = 0.5, seed: int = 0, then: str = "task_arithmetic",
         scale: float = 1.0) -> np.ndarray:
    """DARE (Yu et al., 2024, "Language models are Super Mario"): drop p, rescale by 1/(1-p).

    Each task vector entry is dropped with probability ``p`` and the survivors are rescaled
    by ``1/(1-p)``; the sparse task vectors are then combined by task arithmetic
    (``then="task_arithmetic"``: ``base + scale * sum_i n w_i tau_i``) or by TIES's sign
    election and disjoint mean (``then="ties"``; normalised by the agreeing weights, unlike
    mergekit's dare_ties, whose default ``normalize=False`` sums them). The random mask is
    drawn from NumPy with ``seed`` and the variable's canonical ``path``
    (:func:`kmerge.weights.validate.variable_paths`: layer names below the model, never the
    model's own name), so a merge is reproducible, identical on every backend, and the same
    in memory and streamed from files whatever the models are called.

    Args:
        tensors: The same variable from each fine-tuned model.
        weights: Per-model weights, summing to 1.
        base: The variable in the pretrained model.
        path: The canonical variable path (``"block_1/dense/kernel"``, supplied by
            ``merge_weights`` and ``merge_weights_files``; it varies the mask per tensor).
        p: Drop rate in [0, 1) (default 0.5; the paper's 0.9 suits large models, it hurts
            small MLPs).
        seed: Seed of the drop masks (default 0).
        then: ``"task_arithmetic"`` (default) or ``"ties"``.
        scale: lambda, the factor on the merged task vector (default 1.0).

    >>> dare([np.ones(4)], weights=[1.0], base=np.zeros(4), p=0.0)
    array([1., 1., 1., 1.])
    """
    p = check_fraction("p", p, method="dare", low_open=False, high_open=True,
                       hint="pass p=0.5 (drop half of each task vector) or p=0 to keep all")
    if then not in THEN:
        raise InvalidArgumentError(f"dare: then must be one of {', '.join(THEN)}; "
                                   f"received {then!r}")
    w = np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(path.encode())])
    taus = random_drop(task_vectors(tensors, base), p, rng)
    if then == "ties":
        merged = disjoint_mean(taus, w, elect_sign(taus, w))
    else:
        merged = np.tensordot(w * len(tensors), taus, axes=1)
    return np.asarray(base, dtype=np.float64) + float(scale) * merged

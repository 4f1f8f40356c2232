"""Task arithmetic: add scaled task vectors to the base model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kmerge.weights.methods import merge_methods
from kmerge.weights.methods.sparse import task_vectors


@merge_methods.register("task_arithmetic")
def task_arithmetic(tensors: Sequence[np.ndarray], *, weights: Sequence[float],
                    base: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """theta_0 + scale * sum_i (n w_i) tau_i (Ilharco et al., 2023, "Editing models with task arithmetic").

    ``weights`` sum to 1, so they are multiplied by the number of models ``n``: equal weights
    give the paper's plain sum of task vectors ``tau_i = theta_i - theta_0``.

    Args:
        tensors: The same variable from each fine-tuned model.
        weights: Per-model weights, summing to 1.
        base: The variable in the pretrained model all sources were fine-tuned from.
        scale: lambda, the factor on the summed task vectors (default 1.0; the paper tunes it
            on held-out data, 0.3 to 1 is typical).

    >>> task_arithmetic([np.array([2.0]), np.array([4.0])], weights=[.5, .5],
    ...                 base=np.array([1.0]), scale=0.5)
    array([3.])
    """
    taus = task_vectors(tensors, base)
    w = np.asarray(weights, dtype=np.float64) * len(tensors)
    return np.asarray(base, dtype=np.float64) + float(scale) * np.tensordot(w, taus, axes=1)

"""Spherical linear interpolation between exactly two models."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kmerge.errors import InvalidArgumentError
from kmerge.weights.methods import merge_methods

#: Above this |cos| the tensors are treated as parallel and interpolated linearly (mergekit).
DOT_THRESHOLD = 0.9995


@merge_methods.register("slerp")
def slerp(tensors: Sequence[np.ndarray], *, t: float = 0.5) -> np.ndarray:
    """SLERP between two tensors (Shoemake, 1985; per tensor as in mergekit's slerp.py).

    The angle comes from the normalised tensors; the sin weights are applied to the
    un-normalised ones. Nearly parallel tensors (|cos| > 0.9995) fall back to linear
    interpolation ``(1 - t) a + t b``, and so does a zero tensor (kmerge's choice: mergekit
    leaves a zero tensor unnormalised, takes the angle as 90 degrees and returns
    ``sin(t pi / 2) b``).

    Args:
        tensors: Exactly two tensors: ``t=0`` gives the first, ``t=1`` the second.
        t: Interpolation factor in [0, 1] (default 0.5). ``merge_weights(..., weights=[w_a,
            w_b])`` sets ``t = w_b / (w_a + w_b)`` (:func:`interpolation_t`) and refuses ``t``
            together with ``weights=``.

    >>> slerp([np.array([1.0, 0.0]), np.array([0.0, 1.0])], t=0.5)
    array([0.70710678, 0.70710678])
    """
    if len(tensors) != 2:
        raise InvalidArgumentError(
            f"slerp interpolates exactly two models; received {len(tensors)}. Merge two at a "
            "time, or use method='linear' for more than two")
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"slerp: t must be a number in [0, 1]; received {t!r}") from None
    if not (0.0 <= t <= 1.0):
        raise InvalidArgumentError(f"slerp: t must be in [0, 1]; received {t!r} "
                                   "(t=0 gives the first model, t=1 the second)")
    a = np.asarray(tensors[0], dtype=np.float64)
    b = np.asarray(tensors[1], dtype=np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return (1 - t) * a + t * b
    dot = float(np.sum((a / na) * (b / nb)))
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * a + t * b
    theta = np.arccos(np.clip(dot, -1.0, 1.0))
    s = np.sin(theta)
    return (np.sin((1 - t) * theta) / s) * a + (np.sin(t * theta) / s) * b


def interpolation_t(weights: Sequence[float] | None) -> float:
    """slerp's ``t`` from the two models' weights: ``w_b / (w_a + w_b)`` (0.5 without)."""
    if weights is None:
        return 0.5
    w = [float(x) for x in weights]
    if len(w) != 2 or not sum(w) > 0:
        raise InvalidArgumentError(f"slerp: weights must be two non-negative numbers with a "
                                   f"positive sum; received {list(weights)!r}")
    return w[1] / (w[0] + w[1])

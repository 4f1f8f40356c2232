"""Pieces shared by TIES and DARE: task vectors, sparsification, sign election, disjoint mean."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kmerge.errors import InvalidArgumentError


def check_fraction(name: str, value: float, *, method: str, low_open: bool, high_open: bool,
                   hint: str) -> float:
    """Refuse a fraction outside its interval with a message that says what works."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{method}: {name} must be a number; received {value!r}. "
                                   f"{hint}") from None
    lo_ok = v > 0 if low_open else v >= 0
    hi_ok = v < 1 if high_open else v <= 1
    if not (np.isfinite(v) and lo_ok and hi_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise InvalidArgumentError(f"{method}: {name} must be in {interval}; received {value!r}. "
                                   f"{hint}")
    return v


def task_vectors(tensors: Sequence[np.ndarray], base: np.ndarray) -> np.ndarray:
    """Stack tau_i = theta_i - theta_0 (float64, shape (n, *shape))."""
    b = np.asarray(base, dtype=np.float64)
    return np.stack([np.asarray(t, dtype=np.float64) - b for t in tensors])


def trim_top_k(taus: np.ndarray, density: float) -> np.ndarray:
    """Keep, in each task vector, the ``density`` fraction of entries largest in magnitude.

    Ties at the threshold are kept (so at least ``ceil(density * size)`` entries survive).
    """
    n = taus.shape[0]
    flat = taus.reshape(n, -1)
    size = flat.shape[1]
    k = int(np.ceil(density * size))
    if k >= size:
        return taus.copy()
    mags = np.abs(flat)
    # k-th largest magnitude per row
    thresh = np.partition(mags, size - k, axis=1)[:, size - k][:, None]
    return np.where(mags >= thresh, flat, 0.0).reshape(taus.shape)


def kth_largest(mags: np.ndarray, density: float) -> float:
    """The magnitude a ``density`` fraction of ``mags`` reaches: the k-th largest entry with
    ``k = ceil(density * size)`` (0 when every entry is kept)."""
    flat = np.ravel(mags)
    size = flat.size
    k = int(np.ceil(density * size))
    if k >= size or size == 0:
        return 0.0
    return float(np.partition(flat, size - k)[size - k])


def trim_below(taus: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Zero the entries of each task vector ``i`` below ``thresholds[i]`` in magnitude (the
    model-wide trim of TIES: thresholds from :func:`kth_largest` over the whole vector)."""
    thr = np.asarray(thresholds, dtype=np.float64).reshape((-1,) + (1,) * (taus.ndim - 1))
    return np.where(np.abs(taus) >= thr, taus, 0.0)


def random_drop(taus: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """DARE: drop each entry with probability ``p`` and rescale survivors by 1/(1-p)."""
    if p == 0:
        return taus.copy()
    keep = rng.random(taus.shape) >= p
    return np.where(keep, taus / (1.0 - p), 0.0)


def elect_sign(taus: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Elected sign per entry: the sign of the (weighted) total mass, +1 where it is 0
    (mergekit's rule; the TIES authors' code gives them the majority of all elected signs
    instead). The rule matters only where non-zero entries cancel exactly: entries that are
    zero in every task vector merge to 0 either way."""
    mass = np.tensordot(weights, taus, axes=1)
    return np.where(mass >= 0, 1.0, -1.0)


def disjoint_mean(taus: np.ndarray, weights: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """Weighted mean, per entry, over the task vectors that are non-zero and agree with
    ``sign``; 0 where none does (uniform weights give TIES's disjoint mean)."""
    agree = (np.sign(taus) == sign[None]) & (taus != 0)
    w = weights.reshape((-1,) + (1,) * (taus.ndim - 1))
    num = np.sum(np.where(agree, w * taus, 0.0), axis=0)
    den = np.sum(np.where(agree, w, 0.0), axis=0)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

"""Weight-merge methods: one registered pure NumPy function per method.

Each method merges *one* tensor: it receives the same variable from every source model
(``tensors``) plus the per-model ``weights`` (already normalised to sum 1 by
:func:`kmerge.merge_weights`) and returns the merged tensor. Methods never see Keras
objects, so a merge gives the same numbers on every backend.

Arguments that :func:`kmerge.merge_weights` fills in itself (never passed by users) are
listed in :data:`SUPPLIED`; every other keyword-only parameter is a user parameter with a
default (or required), validated against the function signature.

>>> from kmerge.weights.methods import merge_methods
>>> merge_methods.names()
['dare', 'fisher', 'linear', 'regmean', 'slerp', 'task_arithmetic', 'ties']
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from kmerge.registry import Registry

__all__ = ["merge_methods", "SUPPLIED", "user_params", "supplied_params"]

merge_methods: Registry[Callable] = Registry("merge method")

#: Parameters filled in by ``merge_weights`` (per tensor), not by the user.
SUPPLIED = frozenset({"weights", "base", "fishers", "grams", "path", "thresholds"})


def user_params(fn: Callable) -> dict[str, object]:
    """The user parameters of a method and their defaults (``inspect.Parameter.empty``
    when required), in signature order."""
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in SUPPLIED:
            out[name] = p.default
    return out


def supplied_params(fn: Callable) -> dict[str, bool]:
    """The supplied parameters a method takes -> whether each is required."""
    return {name: p.default is inspect.Parameter.empty
            for name, p in inspect.signature(fn).parameters.items()
            if name in SUPPLIED}


# Importing the modules registers the methods.
from kmerge.weights.methods import (  # noqa: E402,F401
    dare,
    fisher,
    linear,
    regmean,
    slerp,
    task_arithmetic,
    ties,
)

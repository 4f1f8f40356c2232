"""What kmerge knows about a model it made: kind, sources and their files, adapters, notes.

:func:`info` is the public accessor (a copy: editing it changes nothing). Inside kmerge,
:func:`attach` records metadata on a model and :func:`meta_of` reads it back; the record
travels with the model through :func:`kmerge.save` / :func:`kmerge.load`.
"""

from __future__ import annotations

import copy
from typing import Any

_ATTR = "_kmerge_meta"


def info(model: Any) -> dict | None:
    """kmerge's record of how ``model`` was made, or None for a model kmerge did not make.

    >>> kmerge.info(m)["sources"]["a"]["frozen"]
    True
    """
    meta = meta_of(model)
    return copy.deepcopy(meta) if meta is not None else None


def meta_of(model: Any) -> dict | None:
    """The live metadata dict of ``model`` (None when it has none)."""
    meta = getattr(model, _ATTR, None)
    return meta if isinstance(meta, dict) else None


def attach(model: Any, meta: dict) -> Any:
    """Record ``meta`` on ``model`` (Keras models refuse unknown attributes only when
    tracking; ``object.__setattr__`` bypasses the tracker) and return the model."""
    object.__setattr__(model, _ATTR, meta)
    return model

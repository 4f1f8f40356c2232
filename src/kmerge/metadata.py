"""What kmerge knows about a model it made: kind, sources and their files, adapters, notes.

:func:`info` is the public accessor (a copy: editing it changes nothing). Inside kmerge,
:func:`attach` records metadata on a model and :func:`meta_of` reads it back; the record
travels with the model through :func:`kmerge.save` / :func:`kmerge.load`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
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


def own_path(model: Any) -> str | None:
    """The file ``model`` was loaded from by :func:`kmerge.load`, if any."""
    loaded = getattr(model, "_kmerge_load", None)  # kmerge.io.LoadInfo
    path = getattr(loaded, "path", None)
    return str(path) if path else None


def own_files(model: Any) -> list[str]:
    """Every file :func:`kmerge.load` read ``model`` from: the model file and, for a JSON
    architecture, its weights file."""
    loaded = getattr(model, "_kmerge_load", None)
    return [str(p) for p in (getattr(loaded, "path", None), getattr(loaded, "weights", None))
            if p]


def lineage(*models: Any) -> list[str]:
    """Every file ``models`` derive from: each one's own file and, recursively, the files its
    metadata records (``source_paths``), so a merge of merges still knows its grandparents and
    :func:`kmerge.save` can refuse to overwrite any of them. Absolute, resolved, sorted."""
    paths: set[str] = set()
    for model in models:
        if model is None:
            continue
        paths.update(own_files(model))
        meta = meta_of(model) or {}
        recorded = meta.get("source_paths", [])
        if isinstance(recorded, list):
            paths.update(p for p in recorded if isinstance(p, str) and p)
    return sorted({str(Path(p).expanduser().resolve()) for p in paths})


def inherit(model: Any, *parents: Any) -> Any:
    """Add the lineage of ``parents`` to ``model``'s metadata (created if missing)."""
    meta = dict(meta_of(model) or {})
    meta["source_paths"] = lineage(model, *parents)
    return attach(model, meta)


_RELATIVE = "source_paths_relative"


def portable(meta: dict, folder: Path) -> dict:
    """``meta`` as written into a file saved in ``folder``: the source paths also relative to
    that folder, so a copy of the whole folder elsewhere still knows (and protects) its
    sources' copies."""
    paths = meta.get("source_paths")
    if not isinstance(paths, list) or not paths:
        return meta
    rel = []
    for q in paths:
        try:
            rel.append(os.path.relpath(q, folder))
        except ValueError:  # another drive (Windows): no relative path
            continue
    return {**meta, _RELATIVE: rel}


def localized(meta: dict, folder: Path) -> dict:
    """``meta`` read from a file in ``folder``: its relative source paths resolved there and
    added to ``source_paths`` (both are protected: the originals and the copies beside it)."""
    rel = meta.get(_RELATIVE)
    if not isinstance(rel, list) or not rel:
        return meta
    paths = [q for q in meta.get("source_paths", []) if isinstance(q, str)]
    extra = [str((folder / q).resolve()) for q in rel if isinstance(q, str) and q]
    return {**meta, "source_paths": sorted(set(paths) | set(extra))}

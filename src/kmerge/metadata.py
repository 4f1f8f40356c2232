"""What kmerge knows about a model it made: kind, sources and their files, adapters, notes.

:func:`info` is the public accessor (a copy: editing it changes nothing). Inside kmerge,
:func:`attach` records metadata on a model and :func:`meta_of` reads it back; the record
travels with the model through :func:`kmerge.save` / :func:`kmerge.load`.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

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


def fingerprint(arrays: Iterable[Any]) -> str | None:
    """One digest of a model's weights, independent of names and order: the sorted digests of
    its floating-point arrays with more than one element (kernels, biases, statistics; not
    step counters or seed states). The same weights give the same fingerprint in memory and in
    any file format. None when there is nothing to fingerprint."""
    digests = []
    for a in arrays:
        a = np.asarray(a)
        if a.dtype.kind != "f" or a.size < 2:
            continue
        h = hashlib.blake2b(f"{a.dtype.str}{a.shape}".encode(), digest_size=16)
        h.update(np.ascontiguousarray(a).tobytes())
        digests.append(h.hexdigest())
    if not digests:
        return None
    return hashlib.blake2b("".join(sorted(digests)).encode(), digest_size=16).hexdigest()


def model_fingerprint(model: Any) -> str | None:
    import keras

    return fingerprint(keras.ops.convert_to_numpy(v.value) for v in model.weights)


def fingerprints(*models: Any) -> list[str]:
    """The weight fingerprints of ``models`` and of everything they derive from (recorded in
    their metadata): how :func:`kmerge.save` recognises a source it has no path for (a model
    loaded with plain ``keras.models.load_model``)."""
    out: set[str] = set()
    for model in models:
        if model is None:
            continue
        own = model_fingerprint(model)
        if own:
            out.add(own)
        recorded = (meta_of(model) or {}).get("source_fingerprints", [])
        if isinstance(recorded, list):
            out.update(f for f in recorded if isinstance(f, str))
    return sorted(out)


def derivation(*models: Any, result: Any = None) -> dict:
    """What a model made from ``models`` records about them: ``source_paths`` (files) and
    ``source_fingerprints`` (weights), each through every earlier kmerge operation. ``result``
    is a model changed in place (a distilled student, a repaired merge): its files and records
    are kept, but not its own current weights (saving it twice must stay possible)."""
    prints = set(fingerprints(*models))
    if result is not None:
        recorded = (meta_of(result) or {}).get("source_fingerprints", [])
        if isinstance(recorded, list):
            prints.update(f for f in recorded if isinstance(f, str))
    return {"source_paths": lineage(result, *models), "source_fingerprints": sorted(prints)}

"""Feature-level fusion: tap intermediate layers of each model, align, fuse, add a head."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import keras

from kmerge.arguments import flag, model_name
from kmerge.errors import IncompatibleModelsError, InvalidArgumentError
from kmerge.graph.build import (
    GraphBuilder,
    check_adapter_mode,
    check_keep_outputs,
    frozen_names,
    named_models,
    shape_of,
)
from kmerge.graph.heads import apply_head, describe_head
from kmerge.graph.parallel import combine_branches

_POOL = {
    "avg": {1: keras.layers.GlobalAveragePooling1D, 2: keras.layers.GlobalAveragePooling2D,
            3: keras.layers.GlobalAveragePooling3D},
    "max": {1: keras.layers.GlobalMaxPooling1D, 2: keras.layers.GlobalMaxPooling2D,
            3: keras.layers.GlobalMaxPooling3D},
}
POOLINGS = ("auto", "avg", "max", "none")


def _split_taps(taps: Any) -> tuple[dict, dict[str, list]]:
    if not isinstance(taps, Mapping) or not taps:
        raise InvalidArgumentError(
            "fuse takes {name: (model, layer)} or {name: (model, [layer, ...])}, or the "
            "models with taps='auto' and data=(x, y) to let kmerge.probe choose the layers; "
            f"got {type(taps).__name__}"
        )
    models, refs = {}, {}
    for n, value in taps.items():
        if not isinstance(value, tuple | list) or len(value) != 2:
            raise InvalidArgumentError(
                f"tap {n!r} must be a pair (model, layer_ref) or (model, [refs]), got {value!r}"
                " (to let kmerge.probe choose the layers: fuse(models, taps='auto', "
                "data=(x, y)))"
            )
        model, ref = value
        ref_list = list(ref) if isinstance(ref, list | tuple) else [ref]
        if not ref_list:
            raise InvalidArgumentError(f"tap {n!r} names no layer")
        models[n], refs[n] = model, ref_list
    return models, refs


def _align(builder: GraphBuilder, feats: dict[str, Any], pooling: str) -> dict[str, Any]:
    """Bring every tapped feature to a shape the combine op can take."""
    out = {}
    if pooling == "none":
        maps = {k: t for k, t in feats.items() if len(t.shape) == 4}
        if maps and len(maps) != len(feats):
            others = sorted(set(feats) - set(maps))
            raise IncompatibleModelsError(
                f"pooling='none' keeps feature maps, but taps {others} are not 2-D maps; "
                "use pooling='auto' (global pooling) or tap feature maps only"
            )
        if maps:
            h = min(t.shape[1] for t in maps.values())
            w = min(t.shape[2] for t in maps.values())
            for k, t in feats.items():
                if (t.shape[1], t.shape[2]) != (h, w):
                    layer = keras.layers.Resizing(h, w, name=f"fuse_resize_{k}")
                    builder.adapters.append({"where": k, "kind": "resize", "trainable": False,
                                             "step": f"resize {shape_of(t)} -> ({h}, {w})"})
                    t = layer(t)
                out[k] = t
            return out
        return dict(feats)
    kind = "avg" if pooling == "auto" else pooling
    for k, t in feats.items():
        rank = len(t.shape) - 2
        if rank >= 1:
            t = _POOL[kind][rank](name=f"fuse_pool_{k}")(t)
        out[k] = t
    return out


def _chosen_taps(models: Any, taps: Any, data: Any, pooling: str) -> tuple[dict, Any]:
    """``{name: (model, refs)}`` from ``fuse(models, taps=...)``, and the probe result that
    chose them (None for taps given by hand)."""
    from kmerge.probing import ProbeResult, probe

    if taps is None:
        raise InvalidArgumentError("data= is used only with taps='auto' (to probe the models); "
                                   "drop it, or pass taps='auto'")
    sources = named_models(models, minimum=1, what="fuse")
    result = None
    if isinstance(taps, str) and taps == "auto":
        if not isinstance(data, tuple | list) or len(data) != 2:
            raise InvalidArgumentError(
                "taps='auto' chooses the taps with kmerge.probe on labelled data: pass "
                f"data=(x, y); received data={type(data).__name__ if data is not None else None}")
        result = probe(sources, data[0], data[1], pooling=pooling)
        mapping = result.best_taps
    elif isinstance(taps, ProbeResult):
        result = taps
        mapping = taps.best_taps
        missing = [n for n in mapping if n not in sources]
        if missing:
            raise InvalidArgumentError(
                f"the probe result chose taps of models {missing}, which are not among the "
                f"models given to fuse ({list(sources)}); pass the models that were probed")
    elif isinstance(taps, Mapping):
        mapping = dict(taps)
        missing = [n for n in mapping if n not in sources]
        if missing:
            raise InvalidArgumentError(f"taps names models {missing} that are not among the "
                                       f"models {list(sources)}")
    else:
        raise InvalidArgumentError(
            "taps must be 'auto' (chosen by kmerge.probe on data=(x, y)), a probe result, or "
            f"{{name: layer_ref or [refs]}}; received {taps!r}")
    if data is not None and result is None or data is not None and taps is result:
        raise InvalidArgumentError("data= is used only with taps='auto' (to probe the models); "
                                   "drop it, or pass taps='auto'")
    if not mapping:
        raise InvalidArgumentError("the probe found no tap to fuse")
    return {n: (sources[n], ref) for n, ref in mapping.items()}, result


def fuse(
    models: Any,
    *,
    taps: Any = None,
    data: Any = None,
    combine: str = "concat",
    head: Any = None,
    pooling: str = "auto",
    freeze: Any = True,
    share_inputs: bool = True,
    adapter: str = "none",
    weights=None,
    keep_outputs: bool = False,
    name: str | None = None,
    verify: bool = True,
    dry_run: bool = False,
):
    """Fuse intermediate features of several models and put a head on them.

    Args:
        models: ``{name: (model, layer_ref)}`` or ``{name: (model, [ref, ...])}``; a ref is
            a layer name, an index, or a nested path like ``"block_1/conv"``. With ``taps``:
            the models alone, a list or ``{name: model}``.
        taps: ``"auto"``: :func:`kmerge.probe` ranks every layer of every model on
            ``data`` and the best combination is fused (the probe's table is recorded in
            ``kmerge.info(m)["probe"]`` and in reports; the probe's options are its defaults,
            ``seed=0``); a :class:`kmerge.ProbeResult` (its best combination: another seed or
            other probe options, ``taps=kmerge.probe(models, x, y, seed=3)``); or
            ``{name: ref or [refs]}``.
        data: ``(x, y)`` for ``taps="auto"``: x as for :func:`kmerge.probe` (one input for
            all, or ``{name: x}``), y labels or targets.
        combine: How to fuse the aligned features (see :func:`kmerge.parallel`).
        head: The head on the fused features; None returns the features.
        pooling: ``"auto"``/``"avg"``/``"max"`` pool spatial and sequence features to
            vectors; ``"none"`` resizes feature maps to the smallest common grid.
        freeze: ``True``, ``False``, or a set of source names to freeze.
        share_inputs: As in :func:`kmerge.parallel`.
        adapter: ``"auto"`` projects unequal shapes for element-wise combine ops.
        weights: Fixed weights for ``combine="weighted"``, one per tap.
        keep_outputs: A multi-task merge: the outputs are a dict of each source's own
            output(s), unchanged, and the new head ``"head"``; the source outputs come from
            the same copied layers the taps read (every layer runs once). Needs every
            source frozen. See :func:`kmerge.parallel`.
        name: Name of the merged model.
        verify: Check after building that each source is reproduced bit-exactly.
        dry_run: Return a printable plan instead of a model.

    >>> m = kmerge.fuse({"a": (a, "conv_2"), "b": (b, ["dense_1", "dense_2"])},
    ...                 head=kmerge.heads.classifier(10))
    >>> m = kmerge.fuse({"a": a, "b": b}, taps="auto", data=(x, y),
    ...                 head=kmerge.heads.classifier(10))
    """
    from kmerge.graph.parallel import check_weights

    mode = check_adapter_mode(adapter)
    name, verify, dry_run = model_name(name), flag(verify, "verify"), flag(dry_run, "dry_run")
    share_inputs = flag(share_inputs, "share_inputs")
    if pooling not in POOLINGS:
        raise InvalidArgumentError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    result = None
    if taps is not None or data is not None:
        models, result = _chosen_taps(models, taps, data, pooling)
    models, refs = _split_taps(models)
    sources = named_models(models, minimum=1, what="fuse")
    n_feats = sum(len(r) for r in refs.values())
    if n_feats < 2:
        raise InvalidArgumentError("fuse needs at least two taps in all (one model, two layers is fine)")
    fixed = check_weights(weights, n_feats, op=combine, what="tap")
    frozen = frozen_names(freeze, sources)
    keep = check_keep_outputs(keep_outputs, frozen, sources)
    builder = GraphBuilder("fuse", sources, frozen, name=name, dry_run=dry_run)
    inputs = builder.inputs_for(list(sources), share=share_inputs)
    feats = {}
    for n in sources:
        builder.add_source(n, inputs[n])
        for ref in refs[n]:
            key = n if len(refs[n]) == 1 else f"{n}_{re.sub(r'[^A-Za-z0-9_]', '_', str(ref))}"
            feats[key] = builder.tap(n, ref)
    feats = _align(builder, feats, pooling)
    x = combine_branches(builder, feats, combine=combine, adapter=mode, weights=fixed)
    x = apply_head(head, x, name=builder.own_prefix("head"))
    builder.head = describe_head(head)
    merged = builder.finish(x, verify=verify, keep_outputs=keep)
    if result is not None:
        _record_probe(merged, result)
    return merged


def _record_probe(merged: Any, result: Any) -> None:
    """The probe that chose the taps, in the merge's metadata (a plan gets a note)."""
    from kmerge.graph.build import Plan
    from kmerge.metadata import meta_of
    from kmerge.probing import describe

    chosen = ", ".join(f"{n}: {r}" for n, r in result.best_taps.items())
    note = (f"taps chosen by kmerge.probe: {chosen} (held-out probe "
            f"{result.metric} {result.best_score:.4f} of {len(result.rows)} taps)")
    if isinstance(merged, Plan):
        merged.notes.append(note)
        return
    meta = meta_of(merged)
    meta["probe"] = describe(result)
    meta["notes"].append(note)

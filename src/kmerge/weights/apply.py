"""merge_weights: many models of one architecture become one model of that architecture.

This is the only part of weight merging that touches Keras objects. It checks that the
sources are compatible (before any math), walks their variables in order, calls the
registered NumPy method (:mod:`kmerge.weights.methods`) once per float tensor, copies
non-float variables from the first model, assigns the result to a clone of the first model,
refuses NaN/Inf and attaches a drift report. Fisher diagonals and RegMean Gram matrices are
computed here from ``data`` (the methods themselves stay pure NumPy).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kmerge.arguments import integer, labels, model_inputs
from kmerge.errors import (
    InvalidArgumentError,
    InvalidModelError,
)
from kmerge.metadata import attach, derivation
from kmerge.weights.methods import merge_methods, supplied_params
from kmerge.weights.statistics import dense_grams, fisher_diagonals, predict_numpy
from kmerge.weights.validate import (
    DATA_METHODS,
    GREEDY,
    as_model,
    check_compatible,
    check_fast,
    check_param_names,
    compile_patterns,
    method_names,
    normalise_weights,
    path_candidates,
    resolve_method,
    split_data,
)

__all__ = ["merge_weights", "MergeCollapseWarning", "method_names", "COLLAPSE_RATIO"]

ALIGN_METHODS = ("weights", "activations")
REPAIR_METHODS = ("bn", "repair")
#: A merge whose accuracy is below this fraction of the worst source's warns ("collapse").
COLLAPSE_RATIO = 0.75


class MergeCollapseWarning(UserWarning):
    """A weight merge is far less accurate than its worst source (usually: unaligned
    sources that do not share a basin; try ``align="activations"`` and ``repair=...``)."""


def to_numpy(v) -> np.ndarray:
    import keras

    return np.array(keras.ops.convert_to_numpy(v))


def is_float(dtype: Any) -> bool:
    return np.issubdtype(np.dtype(str(dtype).replace("bfloat16", "float32")), np.floating)


def _clone(model):
    import keras

    try:
        clone = keras.models.clone_model(model)
    except Exception:  # subclassed models: rebuild from config
        try:
            clone = model.__class__.from_config(model.get_config())
        except Exception as exc:
            raise InvalidModelError(
                f"cannot build a new {type(model).__name__} to hold the merged weights: "
                f"clone_model and from_config both failed ({type(exc).__name__}: {exc}); "
                "implement get_config/from_config on the model class") from exc
    if len(clone.weights) != len(model.weights) and getattr(model, "inputs", None) is None:
        try:
            shape = getattr(model, "_build_shapes_dict", None) or {}
            if "input_shape" in shape:
                clone.build(shape["input_shape"])
        except Exception:
            pass
    if len(clone.weights) != len(model.weights):
        raise InvalidModelError(
            f"a clone of {model.name!r} has {len(clone.weights)} variables but the model has "
            f"{len(model.weights)}; build the model (call it once on data) before merging")
    return clone


def _checked_data(model, x, y) -> tuple[Any, Any]:
    """``data`` checked against ``model`` before any forward pass (see kmerge.arguments)."""
    if x is None:
        return None, None
    xs = model_inputs(model, x, "data x")
    if y is not None:
        y = labels(y, len(xs[0]), "data y")
        classes = int(model.outputs[0].shape[-1] or 0) if getattr(model, "outputs", None) else 0
        if classes > 1 and y.ndim == 1 and y.dtype.kind in "iu" and (
                y.min() < 0 or y.max() >= classes):
            raise InvalidArgumentError(
                f"data y holds class labels {int(y.min())}..{int(y.max())} but model "
                f"{model.name!r} predicts {classes} classes (0..{classes - 1}); pass the labels "
                "the models were trained on")
    return (xs[0] if len(xs) == 1 else xs), y


def _accuracy(model, x, y) -> float:
    p = predict_numpy(model, x)
    y = np.asarray(y)
    truth = y.argmax(-1) if y.ndim > 1 and y.shape[-1] > 1 else y.reshape(-1)
    if p.ndim == 1 or p.shape[-1] == 1:
        pred = (p.reshape(-1) > (0.5 if p.min() >= 0 and p.max() <= 1 else 0.0)).astype(int)
    else:
        pred = p.argmax(-1)
    return float(np.mean(pred == truth))


# ----------------------------------------------------------------------------- core


def tensor_kwargs(supplied: dict, path: str, method_params: dict,
                  params: list[tuple[str, re.Pattern, dict]], *, weights, base=None,
                  fishers=None, grams=None) -> dict:
    """A method's keyword arguments for one tensor: the user's parameters, the per-tensor
    regex overrides matching ``path``, and what the method takes of the supplied values."""
    kwargs = dict(method_params)
    for _, rx, overrides in params:
        if rx.fullmatch(path):
            kwargs.update(overrides)
    values = {"weights": weights, "base": base, "path": path, "fishers": fishers, "grams": grams}
    kwargs.update({k: v for k, v in values.items() if k in supplied})
    return kwargs


def _merge_arrays(method: str, fn, sources: list[list[np.ndarray]], paths: list[str],
                  merge_mask: list[bool], *, weights: list[float],
                  base: list[np.ndarray] | None, method_params: dict,
                  params: list[tuple[str, re.Pattern, dict]],
                  fishers: list[list[np.ndarray]] | None = None,
                  grams: list[dict[int, np.ndarray]] | None = None) -> list[np.ndarray]:
    sup = supplied_params(fn)
    out = []
    for i, path in enumerate(paths):
        first = sources[0][i]
        if not merge_mask[i]:
            out.append(np.array(first, copy=True))
            continue
        gram = None
        if "grams" in sup:
            g = [gm.get(i) for gm in grams] if grams else [None]
            gram = None if any(x is None for x in g) else g
        kwargs = tensor_kwargs(sup, path, method_params, params, weights=weights,
                               base=None if base is None else base[i],
                               fishers=[f[i] for f in fishers] if "fishers" in sup else None,
                               grams=gram)
        # overflow (scale=1e308) gives inf/NaN, refused below naming the variable
        with np.errstate(over="ignore", invalid="ignore"):
            merged = np.asarray(fn([s[i] for s in sources], **kwargs))
            if merged.shape != first.shape:
                raise InvalidArgumentError(f"method {method!r} returned shape {merged.shape} "
                                           f"for {path!r}, expected {first.shape}")
            out.append(merged.astype(first.dtype, copy=False))
    return out


def refuse_non_finite(arrays: list[np.ndarray], paths: list[str],
                       sources: list[list[np.ndarray]], names: list[str], method: str) -> None:
    for i, (a, path) in enumerate(zip(arrays, paths)):
        if not np.issubdtype(a.dtype, np.floating) or np.all(np.isfinite(a)):
            continue
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        culprits = [n for n, s in zip(names, sources) if not np.all(np.isfinite(s[i]))]
        cause = (f"the source(s) {', '.join(culprits)} already hold NaN/Inf there: fix or drop "
                 "them" if culprits else
                 f"the sources are finite, so {method!r} overflowed: lower scale, or use "
                 "method='linear'")
        raise InvalidArgumentError(
            f"the merged variable {path!r} holds {bad} NaN/Inf value(s) of {np.size(a)}; "
            f"kmerge refuses a non-finite model: {cause}")


def _drift(merged: list[np.ndarray], sources: list[list[np.ndarray]], paths: list[str],
           mask: list[bool]) -> dict[str, list[float]]:
    out = {}
    for i, path in enumerate(paths):
        if not mask[i]:
            continue
        m = merged[i].astype(np.float64)
        out[path] = [float(np.linalg.norm(m - s[i].astype(np.float64))
                           / max(float(np.linalg.norm(s[i].astype(np.float64))), 1e-12))
                     for s in sources]
    return out


def _assign(clone, arrays: list[np.ndarray]) -> None:
    for v, a in zip(clone.weights, arrays):
        v.assign(np.array(a, copy=True))


def merge_weights(models: Sequence[Any], *, method: str, base: Any = None,
                  weights: Sequence[float] | None = None, align: str | None = None,
                  data: Any = None, repair: str | None = None,
                  params: Mapping[str, Mapping[str, Any]] | None = None,
                  exclude: Sequence[str] | None = None, **method_params: Any):
    """Merge models of one architecture into one model of that architecture.

    Args:
        models: Two or more ``keras.Model`` objects (or paths, loaded with
            :func:`kmerge.load`) of the same architecture. With ``method="slerp"``, exactly two.
        method: One of ``linear``, ``slerp``, ``task_arithmetic``, ``ties``, ``dare``,
            ``fisher``, ``regmean`` (see :mod:`kmerge.weights.methods`) or ``greedy_soup``.
        base: The pretrained model the sources were fine-tuned from (model or path); needed by
            ``task_arithmetic``, ``ties`` and ``dare``, refused by the others.
        weights: One non-negative weight per model (normalised to sum 1); default uniform.
        align: ``"weights"`` or ``"activations"``: permute every model's hidden units to match
            the first before merging (:func:`kmerge.align`).
        data: ``x`` or ``(x, y)``. Needed by ``fisher``, ``regmean`` (x), ``greedy_soup``
            ((x, y) held out), ``align="activations"`` and ``repair``. With labels, the
            accuracy of every source and of the result is recorded, and a
            :class:`MergeCollapseWarning` is emitted when the result falls below
            ``COLLAPSE_RATIO`` (0.75) times the worst source's accuracy.
        repair: ``"bn"`` (recompute BatchNorm statistics) or ``"repair"`` (REPAIR) after
            merging, on ``data``.
        params: Per-tensor overrides: ``{regex: {parameter: value}}``; a regex is matched
            (``re.fullmatch``) against each variable path (``"dense_1/kernel"``); later
            entries win. Every regex must match some variable.
        exclude: Regexes of layer names or variable paths whose variables are copied from the
            first model untouched (e.g. an embedding whose vocabulary differs between models:
            same shapes, different meaning, which no weight check can detect).
        **method_params: The method's parameters (``t``, ``scale``, ``density``, ``p``,
            ``seed``, ``then``, ``floor``, ``alpha``, ``samples``); unknown names are refused.

    Returns:
        A new model of the first model's architecture. ``kmerge.info(merged)`` holds the
        method, parameters, normalised weights, source paths, per-variable drift (relative L2
        distance to each source) and, with labelled data, accuracies; :func:`kmerge.save`
        writes it into the file. The sources are not modified.

    Raises:
        InvalidArgumentError: Unknown method or parameter, bad weights or parameter values,
            missing ``base`` or ``data``, a NaN/Inf result.
        IncompatibleModelsError: The models differ in architecture (first difference named).
        InvalidModelError: A model is neither a Keras model nor a path.

    >>> soup = merge_weights([a, b, c], method="linear")  # doctest: +SKIP
    >>> m = merge_weights([ft1, ft2], method="ties", base=pre, density=0.2,
    ...                   params={r".*dense_1/kernel": {"density": 0.5}})  # doctest: +SKIP
    >>> meta_of(m)["drift"]["dense_1/kernel"]  # doctest: +SKIP
    [0.41, 0.39]
    """
    # --- validate every argument before loading or computing anything
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, Sequence):
        raise InvalidArgumentError(f"models must be a list of models or paths; received "
                                   f"{type(models).__name__}")
    models = list(models)
    if len(models) < 1 or (len(models) < 2 and method != "task_arithmetic"
                           and method not in ("ties", "dare")):
        raise InvalidArgumentError(f"merge_weights needs at least two models; received "
                                   f"{len(models)}")
    fn = resolve_method(method)
    if align is not None and align not in ALIGN_METHODS:
        raise InvalidArgumentError(f"unknown align method {align!r}; valid: "
                                   f"{', '.join(ALIGN_METHODS)} (or None)")
    if repair is not None and repair not in REPAIR_METHODS:
        raise InvalidArgumentError(f"unknown repair method {repair!r}; valid: "
                                   f"{', '.join(REPAIR_METHODS)} (or None)")
    check_param_names(method, fn, method_params, "merge_weights")
    params = dict(params or {})
    compiled_params = []
    for (pat, rx), overrides in zip(compile_patterns(params, "params"), params.values()):
        if not isinstance(overrides, Mapping):
            raise InvalidArgumentError(f"params[{pat!r}] must be a dict of parameter overrides; "
                                       f"received {overrides!r}")
        check_param_names(method, fn, overrides, f"params[{pat!r}]")
        compiled_params.append((pat, rx, dict(overrides)))
    excl = compile_patterns([exclude] if isinstance(exclude, str) else list(exclude or []),
                            "exclude")
    n = len(models)
    if method == GREEDY and weights is not None:
        raise InvalidArgumentError("greedy_soup chooses its own ingredients and averages them "
                                   "uniformly; drop weights=, or use method='linear'")
    norm_w = normalise_weights(weights, n)
    sup = supplied_params(fn) if fn is not None else {}
    if sup.get("base") and base is None:
        raise InvalidArgumentError(
            f"method {method!r} needs base=, the pretrained model the sources were fine-tuned "
            f"from: merge_weights([ft1, ft2], method={method!r}, base=pretrained)")
    if base is not None and "base" not in sup:
        raise InvalidArgumentError(
            f"method {method!r} does not use base=; drop it, or use a method that merges task "
            "vectors: task_arithmetic, ties or dare")
    x, y = split_data(data)
    needs_x = [why for cond, why in [
        (method in DATA_METHODS, f"method={method!r}"),
        (align == "activations", "align='activations'"),
        (repair is not None, f"repair={repair!r}")] if cond]
    if needs_x and x is None:
        raise InvalidArgumentError(f"{', '.join(needs_x)} needs data=x (or (x, y)): a few "
                                   "hundred representative inputs")
    if method == GREEDY and y is None:
        raise InvalidArgumentError("method='greedy_soup' needs held-out data=(x, y) with labels "
                                   "to rank and accept models")
    check_fast(method, fn, n, norm_w, base is not None, method_params,
                {p: o for p, _, o in compiled_params})
    align_fn = repair_fn = None
    if align is not None:
        from kmerge.weights.align import align as align_fn
    if repair is not None:
        from kmerge.weights.repair import repair as repair_fn

    # --- load and check
    loaded = [as_model(m, f"models[{i}]") for i, m in enumerate(models)]
    names = [f"models[{i}] ({m.name!r})" for i, m in enumerate(loaded)]
    base_model = as_model(base, "base") if base is not None else None
    check_compatible(loaded + ([base_model] if base_model is not None else []),
                     names + (["base"] if base_model is not None else []))
    ancestry = derivation(*loaded, base_model)
    x, y = _checked_data(loaded[0], x, y)
    if align_fn is not None:
        loaded = [loaded[0]] + [align_fn(loaded[0], m, method=align, data=x) for m in loaded[1:]]

    ref = loaded[0]
    paths = [v.path for v in ref.weights]
    float_vars = [is_float(v.dtype) for v in ref.weights]
    excluded = set()
    for pat, rx in excl:
        hits = [p for p in paths if any(rx.fullmatch(c) for c in path_candidates(p))]
        if not hits:
            raise InvalidArgumentError(f"exclude pattern {pat!r} matches no layer or variable; "
                                       f"variables are: {', '.join(paths[:12])}"
                                       f"{' ...' if len(paths) > 12 else ''}")
        excluded.update(hits)
    for pat, rx, _ in compiled_params:
        if not any(rx.fullmatch(p) for p in paths):
            raise InvalidArgumentError(f"params pattern {pat!r} matches no variable path "
                                       f"(matched with re.fullmatch); variables are: "
                                       f"{', '.join(paths[:12])}{' ...' if len(paths) > 12 else ''}")
    mask = [f and p not in excluded for f, p in zip(float_vars, paths)]
    sources = [[to_numpy(v) for v in m.weights] for m in loaded]

    meta: dict[str, Any] = {
        "kind": "weights", "method": method, "method_params": dict(method_params),
        "params": {p: o for p, _, o in compiled_params}, "exclude": [p for p, _ in excl],
        "weights": norm_w, "align": align, "repair": repair,
        "source_names": [m.name for m in loaded],
        **ancestry,
        "excluded_variables": sorted(excluded),
        "copied_non_float": [p for p, f in zip(paths, float_vars) if not f],
    }
    merged_model = _clone(ref)

    # --- merge
    if method == GREEDY:
        arrays = _greedy_soup(loaded, sources, paths, mask, merged_model, x, y, meta)
    else:
        base_arrays = [to_numpy(v) for v in base_model.weights] if base_model is not None else None
        fishers = grams = None
        if method == "fisher":
            samples = integer(method_params.get("samples", 256), "samples")
            fishers = [fisher_diagonals(m, x, samples=samples) for m in loaded]
        if method == "regmean":
            samples = integer(method_params.get("samples", 256), "samples")
            grams = [dense_grams(m, x, samples=samples) for m in loaded]
            meta["regmean_kernels"] = [paths[i] for i in sorted(grams[0])]
        arrays = _merge_arrays(method, fn, sources, paths, mask, weights=norm_w,
                               base=base_arrays, method_params=method_params,
                               params=compiled_params, fishers=fishers, grams=grams)
    refuse_non_finite(arrays, paths, sources, names, method)
    _assign(merged_model, arrays)

    if repair_fn is not None:
        out = repair_fn(merged_model, loaded, method=repair, data=x)
        merged_model = out if out is not None else merged_model
        arrays = [to_numpy(v) for v in merged_model.weights]
        refuse_non_finite(arrays, paths, sources, names, f"repair={repair!r}")

    drift = _drift(arrays, sources, paths, mask)
    meta["drift"] = drift
    if drift:
        worst = max(drift, key=lambda k: max(drift[k]))
        meta["max_drift"] = {"variable": worst, "value": max(drift[worst])}
    if y is not None:
        accs = meta.get("accuracy_sources") or [_accuracy(m, x, y) for m in loaded]
        result = _accuracy(merged_model, x, y)
        meta["accuracy"] = {"sources": accs, "merged": result}
        worst_src = min(accs)
        if result < COLLAPSE_RATIO * worst_src:
            warnings.warn(
                f"the {method} merge collapsed: accuracy {result:.3f} on data, while the worst "
                f"source reaches {worst_src:.3f} (sources: {', '.join(f'{a:.3f}' for a in accs)})"
                "; independently trained models need align='activations' (or 'weights') and "
                "repair=..., fine-tunes need a shared base", MergeCollapseWarning, stacklevel=2)
    meta.pop("accuracy_sources", None)
    attach(merged_model, meta)
    return merged_model


def _greedy_soup(models, sources, paths, mask, probe, x, y, meta) -> list[np.ndarray]:
    """Greedy soup (Wortsman et al., 2022): rank by held-out accuracy, add a model only if
    the uniform average of the soup so far plus that model is strictly more accurate."""
    linear = merge_methods.get("linear")
    accs = [_accuracy(m, x, y) for m in models]
    order = sorted(range(len(models)), key=lambda i: -accs[i])
    soup = [order[0]]
    best = accs[order[0]]
    trace = [{"model": order[0], "accuracy": best, "accepted": True}]

    def average(members):
        w = [1.0 / len(members)] * len(members)
        return [np.asarray(linear([sources[j][i] for j in members], weights=w)).astype(
                    sources[0][i].dtype) if mask[i] else np.array(sources[0][i], copy=True)
                for i in range(len(paths))]

    arrays = average(soup)
    for i in order[1:]:
        cand = average(soup + [i])
        _assign(probe, cand)
        acc = _accuracy(probe, x, y)
        accepted = acc > best and math.isfinite(acc)
        trace.append({"model": i, "accuracy": acc, "accepted": accepted})
        if accepted:
            soup, best, arrays = soup + [i], acc, cand
    meta["greedy_soup"] = {"ingredients": sorted(soup), "trace": trace}
    meta["accuracy_sources"] = accs
    return arrays

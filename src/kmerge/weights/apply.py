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

from kmerge.arguments import integer, labels, model_inputs, outputs
from kmerge.errors import (
    InvalidArgumentError,
    InvalidModelError,
)
from kmerge.metadata import attach, derivation, meta_of
from kmerge.weights.methods import merge_methods, supplied_params
from kmerge.weights.methods.slerp import interpolation_t
from kmerge.weights.methods.sparse import kth_largest
from kmerge.weights.statistics import (
    dense_grams,
    fisher_diagonals,
    output_kind,
    predict_numpy,
)
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
    variable_paths,
)

__all__ = ["merge_weights", "MergeCollapseWarning", "method_names", "COLLAPSE_RATIO"]

ALIGN_METHODS = ("weights", "activations", "zip", "auto")
REPAIR_METHODS = ("bn", "repair")
#: A merge whose accuracy is below this fraction of the worst source's warns ("collapse").
COLLAPSE_RATIO = 0.75
#: Examples in the probe batch every merge is run on (the first of ``data``, else synthetic).
PROBE_EXAMPLES = 64


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


def accuracy(model, x, y, p: np.ndarray | None = None) -> float:
    """``model``'s accuracy on ``(x, y)`` (``p``: its predictions, when already computed);
    integer or one-hot labels, one sigmoid unit or a softmax."""
    p = predict_numpy(model, x) if p is None else p
    y = np.asarray(y)
    truth = y.argmax(-1) if y.ndim > 1 and y.shape[-1] > 1 else y.reshape(-1)
    if p.ndim == 1 or p.shape[-1] == 1:
        pred = (p.reshape(-1) > (0.5 if p.min() >= 0 and p.max() <= 1 else 0.0)).astype(int)
    else:
        pred = p.argmax(-1)
    return float(np.mean(pred == truth))


# ----------------------------------------------------------------------------- core


def resolved_params(method: str, method_params: Mapping[str, Any],
                    weights: Sequence[float] | None, norm_w: list[float]) -> dict:
    """The method parameters a merge runs with: slerp given ``weights=`` (and no ``t``)
    interpolates at ``t = w_b / (w_a + w_b)``; ``t`` and ``weights=`` together are refused.
    Shared by in-memory and streamed merges."""
    out = dict(method_params)
    if method == "slerp" and weights is not None:
        if "t" in method_params:
            raise InvalidArgumentError(
                "slerp takes its interpolation factor from t= or from weights= (t = w_b / (w_a "
                f"+ w_b)), not both; received t={method_params['t']!r} and weights="
                f"{list(weights)!r}: drop one")
        out["t"] = interpolation_t(norm_w)
    return out


def tensor_kwargs(supplied: dict, path: str, method_params: dict,
                  params: list[tuple[str, re.Pattern, dict]], *, weights, base=None,
                  fishers=None, grams=None, thresholds=None) -> dict:
    """A method's keyword arguments for one tensor: the user's parameters, the per-tensor
    regex overrides matching ``path``, and what the method takes of the supplied values."""
    kwargs = dict(method_params)
    for _, rx, overrides in params:
        if rx.fullmatch(path):
            kwargs.update(overrides)
    values = {"weights": weights, "base": base, "path": path, "fishers": fishers, "grams": grams,
              "thresholds": thresholds}
    kwargs.update({k: v for k, v in values.items() if k in supplied})
    return kwargs


def _merge_arrays(method: str, fn, sources: list[list[np.ndarray]], paths: list[str],
                  merge_mask: list[bool], *, weights: list[float],
                  base: list[np.ndarray] | None, method_params: dict,
                  params: list[tuple[str, re.Pattern, dict]],
                  fishers: list[list[np.ndarray]] | None = None,
                  grams: list[dict[int, np.ndarray]] | None = None,
                  thresholds: list[float] | None = None) -> list[np.ndarray]:
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
                               grams=gram, thresholds=thresholds)
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


def statistic_indices(model) -> list[int]:
    """Indices in ``model.weights`` of the statistics a merge must keep valid: the moving
    mean/variance of BatchNormalization layers and the mean/variance of Normalization layers
    (non-trainable, float; a variance must stay >= 0)."""
    import keras

    from kmerge.weights.validate import leaf_layers

    ids = set()
    for layer in leaf_layers(model):
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.Normalization)):
            ids.update(id(v) for v in layer.non_trainable_weights if is_float(v.dtype))
    return [i for i, v in enumerate(model.weights) if id(v) in ids]


def model_thresholds(sources: list[list[np.ndarray]], base: list[np.ndarray],
                     indices: Sequence[int], density: float) -> list[float]:
    """TIES with ``scope="model"``: per model, the magnitude its top ``density`` fraction of
    task-vector entries reaches over every merged tensor (``indices``) at once."""
    out = []
    for src in sources:
        mags = np.concatenate([np.abs(np.asarray(src[i], np.float64) - np.asarray(
            base[i], np.float64)).ravel() for i in indices]) if indices else np.zeros(0)
        out.append(kth_largest(mags, density))
        del mags
    return out


def synthetic_probe(model, n: int = PROBE_EXAMPLES) -> list[np.ndarray]:
    """A deterministic probe batch from the model's input spec: standard normal floats,
    zeros for integer inputs (token ids), unknown dimensions set to 8."""
    from kmerge.graph.rebuild import input_specs

    rng = np.random.default_rng(0)
    out = []
    for shape, dtype, _ in input_specs(model):
        dims = (n, *(8 if d is None else int(d) for d in shape))
        kind = np.dtype(dtype.replace("bfloat16", "float32")).kind
        out.append(rng.standard_normal(dims).astype(dtype) if kind == "f"
                   else np.zeros(dims, dtype))
    return out


def _non_finite(arrays: list[np.ndarray]) -> int:
    return sum(int(np.size(a) - np.count_nonzero(np.isfinite(a))) for a in arrays
               if np.asarray(a).dtype.kind in "fc")


def first_non_finite_layer(model, xs: list[np.ndarray]) -> str | None:
    """Where ``model`` first produces NaN/Inf on ``xs``: the first call (graph order) whose
    output is not finite, its class, and why when it can tell (a BatchNormalization with
    negative variance, an overflow of finite inputs). None for subclassed models."""
    import keras

    from kmerge.graph.compiled import predict
    from kmerge.graph.replay import is_graph_model
    from kmerge.weights.matching import tap_model
    from kmerge.weights.spec import spec_walk

    if not is_graph_model(model):
        return None
    try:
        walk = spec_walk(model)
        taps = [(n, j, "out") for n, node in enumerate(walk.nodes)
                for j in range(len(node.outputs))]
        sub, _ = tap_model(walk, taps)
        values = dict(zip(walk.inputs, xs))
        for (n, j, _), out in zip(taps, predict(sub, xs)):
            values[walk.nodes[n].outputs[j]] = out
    except Exception:  # a graph kmerge cannot tap: the output check still stands
        return None
    for node in walk.nodes:
        outs = [values[t] for t in node.outputs if t in values]
        if not _non_finite(outs):
            continue
        layer = walk.layers[node.layer]
        what = f"{walk.names[node.layer]!r} ({type(layer).__name__})"
        if isinstance(layer, keras.layers.BatchNormalization):
            var = np.asarray(keras.ops.convert_to_numpy(layer.moving_variance))
            if np.any(var + layer.epsilon < 0):
                return (f"{what}: {int(np.sum(var + layer.epsilon < 0))} of its {var.size} "
                        "moving_variance entries are negative")
        ins = [values[t] for t in node.inputs if t in values]
        if ins and not _non_finite(ins):
            floats = [np.asarray(a) for a in ins if np.asarray(a).dtype.kind in "fc"]
            big = max((float(np.max(np.abs(a))) for a in floats if a.size), default=0.0)
            return (f"{what}: its inputs are finite (largest magnitude {big:.3g}) but its "
                    "output is not (overflow)")
        return what
    return None


def check_outputs(merged, sources: list, names: list[str], x: Any, method: str,
                  outs: list[np.ndarray] | None = None) -> dict:
    """Run the merge once on a probe batch (``x``'s first :data:`PROBE_EXAMPLES` examples,
    else :func:`synthetic_probe`) through the compiled stateless path; refuse NaN/Inf outputs,
    naming the first layer that produced them. ``outs``: the merge's outputs on all of ``x``
    when they were computed anyway (no second pass)."""
    if x is not None:
        xs = x if isinstance(x, list) else [x]
        xs = [np.asarray(a)[:PROBE_EXAMPLES] for a in xs] if outs is None else xs
        origin = "data"
    else:
        origin = "synthetic"
        try:
            xs = synthetic_probe(merged)
            outs = outputs(merged, xs, "probe")
        except Exception as exc:  # kmerge's made-up inputs do not fit this model: no check
            return {"inputs": origin, "skipped": f"{type(exc).__name__}: {exc}"[:300]}
    if outs is None:
        outs = outputs(merged, xs, "probe")
    record = {"inputs": origin, "examples": int(len(xs[0])), "finite": True}
    bad = _non_finite(outs)
    if not bad:
        return record
    # the examples that went wrong (the first PROBE_EXAMPLES of them) for the diagnosis
    rows = np.zeros(len(xs[0]), bool)
    for o in outs:
        if np.asarray(o).dtype.kind in "fc":
            rows |= ~np.isfinite(np.asarray(o).reshape(len(o), -1)).all(axis=1)
    xs = [np.asarray(a)[np.flatnonzero(rows)[:PROBE_EXAMPLES]] for a in xs]
    culprits = [n for n, s in zip(names, sources) if _non_finite(outputs(s, xs, "probe"))]
    if culprits and origin == "synthetic":
        record.update(finite=False, note=f"the sources {', '.join(culprits)} give NaN/Inf on "
                      "the synthetic probe too: pass data= to check the merge")
        return record
    if culprits:
        raise InvalidArgumentError(
            f"the {method} merge gives NaN/Inf outputs on data x, and so do the sources "
            f"{', '.join(culprits)}: fix the data or those models")
    layer = first_non_finite_layer(merged, xs)
    where = (f"the first layer producing them is {layer}" if layer is not None else
             "kmerge cannot name the layer of a subclassed model")
    raise InvalidArgumentError(
        f"the {method} merge of {', '.join(names)} is finite in every weight but its outputs "
        f"hold {bad} NaN/Inf value(s) on the {origin} probe ({len(xs[0])} examples) while "
        f"every source's are finite; {where}. Nothing was returned: lower scale (or p for "
        "dare), check BatchNorm statistics (repair='bn' recomputes them on data), or use "
        "method='linear'")


def _assign(clone, arrays: list[np.ndarray]) -> None:
    for v, a in zip(clone.weights, arrays):
        v.assign(np.array(a, copy=True))


def merge_weights(models: Sequence[Any], *, method: str, base: Any = None,
                  weights: Sequence[float] | None = None, align: str | None = None,
                  data: Any = None, repair: str | None = None,
                  params: Mapping[str, Mapping[str, Any]] | None = None,
                  exclude: Sequence[str] | None = None, zip_until: str | None = None,
                  **method_params: Any):
    """Merge models of one architecture into one model of that architecture.

    Args:
        models: Two or more ``keras.Model`` objects (or paths, loaded with
            :func:`kmerge.load`) of the same architecture. With ``method="slerp"``, exactly two.
        method: One of ``linear``, ``slerp``, ``task_arithmetic``, ``ties``, ``dare``,
            ``fisher``, ``regmean`` (see :mod:`kmerge.weights.methods`) or ``greedy_soup``.
        base: The pretrained model the sources were fine-tuned from (model or path); needed by
            ``task_arithmetic``, ``ties`` and ``dare``, refused by the others.
        weights: One non-negative weight per model (normalised to sum 1); default uniform.
            ``slerp`` interpolates at ``t = w_b / (w_a + w_b)`` (``t`` and ``weights`` together
            are refused).
        align: ``"weights"`` or ``"activations"``: permute every model's hidden units to match
            the first before merging (:func:`kmerge.align`). ``"zip"``: ZipIt!, partial up to
            ``zip_until`` (:func:`kmerge.weights.zip.zip_merge`); ``"auto"``: every alignment
            and repair tried, the best on ``data=(x, y)`` kept (see docs/alignment.md).
        data: ``x`` or ``(x, y)``. Needed by ``fisher``, ``regmean`` (x), ``greedy_soup``
            ((x, y) held out), ``align="activations"`` and ``repair``. With labels, the
            accuracy of every source and of the result is recorded, and a
            :class:`MergeCollapseWarning` is emitted when the result falls below
            ``COLLAPSE_RATIO`` (0.75) times the worst source's accuracy.
        repair: ``"bn"`` (recompute BatchNorm statistics) or ``"repair"`` (REPAIR, toward the
            sources' statistics interpolated with the merge's coefficients) after merging, on
            ``data``.
        params: Per-tensor overrides: ``{regex: {parameter: value}}``; a regex is matched
            (``re.fullmatch``) against each variable path (``"dense_1/kernel"``); later
            entries win. Every regex must match some variable.
        exclude: Regexes of layer names or variable paths whose variables are copied from the
            first model untouched (e.g. an embedding whose vocabulary differs between models:
            same shapes, different meaning, which no weight check can detect).
        **method_params: The method's parameters (``t``, ``scale``, ``density``, ``scope``,
            ``p``, ``seed``, ``then``, ``floor``, ``outputs``, ``normalize``, ``favor_target``,
            ``alpha``, ``samples``); unknown names are refused.

    Returns:
        A new model of the first model's architecture. ``kmerge.info(merged)`` holds the
        method, parameters, normalised weights, source paths, per-variable drift (relative L2
        distance to each source), the statistics averaged instead of merged (BatchNorm
        moving mean/variance: never extrapolated by task vectors), the probe pass, REPAIR's
        report (``repair_report``) and, with labelled data, accuracies; :func:`kmerge.save`
        writes it into the file. The sources are not modified.

    Raises:
        InvalidArgumentError: Unknown method or parameter, bad weights or parameter values,
            missing ``base`` or ``data``, a NaN/Inf weight, NaN/Inf outputs on the probe
            batch (the first layer producing them named), ``fisher`` on a model that does
            not say whether it outputs probabilities or logits (pass ``outputs=``).
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
    if align in ("zip", "auto"):  # feature merging / best-of: kmerge.weights.zip
        from kmerge.weights.zip import merge_zip

        return merge_zip(models, method=method, align=align, base=base, weights=weights,
                         data=data, repair=repair, zip_until=zip_until, params=params,
                         exclude=exclude, **method_params)
    if zip_until is not None:
        raise InvalidArgumentError("zip_until= goes with align='zip' or align='auto'")
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
    ties_model = method == "ties" and method_params.get("scope") == "model"
    for pat, _, overrides in compiled_params if method == "ties" else []:
        for key in ("scope", "density") if ties_model else ("scope",):
            if key in overrides:
                raise InvalidArgumentError(
                    f"params[{pat!r}] sets {key!r}: TIES's scope applies to the whole merge, and "
                    "scope='model' trims each whole task vector with one density; per-tensor "
                    "density needs scope='tensor'")
    # scope='model' needs thresholds the quick check cannot have: check the rest per tensor
    check_fast(method, fn, n, norm_w, base is not None,
               {**method_params, "scope": "tensor"} if ties_model else method_params,
               {p: o for p, _, o in compiled_params})
    run_params = resolved_params(method, method_params, weights, norm_w)
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
    if method == "fisher":  # before any expensive step: refuse a model that does not say
        kinds = [output_kind(m, method_params.get("outputs")) for m in loaded]
    if align_fn is not None:
        loaded = [loaded[0]] + [align_fn(loaded[0], m, method=align, data=x) for m in loaded[1:]]

    ref = loaded[0]
    paths = variable_paths(ref)  # canonical: the same from files (merge_weights_files)
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
    stats = [i for i in statistic_indices(ref) if mask[i]]
    method_mask = [m and i not in stats for i, m in enumerate(mask)]
    sources = [[to_numpy(v) for v in m.weights] for m in loaded]
    # the merge's coefficient per source: what statistics are averaged with and REPAIR's
    # interpolation targets use
    coeffs = ([1.0 - float(run_params.get("t", 0.5)), float(run_params.get("t", 0.5))]
              if method == "slerp" else list(norm_w))

    meta: dict[str, Any] = {
        "kind": "weights", "method": method, "method_params": dict(method_params),
        "params": {p: o for p, _, o in compiled_params}, "exclude": [p for p, _ in excl],
        "weights": norm_w, "align": align, "repair": repair,
        "source_names": [m.name for m in loaded],
        **ancestry,
        "excluded_variables": sorted(excluded),
        **({"t": float(run_params.get("t", 0.5))} if method == "slerp" else {}),
        **({"statistics": {"variables": [paths[i] for i in stats],
                           "rule": "weighted average with the merge's coefficients"}}
           if stats and method != GREEDY else {}),
        "copied_non_float": [p for p, f in zip(paths, float_vars) if not f],
    }
    merged_model = _clone(ref)

    # --- merge
    if method == GREEDY:
        arrays = _greedy_soup(loaded, sources, paths, mask, merged_model, x, y, meta)
        members = meta["greedy_soup"]["ingredients"]
        coeffs = [1.0 / len(members) if i in members else 0.0 for i in range(n)]
    else:
        base_arrays = [to_numpy(v) for v in base_model.weights] if base_model is not None else None
        fishers = grams = thresholds = None
        method_w = norm_w
        if method == "fisher":
            samples = integer(method_params.get("samples", 256), "samples")
            fishers = [fisher_diagonals(m, x, samples=samples, kind=k)
                       for m, k in zip(loaded, kinds)]
            meta["fisher_outputs"] = [k.decided_by for k in kinds]
            if method_params.get("normalize"):
                method_w = _fisher_normalised(norm_w, fishers, method_mask, names)
        if method == "regmean":
            samples = integer(method_params.get("samples", 256), "samples")
            grams = [dense_grams(m, x, samples=samples) for m in loaded]
            meta["regmean_kernels"] = [paths[i] for i in sorted(grams[0])]
        if ties_model:
            thresholds = model_thresholds(
                sources, base_arrays, [i for i, m in enumerate(method_mask) if m],
                float(method_params.get("density", 0.2)))
            meta["ties_thresholds"] = thresholds
        arrays = _merge_arrays(method, fn, sources, paths, method_mask, weights=method_w,
                               base=base_arrays, method_params=run_params,
                               params=compiled_params, fishers=fishers, grams=grams,
                               thresholds=thresholds)
        linear = merge_methods.get("linear")
        for i in stats:  # statistics stay statistics: averaged, never extrapolated
            arrays[i] = np.asarray(linear([s[i] for s in sources], weights=coeffs)).astype(
                sources[0][i].dtype)
    refuse_non_finite(arrays, paths, sources, names, method)
    _assign(merged_model, arrays)

    if repair_fn is not None:
        out = repair_fn(merged_model, loaded, method=repair, data=x, weights=coeffs)
        merged_model = out if out is not None else merged_model
        meta["repair_report"] = (meta_of(merged_model) or {}).get("repair")
        arrays = [to_numpy(v) for v in merged_model.weights]
        refuse_non_finite(arrays, paths, sources, names, f"repair={repair!r}")

    drift = _drift(arrays, sources, paths, mask)
    meta["drift"] = drift
    if drift:
        worst = max(drift, key=lambda k: max(drift[k]))
        meta["max_drift"] = {"variable": worst, "value": max(drift[worst])}
    meta.update(result_checks(merged_model, loaded, names, method, x, y,
                              sources_accuracy=meta.pop("accuracy_sources", None), stacklevel=3))
    attach(merged_model, meta)
    return merged_model


def result_checks(merged, sources: list, names: list[str], method: str, x: Any, y: Any, *,
                  sources_accuracy: list[float] | None = None, stacklevel: int = 2) -> dict:
    """What a weight merge records about its result (``{"probe": ...}``, with labels also
    ``{"accuracy": {"sources": [...], "merged": ...}}``): one compiled forward pass on a probe
    batch (finite weights can still give NaN outputs: refused, naming the first layer), and
    with ``y`` the accuracy of every source and of the merge on ``(x, y)``, warning
    (:class:`MergeCollapseWarning`) when the merge falls below :data:`COLLAPSE_RATIO` times the
    worst source. Used by :func:`merge_weights` and for merges streamed from files."""
    merged_out = predict_numpy(merged, x) if y is not None else None
    out: dict[str, Any] = {"probe": check_outputs(merged, sources, names, x, method,
                                                  None if merged_out is None else [merged_out])}
    if y is None:
        return out
    accs = sources_accuracy or [accuracy(m, x, y) for m in sources]
    result = accuracy(merged, x, y, merged_out)
    out["accuracy"] = {"sources": accs, "merged": result}
    worst_src = min(accs)
    if result < COLLAPSE_RATIO * worst_src:
        warnings.warn(
            f"the {method} merge collapsed: accuracy {result:.3f} on data, while the worst "
            f"source reaches {worst_src:.3f} (sources: {', '.join(f'{a:.3f}' for a in accs)})"
            "; independently trained models need align='activations' (or 'weights') and "
            "repair=..., fine-tunes need a shared base", MergeCollapseWarning,
            stacklevel=stacklevel)
    return out


def _fisher_normalised(weights: list[float], fishers: list[list[np.ndarray]],
                       mask: list[bool], names: list[str]) -> list[float]:
    """mmatena/model_merging's normalisation: each model's weight divided by the L2 norm of
    its whole Fisher (over the merged variables)."""
    out = []
    for w, f, name in zip(weights, fishers, names):
        norm = math.sqrt(sum(float(np.sum(np.square(f[i], dtype=np.float64)))
                             for i, m in enumerate(mask) if m))
        if not norm > 0:
            raise InvalidArgumentError(
                f"fisher normalize=True: {name} has zero Fisher on data x, so it cannot be "
                "normalised; pass data the model responds to, or normalize=False")
        out.append(w / norm)
    return out


def _greedy_soup(models, sources, paths, mask, probe, x, y, meta) -> list[np.ndarray]:
    """Greedy soup (Wortsman et al., 2022): rank by held-out accuracy, add a model only if
    the uniform average of the soup so far plus that model is strictly more accurate."""
    linear = merge_methods.get("linear")
    accs = [accuracy(m, x, y) for m in models]
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
        acc = accuracy(probe, x, y)
        accepted = acc > best and math.isfinite(acc)
        trace.append({"model": i, "accuracy": acc, "accepted": accepted})
        if accepted:
            soup, best, arrays = soup + [i], acc, cand
    meta["greedy_soup"] = {"ingredients": sorted(soup), "trace": trace}
    meta["accuracy_sources"] = accs
    return arrays

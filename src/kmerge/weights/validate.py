"""Checking weight-merge arguments before any math: the method and its parameters, source
weights, tensor patterns, and that the sources share one architecture (one message naming
the first difference). Shared by in-memory merges and streamed file merges."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kmerge.errors import (
    IncompatibleModelsError,
    InvalidArgumentError,
    InvalidModelError,
)
from kmerge.weights.methods import merge_methods, supplied_params, user_params

GREEDY = "greedy_soup"
DATA_METHODS = ("fisher", "regmean", GREEDY)
IGNORED_CONFIG_KEYS = {"name", "trainable", "seed"}


def method_names() -> list[str]:
    """Every method ``merge_weights`` accepts: the registered ones and ``greedy_soup``."""
    return sorted([*merge_methods.names(), GREEDY])


# ----------------------------------------------------------------------------- validation


def resolve_method(method: Any):
    if method == GREEDY:
        return None
    if method not in merge_methods:
        from difflib import get_close_matches

        close = get_close_matches(str(method), method_names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InvalidArgumentError(
            f"unknown merge method {method!r}.{hint} Valid merge methods: "
            f"{', '.join(method_names())}")
    return merge_methods.get(method)


def check_param_names(method: str, fn, given: Mapping[str, Any], where: str) -> None:
    """Every name is a parameter of the method, and every value has its default's type (an
    integer where the default is an int, a finite number where it is a float, ...)."""
    defaults = user_params(fn) if fn is not None else {}
    for name, value in given.items():
        if name not in defaults:
            listing = ", ".join(defaults) if defaults else "none"
            raise InvalidArgumentError(
                f"{where}: unknown parameter {name!r} for method {method!r}; valid parameters: "
                f"{listing}")
        _check_type(method, name, value, defaults[name], where)


def _check_type(method: str, name: str, value: Any, default: Any, where: str) -> None:
    from kmerge.arguments import number

    label = f"{where}: {method}: {name}"
    if default is None or default is inspect.Parameter.empty:
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"{label} must be true or false; received {value!r}")
    elif isinstance(default, int):
        number(value, label, integer=True)
    elif isinstance(default, float):
        number(value, label)
    elif isinstance(default, str) and not isinstance(value, str):
        raise InvalidArgumentError(f"{label} must be a string; received {value!r}")


def normalise_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    from kmerge.arguments import normalised_weights

    return normalised_weights(weights, n, what="model")


def compile_patterns(patterns, what: str) -> list[tuple[str, re.Pattern]]:
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise InvalidArgumentError(f"{what}: patterns must be regular-expression strings; "
                                       f"received {p!r}")
        try:
            out.append((p, re.compile(p)))
        except re.error as exc:
            raise InvalidArgumentError(f"{what}: {p!r} is not a valid regular expression "
                                       f"({exc})") from None
    return out


def path_candidates(path: str) -> list[str]:
    """Every contiguous piece of a variable path ('m/dense/kernel' -> m, dense, m/dense, ...),
    so a pattern can name a layer, a nested layer path or the whole variable path."""
    parts = path.split("/")
    return ["/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]


def split_data(data: Any) -> tuple[Any, Any]:
    if data is None:
        return None, None
    if isinstance(data, tuple):
        if len(data) == 2:
            return data
        if len(data) == 1:
            return data[0], None
        raise InvalidArgumentError(f"data must be x or a tuple (x, y); received a tuple of "
                                   f"{len(data)} items")
    return data, None


def check_fast(method: str, fn, n: int, weights: list[float], base: bool,
                method_params: dict, params: dict) -> None:
    """Run the method once on 1-element tensors so bad parameter values (density=2, slerp
    with three models) fail in milliseconds, before models are loaded or data is used."""
    if fn is None:
        return
    sup = supplied_params(fn)
    kwargs: dict[str, Any] = {"weights": weights, "path": ""}
    if "base" in sup:
        kwargs["base"] = np.zeros(1)
    if "fishers" in sup:
        kwargs["fishers"] = [np.ones(1)] * n
    kwargs = {k: v for k, v in kwargs.items() if k in sup}
    for overrides in [{}, *params.values()]:
        fn([np.zeros(1)] * n, **kwargs, **{**method_params, **overrides})


# ----------------------------------------------------------------------------- models


def as_model(m: Any, what: str):
    import keras

    if isinstance(m, (str, os.PathLike)):
        from kmerge.io import load

        return load(m)
    if not isinstance(m, keras.Model):
        raise InvalidModelError(f"{what} must be a keras.Model or the path of a saved model; "
                                f"received {type(m).__name__}")
    return m


def leaf_layers(model) -> list:
    out = []
    for layer in getattr(model, "layers", []):
        if type(layer).__name__ == "InputLayer":
            continue
        if getattr(layer, "layers", None):
            out.extend(leaf_layers(layer))
        else:
            out.append(layer)
    return out


def clean_config(obj: Any) -> Any:
    """A layer config without what does not change the function: names, seeds, initializers,
    trainable flags. A dtype policy stays, as its name ("mixed_float16" vs "float32" is another
    computation): the generic rule would drop its ``name``."""
    if isinstance(obj, dict) and str(obj.get("class_name", "")).endswith("DTypePolicy"):
        return f"dtype policy {obj.get('config', {}).get('name')}"
    if isinstance(obj, dict):
        return {k: clean_config(v) for k, v in obj.items()
                if k not in IGNORED_CONFIG_KEYS and not k.endswith("_initializer")}
    if isinstance(obj, (list, tuple)):
        return [clean_config(v) for v in obj]
    return obj


def first_config_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{prefix}{k}"
            d = first_config_difference(a[k], b[k], f"{prefix}{k}.")
            if d is not None:
                return d
        return None
    return None if a == b else prefix.rstrip(".") or "<value>"


def dig(cfg: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(cfg, dict) or k not in cfg:
            return "<absent>"
        cfg = cfg[k]
    return cfg


def check_compatible(models: Sequence[Any], names: Sequence[str]) -> None:
    """Refuse models that are not the same architecture; the first difference is named.

    Raises:
        IncompatibleModelsError: Layer classes, variable counts or shapes, or layer configs
            (apart from names, seeds, initializers and trainable flags) differ.
    """
    fix = ("weight merges need one architecture; merge different models with kmerge.parallel "
           "or kmerge.fuse instead")
    ref, ref_name = models[0], names[0]
    ref_layers = leaf_layers(ref)
    for other, name in zip(models[1:], names[1:]):
        layers = leaf_layers(other)
        for i, (la, lb) in enumerate(zip(ref_layers, layers)):
            ca, cb = type(la).__name__, type(lb).__name__
            if ca != cb:
                raise IncompatibleModelsError(
                    f"{ref_name} and {name} differ at layer #{i}: {la.name!r} is {ca} in "
                    f"{ref_name} but {lb.name!r} is {cb} in {name}; {fix}")
            wa, wb = la.weights, lb.weights
            for va, vb in zip(wa, wb):
                if tuple(va.shape) != tuple(vb.shape):
                    raise IncompatibleModelsError(
                        f"{ref_name} and {name} differ at layer {la.name!r} ({ca}), variable "
                        f"{va.path!r}: shape {tuple(va.shape)} in {ref_name} but "
                        f"{tuple(vb.shape)} in {name} ({vb.path!r}); {fix}")
            if len(wa) != len(wb):
                raise IncompatibleModelsError(
                    f"{ref_name} and {name} differ at layer {la.name!r} ({ca}): {len(wa)} "
                    f"variables in {ref_name} ({[v.path for v in wa]}) but {len(wb)} in {name} "
                    f"({[v.path for v in wb]}); {fix}")
            cfa, cfb = clean_config(la.get_config()), clean_config(lb.get_config())
            diff = first_config_difference(cfa, cfb)
            if diff is not None:
                how = fix if diff != "dtype" else (
                    "a merge would silently compute in one of them; build both with one dtype "
                    "policy (keras.config.set_dtype_policy) and copy the weights in")
                raise IncompatibleModelsError(
                    f"{ref_name} and {name} differ at layer {la.name!r} ({ca}): config "
                    f"{diff!r} is {dig(cfa, diff)!r} in {ref_name} but {dig(cfb, diff)!r} in "
                    f"{name}; {how}")
        if len(layers) != len(ref_layers):
            longer, short = (ref_layers, layers) if len(ref_layers) > len(layers) else (layers, ref_layers)
            extra = longer[len(short)]
            raise IncompatibleModelsError(
                f"{ref_name} has {len(ref_layers)} layers but {name} has {len(layers)}; the "
                f"first layer without a counterpart is {extra.name!r} ({type(extra).__name__}); "
                f"{fix}")
        if len(other.weights) != len(ref.weights):
            raise IncompatibleModelsError(
                f"{ref_name} has {len(ref.weights)} variables but {name} has "
                f"{len(other.weights)}; {fix}")
        for va, vb in zip(ref.weights, other.weights):
            if tuple(va.shape) != tuple(vb.shape):
                raise IncompatibleModelsError(
                    f"{ref_name} and {name} differ at variable {va.path!r}: shape "
                    f"{tuple(va.shape)} in {ref_name} but {tuple(vb.shape)} in {name}; {fix}")
            if str(va.dtype) != str(vb.dtype):
                raise IncompatibleModelsError(
                    f"{ref_name} and {name} store variable {va.path!r} as {va.dtype} and "
                    f"{vb.dtype}: a merge would silently round one of them; load both with one "
                    "dtype policy (e.g. rebuild the float16 model in float32 and copy its "
                    "weights) and merge again")

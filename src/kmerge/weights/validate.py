"""Checking weight-merge arguments before any math: the method and its parameters, source
weights, tensor patterns, and that the sources share one architecture (one message naming
the first difference). Shared by in-memory merges and streamed file merges."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
#: Config keys that do not change what a layer computes: names, seeds, trainable flags and
#: the ids Keras writes when it serializes a shared object (``shared_object_id``: differs
#: between processes). Keys ending in ``_initializer``, ``_regularizer`` or ``_constraint``
#: are ignored too (they act at build time or during training, never in a forward pass).
IGNORED_CONFIG_KEYS = {"name", "trainable", "seed", "shared_object_id"}
IGNORED_CONFIG_SUFFIXES = ("_initializer", "_regularizer", "_constraint")


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
    """A layer config without what does not change the function (:data:`IGNORED_CONFIG_KEYS`
    and keys ending in :data:`IGNORED_CONFIG_SUFFIXES`, at any depth). A dtype policy stays,
    as its name ("mixed_float16" vs "float32" is another computation): the generic rule
    would drop its ``name``."""
    if isinstance(obj, dict) and str(obj.get("class_name", "")).endswith("DTypePolicy"):
        return f"dtype policy {obj.get('config', {}).get('name')}"
    if isinstance(obj, dict):
        return {k: clean_config(v) for k, v in obj.items()
                if k not in IGNORED_CONFIG_KEYS and not str(k).endswith(IGNORED_CONFIG_SUFFIXES)}
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


@dataclass
class ArchLayer:
    """One leaf layer as the architecture comparison sees it."""

    path: str  # layer names below the model, 'block_1/conv'
    cls: str
    config: Any  # clean_config of the serialized config (None: not comparable)
    variables: list[tuple[str, tuple]] | None  # (path, shape), or None when not known


_CONTAINERS = ("Functional", "Sequential", "Model")


def _config_layers(cfg: dict, prefix: str = "") -> list[ArchLayer]:
    out = []
    for layer in (cfg.get("config") or {}).get("layers") or []:
        if not isinstance(layer, dict):
            continue
        cls = str(layer.get("class_name", "?"))
        inner = layer.get("config") or {}
        name = str(inner.get("name", layer.get("name", "?")))
        if cls == "InputLayer":
            continue
        if cls in _CONTAINERS and isinstance(inner.get("layers"), list):
            out.extend(_config_layers(layer, f"{prefix}{name}/"))
        else:
            out.append(ArchLayer(prefix + name, cls, clean_config(inner), None))
    return out


def _model_layers(model) -> list[ArchLayer]:
    import keras

    out = []

    def walk(m, prefix: str) -> None:
        for layer in getattr(m, "layers", []):
            if type(layer).__name__ == "InputLayer":
                continue
            if getattr(layer, "layers", None):
                walk(layer, f"{prefix}{layer.name}/")
                continue
            try:
                cfg = clean_config(keras.saving.serialize_keras_object(layer).get("config"))
            except Exception:  # custom layers without a serializable config
                cfg = None
            out.append(ArchLayer(prefix + layer.name, type(layer).__name__, cfg,
                                 [(v.path, tuple(v.shape)) for v in layer.weights]))

    walk(model, "")
    return out


def architecture(model_or_config: Any) -> list[ArchLayer]:
    """The leaf layers (nested models inlined, input layers skipped) of a Keras model or of
    a serialized model config (a ``.keras`` archive's ``config.json``), in order."""
    if isinstance(model_or_config, dict):
        return _config_layers(model_or_config)
    return _model_layers(model_or_config)


def config_difference(a: Any, b: Any) -> tuple[str, Any, Any] | None:
    """The first key where two cleaned layer configs differ, with both values (None when
    they agree or either is unknown)."""
    if a is None or b is None:
        return None
    diff = first_config_difference(a, b)
    return None if diff is None else (diff, dig(a, diff), dig(b, diff))


def layer_config_difference(la, lb) -> tuple[str, Any, Any] | None:
    """:func:`config_difference` of two live layers (what :func:`same_architecture` compares
    per layer; :func:`kmerge.align` uses it too)."""
    import keras

    def cfg(layer):
        try:
            return clean_config(keras.saving.serialize_keras_object(layer).get("config"))
        except Exception:
            return None

    return config_difference(cfg(la), cfg(lb))


def same_architecture(a: Any, b: Any, names: Sequence[str] = ("models[0]", "models[1]"), *,
                      fix: str | None = None) -> None:
    """Refuse two models (or two ``config.json`` configs) that do not compute the same kind of
    function; the first difference is named.

    The one architecture comparison of weight merges: :func:`kmerge.merge_weights`,
    :func:`kmerge.align` and :func:`kmerge.weights.merge_weights_files` all use it. Leaf
    layers are compared in order (nested models inlined, input layers skipped, so a
    Sequential and its Functional twin compare equal): class, variable shapes (when known)
    and config. Ignored: names, seeds, ``trainable``, serialization ids
    (``shared_object_id``, different in every process), initializers, regularizers and
    constraints. Kept: everything else, the dtype policy included.

    Raises:
        IncompatibleModelsError: naming the layer, and the config key and both values (or
            the classes, or the variable and both shapes).
    """
    fix = fix or ("weight merges need one architecture; merge different models with "
                  "kmerge.parallel or kmerge.fuse instead")
    na, nb = names[0], names[1]
    la, lb = architecture(a), architecture(b)
    for i, (x, y) in enumerate(zip(la, lb)):
        if x.cls != y.cls:
            raise IncompatibleModelsError(
                f"{na} and {nb} differ at layer #{i}: {x.path!r} is {x.cls} in {na} but "
                f"{y.path!r} is {y.cls} in {nb}; {fix}")
        if x.variables is not None and y.variables is not None:
            for (pa, sa), (pb, sb) in zip(x.variables, y.variables):
                if sa != sb:
                    raise IncompatibleModelsError(
                        f"{na} and {nb} differ at layer {x.path!r} ({x.cls}), variable "
                        f"{pa!r}: shape {sa} in {na} but {sb} in {nb} ({pb!r}); {fix}")
            if len(x.variables) != len(y.variables):
                raise IncompatibleModelsError(
                    f"{na} and {nb} differ at layer {x.path!r} ({x.cls}): "
                    f"{len(x.variables)} variables in {na} ({[p for p, _ in x.variables]}) "
                    f"but {len(y.variables)} in {nb} ({[p for p, _ in y.variables]}); {fix}")
        diff = config_difference(x.config, y.config)
        if diff is not None:
            key, va, vb = diff
            how = fix if key != "dtype" else (
                "a merge would silently compute in one of them; build both with one dtype "
                "policy (keras.config.set_dtype_policy) and copy the weights in")
            raise IncompatibleModelsError(
                f"{na} and {nb} differ at layer {x.path!r} ({x.cls}): config {key!r} is "
                f"{va!r} in {na} but {vb!r} in {nb}; {how}")
    if len(la) != len(lb):
        longer = la if len(la) > len(lb) else lb
        extra = longer[min(len(la), len(lb))]
        raise IncompatibleModelsError(
            f"{na} has {len(la)} layers but {nb} has {len(lb)}; the first layer without a "
            f"counterpart is {extra.path!r} ({extra.cls}); {fix}")


def check_compatible(models: Sequence[Any], names: Sequence[str]) -> None:
    """Refuse models that are not the same architecture (:func:`same_architecture`), or
    whose variables differ in number, shape or dtype; the first difference is named.

    Raises:
        IncompatibleModelsError: Layer classes, variable counts or shapes, or layer configs
            (apart from names, seeds, initializers, regularizers, constraints, serialization
            ids and trainable flags) differ.
    """
    fix = ("weight merges need one architecture; merge different models with kmerge.parallel "
           "or kmerge.fuse instead")
    ref, ref_name = models[0], names[0]
    for other, name in zip(models[1:], names[1:]):
        same_architecture(ref, other, (ref_name, name), fix=fix)
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


# ----------------------------------------------------------------------------- names


def owned_variables(model) -> list[tuple[tuple[str, ...], Any, Any]]:
    """``(layer chain, owning layer, variable)`` for each of ``model.weights``: the chain
    holds the names of the layers from below the model down to the layer that owns the
    variable."""
    from kmerge import _keras

    owner: dict[int, Any] = {}
    parent: dict[int, Any] = {}
    for layer in _keras.sublayers(model):  # parents come before their sub-layers
        for sub in _keras.sublayers(layer)[1:]:
            parent[id(sub)] = layer
        for v in layer.weights:
            owner[id(v)] = layer
    out = []
    for v in model.weights:
        chain = []
        layer = own = owner.get(id(v), model)
        while layer is not None and layer is not model:
            chain.append(layer.name)
            layer = parent.get(id(layer))
        out.append((tuple(reversed(chain)), own, v))
    return out


def variable_name(v) -> str:
    return str(getattr(v, "name", "") or v.path.rsplit("/", 1)[-1])


def variable_paths(model) -> list[str]:
    """The canonical path of each of ``model.weights``: the names of the layers below the
    model, then the variable's name (``"dense_1/kernel"``, ``"block_1/bn/gamma"``).

    Unlike Keras's ``Variable.path``, it does not depend on how the model was built (a
    Sequential built in memory prefixes its own name, the same model loaded from a file
    does not; a nested model's layers lose their parent's name when loaded). Weight merges
    in memory and from files name variables this way: ``params`` and ``exclude`` patterns,
    the drift report, and the per-tensor seeds of DARE's masks.

    >>> variable_paths(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")],
    ...                                 name="m"))  # doctest: +SKIP
    ['d/kernel', 'd/bias']
    """
    return ["/".join((*chain, variable_name(v))) for chain, _, v in owned_variables(model)]

"""Repairs that let Keras 2 (``keras`` 2.0-2.15, ``tf.keras``, ``tf_keras``) ``.h5`` models load in Keras 3.

Keras 3 reads the legacy ``.h5`` layout but not every Keras 2 config in it: recurrent layers carry
``time_major``, ``SeparableConv2D`` carries unused ``kernel_*`` arguments, dtype policies were stored
as ``Policy`` dicts, nested functional models use Keras 2 node indices, very old Sequential
models have no ``InputLayer`` (or are a bare list of layers), a GRU without ``reset_after`` meant
``False``, and ``hard_sigmoid`` was another function. :func:`repair_config` rewrites the stored
``model_config`` JSON (or a ``model.to_json()`` file) so Keras 3 accepts it and computes what Keras 2
computed, one human-readable line per change; :func:`load_keras2` builds the model from the
repaired config and copies every weight from the file by layer name, checking each shape.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from kmerge.errors import ModelLoadError

__all__ = [
    "repair_config", "build_keras2", "load_keras2", "load_h5_weights", "read_h5_attr_list",
    "is_keras2_weights_file", "is_keras3_weights_file",
]

_MODEL_CLASSES = {"Functional", "Model", "Sequential"}
_RNN_CLASSES = {"LSTM", "GRU", "SimpleRNN", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D", "RNN"}
# Keras 3 defaults reset_after to True; Keras 2 before 2.1.5 had no such argument (and meant False).
_GRU_CLASSES = {"GRU", "GRUCell"}
# Arguments Keras 3 layers take through **kwargs rather than their signature.
_KWARGS_ACCEPTED: dict[str, set[str]] = {
    "LSTM": {"implementation"},
    "GRU": {"implementation"},
    "LSTMCell": {"implementation"},
    "GRUCell": {"implementation"},
    "LayerNormalization": {"rms_scaling"},
    "LeakyReLU": {"alpha"},
    "InputLayer": {"input_shape", "batch_input_shape"},
}
_ANY_LAYER_ACCEPTS = {"input_dim", "input_shape", "name", "trainable", "dtype", "autocast"}
# Keras 2 arguments with no effect in Keras 2 itself, so dropping them never changes the math.
_HARMLESS: dict[str, set[str]] = {
    "SeparableConv1D": {"kernel_initializer", "kernel_regularizer", "kernel_constraint"},
    "SeparableConv2D": {"kernel_initializer", "kernel_regularizer", "kernel_constraint"},
    "Embedding": {"input_length"},
}
# Keras 2 arguments Keras 3 lacks that are safe to drop only at their default value.
_DROP_AT_DEFAULT: dict[str, Any] = {"time_major": False, "groups": 1, "ragged": False}


def _layer_class(class_name: str) -> type | None:
    import keras

    cls = getattr(keras.layers, class_name, None)
    return cls if inspect.isclass(cls) and issubclass(cls, keras.layers.Layer) else None


def _accepted_args(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        names.update(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return names - {"self"}


def _inert(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {}


def _fix_dtype(name: str, cfg: dict, repairs: list[str]) -> None:
    dtype = cfg.get("dtype")
    if isinstance(dtype, dict) and dtype.get("class_name") in {"Policy", "PolicyV1"}:
        policy = dtype.get("config", {}).get("name", "float32")
        cfg["dtype"] = policy
        repairs.append(f"layer '{name}': dtype policy dict {dtype['class_name']} -> '{policy}'")


def _fix_initializers(obj: Any, name: str, repairs: list[str]) -> None:
    """Keras 2.0-2.2 ``VarianceScaling(distribution="normal")`` meant a truncated normal."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "VarianceScaling":
            c = obj.get("config", {})
            if c.get("distribution") == "normal":
                c["distribution"] = "truncated_normal"
                repairs.append(f"layer '{name}': VarianceScaling distribution 'normal' -> "
                               "'truncated_normal'")
        for v in obj.values():
            _fix_initializers(v, name, repairs)
    elif isinstance(obj, list):
        for v in obj:
            _fix_initializers(v, name, repairs)


def _fix_layer_args(class_name: str, name: str, cfg: dict, repairs: list[str], where: str) -> None:
    if "batch_input_shape" in cfg and class_name == "InputLayer":
        cfg["batch_shape"] = cfg.pop("batch_input_shape")
        repairs.append(f"layer '{name}': batch_input_shape -> batch_shape")
    if "input_dtype" in cfg:  # Keras 1/2.0 spelling
        dtype = cfg.pop("input_dtype")
        cfg.setdefault("dtype", dtype)
        repairs.append(f"layer '{name}': input_dtype -> dtype")
    axis = cfg.get("axis")
    if isinstance(axis, list) and len(axis) == 1 and class_name == "BatchNormalization":
        cfg["axis"] = int(axis[0])
        repairs.append(f"layer '{name}': axis {axis} -> {cfg['axis']}")
    if class_name in _RNN_CLASSES and cfg.get("time_major") is True:
        raise ModelLoadError(
            f"{where}: layer '{name}' ({class_name}) was saved with time_major=True, which "
            "Keras 3 does not support; re-save it in Keras 2 with time_major=False (transpose "
            "the input instead), or export it as a SavedModel")
    if class_name in _GRU_CLASSES and "reset_after" not in cfg:
        cfg["reset_after"] = False
        repairs.append(f"layer '{name}': no reset_after (Keras 2 before 2.1.5: the reset gate "
                       "applied before the recurrent matmul) -> reset_after=False (the Keras 3 "
                       "default, True, is another function)")
    if class_name in ("LSTM", "GRU", "LSTMCell", "GRUCell") and cfg.get("implementation", 2) != 2:
        # Keras 3 computes implementation 1 and 2 alike up to rounding, but does not save the
        # argument: a model kept at 1 would change in the last bit after any save and load.
        repairs.append(f"layer '{name}': implementation {cfg['implementation']!r} -> 2 (Keras 3 "
                       "does not save it; the same function up to float rounding)")
        cfg["implementation"] = 2
    cls = None if class_name == "Lambda" else _layer_class(class_name)
    if cls is None:  # custom class, or Lambda (Keras' own loader converts it)
        return
    accepted = _accepted_args(cls) | _KWARGS_ACCEPTED.get(class_name, set()) | _ANY_LAYER_ACCEPTS
    accepted |= {"batch_input_shape"}  # handled by the Sequential/Input repairs or Keras itself
    for key in [k for k in cfg if k not in accepted]:
        value = cfg[key]
        if key in _HARMLESS.get(class_name, set()) or _DROP_AT_DEFAULT.get(key, object()) == value \
                or _inert(value):
            del cfg[key]
            repairs.append(f"layer '{name}': dropped Keras 2 argument {key}={value!r}"
                           if not isinstance(value, dict)
                           else f"layer '{name}': dropped Keras 2 argument {key}")
        else:
            raise ModelLoadError(
                f"{where}: layer '{name}' ({class_name}) uses the Keras 2 argument "
                f"{key}={value!r}, which Keras 3 does not accept and kmerge cannot drop without "
                "changing the model; re-save the model from Keras 2 without it")


def _keras2_activation_name(value: Any) -> str | None:
    """The Keras 2 activation named by a config value (a string, or a serialized function)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("class_name") == "function" \
            and isinstance(value.get("config"), str):
        module = value.get("module")
        if module is None or module in ("builtins", "keras.activations") \
                or str(module).startswith(("keras.", "tf_keras.")):
            return value["config"]
    return None


def _fix_activations(name: str, cfg: dict, repairs: list[str]) -> None:
    """Replace Keras 2 activations whose Keras 3 namesake computes something else."""
    import keras

    from kmerge.legacy_activations import REPLACEMENTS

    for key in [k for k in cfg if k == "activation" or k.endswith("_activation")]:
        act = _keras2_activation_name(cfg[key])
        if act in REPLACEMENTS:
            fn, formula = REPLACEMENTS[act]
            cfg[key] = keras.activations.serialize(fn)
            repairs.append(f"layer '{name}': {key} '{act}' -> kmerge>{fn.__name__} (Keras 2's "
                           f"{act} is {formula}; Keras 3's is another function)")


def _repair_sequential(cfg: dict, repairs: list[str]) -> None:
    layers = cfg.get("layers")
    if not isinstance(layers, list) or not layers:
        return
    first = layers[0]
    if first.get("class_name") == "InputLayer":
        # tf.keras also copies batch_input_shape onto the first real layer: redundant now.
        for layer in layers[1:2]:
            if layer.get("config", {}).pop("batch_input_shape", None) is not None:
                repairs.append(f"layer '{layer['config'].get('name')}': dropped batch_input_shape "
                               "(the model has an InputLayer)")
        return
    fc = first.get("config", {})
    shape = fc.pop("batch_input_shape", None)
    if shape is None and fc.get("input_shape") is not None:
        shape = [None, *fc.pop("input_shape")]
    if shape is None and fc.get("input_dim") is not None:
        shape = [None, fc.pop("input_dim")]
    if shape is None:
        return
    if first.get("class_name") == "Embedding" and "input_length" in fc:
        length = fc.pop("input_length")
        if len(shape) == 2 and shape[1] is None:
            shape = [shape[0], length]
    dtype = fc.pop("input_dtype", None) or ("int32" if first.get("class_name") == "Embedding"
                                            else fc.get("dtype", "float32"))
    if isinstance(dtype, dict):
        dtype = dtype.get("config", {}).get("name", "float32")
    name = f"{fc.get('name', 'input')}_input"
    layers.insert(0, {"class_name": "InputLayer",
                      "config": {"batch_shape": shape, "dtype": dtype, "name": name}})
    repairs.append(f"layer '{fc.get('name')}': batch_input_shape {shape} -> InputLayer '{name}'")


def _has_input(seq_cfg: dict) -> bool:
    """A Keras 2 Sequential built with an input shape owns a construction node, like Functional."""
    layers = seq_cfg.get("layers") or [{}]
    first = layers[0].get("config", {})
    return layers[0].get("class_name") == "InputLayer" or any(
        first.get(k) is not None for k in ("batch_input_shape", "input_shape", "input_dim"))


def _repair_functional(cfg: dict, repairs: list[str]) -> None:
    """Unwrap single inputs/outputs; re-index calls of nested models."""
    name = cfg.get("name")
    for key in ("input_layers", "output_layers"):
        refs = cfg.get(key)
        # Keras 2 stores one input as [["x", 0, 0]]; Keras 3 reads that as a list of one input
        # (a structure warning on every call, and a one-element list as output).
        if isinstance(refs, list) and len(refs) == 1 and isinstance(refs[0], list):
            cfg[key] = refs[0]
            repairs.append(f"model '{name}': single {key.split('_')[0]} {refs[0][0]!r} unwrapped "
                           "from a one-element list")
    # Keras 2 counts a nested model's own construction as node 0; Keras 3 does not.
    nested = {lyr["config"].get("name", lyr.get("name")) for lyr in cfg.get("layers", [])
              if lyr.get("class_name") in {"Functional", "Model"}
              or (lyr.get("class_name") == "Sequential" and _has_input(lyr["config"]))}
    if not nested:
        return
    for layer in cfg.get("layers", []):
        for node in layer.get("inbound_nodes", []):
            if not isinstance(node, list):
                continue
            for ref in node:
                if isinstance(ref, list) and len(ref) >= 3 and ref[0] in nested and ref[1] > 0:
                    ref[1] -= 1
                    repairs.append(f"layer '{layer.get('name')}': input from nested model "
                                   f"'{ref[0]}' re-indexed to Keras 3 node {ref[1]}")


_CHILD_KEYS = {"layers", "cells", "layer", "backward_layer", "cell"}


def _children(class_name: str, cfg: dict) -> Iterator[dict]:
    """Every layer config inside ``cfg``: a model's layers, a wrapper's (``Bidirectional``,
    ``TimeDistributed``) layer and backward layer, an ``RNN``'s cell or cells."""
    yield from _wrapped(cfg)
    for child in cfg.get("layers") or []:
        if isinstance(child, dict) and "class_name" in child:
            yield child


def _wrapped(cfg: dict) -> Iterator[dict]:
    """The layer configs a wrapper or RNN holds (Keras 3 deserializes them on their own)."""
    for child in cfg.get("cells") or []:
        if isinstance(child, dict) and "class_name" in child:
            yield child
    for key in ("layer", "backward_layer", "cell"):
        child = cfg.get(key)
        if isinstance(child, dict) and "class_name" in child:
            yield child


def _fix_wrapped_module(name: str, cfg: dict, repairs: list[str]) -> None:
    """Keras 3 wrappers deserialize their inner layer by ``module``; Keras 2 (before 2.13) wrote
    none, which Keras 3 reads as an unregistered custom class."""
    for child in _wrapped(cfg):
        cls_name = child["class_name"]
        if child.get("module") is None and "registered_name" not in child \
                and _layer_class(cls_name) is not None:
            child["module"] = "keras.layers"
            child["registered_name"] = None
            inner = child.get("config", {}).get("name", cls_name) \
                if isinstance(child.get("config"), dict) else cls_name
            repairs.append(f"layer '{name}': inner {cls_name} '{inner}' given module "
                           "'keras.layers' (Keras 2 wrote none)")


def _repair_layer(obj: dict, repairs: list[str], where: str) -> None:
    class_name = obj.get("class_name")
    cfg = obj.get("config")
    if class_name == "Sequential" and isinstance(cfg, list):
        # Keras 2.0-2.2.2 stored a Sequential's config as the bare list of its layers.
        obj["config"] = cfg = {"name": obj.get("name") or "sequential", "layers": cfg}
        repairs.append(f"model '{cfg['name']}': Keras 2.0-2.2 list-form Sequential config -> "
                       "{'name', 'layers'}")
    if not isinstance(cfg, dict) or not isinstance(class_name, str):
        return
    name = cfg.get("name", obj.get("name", class_name))
    if class_name == "Model" and "layers" in cfg:
        obj["class_name"] = class_name = "Functional"
        repairs.append(f"model '{name}': class name Model -> Functional")
    _fix_dtype(name, cfg, repairs)
    _fix_initializers([v for k, v in cfg.items() if k not in _CHILD_KEYS], name, repairs)
    if class_name == "Sequential":
        _repair_sequential(cfg, repairs)
    elif class_name == "Functional":
        _repair_functional(cfg, repairs)
    else:
        _fix_activations(name, cfg, repairs)
        _fix_layer_args(class_name, name, cfg, repairs, where)
        _fix_wrapped_module(name, cfg, repairs)
    for child in _children(class_name, cfg):
        _repair_layer(child, repairs, where)


def repair_config(config: dict, *, where: str = "model") -> tuple[dict, list[str]]:
    """Rewrite a Keras 2 ``model_config`` so that Keras 3 deserializes it.

    Args:
        config: The decoded ``model_config`` JSON of a Keras 2 ``.h5`` file (not modified).
        where: Name of the file, used in error messages.

    Returns:
        The repaired copy and one human-readable line per repair.

    Raises:
        ModelLoadError: A Keras 2 setting has no Keras 3 equivalent (e.g. ``time_major=True``).

    >>> cfg, repairs = repair_config({"class_name": "LSTM", "config": {"name": "l", "units": 2,
    ...                                                                "time_major": False}})
    >>> repairs
    ["layer 'l': dropped Keras 2 argument time_major=False"]
    """
    config = json.loads(json.dumps(config))
    repairs: list[str] = []
    _repair_layer(config, repairs, where)
    return config, repairs


def read_h5_attr_list(group: h5py.Group, name: str) -> list[str]:
    """Read a (possibly chunked: ``name0``, ``name1``, ...) string-list attribute."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def load_h5_weights(group: h5py.Group, model: Any, *, where: str) -> None:
    """Copy every weight of a Keras 2 ``model_weights`` group into ``model``, by layer name.

    Within a layer (a nested model counts as one layer, as Keras 2 stored it) the variables are
    matched in Keras 2 order (trainable, then non-trainable) and every shape is checked first, so
    nothing is assigned unless the whole file fits.

    Raises:
        ModelLoadError: A layer is missing on either side, or a count or shape differs.
    """
    plan: list[tuple[Any, np.ndarray]] = []
    seen: set[str] = set()
    for lname in read_h5_attr_list(group, "layer_names"):
        weight_names = read_h5_attr_list(group[lname], "weight_names")
        if not weight_names:
            continue
        try:
            layer = model.get_layer(lname)
        except ValueError:
            raise ModelLoadError(
                f"{where}: the file holds weights for layer '{lname}' but the rebuilt model has "
                f"no such layer (layers: {[lyr.name for lyr in model.layers]}); the file may be "
                "damaged or hand-edited") from None
        seen.add(lname)
        variables = list(layer.trainable_weights) + list(layer.non_trainable_weights)
        if len(variables) != len(weight_names):
            raise ModelLoadError(
                f"{where}: layer '{lname}' has {len(variables)} weight(s) in Keras 3 but the file "
                f"stores {len(weight_names)} ({weight_names}); the layer config and its weights "
                "disagree")
        for var, wname in zip(variables, weight_names, strict=True):
            dataset = group[lname][wname]
            # The shape is checked before the data is read: a damaged file cannot make kmerge
            # read more than the rebuilt model holds.
            if tuple(var.shape) != tuple(dataset.shape):
                raise ModelLoadError(
                    f"{where}: layer '{lname}' weight '{wname}' has shape {tuple(dataset.shape)} "
                    f"in the file but the rebuilt layer expects {tuple(var.shape)} (variable "
                    f"'{var.path}'); the layer config and its weights disagree")
            plan.append((var, np.asarray(dataset)))
    missing = [lyr.name for lyr in model.layers if lyr.weights and lyr.name not in seen]
    if missing:
        raise ModelLoadError(f"{where}: the file stores no weights for layer(s) {missing}; "
                             "the file may be truncated or hand-edited")
    for var, value in plan:
        var.assign(value)


def _deserialize(config: dict, *, safe_mode: bool, custom_objects: dict | None) -> Any:
    import keras

    from kmerge import _keras

    objects = {**keras.saving.get_custom_objects(), **(custom_objects or {})}
    with keras.saving.custom_object_scope(objects), _keras.safe_mode_scope(safe_mode):
        return _keras.legacy_model_from_config(config, custom_objects=objects)


def build_keras2(config: dict, *, where: str, safe_mode: bool = True,
                 custom_objects: dict | None = None,
                 on_error: Callable[[Exception], ModelLoadError] | None = None
                 ) -> tuple[Any, tuple[str, ...]]:
    """Repair a Keras 2 model config (``model_config`` of an ``.h5``, or ``model.to_json()``) and
    build the model from it, without weights.

    Returns:
        The model (freshly initialised weights) and the repairs made.
    """
    config, repairs = repair_config(config, where=where)
    try:
        model = _deserialize(config, safe_mode=safe_mode, custom_objects=custom_objects)
    except ModelLoadError:
        raise
    except Exception as exc:  # Keras raises ValueError/TypeError/AttributeError here
        if on_error is None:
            raise ModelLoadError(f"{where}: Keras 3 cannot rebuild this Keras 2 model: {exc}") \
                from exc
        raise on_error(exc) from exc
    return model, tuple(repairs)


def load_keras2(f: h5py.File, *, where: str, safe_mode: bool = True,
                custom_objects: dict | None = None,
                on_error: Callable[[Exception], ModelLoadError] | None = None
                ) -> tuple[Any, tuple[str, ...]]:
    """Build a Keras 3 model from an open Keras 2 ``.h5`` file.

    The stored ``training_config`` (optimizer with ``lr``, old losses) is never read: kmerge
    loads for inference and merging, uncompiled.

    Args:
        f: The open file (read only).
        where: The file's path, for messages.
        safe_mode: Refuse Lambda layers (checked by the caller before this is called).
        custom_objects: Extra classes for custom layers.
        on_error: Turns a Keras deserialization error into a ModelLoadError.

    Returns:
        The model, with every weight copied, and the repairs made.
    """
    raw = f.attrs["model_config"]
    config = json.loads(raw.decode("utf8") if isinstance(raw, bytes) else raw)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{where}: the stored model_config is not a JSON object (it is a "
                             f"{type(config).__name__}); the file is corrupt: copy it again or "
                             "re-save the model")
    model, repairs = build_keras2(config, where=where, safe_mode=safe_mode,
                                  custom_objects=custom_objects, on_error=on_error)
    group = f["model_weights"] if "model_weights" in f else f
    load_h5_weights(group, model, where=where)
    return model, repairs


def is_keras2_weights_file(f: h5py.File) -> bool:
    """A Keras 2 ``save_weights`` file: ``layer_names`` at the root, no ``model_config``."""
    return "model_config" not in f.attrs and (
        "layer_names" in f.attrs or "layer_names0" in f.attrs)


def is_keras3_weights_file(f: h5py.File, path: Path) -> bool:
    """A Keras 3 ``save_weights`` (``.weights.h5``) file."""
    return "model_config" not in f.attrs and (
        path.name.endswith(".weights.h5") or "vars" in f or "layers" in f)

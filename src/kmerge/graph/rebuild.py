"""Copy a source model's graph into a new graph: prefixed names, exact state, taps.

This is the heart of every output-space merge. Keras cannot nest two models that were
saved separately (both hold a layer called ``dense``), cannot build a sub-model from a
layer inside a nested model ("not connected to inputs"), and ``clone_model`` re-initialises
weights. So kmerge replays each source's graph (:mod:`kmerge.graph.replay`) on tensors of the
merged graph, re-creating every layer and ``keras.ops`` operation from its config under a
new, prefixed name and copying its full state verbatim. Nested Sequential and Functional
models are inlined, so any layer at any depth is an ordinary tensor of the merged graph:
tapping it never recomputes a prefix, and every source layer runs once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from keras import tree

from kmerge import _keras
from kmerge.errors import InvalidModelError, TapError
from kmerge.graph import inference
from kmerge.graph.layers import Inference
from kmerge.graph.replay import (
    Call,
    LayerRef,
    Walk,
    graph_of,
    is_graph_model,
    replay,
    resolve_ref,
    walk,
)

__all__ = [
    "Copier", "LayerRef", "Rebuilt", "check_model", "copy_state", "graph_of", "input_specs",
    "is_graph_model", "is_symbolic", "rebuild", "resolve_ref",
]


def check_model(model: Any, name: str) -> keras.Model:
    """Raise a clear error unless ``model`` is a built Keras model."""
    if not isinstance(model, keras.Model):
        raise InvalidModelError(
            f"model {name!r} is a {type(model).__name__}, not a keras.Model; pass a Keras "
            "model, or a path that kmerge.load can read"
        )
    if isinstance(model, keras.Sequential):
        graph_of(model)
    elif not model.built or not input_specs(model):
        raise InvalidModelError(
            f"model {name!r} ({type(model).__name__}) is not built: it has no inputs yet; "
            "call it on a batch of data (or build it) before merging"
        )
    return model


def _safe_inputs(model: keras.Model) -> list:
    try:
        return list(model.inputs or [])
    except (AttributeError, ValueError):
        return []


def input_specs(model: keras.Model) -> list[tuple[tuple, str, str]]:
    """(shape without batch, dtype, name) for each input of ``model``.

    Subclassed models have no ``inputs``; the shapes they were built with stand in.
    """
    inputs = _safe_inputs(model)
    if inputs:
        return [(tuple(t.shape[1:]), str(t.dtype), t.name) for t in inputs]
    shapes = _keras.build_shapes(model)
    dtype = str(getattr(model, "input_dtype", None) or "float32")
    return [(tuple(s[1:]), dtype, f"{model.name}_input_{i}" if len(shapes) > 1 else
             f"{model.name}_input") for i, s in enumerate(shapes)]


def is_symbolic(x: Any) -> bool:
    return isinstance(x, keras.KerasTensor)


@dataclass(frozen=True)
class Rebuilt:
    """A source copied into the merged graph."""

    name: str
    model: keras.Model
    inputs: list  # merged-graph tensors that feed the source's inputs
    outputs: list  # merged-graph tensors for the source's outputs
    walk: Walk | None  # the source's graph (None for an opaque, subclassed source)
    values: dict[int, Any]  # walk id -> merged-graph tensor
    layers: dict[int, Any] = field(default_factory=dict)  # id(source op) -> its copy
    notes: list[str] = field(default_factory=list)

    @property
    def opaque(self) -> bool:
        return self.walk is None

    def tap(self, ref: LayerRef) -> Any:
        """The merged-graph tensor produced by the source layer ``ref``."""
        if self.opaque:
            resolve_ref(self.model, ref, source=self.name)  # type errors first
            raise TapError(
                f"model {self.name!r} is a subclassed model ({type(self.model).__name__}); "
                "kmerge treats it as an opaque block whose final output is all it can use. "
                f"Tap its final output, or rebuild it as a Functional model to tap {ref!r}"
            )
        call, out = self.walk.find(ref, source=self.name)
        return self.values[call.outputs[out]]

    def copy_of(self, op: Any) -> Any:
        """The merged graph's copy of the source operation ``op``."""
        return self.layers[id(op)]


class Copier:
    """Re-creates source operations under prefixed names and copies their state once.

    Its :meth:`__call__` is a :func:`kmerge.graph.replay.replay` function.
    """

    def __init__(self, prefix: str, *, freeze: bool, taken: set[str], copy: bool) -> None:
        self.prefix = prefix
        self.freeze = freeze
        self.copy = copy
        self.taken = taken  # layer names already used in the merged graph
        self.layers: dict[int, Any] = {}
        self.copied: set[int] = set()
        self.wrapped: set[int] = set()  # sources wrapped in Inference by this copier
        self.notes: list[str] = []

    def new_name(self, path: tuple[str, ...], name: str) -> str:
        base = "_".join(p for p in (self.prefix, *path, name) if p)  # "" prefix: own names
        candidate, k = base, 1
        while candidate in self.taken:
            candidate = f"{base}_{k}"
            k += 1
        self.taken.add(candidate)
        return candidate

    def clone(self, op: Any, path: tuple[str, ...]) -> Any:
        if id(op) in self.layers:
            return self.layers[id(op)]
        name = self.new_name(path, op.name)
        where = "/".join((*path, op.name))
        kind = type(op).__name__
        if not isinstance(op, keras.layers.Layer):
            new = _clone_operation(op, name)
        elif self.freeze and inference.is_training_only(op):
            new = keras.layers.Identity(name=name)  # weightless: no state to copy
            self.copied.add(id(op))
            self.notes.append(f"{where}: {kind} runs as Identity (frozen)")
        else:
            new = _clone_layer(op, name, source=self.prefix)
            if self.freeze and inference.is_random(op):
                new = Inference(new, name=f"{name}_inference")
                self.wrapped.add(id(op))
                self.taken.add(new.name)
                self.notes.append(f"{where}: {kind} always runs in inference mode (frozen)")
        if isinstance(new, keras.layers.Layer) and (self.freeze or not op.trainable):
            new.trainable = False
        self.layers[id(op)] = new
        return new

    def __call__(self, call: Call, args: tuple, kwargs: dict) -> Any:
        op = call.op
        new = self.clone(op, call.path)
        outputs = new(*args, **kwargs)
        if id(op) not in self.copied and isinstance(op, keras.layers.Layer):
            self.copied.add(id(op))
            if self.copy:
                copy_state(op, new.layer if id(op) in self.wrapped else new,
                           source=self.prefix)
            if isinstance(new, keras.layers.Layer) and not new.trainable:
                # Again after the build, at every depth: sub-layers created in build() (the
                # query/key/value projections of MultiHeadAttention) missed the first freeze.
                for sub in _keras.sublayers(new):
                    sub.trainable = False
        return outputs


def _clone_layer(layer: keras.layers.Layer, name: str, *, source: str) -> keras.layers.Layer:
    kind = type(layer).__name__
    if kind == "Lambda":
        # In memory the function object is at hand: re-creating it from its serialized
        # bytecode would need safe_mode off, which the caller already chose at load time.
        return keras.layers.Lambda(
            layer.function,
            output_shape=getattr(layer, "_output_shape", None),
            mask=getattr(layer, "mask", None),
            arguments=dict(getattr(layer, "arguments", None) or {}),
            name=name,
        )
    config = layer.get_config()
    config["name"] = name
    try:
        new = type(layer).from_config(config)
    except Exception as exc:  # custom layers can fail in any way
        raise InvalidModelError(
            f"cannot copy layer {layer.name!r} ({kind}) of model {source!r}: "
            f"{type(exc).__name__}: {exc}. Give the layer a get_config() that "
            "from_config() accepts"
        ) from exc
    _restore_unserialized(layer, new)
    return new


# Attributes that change what a Keras layer computes but are missing from its config.
_UNSERIALIZED = ("implementation",)  # LSTM/GRU cells: 1 and 2 round differently


def _restore_unserialized(src: keras.layers.Layer, dst: keras.layers.Layer) -> None:
    for s, d in zip(_keras.sublayers(src), _keras.sublayers(dst)):
        for attr in _UNSERIALIZED:
            if hasattr(s, attr) and hasattr(d, attr) and getattr(s, attr) != getattr(d, attr):
                setattr(d, attr, getattr(s, attr))


def _clone_operation(op: Any, name: str) -> Any:
    """A ``keras.ops`` operation under a new name; the same object if it has no config.

    Operations hold no state, so re-invoking the source's own object computes the same;
    a renamed copy keeps two sources' ``add`` operations apart in the merged graph.
    """
    try:
        return type(op).from_config({**op.get_config(), "name": name})
    except Exception:  # an operation without a usable config: reuse it as Keras would
        return op


def copy_state(src: keras.layers.Layer, dst: keras.layers.Layer, *, source: str) -> None:
    """Copy every piece of ``src``'s state into ``dst``: weights and non-weight state.

    State is moved the way Keras's own saving moves it, layer by layer (sub-layers
    included): ``save_own_variables`` / ``load_own_variables`` (so an adapted
    ``Normalization`` finalizes its mean and variance), and ``save_assets`` /
    ``load_assets`` for state outside variables (the vocabulary of ``StringLookup``,
    ``IntegerLookup`` and ``TextVectorization``). Values go through host memory: on jax,
    training the merged model donates its variables' buffers, which would otherwise delete
    the source's weights.
    """
    sw, dw = src.weights, dst.weights
    if len(sw) != len(dw) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(sw, dw)):
        raise InvalidModelError(
            f"copying layer {src.name!r} of model {source!r}: the copy has weights "
            f"{[tuple(w.shape) for w in dw]} but the source has {[tuple(w.shape) for w in sw]}"
        )
    subs, dsubs = _keras.sublayers(src), _keras.sublayers(dst)
    if [type(x) for x in subs] != [type(x) for x in dsubs]:
        raise InvalidModelError(
            f"copying layer {src.name!r} of model {source!r}: the copy is made of the layers "
            f"{[type(x).__name__ for x in dsubs]}, the source of "
            f"{[type(x).__name__ for x in subs]}; its get_config() does not describe it fully"
        )
    pairs = list(zip(subs, dsubs))
    moved = 0
    for s, d in pairs:
        store: dict[str, Any] = {}
        s.save_own_variables(store)
        d.load_own_variables({k: _host_copy(v) for k, v in store.items()})
        moved += len(store)
    for s, d in pairs:
        if hasattr(s, "save_assets") and hasattr(d, "load_assets"):
            _copy_assets(s, d)
    if moved < len(sw):
        # A layer whose own save/load skips some weights (a custom override): copy the
        # weights in order as well, so nothing stays at its initial value.
        for a, b in zip(sw, dw):
            b.assign(_host_copy(a))


def _host_copy(v: Any) -> np.ndarray:
    value = v.value if hasattr(v, "value") and not isinstance(v, np.ndarray) else v
    return np.array(keras.ops.convert_to_numpy(value), copy=True)


def _copy_assets(src: Any, dst: Any) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kmerge-assets-") as d:
        src.save_assets(d)
        dst.load_assets(d)


def rebuild(
    model: keras.Model,
    inputs: list,
    *,
    name: str,
    freeze: bool,
    taken: set[str],
    copy: bool = True,
) -> Rebuilt:
    """Copy ``model`` into the graph that ``inputs`` belong to.

    Args:
        model: A built source model (Sequential, Functional, or subclassed).
        inputs: Merged-graph tensors, one per input of ``model``.
        name: The source's name, used as prefix for every copied layer.
        freeze: Make every copied layer non-trainable and make it compute its inference
            function (BatchNorm in inference mode, dropout and noise as Identity, layers
            with inner randomness always called with ``training=False``).
        taken: Layer names already used in the merged graph (updated in place).
        copy: Copy the state (False for a dry run: shapes only).

    Returns:
        A :class:`Rebuilt` with the output tensors and a ``tap`` to reach any layer.
    """
    copier = Copier(name, freeze=freeze, taken=taken, copy=copy)
    if not is_graph_model(model):
        outs = tree.flatten(copier(Call(model, (), 0, None, (), ()),
                                   (inputs[0] if len(inputs) == 1 else list(inputs),), {}))
        return Rebuilt(name, model, list(inputs), outs, None, {}, copier.layers, copier.notes)
    w = walk(model)
    if len(inputs) != len(w.inputs):
        raise InvalidModelError(
            f"model {name!r} expects {len(w.inputs)} inputs, got {len(inputs)}"
        )
    values = replay(w, dict(zip(w.inputs, inputs)), copier)
    outputs = [values[i] for i in w.outputs]
    return Rebuilt(name, model, list(inputs), outputs, w, values, copier.layers, copier.notes)

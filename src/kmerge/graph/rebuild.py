"""Copy a source model's graph into a new graph: prefixed names, exact weights, taps.

This is the heart of every output-space merge. Keras cannot nest two models that were
saved separately (both hold a layer called ``dense``), cannot build a sub-model from a
layer inside a nested model ("not connected to inputs"), and ``clone_model`` re-initialises
weights. So kmerge re-creates each source layer from its config under a new, prefixed name,
calls it on tensors of the merged graph, and copies the weights verbatim. Nested Sequential
and Functional models are inlined, so any layer at any depth is an ordinary tensor of the
merged graph: tapping it never recomputes a prefix, and every source layer runs once.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from keras import tree

from kmerge.errors import (
    InvalidModelError,
    LayerNotFoundError,
    TapError,
)

# Layers that only act in training mode (noise, dropout). In a frozen source they become
# Identity, which is exactly what they compute at inference: a frozen source then behaves
# as in inference while the head trains, and keeps doing so after save/load (a Keras
# functional graph overrides a recorded ``training=False`` with the fit-time flag).
_TRAINING_ONLY = (
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "GaussianDropout",
    "GaussianNoise",
    "AlphaDropout",
    "ActivityRegularization",
)

LayerRef = int | str


def is_graph_model(model: Any) -> bool:
    """True for models whose layer graph kmerge can see (Functional and Sequential)."""
    return isinstance(model, keras.Sequential) or _is_functional(model)


def _is_functional(model: Any) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(model, Functional) and not isinstance(model, keras.Sequential)


def graph_of(model: keras.Model):
    """The Functional graph behind a Sequential or Functional model."""
    if isinstance(model, keras.Sequential):
        graph = getattr(model, "_functional", None)
        if graph is None:
            raise InvalidModelError(
                f"model {model.name!r} is a Sequential model that has not been built; "
                "give it an input shape (keras.Input(shape=...) as first layer) or call it "
                "on data once before merging"
            )
        return graph
    return model


def graph_nodes(model: keras.Model) -> list:
    """The computing nodes of a Functional or Sequential graph, inputs first."""
    graph = graph_of(model)
    return [node for depth in sorted(graph._nodes_by_depth, reverse=True)
            for node in graph._nodes_by_depth[depth]
            if node.operation is not None and not node.is_input]


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
    shapes = list((getattr(model, "_build_shapes_dict", None) or {}).values())
    if len(shapes) == 1 and isinstance(shapes[0], list | tuple) and shapes[0] and all(
        isinstance(s, list | tuple) for s in shapes[0]
    ):
        shapes = list(shapes[0])
    dtype = str(getattr(model, "input_dtype", None) or "float32")
    return [(tuple(s[1:]), dtype, f"{model.name}_input_{i}" if len(shapes) > 1 else
             f"{model.name}_input") for i, s in enumerate(shapes)
            if isinstance(s, list | tuple) and len(s) >= 1]


@dataclass
class Rebuilt:
    """A source copied into the merged graph."""

    name: str
    model: keras.Model
    inputs: list  # merged-graph tensors that feed the source's inputs
    outputs: list  # merged-graph tensors for the source's outputs
    opaque: bool
    layers: dict[int, keras.layers.Layer] = field(default_factory=dict)  # id(source) -> clone
    calls: dict[int, list[list]] = field(default_factory=dict)  # id(source op) -> outputs per call
    notes: list[str] = field(default_factory=list)
    uses: str = "output"  # what the merge uses of this source (for plans)
    taps: list[tuple[LayerRef, Any]] = field(default_factory=list)  # (ref, tensor) used

    def tap(self, ref: LayerRef) -> Any:
        """The merged-graph tensor produced by the source layer ``ref``."""
        layer, call = resolve_ref(self.model, ref, source=self.name)
        if self.opaque:
            raise TapError(
                f"model {self.name!r} is a subclassed model ({type(self.model).__name__}); "
                "kmerge treats it as an opaque block whose final output is all it can use. "
                f"Tap its final output, or rebuild it as a Functional model to tap {ref!r}"
            )
        calls = self.calls.get(id(layer), [])
        if not calls:
            raise TapError(
                f"layer {ref!r} of model {self.name!r} is not connected to the model's "
                "inputs, so it computes nothing in the merged graph"
            )
        if call is None:
            if len(calls) > 1:
                raise TapError(
                    f"layer {ref!r} of model {self.name!r} is called {len(calls)} times; "
                    f"say which call with '{ref}@0' .. '{ref}@{len(calls) - 1}'"
                )
            call = 0
        if not 0 <= call < len(calls):
            raise TapError(
                f"layer {ref!r} of model {self.name!r} has calls 0..{len(calls) - 1}, "
                f"not {call}"
            )
        outs = calls[call]
        if len(outs) != 1:
            raise TapError(
                f"layer {ref!r} of model {self.name!r} has {len(outs)} outputs; tap a layer "
                "with a single output"
            )
        return outs[0]


def _all_refs(model: keras.Model, prefix: str = "") -> list[str]:
    names = []
    if not is_graph_model(model):
        return names
    for layer in model.layers:
        names.append(prefix + layer.name)
        if is_graph_model(layer):
            names.extend(_all_refs(layer, prefix + layer.name + "/"))
    return names


def resolve_ref(model: keras.Model, ref: LayerRef, *, source: str) -> tuple[Any, int | None]:
    """Find the layer ``ref`` names in ``model``: index, name, or nested path ``a/b``.

    A trailing ``@k`` picks the k-th call of a shared layer.
    """
    if isinstance(ref, bool) or not isinstance(ref, int | str):
        raise LayerNotFoundError(
            f"layer reference {ref!r} for model {source!r} must be a layer name, an index, "
            "or a nested path like 'block_1/conv'"
        )
    if not is_graph_model(model):
        # Opaque: only its own name (the final output) is meaningful.
        return model, None
    if isinstance(ref, int):
        layers = model.layers
        if not -len(layers) <= ref < len(layers):
            raise LayerNotFoundError(
                f"model {source!r} has {len(layers)} layers (indices 0..{len(layers) - 1}); "
                f"index {ref} is out of range"
            )
        return layers[ref], None
    text, call = ref, None
    if "@" in ref:
        text, _, k = ref.rpartition("@")
        if not k.isdigit():
            raise LayerNotFoundError(
                f"layer reference {ref!r}: the part after '@' must be a call index"
            )
        call = int(k)
    current: Any = model
    parts = text.split("/")
    for depth, part in enumerate(parts):
        if not is_graph_model(current):
            raise TapError(
                f"cannot look inside layer {'/'.join(parts[:depth])!r} of model {source!r}: "
                f"it is a {type(current).__name__}, not a Functional or Sequential model "
                "(subclassed models are opaque blocks)"
            )
        found = {layer.name: layer for layer in current.layers}
        if part not in found:
            everything = _all_refs(model)
            close = difflib.get_close_matches(text, everything, n=3, cutoff=0.4)
            hint = f" Nearest: {', '.join(close)}." if close else ""
            shown = ", ".join(everything[:40]) + (" ..." if len(everything) > 40 else "")
            raise LayerNotFoundError(
                f"model {source!r} has no layer {text!r}.{hint} Existing layers are: {shown}"
            )
        current = found[part]
    return current, call


class Rebuilder:
    def __init__(self, prefix: str, *, freeze: bool, taken: set[str], copy: bool) -> None:
        self.prefix = prefix
        self.freeze = freeze
        self.copy = copy
        self.taken = taken  # layer names already used in the merged graph
        self.result: Rebuilt | None = None

    def new_name(self, path: tuple[str, ...], name: str) -> str:
        base = "_".join((self.prefix, *path, name))
        candidate, k = base, 1
        while candidate in self.taken:
            candidate = f"{base}_{k}"
            k += 1
        self.taken.add(candidate)
        return candidate

    def clone(self, layer: keras.layers.Layer, path: tuple[str, ...]) -> keras.layers.Layer:
        result = self.result
        assert result is not None
        if id(layer) in result.layers:
            return result.layers[id(layer)]
        name = self.new_name(path, layer.name)
        kind = type(layer).__name__
        if self.freeze and kind in _TRAINING_ONLY and not layer.weights:
            new = keras.layers.Identity(name=name)
            result.notes.append(f"{'/'.join((*path, layer.name))}: {kind} runs as Identity (frozen)")
        elif kind == "Lambda":
            # In memory the function object is at hand: re-creating it from its serialized
            # bytecode would need safe_mode off, which the caller already chose at load time.
            new = keras.layers.Lambda(
                layer.function,
                output_shape=getattr(layer, "_output_shape", None),
                mask=getattr(layer, "mask", None),
                arguments=dict(getattr(layer, "arguments", None) or {}),
                name=name,
            )
        else:
            config = layer.get_config()
            config["name"] = name
            try:
                new = type(layer).from_config(config)
            except Exception as exc:  # custom layers can fail in any way
                raise InvalidModelError(
                    f"cannot copy layer {layer.name!r} ({kind}) of model {self.prefix!r}: "
                    f"{type(exc).__name__}: {exc}. Give the layer a get_config() that "
                    "from_config() accepts"
                ) from exc
        if self.freeze:
            new.trainable = False
        elif not layer.trainable:
            new.trainable = False
        result.layers[id(layer)] = new
        return new

    def call_layer(self, layer, path, args, kwargs):
        new = self.clone(layer, path)
        first = not new.built
        outputs = new(*args, **kwargs)
        if first and self.copy:
            copy_weights(layer, new, source=self.prefix)
        return outputs

    def inline(self, model: keras.Model, inputs: list, path: tuple[str, ...]) -> list:
        graph = graph_of(model)
        if len(inputs) != len(graph.inputs):
            raise InvalidModelError(
                f"model {'/'.join((self.prefix, *path))!r} expects {len(graph.inputs)} "
                f"inputs, got {len(inputs)}"
            )
        tensors = {id(x): y for x, y in zip(graph.inputs, inputs)}
        for node in graph_nodes(graph):
            op = node.operation
            if any(id(x) not in tensors for x in node.input_tensors):
                continue
            args, kwargs = node.arguments.fill_in(tensors)
            if is_graph_model(op):
                sub_inputs = [t for t in tree.flatten((args, kwargs)) if is_symbolic(t)]
                outs = self.inline(op, sub_inputs, (*path, op.name))
            else:
                outs = tree.flatten(self.call_layer(op, path, args, kwargs))
            self.result.calls.setdefault(id(op), []).append(list(outs))
            for x, y in zip(node.outputs, outs):
                tensors[id(x)] = y
        missing = [x for x in graph.outputs if id(x) not in tensors]
        if missing:
            raise InvalidModelError(
                f"model {'/'.join((self.prefix, *path))!r}: output(s) not reachable from "
                "its inputs while copying the graph"
            )
        return [tensors[id(x)] for x in graph.outputs]


def is_symbolic(x: Any) -> bool:
    return isinstance(x, keras.KerasTensor)


def copy_weights(src: keras.layers.Layer, dst: keras.layers.Layer, *, source: str) -> None:
    """Copy every weight of ``src`` into ``dst`` verbatim (same order, same shapes)."""
    sw, dw = src.weights, dst.weights
    if len(sw) != len(dw) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(sw, dw)):
        raise InvalidModelError(
            f"copying layer {src.name!r} of model {source!r}: the copy has weights "
            f"{[tuple(w.shape) for w in dw]} but the source has {[tuple(w.shape) for w in sw]}"
        )
    for a, b in zip(sw, dw):
        # A host copy, never the source's buffer: on jax, training the merged model
        # donates its variables' buffers, which would delete the source's weights.
        b.assign(np.array(keras.ops.convert_to_numpy(a.value), copy=True))


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
        freeze: Make every copied layer non-trainable (BatchNorm then runs in
            inference mode; dropout and noise become Identity).
        taken: Layer names already used in the merged graph (updated in place).
        copy: Copy the weights (False for a dry run: shapes only).

    Returns:
        A :class:`Rebuilt` with the output tensors and a ``tap`` to reach any layer.
    """
    builder = Rebuilder(name, freeze=freeze, taken=taken, copy=copy)
    opaque = not is_graph_model(model)
    result = Rebuilt(name=name, model=model, inputs=list(inputs), outputs=[], opaque=opaque)
    builder.result = result
    if opaque:
        outs = builder.call_layer(model, (), (inputs[0] if len(inputs) == 1 else inputs,), {})
        result.outputs = tree.flatten(outs)
        result.calls[id(model)] = [list(result.outputs)]
    else:
        result.outputs = builder.inline(model, list(inputs), ())
    return result

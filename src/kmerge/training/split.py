"""The frozen / trainable split of a merged model: which tensors ``fit_head`` computes once.

The frozen part is every call of an operation that has no trainable weights, is not random
in training mode (:func:`kmerge.graph.inference.is_random`), and reads only frozen tensors
(model inputs are frozen). The boundary is where the trainable part reads from it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import keras

from kmerge import _keras
from kmerge.errors import InvalidModelError
from kmerge.graph import inference
from kmerge.graph.replay import Walk, is_graph_model, replay, run_source_ops, submodel, walk


def checked_walk(model: keras.Model) -> Walk:
    """The walk of a Functional or Sequential ``model``; a clear error for anything else."""
    if not isinstance(model, keras.Model):
        raise InvalidModelError(f"expected a keras.Model, got {type(model).__name__}")
    if not is_graph_model(model):
        raise InvalidModelError(
            f"model {model.name!r} is a subclassed {type(model).__name__}; kmerge can only split "
            "Functional and Sequential models into frozen and trainable parts. Call "
            "model.fit directly, or pass cache=None"
        )
    return walk(model)


def _has_trainable(op: Any) -> bool:
    return bool(getattr(op, "trainable_weights", None))


@dataclass
class Split:
    """Where a model's frozen part ends: the tensors the trainable part reads from it."""

    walk: Walk
    boundary: list[int]  # walk ids of frozen tensors read by trainable calls (or outputs)
    frozen_layers: list[str]
    trainable_layers: list[str]
    trainable_calls: list = field(default_factory=list)

    @property
    def boundary_tensors(self) -> list:
        return [self.walk.tensors[i] for i in self.boundary]

    def describe(self) -> str:
        shapes = ", ".join(str(self.walk.shape(i)[1:]) for i in self.boundary)
        return (f"{len(self.frozen_layers)} frozen layers computed once; "
                f"{len(self.trainable_layers)} layers train on {len(self.boundary)} cached "
                f"tensor(s) of shape {shapes}")


def split(model: keras.Model) -> Split:
    """Find the boundary between the frozen part and the trainable part of ``model``.

    The frozen part is every call of an operation without trainable weights that is not
    random in training mode (:func:`kmerge.graph.inference.is_random`) and reads only frozen
    tensors.

    >>> s = split(merged)
    >>> s.boundary_tensors  # the tensors computed once by fit_head
    """
    w = checked_walk(model)
    frozen: set[int] = set(w.inputs)
    trainable_calls, frozen_names, train_names = [], [], []
    for call in w.leaf_calls:
        op = call.op
        if (all(i in frozen for i in call.inputs) and not _has_trainable(op)
                and not inference.is_random(op)):
            frozen.update(call.outputs)
            frozen_names.append(call.name)
        else:
            trainable_calls.append(call)
            train_names.append(call.name)
    boundary: list[int] = []
    for i in [i for c in trainable_calls for i in c.inputs] + list(w.outputs):
        if i in frozen and i not in boundary:
            boundary.append(i)
    return Split(w, boundary, _unique(frozen_names), _unique(train_names), trainable_calls)


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def frozen_submodel(model: keras.Model, s: Split) -> keras.Model:
    """The frozen part: the model's inputs to the boundary tensors."""
    w = s.walk
    if all(c is None or not c.path for c in map(w.producer_call, s.boundary)):
        inputs, outputs = [w.tensors[i] for i in w.inputs], s.boundary_tensors
    else:  # boundary inside a nested model: replay the frozen calls on new inputs
        inputs = [keras.Input(shape=w.shape(i)[1:], dtype=w.tensors[i].dtype) for i in w.inputs]
        trainable = {id(c) for c in s.trainable_calls}
        values = replay(w, dict(zip(w.inputs, inputs)), run_source_ops,
                        calls=[c for c in w.leaf_calls if id(c) not in trainable])
        outputs = [values[i] for i in s.boundary]
    return submodel(inputs, outputs, name=f"{model.name}_frozen_part")


def trainable_submodel(model: keras.Model, s: Split) -> keras.Model:
    """The trainable part as its own model on the boundary tensors, with the SAME layers."""
    w = s.walk
    inputs = [keras.Input(shape=w.shape(i)[1:], dtype=w.tensors[i].dtype, name=f"boundary_{k}")
              for k, i in enumerate(s.boundary)]
    values = replay(w, dict(zip(s.boundary, inputs)), run_source_ops, calls=s.trainable_calls)
    outputs = [values[i] for i in w.outputs]
    return keras.Model(inputs[0] if len(inputs) == 1 else inputs,
                       outputs[0] if len(outputs) == 1 else outputs,
                       name=f"{model.name}_trainable_part")


def _graph_operations(model: keras.Model) -> list:
    """Every operation of ``model``'s graph at any depth: layers, nested models, their input
    layers and ``keras.ops`` operations."""
    seen: dict[int, Any] = {}
    stack = [model]
    while stack:
        op = stack.pop()
        if id(op) in seen:
            continue
        seen[id(op)] = op
        if isinstance(op, keras.layers.Layer):
            stack.extend(_keras.sublayers(op))
        stack.extend(getattr(op, "_operations", None) or [])  # Functional: ops and inputs
        functional = getattr(op, "_functional", None)  # a built Sequential's graph
        if functional is not None:
            stack.append(functional)
    return [op for op in seen.values() if hasattr(op, "_inbound_nodes")]


@contextlib.contextmanager
def no_new_nodes(model: keras.Model) -> Iterator[None]:
    """Leave ``model``'s graph as it was: the call nodes that sub-models built inside the
    body add to ``model``'s operations are removed when it ends (also on failure).

    ``fit_head`` trains a sub-model made of the model's own trainable layers, which calls them
    a second time; without this, every head layer would keep a second inbound node (and
    ``plot_model`` would draw the cache's ``boundary_*`` inputs), and a layer's ``output``
    would be ambiguous. Sub-models built in the body keep working: a Functional model runs
    through its own node list, not its layers'.

    Nodes are only ever appended, so returning each operation's node lists to their length
    before the body removes exactly the nodes the body added (``_keras.node_counts``).
    """
    counts = [(op, _keras.node_counts(op)) for op in _graph_operations(model)]
    try:
        yield
    finally:
        for op, before in counts:
            _keras.truncate_nodes(op, before)

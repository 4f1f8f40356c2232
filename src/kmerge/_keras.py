"""The one door to Keras internals.

kmerge needs a few things Keras keeps private: the node graph of a Functional model, the
call history of a tensor, the sub-layers of a layer, the shapes a subclassed model was built
with. Every such name is reached here and nowhere else, each with the reason, so a Keras
release that moves one breaks one function (and ``tests/test_keras_adapter.py``, which calls
each of them), not ten modules. Everything else in kmerge uses public Keras API only.

The oldest Keras kmerge declares (``keras>=`` in pyproject.toml) runs in CI next to the
newest, so both ends of the range are exercised.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import keras

# -- models and graphs ---------------------------------------------------------------------


def is_functional(model: Any) -> bool:
    """A Functional model that is not a Sequential.

    Why private: ``keras.Model(inputs, outputs)`` returns a ``Functional`` instance, but the
    class is not exported; ``isinstance(m, keras.Model)`` is also true for subclassed models.
    """
    from keras.src.models.functional import Functional

    return isinstance(model, Functional) and not isinstance(model, keras.Sequential)


def sequential_graph(model: keras.Sequential) -> Any:
    """The Functional graph a built Sequential model runs, or None when not built.

    Why private: Sequential keeps it in ``_functional``; there is no public accessor.
    """
    return getattr(model, "_functional", None)


def graph_nodes(graph: Any) -> list:
    """The computing nodes of a Functional graph in execution order (inputs excluded).

    Why private: ``_nodes_by_depth`` is the graph itself; Keras's own
    ``Function._run_through_graph`` walks it deepest-first, and so do we, so every kmerge
    walk visits nodes in the order Keras executes them.
    """
    by_depth = graph._nodes_by_depth
    return [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]
            if node.operation is not None and not node.is_input]


def node_counts(op: Any) -> tuple[int, int]:
    """How many inbound and outbound call nodes Keras has recorded on ``op``.

    Why private: ``_inbound_nodes`` / ``_outbound_nodes`` are where Keras records each call of
    an operation in a graph; nodes are only ever appended, so these counts mark a point to
    which :func:`truncate_nodes` can return.
    """
    return len(op._inbound_nodes), len(op._outbound_nodes)


def truncate_nodes(op: Any, counts: tuple[int, int]) -> None:
    """Drop the call nodes recorded on ``op`` after :func:`node_counts` gave ``counts``."""
    n_in, n_out = counts
    del op._inbound_nodes[n_in:]
    del op._outbound_nodes[n_out:]


def fill_in(node: Any, values: dict[int, Any]) -> tuple[tuple, dict]:
    """A node's call arguments with each graph tensor replaced by ``values[id(tensor)]``.

    Why private-ish: ``node.arguments`` (a ``SymbolicArguments``) keeps the exact call
    structure (positional, keyword, nested lists, constants, masks); ``fill_in`` is what
    ``Function._run_through_graph`` uses to re-invoke a node.
    """
    return node.arguments.fill_in(values)


def node_call_args(node: Any) -> tuple[tuple, dict]:
    """The recorded positional and keyword arguments of a node (graph tensors inside)."""
    return node.arguments.args, node.arguments.kwargs


def history(tensor: Any) -> tuple[Any, int, int]:
    """(operation, node index, output index) that produced a symbolic tensor.

    Why private: ``_keras_history`` is how Keras itself links a KerasTensor to its node.
    """
    op, node_index, tensor_index = tensor._keras_history
    return op, int(node_index), int(tensor_index)


def build_shapes(model: Any) -> list:
    """The input shapes a (subclassed) model was built with, batch axis included.

    Why private: a subclassed model has no ``inputs``; ``_build_shapes_dict`` is what Keras
    records at build time (and what ``get_build_config`` serializes).
    """
    shapes = list((getattr(model, "_build_shapes_dict", None) or {}).values())
    if len(shapes) == 1 and isinstance(shapes[0], list | tuple) and shapes[0] and all(
        isinstance(s, list | tuple) for s in shapes[0]
    ):
        shapes = list(shapes[0])
    return [tuple(s) for s in shapes if isinstance(s, list | tuple) and len(s) >= 1]


def inputs_struct(model: Any) -> Any:
    """The nesting of a Functional model's inputs (a tensor, a list, a dict), or None.

    Why private: ``_inputs_struct`` is how Functional packs flat inputs back for ``call``.
    """
    if isinstance(model, keras.Sequential):
        return None
    return getattr(model, "_inputs_struct", None)


def call_has_training_arg(layer: Any) -> bool:
    """True when ``layer.call`` accepts ``training`` (public: read from its signature)."""
    try:
        return "training" in inspect.signature(layer.call).parameters
    except (TypeError, ValueError):
        return False


# -- layers ----------------------------------------------------------------------------------


def sublayers(layer: Any) -> list:
    """``layer`` and every layer it holds, at any depth, in Keras's tracking order.

    Why private: ``_flatten_layers`` is the order in which Keras saves and loads per-layer
    state (``save_own_variables``), so pairing a layer's copy with its source by it is the
    pairing Keras's own save/load makes.
    """
    return list(layer._flatten_layers(include_self=True, recursive=True))


def seed_generators(layer: Any) -> Iterator[Any]:
    """Every ``keras.random.SeedGenerator`` held by ``layer`` or any of its sub-layers.

    Why private: Keras tracks a layer's generators in ``_seed_generators`` (they are not
    variables); plain attributes are read too, for layers that bypass the tracker.
    """
    seen: set[int] = set()
    for sub in sublayers(layer):
        candidates = list(getattr(sub, "_seed_generators", None) or []) + list(vars(sub).values())
        for value in candidates:
            if isinstance(value, keras.random.SeedGenerator) and id(value) not in seen:
                seen.add(id(value))
                yield value


# -- saving internals --------------------------------------------------------------------


def skeleton_scope():
    """A scope in which a model built from config allocates no variable, and is then forgotten.

    Why private: ``StatelessScope(initialize_variables=False)`` defers variable creation by
    registering them in the global ``uninitialized_variables`` list; the skeleton must be
    taken out of that list again, or a later scope would initialize it.
    """
    import contextlib

    from keras.src.backend.common import global_state

    @contextlib.contextmanager
    def scope():
        before = list(global_state.get_global_attribute("uninitialized_variables") or [])
        try:
            with keras.StatelessScope(initialize_variables=False):
                yield
        finally:
            global_state.set_global_attribute("uninitialized_variables", before)

    return scope()


def legacy_model_from_config(config: dict, *, custom_objects: dict) -> Any:
    """Build a model from a Keras 2 (``.h5``) model config, with Keras 2 semantics.

    Why private: this is the code path ``keras.models.load_model`` takes for legacy ``.h5``
    files (``legacy.saving``), which is not exported on its own.
    """
    from keras.src.legacy.saving import saving_options, saving_utils

    with saving_options.keras_option_scope(use_legacy_config=True):
        return saving_utils.model_from_config(config, custom_objects=custom_objects)


def safe_mode_scope(safe_mode: bool):
    """Keras's own safe-mode switch for deserialization (``SafeModeScope``; not exported)."""
    from keras.src.saving import serialization_lib

    return serialization_lib.SafeModeScope(safe_mode)

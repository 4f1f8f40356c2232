"""Combine ops: how the outputs of parallel branches become one tensor.

Each op is registered by name and called as ``op(tensors, name=..., weights=..., context=...)``.
Element-wise ops need equal shapes; the builders make them equal (or raise) beforehand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import keras

from kmerge.graph.layers import Gate, LearnedWeights, Stack, WeightedSum
from kmerge.registry import Registry


@dataclass(frozen=True)
class CombineOp:
    """A combine op: ``elementwise`` ops need inputs of one shape."""

    build: Callable[..., object]
    elementwise: bool
    needs_weights: bool = False
    needs_context: bool = False


combine_ops: Registry[CombineOp] = Registry("combine op")


def _merge_layer(cls):
    return lambda tensors, *, name, **_: cls(name=name)(list(tensors))


combine_ops.register("concat")(
    CombineOp(lambda t, *, name, **_: keras.layers.Concatenate(axis=-1, name=name)(list(t)), False)
)
for _name, _cls in {
    "average": keras.layers.Average,
    "add": keras.layers.Add,
    "multiply": keras.layers.Multiply,
    "maximum": keras.layers.Maximum,
    "minimum": keras.layers.Minimum,
}.items():
    combine_ops.register(_name)(CombineOp(_merge_layer(_cls), True))
combine_ops.register("stack")(CombineOp(_merge_layer(Stack), True))
combine_ops.register("weighted")(
    CombineOp(
        lambda t, *, name, weights, **_: WeightedSum(weights, name=name)(list(t)),
        True,
        needs_weights=True,
    )
)
combine_ops.register("learned_weights")(CombineOp(_merge_layer(LearnedWeights), True))
combine_ops.register("gate")(
    CombineOp(
        lambda t, *, name, context, **_: Gate(name=name)([context, *t]),
        True,
        needs_context=True,
    )
)


def combine(op_name: str, tensors: Sequence, *, name: str, weights=None, context=None):
    """Apply the registered op ``op_name`` to ``tensors``."""
    return combine_ops.get(op_name).build(tensors, name=name, weights=weights, context=context)

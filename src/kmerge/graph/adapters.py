"""Shape adapters and the planner that chooses the least lossy one.

Order of preference (first that applies wins):

1. nothing, when the shapes already agree;
2. ``Flatten`` / ``Reshape``, when the element counts agree (no information lost);
3. global average pooling, from a spatial or sequence map to a vector (then a Dense
   projection if the channel count still differs);
4. ``Resizing`` between spatial sizes (then a 1x1 convolution if channels differ);
5. a trainable ``Dense`` projection (``Dense`` + ``Reshape`` for non-vector targets).

Projections are trainable even when the sources are frozen: this is model stitching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras

from kmerge.errors import IncompatibleModelsError

Shape = tuple  # without the batch axis; entries may be None


@dataclass(frozen=True)
class AdapterStep:
    """One adapter layer the planner chose."""

    kind: str  # flatten | reshape | global_pool | resize | conv1x1 | dense
    from_shape: Shape
    to_shape: Shape
    trainable: bool

    def describe(self) -> str:
        return f"{self.kind} {fmt(self.from_shape)} -> {fmt(self.to_shape)}"


def fmt(shape: Shape) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in (None, *shape)) + ")"


def compatible(src: Shape, dst: Shape) -> bool:
    """Same rank and every known dimension equal."""
    return len(src) == len(dst) and all(a is None or b is None or a == b for a, b in zip(src, dst))


def _known(shape: Shape) -> bool:
    return all(d is not None for d in shape)


def plan(src: Shape, dst: Shape) -> list[AdapterStep] | None:
    """The adapter steps from ``src`` to ``dst``, or None when no adapter fits."""
    src, dst = tuple(src), tuple(dst)
    if compatible(src, dst):
        return []
    if _known(src) and _known(dst) and math.prod(src) == math.prod(dst):
        kind = "flatten" if len(dst) == 1 else "reshape"
        return [AdapterStep(kind, src, dst, False)]
    steps: list[AdapterStep] = []
    cur = src
    if len(cur) in (2, 3, 4) and len(dst) == 1:  # sequence / image / volume -> vector
        steps.append(AdapterStep("global_pool", cur, (cur[-1],), False))
        cur = (cur[-1],)
    elif len(cur) == len(dst) and len(cur) in (3, 4) and _known(dst):
        if cur[:-1] != dst[:-1]:
            if len(cur) != 3:
                return None  # Resizing exists for 2-D maps only
            steps.append(AdapterStep("resize", cur, (*dst[:-1], cur[-1]), False))
            cur = (*dst[:-1], cur[-1])
        if cur[-1] != dst[-1]:
            steps.append(AdapterStep("conv1x1", cur, dst, True))
            cur = dst
        return steps
    elif len(cur) == len(dst) == 2 and compatible(cur[:-1], dst[:-1]) and dst[-1] is not None:
        # sequence -> sequence with other features: Dense acts on the last axis
        steps.append(AdapterStep("dense", cur, dst, True))
        return steps
    if compatible(cur, dst):
        return steps
    if not _known(dst) or (len(cur) != 1 and not _known(cur)):
        return None
    if len(cur) != 1:
        steps.append(AdapterStep("flatten", cur, (math.prod(cur),), False))
        cur = (math.prod(cur),)
    steps.append(AdapterStep("dense", cur, (math.prod(dst),), True))
    if len(dst) != 1:
        steps.append(AdapterStep("reshape", (math.prod(dst),), dst, False))
    return steps


def layers_for(step: AdapterStep, name: str) -> keras.layers.Layer:
    """The Keras layer that performs ``step``."""
    if step.kind == "flatten":
        return keras.layers.Flatten(name=name)
    if step.kind == "reshape":
        return keras.layers.Reshape(step.to_shape, name=name)
    if step.kind == "global_pool":
        rank = len(step.from_shape) - 1
        cls = {1: keras.layers.GlobalAveragePooling1D, 2: keras.layers.GlobalAveragePooling2D,
               3: keras.layers.GlobalAveragePooling3D}[rank]
        return cls(name=name)
    if step.kind == "resize":
        return keras.layers.Resizing(step.to_shape[0], step.to_shape[1], name=name)
    if step.kind == "conv1x1":
        return keras.layers.Conv2D(step.to_shape[-1], 1, name=name)
    if step.kind == "dense":
        return keras.layers.Dense(step.to_shape[-1], name=name)
    raise ValueError(f"unknown adapter kind {step.kind!r}")  # planner bug, not user input


def adapt(tensor, steps: list[AdapterStep], *, name: str, taken: set[str]):
    """Apply ``steps`` to ``tensor``; layer names are ``{name}_{kind}``, made unique."""
    for step in steps:
        base, k = f"{name}_{step.kind}", 1
        layer_name = base
        while layer_name in taken:
            layer_name = f"{base}_{k}"
            k += 1
        taken.add(layer_name)
        tensor = layers_for(step, layer_name)(tensor)
    return tensor


def mismatch_error(what_a: str, shape_a: Shape, what_b: str, shape_b: Shape, fix: str):
    return IncompatibleModelsError(
        f"{what_a} gives {fmt(shape_a)} but {what_b} expects {fmt(shape_b)}; {fix}"
    )

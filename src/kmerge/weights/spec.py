"""The permutation spec of an architecture, derived from its Keras graph (see
:mod:`kmerge.weights.align`): kmerge's graph walk seen as layers and calls over numbered
tensors, the architecture comparison, and the union-find of permutation groups."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from kmerge.errors import IncompatibleModelsError
from kmerge.graph import replay
from kmerge.weights.validate import layer_config_difference


# ----------------------------------------------------------------------------- graph walk
@dataclass
class Node:
    layer: int  # index into SpecWalk.layers
    call: int  # k-th call of that layer, counted as kmerge.graph.rebuild counts them
    inputs: list[int]  # tensor indices
    outputs: list[int]


@dataclass
class SpecWalk:
    """A model's graph with nested Sequential/Functional models inlined."""

    model: keras.Model
    layers: list[keras.layers.Layer] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # 'block/dense' paths
    nodes: list[Node] = field(default_factory=list)
    shapes: list[tuple] = field(default_factory=list)  # per tensor, batch axis included
    producer: list[tuple[int, int] | None] = field(default_factory=list)  # (node, out) or None
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)


def spec_walk(model: keras.Model) -> SpecWalk:
    """The permutation-spec view of kmerge's one graph walk (same tensor ids, same calls)."""
    w = replay.walk(model)
    out = SpecWalk(model, inputs=list(w.inputs), outputs=list(w.outputs))
    out.shapes = [w.shape(i) for i in range(len(w.tensors))]
    out.producer = [None] * len(w.tensors)
    index: dict[int, int] = {}
    for call in w.leaf_calls:
        if id(call.op) not in index:
            index[id(call.op)] = len(out.layers)
            out.layers.append(call.op)
            out.names.append(call.name)
        n = len(out.nodes)
        for j, t in enumerate(call.outputs):
            out.producer[t] = (n, j)
        out.nodes.append(Node(index[id(call.op)], call.index, list(call.inputs),
                               list(call.outputs)))
    return out


def layer_weights(op: Any) -> list:
    """The weights of a layer; none for a keras.ops operation (NotEqual, Add, ...)."""
    return list(getattr(op, "weights", None) or [])


def check_same(ref: SpecWalk, other: SpecWalk, names: tuple[str, str]) -> None:
    """Raise IncompatibleModelsError at the first structural difference."""
    a, b = names
    if len(ref.layers) != len(other.layers) or len(ref.nodes) != len(other.nodes):
        raise IncompatibleModelsError(
            f"models {a!r} and {b!r} have different architectures: {len(ref.layers)} layers / "
            f"{len(ref.nodes)} calls vs {len(other.layers)} / {len(other.nodes)}; alignment "
            "needs two models of the same architecture (merge different ones with "
            "kmerge.parallel or kmerge.fuse)"
        )
    for i, (la, lb) in enumerate(zip(ref.layers, other.layers)):
        where = f"layer {i} ({a!r}: {ref.names[i]!r}, {b!r}: {other.names[i]!r})"
        if type(la) is not type(lb):
            raise IncompatibleModelsError(
                f"models {a!r} and {b!r} differ at {where}: {type(la).__name__} vs "
                f"{type(lb).__name__}; alignment needs the same architecture"
            )
        wa, wb = layer_weights(la), layer_weights(lb)
        sa, sb = [tuple(w.shape) for w in wa], [tuple(w.shape) for w in wb]
        if sa != sb:
            raise IncompatibleModelsError(
                f"models {a!r} and {b!r} differ at {where}: variable shapes {sa} vs {sb}; "
                "alignment needs the same architecture"
            )
        diff = layer_config_difference(la, lb)  # the weight merges' one config comparison
        if diff is not None:
            raise IncompatibleModelsError(
                f"models {a!r} and {b!r} differ at {where}: config {diff[0]!r} is "
                f"{diff[1]!r} vs {diff[2]!r}; alignment needs the same architecture"
            )
    for na, nb in zip(ref.nodes, other.nodes):
        if (na.layer, na.inputs) != (nb.layer, nb.inputs):
            raise IncompatibleModelsError(
                f"models {a!r} and {b!r} are wired differently at layer "
                f"{ref.names[na.layer]!r}; alignment needs the same architecture"
            )


# ----------------------------------------------------------------------------- axis specs
@dataclass
class Axis:
    """Per index of a feature axis: the group it belongs to (-1: fixed) and its unit."""

    group: np.ndarray
    unit: np.ndarray

    @staticmethod
    def fixed(n: int) -> Axis:
        return Axis(np.full(n, -1, np.int64), np.zeros(n, np.int64))

    @staticmethod
    def new(group: int, n: int) -> Axis:
        return Axis(np.full(n, group, np.int64), np.arange(n, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.group)

    def tile(self, reps: int) -> Axis:
        return Axis(np.tile(self.group, reps), np.tile(self.unit, reps))

    @staticmethod
    def concat(axes: Sequence[Axis]) -> Axis:
        return Axis(np.concatenate([a.group for a in axes]),
                     np.concatenate([a.unit for a in axes]))


@dataclass
class Group:
    size: int
    parent: int
    fenced: str | None = None
    layers: list[str] = field(default_factory=list)


class Spec:
    """Permutation groups of one architecture, derived from its graph (see module doc)."""

    def __init__(self, walk: SpecWalk) -> None:
        self.walk = walk
        self.groups: list[Group] = []
        self.tensors: list[Axis | None] = [None] * len(walk.shapes)
        # id(variable) -> (variable, per-axis Axis or None); variables of walk.layers only.
        self.bindings: dict[int, tuple[Any, list[Axis | None]]] = {}
        self.created: dict[tuple[int, str], int] = {}  # (layer, key) -> group
        self.fenced: list[dict[str, str]] = []
        self.creators: dict[int, list[tuple[int, int]]] = {}  # group -> [(node, out)]
        self._derive()

    # union-find ------------------------------------------------------------------------
    def find(self, g: int) -> int:
        while self.groups[g].parent != g:
            self.groups[g].parent = self.groups[self.groups[g].parent].parent
            g = self.groups[g].parent
        return g

    def _fence_group(self, g: int, reason: str) -> None:
        root = self.groups[self.find(g)]
        if root.fenced is None:
            root.fenced = reason

    def _union(self, g: int, h: int, reason: str) -> bool:
        g, h = self.find(g), self.find(h)
        if g == h:
            return True
        if self.groups[g].size != self.groups[h].size:
            self._fence_group(g, reason)
            self._fence_group(h, reason)
            return False
        self.groups[h].parent = g
        self.groups[g].layers += self.groups[h].layers
        if self.groups[g].fenced is None:
            self.groups[g].fenced = self.groups[h].fenced
        return True

    def _note(self, layer: int, reason: str) -> None:
        entry = {"layer": self.walk.names[layer], "reason": reason}
        if entry not in self.fenced:
            self.fenced.append(entry)

    def fence(self, axes: Sequence[Axis | None], layer: int, reason: str,
              *, always: bool = True) -> None:
        """Leave every group reaching ``axes`` unpermuted; record why."""
        hit = False
        for ax in axes:
            if ax is None:
                continue
            for g in np.unique(ax.group[ax.group >= 0]):
                self._fence_group(int(g), f"{self.walk.names[layer]}: {reason}")
                hit = True
        if hit or always:
            self._note(layer, reason)

    def unify(self, a: Axis, b: Axis, layer: int, reason: str) -> Axis:
        """Tie two axes that must carry the same permutation index by index."""
        if len(a) != len(b):
            self.fence([a, b], layer, f"{reason}: feature sizes {len(a)} and {len(b)} differ")
            return Axis.fixed(max(len(a), len(b)))
        ok = True
        pairs = np.unique(np.stack([a.group, a.unit, b.group, b.unit], axis=1), axis=0)
        for ga, ua, gb, ub in pairs.tolist():
            if ga < 0 and gb < 0:
                continue
            if ga < 0 or gb < 0 or ua != ub or not self._union(ga, gb, reason):
                ok = False
                for g in (ga, gb):
                    if g >= 0:
                        self._fence_group(g, f"{self.walk.names[layer]}: {reason}")
        if not ok:
            self._note(layer, f"{reason} (ties units to a fixed or mismatched axis)")
        return a

    # groups and bindings ---------------------------------------------------------------
    def new_group(self, layer: int, key: str, size: int) -> int:
        if (layer, key) not in self.created:
            self.groups.append(Group(size, len(self.groups), None, [self.walk.names[layer]]))
            self.created[(layer, key)] = len(self.groups) - 1
        return self.created[(layer, key)]

    def bind(self, layer: int, var: Any, axes: Sequence[Axis | None]) -> None:
        axes = list(axes) + [None] * (len(var.shape) - len(axes))
        known = self.bindings.get(id(var))
        if known is None:
            self.bindings[id(var)] = (var, axes)
            for ax in axes:
                for g in (np.unique(ax.group[ax.group >= 0]) if ax is not None else ()):
                    root = self.groups[self.find(int(g))]
                    if self.walk.names[layer] not in root.layers:
                        root.layers.append(self.walk.names[layer])
            return
        for old, ax in zip(known[1], axes):  # a shared layer: every call must agree
            if old is not None and ax is not None:
                self.unify(old, ax, layer, "shared layer called on differently permuted inputs")
            elif (old is None) != (ax is None):
                self.fence([old, ax], layer, "shared layer with inconsistent permutations")

    # derivation ------------------------------------------------------------------------
    def _derive(self) -> None:
        walk = self.walk
        from kmerge.weights import rules  # the rules build on this module's Axis

        for t in walk.inputs:
            self.tensors[t] = Axis.fixed(last_axis(walk.shapes[t]))
        for n, node in enumerate(walk.nodes):
            layer = walk.layers[node.layer]
            ins = [self.tensors[t] for t in node.inputs]
            in_shapes = [walk.shapes[t] for t in node.inputs]
            out_shapes = [walk.shapes[t] for t in node.outputs]
            rule = rules.RULES.get(type(layer).__name__)
            outs = None
            if rule is not None:
                outs = rule(self, node.layer, layer, ins, in_shapes, out_shapes)
            else:
                self.fence(ins, node.layer, f"{type(layer).__name__}: {why_fenced(layer)}")
            if outs is None:
                outs = [Axis.fixed(last_axis(s)) for s in out_shapes]
            for j, (t, ax) in enumerate(zip(node.outputs, outs)):
                if ax is None or len(ax) != last_axis(walk.shapes[t]):
                    ax = Axis.fixed(last_axis(walk.shapes[t]))
                self.tensors[t] = ax
                if creates_units(layer):
                    for g in np.unique(ax.group[ax.group >= 0]):
                        self.creators.setdefault(int(g), []).append((n, j))
        for t in walk.outputs:
            ax = self.tensors[t]
            for g in np.unique(ax.group[ax.group >= 0]):
                root = self.groups[self.find(int(g))]
                if root.fenced is None:
                    root.fenced = "model output"
                    if len(root.layers) > 1:
                        name = self.walk.names[walk.nodes[walk.producer[t][0]].layer] \
                            if walk.producer[t] else "input"
                        self.fenced.append({"layer": name, "reason": (
                            "its units reach a model output, so the units of "
                            f"{', '.join(root.layers)} stay in place")})

    def active(self) -> list[int]:
        """Root groups that will be permuted."""
        return [g for g in range(len(self.groups))
                if self.find(g) == g and self.groups[g].fenced is None]

    def describe(self) -> list[dict]:
        return [{"size": self.groups[g].size, "layers": list(dict.fromkeys(self.groups[g].layers))}
                for g in self.active()]

    def roots(self, ax: Axis) -> np.ndarray:
        """The root group of each index of ``ax`` (-1 where fixed)."""
        table = np.array([self.find(g) for g in range(len(self.groups))] + [-1], np.int64)
        return table[ax.group]  # group -1 picks the trailing -1

    def positions(self, ax: Axis, g: int) -> np.ndarray:
        """Indices of group ``g`` on ``ax`` as a (blocks, size) array."""
        where = np.flatnonzero(self.roots(ax) == g)
        blocks = np.unique(where - ax.unit[where])
        return blocks[:, None] + np.arange(self.groups[g].size)[None, :]

    def source_index(self, ax: Axis, perms: dict[int, np.ndarray],
                     skip: int | None = None) -> np.ndarray:
        """For a permuted axis: ``new[i] = old[source_index[i]]``."""
        src = np.arange(len(ax))
        roots = self.roots(ax)
        for g, perm in perms.items():
            if g == skip:
                continue
            where = np.flatnonzero(roots == g)
            if len(where):
                src[where] = where - ax.unit[where] + perm[ax.unit[where]]
        return src


def last_axis(shape: tuple) -> int:
    return int(shape[-1]) if shape and shape[-1] is not None else 0


def why_fenced(layer) -> str:
    name = type(layer).__name__
    if isinstance(layer, keras.layers.RNN) or "RNN" in name or "LSTM" in name or "GRU" in name \
            or name in ("Bidirectional",):
        return "recurrent layer; its units are not permuted and its inputs stay fixed"
    if "Attention" in name:
        return "attention layer; its heads and units are not permuted and its inputs stay fixed"
    if name in ("Reshape", "Permute"):
        return "reshape that moves the feature axis; its inputs stay fixed"
    return "kmerge does not know how this layer treats its feature axis; its inputs stay fixed"


# Layers that create units: each opens a new permutation group.
CREATORS = {"Dense", "Conv1D", "Conv2D", "Conv3D", "SeparableConv1D", "SeparableConv2D",
            "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose", "Embedding"}


def creates_units(layer) -> bool:
    return type(layer).__name__ in CREATORS


def permuted(spec: Spec, arrays: dict[int, np.ndarray], perms: dict[int, np.ndarray],
              *, skip: tuple[int, int] | None = None, ids: Sequence[int] | None = None
              ) -> dict[int, np.ndarray]:
    """Apply ``perms`` to every bound variable; ``skip=(var id, axis)`` leaves one axis alone."""
    out = dict(arrays)
    for vid in (ids if ids is not None else spec.bindings):
        _, axes = spec.bindings[vid]
        arr = arrays[vid]
        for k, ax in enumerate(axes):
            if ax is None or (skip is not None and skip == (vid, k)):
                continue
            src = spec.source_index(ax, perms)
            if not np.array_equal(src, np.arange(len(src))):
                arr = np.take(arr, src, axis=k)
        out[vid] = arr
    return out

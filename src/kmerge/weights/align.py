"""Permutation alignment: make two same-architecture models' hidden units line up.

Two networks trained from different seeds compute similar features in a different order;
averaging them unit by unit mixes unrelated features. :func:`align` permutes the hidden
units of one model (``other``) so they match another (``reference``) without changing what
``other`` computes (Git Re-Basin, Ainsworth et al. 2023).

The permutation spec is derived from the Keras graph, not written by hand:

* every tensor's last (channels-last feature) axis carries, per index, the *permutation
  group* it belongs to and its unit number in that group (or "fixed");
* layers that create units (Dense, Conv, SeparableConv, Embedding) open a new group;
* layers that act per unit (BatchNorm, LayerNorm, activations, Dropout, pooling, padding,
  DepthwiseConv with ``depth_multiplier=1``) pass the axis through and bind their weights to it;
* ``Add`` / ``Multiply`` / ``Average`` ... tie their inputs' groups (union-find: a residual
  stream is one group); ``Concatenate`` lays its inputs' groups side by side; ``Flatten``
  after a conv repeats the channel group over positions (index ``pos * C + c``);
* layers kmerge cannot reason about (recurrent, attention, custom, most reshapes) *fence*:
  every group reaching them is left unpermuted, and the result's ``kmerge.info`` says which.
  Model inputs and outputs are never permuted.

All matching math is NumPy (float64), so the result is the same on every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from kmerge.errors import IncompatibleModelsError, InvalidArgumentError, InvalidModelError
from kmerge.graph import replay
from kmerge.graph.rebuild import check_model, input_specs, is_graph_model, rebuild
from kmerge.metadata import attach

METHODS = ("weights", "activations")

__all__ = ["align", "random_permute", "METHODS"]


# ----------------------------------------------------------------------------- graph walk
@dataclass
class _Node:
    layer: int  # index into _Walk.layers
    call: int  # k-th call of that layer, counted as kmerge.graph.rebuild counts them
    inputs: list[int]  # tensor indices
    outputs: list[int]


@dataclass
class _Walk:
    """A model's graph with nested Sequential/Functional models inlined."""

    model: keras.Model
    layers: list[keras.layers.Layer] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # 'block/dense' paths
    nodes: list[_Node] = field(default_factory=list)
    shapes: list[tuple] = field(default_factory=list)  # per tensor, batch axis included
    producer: list[tuple[int, int] | None] = field(default_factory=list)  # (node, out) or None
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)


def _walk(model: keras.Model) -> _Walk:
    """The permutation-spec view of kmerge's one graph walk (same tensor ids, same calls)."""
    w = replay.walk(model)
    out = _Walk(model, inputs=list(w.inputs), outputs=list(w.outputs))
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
        out.nodes.append(_Node(index[id(call.op)], call.index, list(call.inputs),
                               list(call.outputs)))
    return out


def _weights(op: Any) -> list:
    """The weights of a layer; none for a keras.ops operation (NotEqual, Add, ...)."""
    return list(getattr(op, "weights", None) or [])


_IGNORED_CONFIG = {"name", "trainable", "seed", "dtype"}


def _config(layer: keras.layers.Layer) -> dict:
    try:
        cfg = layer.get_config()
    except Exception:  # custom layers without get_config: compare types and shapes only
        return {}
    return {k: v for k, v in cfg.items() if k not in _IGNORED_CONFIG}


def _check_same(ref: _Walk, other: _Walk, names: tuple[str, str]) -> None:
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
        wa, wb = _weights(la), _weights(lb)
        sa, sb = [tuple(w.shape) for w in wa], [tuple(w.shape) for w in wb]
        if sa != sb:
            raise IncompatibleModelsError(
                f"models {a!r} and {b!r} differ at {where}: variable shapes {sa} vs {sb}; "
                "alignment needs the same architecture"
            )
        ca, cb = _config(la), _config(lb)
        if ca != cb:
            key = next(k for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k))
            raise IncompatibleModelsError(
                f"models {a!r} and {b!r} differ at {where}: config {key!r} is "
                f"{ca.get(key)!r} vs {cb.get(key)!r}; alignment needs the same architecture"
            )
    for na, nb in zip(ref.nodes, other.nodes):
        if (na.layer, na.inputs) != (nb.layer, nb.inputs):
            raise IncompatibleModelsError(
                f"models {a!r} and {b!r} are wired differently at layer "
                f"{ref.names[na.layer]!r}; alignment needs the same architecture"
            )


# ----------------------------------------------------------------------------- axis specs
@dataclass
class _Axis:
    """Per index of a feature axis: the group it belongs to (-1: fixed) and its unit."""

    group: np.ndarray
    unit: np.ndarray

    @staticmethod
    def fixed(n: int) -> _Axis:
        return _Axis(np.full(n, -1, np.int64), np.zeros(n, np.int64))

    @staticmethod
    def new(group: int, n: int) -> _Axis:
        return _Axis(np.full(n, group, np.int64), np.arange(n, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.group)

    def tile(self, reps: int) -> _Axis:
        return _Axis(np.tile(self.group, reps), np.tile(self.unit, reps))

    @staticmethod
    def concat(axes: Sequence[_Axis]) -> _Axis:
        return _Axis(np.concatenate([a.group for a in axes]),
                     np.concatenate([a.unit for a in axes]))


@dataclass
class _Group:
    size: int
    parent: int
    fenced: str | None = None
    layers: list[str] = field(default_factory=list)


class _Spec:
    """Permutation groups of one architecture, derived from its graph (see module doc)."""

    def __init__(self, walk: _Walk) -> None:
        self.walk = walk
        self.groups: list[_Group] = []
        self.tensors: list[_Axis | None] = [None] * len(walk.shapes)
        # id(variable) -> (variable, per-axis _Axis or None); variables of walk.layers only.
        self.bindings: dict[int, tuple[Any, list[_Axis | None]]] = {}
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

    def fence(self, axes: Sequence[_Axis | None], layer: int, reason: str,
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

    def unify(self, a: _Axis, b: _Axis, layer: int, reason: str) -> _Axis:
        """Tie two axes that must carry the same permutation index by index."""
        if len(a) != len(b):
            self.fence([a, b], layer, f"{reason}: feature sizes {len(a)} and {len(b)} differ")
            return _Axis.fixed(max(len(a), len(b)))
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
            self.groups.append(_Group(size, len(self.groups), None, [self.walk.names[layer]]))
            self.created[(layer, key)] = len(self.groups) - 1
        return self.created[(layer, key)]

    def bind(self, layer: int, var: Any, axes: Sequence[_Axis | None]) -> None:
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
        for t in walk.inputs:
            self.tensors[t] = _Axis.fixed(_last(walk.shapes[t]))
        for n, node in enumerate(walk.nodes):
            layer = walk.layers[node.layer]
            ins = [self.tensors[t] for t in node.inputs]
            in_shapes = [walk.shapes[t] for t in node.inputs]
            out_shapes = [walk.shapes[t] for t in node.outputs]
            rule = _RULES.get(type(layer).__name__)
            outs = None
            if rule is not None:
                outs = rule(self, node.layer, layer, ins, in_shapes, out_shapes)
            else:
                self.fence(ins, node.layer, f"{type(layer).__name__}: {_why(layer)}")
            if outs is None:
                outs = [_Axis.fixed(_last(s)) for s in out_shapes]
            for j, (t, ax) in enumerate(zip(node.outputs, outs)):
                if ax is None or len(ax) != _last(walk.shapes[t]):
                    ax = _Axis.fixed(_last(walk.shapes[t]))
                self.tensors[t] = ax
                if _creates(layer):
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

    def roots(self, ax: _Axis) -> np.ndarray:
        """The root group of each index of ``ax`` (-1 where fixed)."""
        table = np.array([self.find(g) for g in range(len(self.groups))] + [-1], np.int64)
        return table[ax.group]  # group -1 picks the trailing -1

    def positions(self, ax: _Axis, g: int) -> np.ndarray:
        """Indices of group ``g`` on ``ax`` as a (blocks, size) array."""
        where = np.flatnonzero(self.roots(ax) == g)
        blocks = np.unique(where - ax.unit[where])
        return blocks[:, None] + np.arange(self.groups[g].size)[None, :]

    def source_index(self, ax: _Axis, perms: dict[int, np.ndarray],
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


def _last(shape: tuple) -> int:
    return int(shape[-1]) if shape and shape[-1] is not None else 0


def _why(layer) -> str:
    name = type(layer).__name__
    if isinstance(layer, keras.layers.RNN) or "RNN" in name or "LSTM" in name or "GRU" in name \
            or name in ("Bidirectional",):
        return "recurrent layer; its units are not permuted and its inputs stay fixed"
    if "Attention" in name:
        return "attention layer; its heads and units are not permuted and its inputs stay fixed"
    if name in ("Reshape", "Permute"):
        return "reshape that moves the feature axis; its inputs stay fixed"
    return "kmerge does not know how this layer treats its feature axis; its inputs stay fixed"


def _creates(layer) -> bool:
    return type(layer).__name__ in _CREATORS


# --------------------------------------------------------------------------- layer rules
_Rule = Callable[..., "list[_Axis | None] | None"]
_RULES: dict[str, _Rule] = {}
_CREATORS = {"Dense", "Conv1D", "Conv2D", "Conv3D", "SeparableConv1D", "SeparableConv2D",
             "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose", "Embedding"}


def _rule(*names: str):
    def register(fn):
        for n in names:
            _RULES[n] = fn
        return fn
    return register


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") in (None, "channels_last")


@_rule("Dense")
def _dense(spec, li, layer, ins, in_shapes, out_shapes):
    g = _Axis.new(spec.new_group(li, "out", layer.units), layer.units)
    spec.bind(li, layer.kernel, [ins[0], g])
    if layer.use_bias:
        spec.bind(li, layer.bias, [g])
    return [g]


@_rule("Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")
def _conv(spec, li, layer, ins, in_shapes, out_shapes):
    if not _channels_last(layer):
        return spec.fence(ins, li, "channels_first convolution (kmerge permutes the last axis)")
    if getattr(layer, "groups", 1) != 1:
        return spec.fence(ins, li, f"grouped convolution (groups={layer.groups})")
    g = _Axis.new(spec.new_group(li, "out", layer.filters), layer.filters)
    transpose = type(layer).__name__.endswith("Transpose")  # kernel (..., out, in)
    axes = [None] * (len(layer.kernel.shape) - 2) + ([g, ins[0]] if transpose else [ins[0], g])
    spec.bind(li, layer.kernel, axes)
    if layer.use_bias:
        spec.bind(li, layer.bias, [g])
    return [g]


@_rule("DepthwiseConv1D", "DepthwiseConv2D")
def _depthwise(spec, li, layer, ins, in_shapes, out_shapes):
    if not _channels_last(layer):
        return spec.fence(ins, li, "channels_first convolution")
    if layer.depth_multiplier != 1:  # output index c*m + k is not a block layout
        return spec.fence(ins, li, f"depth_multiplier={layer.depth_multiplier} (only 1 is "
                          "supported)")
    nd = len(layer.kernel.shape) - 2
    spec.bind(li, layer.kernel, [None] * nd + [ins[0], None])
    if layer.use_bias:
        spec.bind(li, layer.bias, [ins[0]])
    return [ins[0]]


@_rule("SeparableConv1D", "SeparableConv2D")
def _separable(spec, li, layer, ins, in_shapes, out_shapes):
    if not _channels_last(layer):
        return spec.fence(ins, li, "channels_first convolution")
    if layer.depth_multiplier != 1:
        return spec.fence(ins, li, f"depth_multiplier={layer.depth_multiplier} (only 1 is "
                          "supported)")
    g = _Axis.new(spec.new_group(li, "out", layer.filters), layer.filters)
    nd = len(layer.depthwise_kernel.shape) - 2
    spec.bind(li, layer.depthwise_kernel, [None] * nd + [ins[0], None])
    spec.bind(li, layer.pointwise_kernel, [None] * nd + [ins[0], g])
    if layer.use_bias:
        spec.bind(li, layer.bias, [g])
    return [g]


@_rule("Embedding")
def _embedding(spec, li, layer, ins, in_shapes, out_shapes):
    dim = int(layer.embeddings.shape[1])
    g = _Axis.new(spec.new_group(li, "out", dim), dim)
    spec.bind(li, layer.embeddings, [None, g])
    return [g]


def _is_last_axis(axis, rank: int) -> bool:
    axes = list(axis) if isinstance(axis, list | tuple) else [axis]
    return len(axes) == 1 and axes[0] in (-1, rank - 1)


@_rule("BatchNormalization")
def _batchnorm(spec, li, layer, ins, in_shapes, out_shapes):
    if not _is_last_axis(layer.axis, len(in_shapes[0])):
        return spec.fence(ins, li, f"normalizes axis {layer.axis}, not the feature axis")
    for var in _weights(layer):
        spec.bind(li, var, [ins[0]])
    return [ins[0]]


@_rule("LayerNormalization", "RMSNormalization", "UnitNormalization")
def _layernorm(spec, li, layer, ins, in_shapes, out_shapes):
    if not _is_last_axis(getattr(layer, "axis", -1), len(in_shapes[0])):
        return spec.fence(ins, li, f"normalizes over axes {layer.axis}; only the last axis "
                          "is supported")
    for var in _weights(layer):
        spec.bind(li, var, [None] * (len(var.shape) - 1) + [ins[0]])
    return [ins[0]]


@_rule("PReLU")
def _prelu(spec, li, layer, ins, in_shapes, out_shapes):
    alpha = layer.alpha
    if alpha.shape[-1] == len(ins[0]) and len(ins[0]) > 1:
        spec.bind(li, alpha, [None] * (len(alpha.shape) - 1) + [ins[0]])
    return [ins[0]]


# Elementwise or per-position layers with no weights tied to units: the axis passes through.
_PASS = ("Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "Dropout", "SpatialDropout1D",
         "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout", "GaussianNoise",
         "AlphaDropout", "ActivityRegularization", "Identity", "Masking", "RepeatVector")
_POSITIONAL = ("MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D",
               "AveragePooling2D", "AveragePooling3D", "GlobalMaxPooling1D",
               "GlobalMaxPooling2D", "GlobalMaxPooling3D", "GlobalAveragePooling1D",
               "GlobalAveragePooling2D", "GlobalAveragePooling3D", "ZeroPadding1D",
               "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D",
               "UpSampling1D", "UpSampling2D", "UpSampling3D")


@_rule(*_PASS)
def _passthrough(spec, li, layer, ins, in_shapes, out_shapes):
    if type(layer).__name__ == "Softmax" and not _is_last_axis(layer.axis, len(in_shapes[0])):
        spec.fence(ins, li, "softmax over an axis other than the feature axis")
        return None
    return [ins[0]]


@_rule(*_POSITIONAL)
def _positional(spec, li, layer, ins, in_shapes, out_shapes):
    if not _channels_last(layer):
        return spec.fence(ins, li, "channels_first layout")
    return [ins[0]]


@_rule("Rescaling", "Normalization", "Resizing", "CenterCrop", "RandomFlip", "RandomRotation",
       "RandomZoom", "RandomTranslation", "RandomCrop", "RandomContrast", "RandomBrightness")
def _preprocessing(spec, li, layer, ins, in_shapes, out_shapes):
    if any(ax is not None and (ax.group >= 0).any() for ax in ins):
        spec.fence(ins, li, "preprocessing layer on permutable units", always=False)
    return None


@_rule("Flatten")
def _flatten(spec, li, layer, ins, in_shapes, out_shapes):
    shape = in_shapes[0]
    if len(shape) <= 2:
        return [ins[0]]
    if not _channels_last(layer):
        return spec.fence(ins, li, "channels_first Flatten")
    if any(d is None for d in shape[1:]):
        return spec.fence(ins, li, f"flattens unknown spatial dims {shape}")
    positions = int(np.prod(shape[1:-1]))
    return [ins[0].tile(positions)]  # channels-last: index = pos * C + c


@_rule("Reshape")
def _reshape(spec, li, layer, ins, in_shapes, out_shapes):
    i, o = in_shapes[0], out_shapes[0]
    if i[-1] is not None and i[-1] == o[-1]:
        return [ins[0]]  # only the positions before the feature axis are regrouped
    if len(o) == 2 and all(d is not None for d in i[1:]):
        return _flatten(spec, li, layer, ins, in_shapes, out_shapes)
    return spec.fence(ins, li, f"reshape {i[1:]} -> {o[1:]} moves the feature axis")


@_rule("Permute")
def _permute(spec, li, layer, ins, in_shapes, out_shapes):
    if tuple(layer.dims)[-1] == len(in_shapes[0]) - 1:
        return [ins[0]]
    return spec.fence(ins, li, f"Permute{tuple(layer.dims)} moves the feature axis")


@_rule("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")
def _elementwise(spec, li, layer, ins, in_shapes, out_shapes):
    out = ins[0]
    for ax in ins[1:]:
        out = spec.unify(out, ax, li, f"{type(layer).__name__} of tensors")
    return [out]


@_rule("Concatenate")
def _concatenate(spec, li, layer, ins, in_shapes, out_shapes):
    if _is_last_axis(layer.axis, len(in_shapes[0])):
        return [_Axis.concat(ins)]
    return _elementwise(spec, li, layer, ins, in_shapes, out_shapes)


# ------------------------------------------------------------------------------ applying
def _arrays(model: keras.Model) -> dict[int, np.ndarray]:
    return {id(v): np.array(keras.ops.convert_to_numpy(v.value), copy=True) for v in model.weights}


def _permuted(spec: _Spec, arrays: dict[int, np.ndarray], perms: dict[int, np.ndarray],
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


def _model_with(model: keras.Model, arrays: dict[int, np.ndarray]) -> keras.Model:
    new = keras.models.clone_model(model)
    if len(new.weights) != len(model.weights):
        raise InvalidModelError(
            f"cannot copy model {model.name!r}: keras.models.clone_model gave "
            f"{len(new.weights)} variables instead of {len(model.weights)}"
        )
    for src, dst in zip(model.weights, new.weights):
        value = arrays[id(src)]
        if tuple(dst.shape) != value.shape:
            raise InvalidModelError(
                f"cannot copy model {model.name!r}: variable {dst.path} of the clone has shape "
                f"{tuple(dst.shape)}, the source {value.shape}"
            )
        dst.assign(value.astype(keras.backend.standardize_dtype(dst.dtype)))
    return new


def random_permute(model: keras.Model, *, seed: int = 0) -> keras.Model:
    """A copy of ``model`` with its hidden units shuffled at random; same function.

    Useful to test alignment: ``align(model, random_permute(model))`` restores the weights.

    Args:
        model: A Functional or Sequential model.
        seed: Seed of the shuffle.

    Returns:
        A new model; ``kmerge.info(new)["perms"]`` holds each group's permutation.

    Example:
        >>> shuffled = random_permute(model, seed=1)
        >>> np.allclose(model.predict(x), shuffled.predict(x), atol=1e-5)
        True
    """
    spec = _spec_for(check_model(model, model.name), model.name)
    rng = np.random.default_rng(seed)
    perms = {g: rng.permutation(spec.groups[g].size) for g in spec.active()}
    new = _model_with(model, _permuted(spec, _arrays(model), perms))
    attach(new, {"kind": "random_permute",
                                             "perms": [perms[g].tolist() for g in perms]})
    return new


# ------------------------------------------------------------------------------- matching
def _weight_matching(spec: _Spec, ref: dict[int, np.ndarray], ref_ids: dict[int, int],
                     other: dict[int, np.ndarray], *, max_iter: int, seed: int
                     ) -> tuple[dict[int, np.ndarray], int]:
    """Permutation coordinate descent (Ainsworth et al. 2023, Algorithm 1)."""
    from scipy.optimize import linear_sum_assignment

    groups = spec.active()
    perms = {g: np.arange(spec.groups[g].size) for g in groups}
    # Which (variable, axis) pairs each group touches; only trainable weights enter the
    # objective (moving statistics are permuted along, but are not "the function").
    trainable = {id(v) for layer in spec.walk.layers for v in getattr(layer, "trainable_weights", [])}
    touches: dict[int, list[tuple[int, int, np.ndarray]]] = {g: [] for g in groups}
    for vid, (_, axes) in spec.bindings.items():
        if vid not in trainable:
            continue
        for k, ax in enumerate(axes):
            if ax is None:
                continue
            for g in groups:
                pos = spec.positions(ax, g)
                if len(pos):
                    touches[g].append((vid, k, pos))
    a64 = {vid: ref[ref_ids[vid]].astype(np.float64) for vid in spec.bindings}
    b64 = {vid: other[vid].astype(np.float64) for vid in spec.bindings}
    rng = np.random.default_rng(seed)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (reported after the loop)
        improved = False
        for g in rng.permutation(groups):
            g = int(g)
            n = spec.groups[g].size
            cost = np.zeros((n, n))
            for vid, k, pos in touches[g]:
                b = _permuted(spec, b64, perms, skip=(vid, k), ids=[vid])[vid]
                a_k = np.moveaxis(a64[vid], k, 0)[pos]  # (blocks, n, rest...)
                b_k = np.moveaxis(b, k, 0)[pos]
                a_k = np.moveaxis(a_k, 1, 0).reshape(n, -1)
                b_k = np.moveaxis(b_k, 1, 0).reshape(n, -1)
                cost += a_k @ b_k.T
            _, best = linear_sum_assignment(cost, maximize=True)
            old = cost[np.arange(n), perms[g]].sum()
            new = cost[np.arange(n), best].sum()
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[g] = best
                improved = True
        if not improved:
            break
    return perms, iterations


def as_inputs(data: Any) -> list[np.ndarray]:
    """``data`` as a list of arrays (one per model input)."""
    if isinstance(data, dict):
        raise InvalidArgumentError(
            "data must be an array (or a list of arrays, one per model input), not a dict"
        )
    if isinstance(data, list | tuple):
        return [np.asarray(d) for d in data]
    return [np.asarray(data)]


def batches(data: Any, batch_size: int):
    """Yield ``data`` in batches: one array, or a list for multi-input models."""
    arrays = as_inputs(data)
    n = len(arrays[0])
    if n == 0:
        raise InvalidArgumentError("data is empty: pass at least one example")
    for start in range(0, n, batch_size):
        part = [a[start:start + batch_size] for a in arrays]
        yield part[0] if len(part) == 1 else part


def tap_model(walk: _Walk, taps: Sequence[tuple[int, int, str]]) -> tuple[keras.Model, Any]:
    """A model computing chosen tensors of ``walk.model`` (nested models inlined).

    Each tap is ``(node, index, kind)`` with kind ``"out"`` (the node's output ``index``),
    ``"in"`` (its input ``index``) or ``"pre"`` (a Dense/Conv's output before its activation). Returns the model and the
    :class:`~kmerge.graph.rebuild.Rebuilt` copy, whose ``layers`` map ``id(source layer)``
    to the copy the tap model uses (so its weights can be updated in place).
    """
    model = walk.model
    inputs = [keras.Input(shape=s, dtype=d) for s, d, _ in input_specs(model)]
    rb = rebuild(model, inputs, name=f"{model.name}_tap", freeze=True, taken=set())

    def tensor(t: int):
        return rb.values[t]

    outs = []
    pre_layers: dict[int, keras.layers.Layer] = {}
    for n, j, kind in taps:
        node = walk.nodes[n]
        if kind in ("out", "in"):
            outs.append(tensor((node.outputs if kind == "out" else node.inputs)[j]))
            continue
        layer = walk.layers[node.layer]
        if node.layer not in pre_layers:
            cfg = layer.get_config()
            cfg.update(activation="linear", name=f"{rb.copy_of(layer).name}_preact")
            pre = type(layer).from_config(cfg)
            pre.trainable = False
            pre_layers[node.layer] = pre
        pre = pre_layers[node.layer]
        x = pre(tensor(node.inputs[0]))
        if len(pre.weights) == len(layer.weights):
            for a, b in zip(rb.copy_of(layer).weights, pre.weights):
                b.assign(keras.ops.convert_to_numpy(a.value))
        outs.append(x)
    return replay.submodel(inputs, outs), rb


def run_taps(sub: keras.Model, data: Any, batch_size: int):
    """Yield the tap model's outputs (a list of numpy arrays) batch by batch."""
    for xb in batches(data, batch_size):
        out = sub.predict_on_batch(xb)
        yield [np.asarray(o) for o in (out if isinstance(out, list | tuple) else [out])]


_TIE_BREAK = 1e-3  # weight of pre-activation correlations in activation matching


def _has_activation(layer) -> bool:
    act = getattr(layer, "activation", None)
    return act is not None and getattr(act, "__name__", "linear") != "linear"


def _activation_matching(spec: _Spec, ref_walk: _Walk, data: Any, batch_size: int
                         ) -> dict[int, np.ndarray]:
    """Match units by the correlation of their activations on ``data`` (Ainsworth et al.)."""
    from scipy.optimize import linear_sum_assignment

    groups = spec.active()
    walk = spec.walk
    # Every tensor a group lives on (outputs of creators, norms, merges, ...), as in the
    # paper (post-activation). Pre-activations of layers with a fused activation enter with
    # a tiny weight: they only break ties between units that never fire (dead ReLUs).
    taps: list[tuple[int, int, str]] = []
    where: list[tuple[int, np.ndarray]] = []  # per tap: (group, positions)
    scale: list[float] = []
    for n, node in enumerate(walk.nodes):
        layer = walk.layers[node.layer]
        for j, t in enumerate(node.outputs):
            ax = spec.tensors[t]
            for g in groups:
                pos = spec.positions(ax, g)
                if not len(pos):
                    continue
                taps.append((n, j, "out"))
                where.append((g, pos))
                scale.append(1.0)
                if _creates(layer) and _has_activation(layer) and type(layer).__name__ != \
                        "Embedding":
                    taps.append((n, j, "pre"))
                    where.append((g, pos))
                    scale.append(_TIE_BREAK)
    if not taps:
        return {}
    sub_a, _ = tap_model(ref_walk, taps)
    sub_b, _ = tap_model(walk, taps)
    stats = [None] * len(taps)
    for outs_a, outs_b in zip(run_taps(sub_a, data, batch_size), run_taps(sub_b, data, batch_size)):
        for i, (_, pos) in enumerate(where):
            n = pos.shape[1]
            xa = outs_a[i][..., pos].reshape(-1, n).astype(np.float64)
            xb = outs_b[i][..., pos].reshape(-1, n).astype(np.float64)
            s = (len(xa), xa.sum(0), xb.sum(0), (xa * xa).sum(0), (xb * xb).sum(0), xa.T @ xb)
            stats[i] = s if stats[i] is None else tuple(p + q for p, q in zip(stats[i], s))
    corr: dict[int, np.ndarray] = {g: np.zeros((spec.groups[g].size,) * 2) for g in groups}
    for (g, _), w, (m, sa, sb, saa, sbb, sab) in zip(where, scale, stats):
        ma, mb = sa / m, sb / m
        cov = sab / m - np.outer(ma, mb)
        std_a = np.sqrt(np.maximum(saa / m - ma * ma, 0.0))
        std_b = np.sqrt(np.maximum(sbb / m - mb * mb, 0.0))
        denom = np.outer(std_a, std_b)
        corr[g] += w * np.where(denom > 1e-12, cov / np.maximum(denom, 1e-300), 0.0)
    perms = {}
    for g in groups:
        _, best = linear_sum_assignment(corr[g], maximize=True)
        perms[g] = best
    return perms


# ------------------------------------------------------------------------------- the API
def _spec_for(model: keras.Model, name: str) -> _Spec:
    if not is_graph_model(model):
        raise InvalidModelError(
            f"model {name!r} is a subclassed model ({type(model).__name__}); kmerge derives "
            "permutations from a Functional or Sequential graph. Rebuild it as a Functional "
            "model to align it"
        )
    return _Spec(_walk(model))


def align(
    reference: keras.Model,
    other: keras.Model,
    *,
    method: str = "weights",
    data: Any = None,
    max_iter: int = 100,
    seed: int = 0,
    batch_size: int = 256,
) -> keras.Model:
    """Permute ``other``'s hidden units to match ``reference``; the function is unchanged.

    Weight matching (``method="weights"``) is Git Re-Basin's permutation coordinate descent
    (Ainsworth et al., 2023): each permutation group in turn, in a seeded random order, is
    set to the assignment (``scipy.optimize.linear_sum_assignment``) that maximizes
    ``sum <W_ref, P W_other>`` over every weight it touches, until an iteration improves
    nothing or ``max_iter`` is reached. Activation matching (``method="activations"``)
    runs ``data`` through both models once and assigns units by the correlation of their
    activations (post-activation; pre-activations only break ties between dead units).

    The permutation groups come from the Keras graph (see the module docstring and
    ``docs/alignment.md``); layers kmerge cannot reason about fence the groups touching them.

    Args:
        reference: The model whose unit order is kept.
        other: The model to permute (not modified). Same architecture as ``reference``.
        method: ``"weights"`` or ``"activations"``.
        data: Inputs (an array, or a list of arrays for multi-input models); needed by
            ``"activations"``, ignored by ``"weights"``.
        max_iter: Most coordinate-descent sweeps for weight matching.
        seed: Seeds the order in which groups are visited.
        batch_size: Batch size for the activation pass.

    Returns:
        A new model (a clone of ``other``) with permuted weights. Its ``kmerge.info`` holds
        ``{"kind": "align", "method", "groups": [{"size", "layers"}], "fenced":
        [{"layer", "reason"}], "iterations"}``.

    Raises:
        IncompatibleModelsError: The models differ in architecture (first difference named).
        InvalidArgumentError: Unknown ``method``, ``"activations"`` without ``data``, or
            nothing to align (every hidden layer is fenced).
        InvalidModelError: A model is not a built Functional/Sequential model.

    Example:
        >>> b_aligned = kmerge.align(a, b)                       # weight matching
        >>> meta_of(b_aligned)["groups"]
        [{'size': 128, 'layers': ['dense']}, {'size': 128, 'layers': ['dense_1']}]
        >>> b_act = kmerge.align(a, b, method="activations", data=x_train[:1000])
    """
    if method not in METHODS:
        raise InvalidArgumentError(
            f"unknown alignment method {method!r}; valid methods are: {', '.join(METHODS)}"
        )
    if method == "activations" and data is None:
        raise InvalidArgumentError(
            "align(method='activations') needs data: pass data=<a batch of inputs> (a few "
            "hundred examples are enough), or use method='weights', which needs none"
        )
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise InvalidArgumentError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_model(reference, "reference")
    check_model(other, "other")
    ref_spec = _spec_for(reference, reference.name)
    spec = _spec_for(other, other.name)
    _check_same(ref_spec.walk, spec.walk, (reference.name, other.name))
    groups = spec.active()
    if not groups:
        fenced = "; ".join(f"{f['layer']}: {f['reason']}" for f in spec.fenced) or \
            "it has no hidden Dense/Conv/Embedding units"
        raise InvalidArgumentError(
            f"nothing to align in model {other.name!r}: every hidden unit is fixed ({fenced}). "
            "Alignment permutes units of Dense, Conv, SeparableConv and Embedding layers "
            "that feed layers kmerge understands; merge without align (align=None) instead"
        )
    # Pair variables by position in the walk (the architectures are the same).
    ref_ids = {}
    for la, lb in zip(ref_spec.walk.layers, spec.walk.layers):
        for va, vb in zip(_weights(la), _weights(lb)):
            ref_ids[id(vb)] = id(va)
    ref_arrays, other_arrays = _arrays(reference), _arrays(other)
    if method == "weights":
        perms, iterations = _weight_matching(spec, ref_arrays, ref_ids, other_arrays,
                                             max_iter=max_iter, seed=seed)
    else:
        perms, iterations = _activation_matching(spec, ref_spec.walk, data, batch_size), 1
    new = _model_with(other, _permuted(spec, other_arrays, perms))
    attach(new, {
        "kind": "align",
        "method": method,
        "groups": spec.describe(),
        "fenced": list(spec.fenced),
        "iterations": iterations,
    })
    return new

"""How each layer kind treats the feature axis: open a permutation group, pass it through,
tie its inputs, or fence (one rule per Keras layer class, registered in :data:`RULES`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kmerge.weights.spec import Axis, layer_weights

# --------------------------------------------------------------------------- layer rules
Rule = Callable[..., "list[Axis | None] | None"]
RULES: dict[str, Rule] = {}


def rule(*names: str):
    def register(fn):
        for n in names:
            RULES[n] = fn
        return fn
    return register


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") in (None, "channels_last")


@rule("Dense")
def _dense(spec, li, layer, ins, in_shapes, out_shapes):
    g = Axis.new(spec.new_group(li, "out", layer.units), layer.units)
    spec.bind(li, layer.kernel, [ins[0], g])
    if layer.use_bias:
        spec.bind(li, layer.bias, [g])
    return [g]


@rule("Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")
def _conv(spec, li, layer, ins, in_shapes, out_shapes):
    if not _channels_last(layer):
        return spec.fence(ins, li, "channels_first convolution (kmerge permutes the last axis)")
    if getattr(layer, "groups", 1) != 1:
        return spec.fence(ins, li, f"grouped convolution (groups={layer.groups})")
    g = Axis.new(spec.new_group(li, "out", layer.filters), layer.filters)
    transpose = type(layer).__name__.endswith("Transpose")  # kernel (..., out, in)
    axes = [None] * (len(layer.kernel.shape) - 2) + ([g, ins[0]] if transpose else [ins[0], g])
    spec.bind(li, layer.kernel, axes)
    if layer.use_bias:
        spec.bind(li, layer.bias, [g])
    return [g]


@rule("DepthwiseConv1D", "DepthwiseConv2D")
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


@rule("SeparableConv1D", "SeparableConv2D")
def _separable(spec, li, layer, ins, in_shapes, out_shapes):
    if not _channels_last(layer):
        return spec.fence(ins, li, "channels_first convolution")
    if layer.depth_multiplier != 1:
        return spec.fence(ins, li, f"depth_multiplier={layer.depth_multiplier} (only 1 is "
                          "supported)")
    g = Axis.new(spec.new_group(li, "out", layer.filters), layer.filters)
    nd = len(layer.depthwise_kernel.shape) - 2
    spec.bind(li, layer.depthwise_kernel, [None] * nd + [ins[0], None])
    spec.bind(li, layer.pointwise_kernel, [None] * nd + [ins[0], g])
    if layer.use_bias:
        spec.bind(li, layer.bias, [g])
    return [g]


@rule("Embedding")
def _embedding(spec, li, layer, ins, in_shapes, out_shapes):
    dim = int(layer.embeddings.shape[1])
    g = Axis.new(spec.new_group(li, "out", dim), dim)
    spec.bind(li, layer.embeddings, [None, g])
    return [g]


def _is_last_axis(axis, rank: int) -> bool:
    axes = list(axis) if isinstance(axis, list | tuple) else [axis]
    return len(axes) == 1 and axes[0] in (-1, rank - 1)


@rule("BatchNormalization")
def _batchnorm(spec, li, layer, ins, in_shapes, out_shapes):
    if not _is_last_axis(layer.axis, len(in_shapes[0])):
        return spec.fence(ins, li, f"normalizes axis {layer.axis}, not the feature axis")
    for var in layer_weights(layer):
        spec.bind(li, var, [ins[0]])
    return [ins[0]]


@rule("LayerNormalization", "RMSNormalization", "UnitNormalization")
def _layernorm(spec, li, layer, ins, in_shapes, out_shapes):
    if not _is_last_axis(getattr(layer, "axis", -1), len(in_shapes[0])):
        return spec.fence(ins, li, f"normalizes over axes {layer.axis}; only the last axis "
                          "is supported")
    for var in layer_weights(layer):
        spec.bind(li, var, [None] * (len(var.shape) - 1) + [ins[0]])
    return [ins[0]]


@rule("PReLU")
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


@rule(*_PASS)
def _passthrough(spec, li, layer, ins, in_shapes, out_shapes):
    if type(layer).__name__ == "Softmax" and not _is_last_axis(layer.axis, len(in_shapes[0])):
        spec.fence(ins, li, "softmax over an axis other than the feature axis")
        return None
    return [ins[0]]


@rule(*_POSITIONAL)
def _positional(spec, li, layer, ins, in_shapes, out_shapes):
    if not _channels_last(layer):
        return spec.fence(ins, li, "channels_first layout")
    return [ins[0]]


@rule("Rescaling", "Normalization", "Resizing", "CenterCrop", "RandomFlip", "RandomRotation",
       "RandomZoom", "RandomTranslation", "RandomCrop", "RandomContrast", "RandomBrightness")
def _preprocessing(spec, li, layer, ins, in_shapes, out_shapes):
    if any(ax is not None and (ax.group >= 0).any() for ax in ins):
        spec.fence(ins, li, "preprocessing layer on permutable units", always=False)
    return None


@rule("Flatten")
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


@rule("Reshape")
def _reshape(spec, li, layer, ins, in_shapes, out_shapes):
    i, o = in_shapes[0], out_shapes[0]
    if i[-1] is not None and i[-1] == o[-1]:
        return [ins[0]]  # only the positions before the feature axis are regrouped
    if len(o) == 2 and all(d is not None for d in i[1:]):
        return _flatten(spec, li, layer, ins, in_shapes, out_shapes)
    return spec.fence(ins, li, f"reshape {i[1:]} -> {o[1:]} moves the feature axis")


@rule("Permute")
def _permute(spec, li, layer, ins, in_shapes, out_shapes):
    if tuple(layer.dims)[-1] == len(in_shapes[0]) - 1:
        return [ins[0]]
    return spec.fence(ins, li, f"Permute{tuple(layer.dims)} moves the feature axis")


@rule("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")
def _elementwise(spec, li, layer, ins, in_shapes, out_shapes):
    out = ins[0]
    for ax in ins[1:]:
        out = spec.unify(out, ax, li, f"{type(layer).__name__} of tensors")
    return [out]


@rule("Concatenate")
def _concatenate(spec, li, layer, ins, in_shapes, out_shapes):
    if _is_last_axis(layer.axis, len(in_shapes[0])):
        return [Axis.concat(ins)]
    return _elementwise(spec, li, layer, ins, in_shapes, out_shapes)

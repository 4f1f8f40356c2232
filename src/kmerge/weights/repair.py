"""Repair a weight-space merge: reset BatchNorm statistics, or REPAIR pre-activations.

Averaging two networks shrinks the variance of their hidden units ("variance collapse"),
and each BatchNorm's moving statistics no longer describe its inputs. Two fixes:

* ``method="bn"``: recompute every BatchNormalization's moving mean and variance on
  ``data``, exactly (one cumulative pass over the whole data set, not a momentum average:
  Keras BN has no cumulative mode, so kmerge computes the statistics from the BN inputs
  itself), layer by layer in graph order so each BN sees the already repaired ones before it.
* ``method="repair"``: REPAIR (Jordan et al., 2023) for networks without BN: every hidden
  Dense / Conv / SeparableConv pre-activation channel of the merged model is rescaled and
  shifted (through its kernel and bias) to the interpolated mean and standard deviation of
  the sources' corresponding channels.

Statistics are accumulated in float64 NumPy (Chan's parallel update), so they do not depend
on the backend beyond the forward pass itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from kmerge.errors import InvalidArgumentError, InvalidModelError
from kmerge.graph.rebuild import check_model, is_graph_model
from kmerge.graph.replay import submodel
from kmerge.metadata import attach, derivation, meta_of
from kmerge.weights.matching import run_taps, tap_model
from kmerge.weights.spec import SpecWalk, check_same, spec_walk

METHODS = ("bn", "repair")

__all__ = ["repair", "METHODS"]

# Layers REPAIR rescales: (kernel attribute, output channel axis of that kernel).
REPAIRABLE = {
    "Dense": "kernel",
    "Conv1D": "kernel",
    "Conv2D": "kernel",
    "Conv3D": "kernel",
    "SeparableConv1D": "pointwise_kernel",
    "SeparableConv2D": "pointwise_kernel",
}


class _Moments:
    """Exact running mean and (population) variance per channel, in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        x = x.astype(np.float64)
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total

    @property
    def var(self) -> np.ndarray:
        return self.m2 / max(self.n, 1)


def _channels(x: np.ndarray, axis: int) -> np.ndarray:
    """(samples, channels): every axis but ``axis`` is a sample axis."""
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


def _output_side(walk: SpecWalk) -> set[int]:
    """Tensors that reach a model output through weightless layers only (logits and after)."""
    side = set(walk.outputs)
    for node in reversed(walk.nodes):
        if any(t in side for t in node.outputs) and not walk.layers[node.layer].weights:
            side.update(node.inputs)
    return side


def _check_data(data: Any, batch_size: int, method: str) -> None:
    if data is None:
        raise InvalidArgumentError(
            f"repair(method={method!r}) needs data: pass data=<inputs> (a few hundred to a "
            "few thousand training examples, no labels); statistics cannot be recomputed "
            "without it"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")


def _reset_bn(merged: keras.Model, walk: SpecWalk, data: Any, batch_size: int) -> list[str]:
    bn_layers: list[int] = []
    for node in walk.nodes:
        if isinstance(walk.layers[node.layer], keras.layers.BatchNormalization) \
                and node.layer not in bn_layers:
            bn_layers.append(node.layer)
    if not bn_layers:
        raise InvalidArgumentError(
            f"model {merged.name!r} has no BatchNormalization layer, so repair='bn' has "
            "nothing to reset; use repair='repair' (REPAIR) for networks without BN"
        )
    taps = [(n, node.layer) for n, node in enumerate(walk.nodes) if node.layer in bn_layers]
    # One copy of the graph for every tap; each BN's input is read from it after the BNs
    # before it were reset (in the copy too), so the statistics compound correctly.
    sub, rb = tap_model(walk, [(n, 0, "in") for n, _ in taps])
    for li in bn_layers:
        layer = walk.layers[li]
        outs = [sub.outputs[i] for i, (_, owner) in enumerate(taps) if owner == li]
        probe = submodel(sub.inputs, outs)
        rank = len(outs[0].shape)
        axis = layer.axis if layer.axis >= 0 else rank + layer.axis
        moments = _Moments()
        for batch in run_taps(probe, data, batch_size):
            for x in batch:
                moments.update(_channels(x, axis))
        for target in (layer, rb.layers[id(layer)]):
            dtype = keras.backend.standardize_dtype(target.moving_mean.dtype)
            target.moving_mean.assign(moments.mean.astype(dtype))
            target.moving_variance.assign(moments.var.astype(dtype))
    return [walk.names[li] for li in bn_layers]


def pre_stats(walk: SpecWalk, targets: list[int], data: Any, batch_size: int
              ) -> dict[int, _Moments]:
    """Per-channel moments of each target layer's pre-activation (all of its calls)."""
    taps = [(n, node.layer) for n, node in enumerate(walk.nodes) if node.layer in targets]
    sub, _ = tap_model(walk, [(n, 0, "pre") for n, _ in taps])
    stats = {li: _Moments() for li in targets}
    for batch in run_taps(sub, data, batch_size):
        for x, (_, li) in zip(batch, taps):
            stats[li].update(_channels(x, x.ndim - 1))
    return stats


def _repair(merged: keras.Model, walk: SpecWalk, sources: list[keras.Model],
            weights: np.ndarray, data: Any, batch_size: int) -> list[dict]:
    side = _output_side(walk)
    targets: list[int] = []
    for node in walk.nodes:
        layer = walk.layers[node.layer]
        if type(layer).__name__ in REPAIRABLE and not any(t in side for t in node.outputs) \
                and node.layer not in targets:
            if getattr(layer, "data_format", "channels_last") == "channels_first":
                continue
            targets.append(node.layer)
    if not targets:
        raise InvalidArgumentError(
            f"model {merged.name!r} has no hidden Dense/Conv/SeparableConv layer for REPAIR "
            "to rescale (the output layer is left alone)"
        )
    source_stats = [pre_stats(spec_walk(s), targets, data, batch_size) for s in sources]
    taps = [(n, node.layer) for n, node in enumerate(walk.nodes) if node.layer in targets]
    sub, rb = tap_model(walk, [(n, 0, "pre") for n, _ in taps])
    done = []
    for li in targets:
        layer = walk.layers[li]
        outs = [sub.outputs[i] for i, (_, owner) in enumerate(taps) if owner == li]
        probe = submodel(sub.inputs, outs)
        moments = _Moments()
        for batch in run_taps(probe, data, batch_size):
            for x in batch:
                moments.update(_channels(x, x.ndim - 1))
        mean_t = sum(w * s[li].mean for w, s in zip(weights, source_stats))
        std_t = sum(w * np.sqrt(s[li].var) for w, s in zip(weights, source_stats))
        std_m = np.sqrt(moments.var)
        scale = std_t / np.maximum(std_m, 1e-8)
        for target in (layer, rb.layers[id(layer)]):
            rescale(target, scale, moments.mean, mean_t)
        done.append({"layer": walk.names[li], "channels": int(len(scale)),
                     "shifted": bool(layer.use_bias),
                     "scale_min": float(scale.min()), "scale_max": float(scale.max())})
    return done


def rescale(layer, scale: np.ndarray, mean_now: np.ndarray, mean_target: np.ndarray) -> None:
    """REPAIR's update of one layer: per output channel, the kernel is multiplied by ``scale``
    and the bias moved so a pre-activation of mean ``mean_now`` gets ``mean_target``."""
    kernel = getattr(layer, REPAIRABLE[type(layer).__name__])
    k = np.asarray(keras.ops.convert_to_numpy(kernel.value), np.float64)
    dtype = keras.backend.standardize_dtype(kernel.dtype)
    kernel.assign((k * scale).astype(dtype))
    if layer.use_bias:
        b = np.asarray(keras.ops.convert_to_numpy(layer.bias.value), np.float64)
        layer.bias.assign(((b - mean_now) * scale + mean_target).astype(dtype))


def repair(
    merged: keras.Model,
    sources: Sequence[keras.Model] | None = None,
    *,
    method: str = "bn",
    data: Any = None,
    batch_size: int = 256,
    weights: Sequence[float] | None = None,
) -> keras.Model:
    """Fix the statistics of a merged model in place (and return it).

    ``"bn"`` resets every BatchNormalization's moving mean / variance to the exact
    statistics of its inputs on ``data`` (Jordan et al., 2023, "BN reset").
    ``"repair"`` is REPAIR (Jordan et al., 2023): each hidden Dense/Conv/SeparableConv
    pre-activation channel is rescaled, through the layer's kernel and bias, to the mean
    ``sum_i w_i mu_i`` and standard deviation ``sum_i w_i sigma_i`` of the sources' same
    channel; the output layer (whose output reaches a model output through weightless
    layers only) is left alone.

    Args:
        merged: The merged model; updated in place.
        sources: The models that were merged, aligned to ``merged`` (same unit order; pass
            the output of :func:`kmerge.align`, not the raw models). Needed by ``"repair"``;
            ignored by ``"bn"``.
        method: ``"bn"`` or ``"repair"``.
        data: Inputs (an array, or a list of arrays for multi-input models), no labels.
        batch_size: Batch size of the statistics passes.
        weights: Interpolation weights of the sources for ``"repair"`` (normalized to sum
            to one); default uniform, e.g. ``(1 - t, t)`` for a two-model interpolation.

    Returns:
        ``merged``, whose ``kmerge.info(merged)["repair"]`` lists what was changed.

    Raises:
        InvalidArgumentError: Unknown ``method``, ``data=None``, bad ``weights``, or nothing
            to repair (no BN for ``"bn"``; no hidden Dense/Conv for ``"repair"``).
        IncompatibleModelsError: A source's architecture differs from ``merged``'s.

    Example:
        >>> merged = kmerge.merge_weights([a, kmerge.align(a, b)], method="linear")
        >>> repair(merged, [a, kmerge.align(a, b)], method="repair", data=x_train[:2000])
    """
    if method not in METHODS:
        raise InvalidArgumentError(
            f"unknown repair method {method!r}; valid methods are: {', '.join(METHODS)}"
        )
    _check_data(data, batch_size, method)
    check_model(merged, "merged")
    if not is_graph_model(merged):
        raise InvalidModelError(
            f"model {merged.name!r} is a subclassed model; repair needs a Functional or "
            "Sequential graph to read intermediate statistics"
        )
    walk = spec_walk(merged)
    if method == "bn":
        info: dict[str, Any] = {"method": "bn", "layers": _reset_bn(merged, walk, data,
                                                                    batch_size)}
    else:
        if sources is None or isinstance(sources, keras.Model) or len(sources) == 0:
            raise InvalidArgumentError(
                "repair(method='repair') needs the source models: pass sources=[a, b_aligned] "
                "(the models that were merged, aligned to the merge)"
            )
        sources = list(sources)
        for i, s in enumerate(sources):
            check_model(s, f"sources[{i}]")
            if not is_graph_model(s):
                raise InvalidModelError(f"sources[{i}] is a subclassed model; repair needs "
                                        "a Functional or Sequential graph")
            check_same(walk, spec_walk(s), (merged.name, s.name))
        if weights is None:
            w = np.full(len(sources), 1.0 / len(sources))
        else:
            w = np.asarray(list(weights), np.float64)
            if w.shape != (len(sources),) or not np.all(np.isfinite(w)) or abs(w.sum()) < 1e-12:
                raise InvalidArgumentError(
                    f"weights must be {len(sources)} finite numbers with a non-zero sum (one "
                    f"per source), got {list(weights)!r}"
                )
            w = w / w.sum()
        info = {"method": "repair", "weights": w.tolist(),
                "layers": _repair(merged, walk, sources, w, data, batch_size)}
    meta = meta_of(merged)
    meta = dict(meta) if isinstance(meta, dict) else {"kind": "repair"}
    meta["repair"] = info
    meta.update(derivation(*(sources or []), result=merged))
    attach(merged, meta)
    return merged


"""Finding the permutations: weight matching (Git Re-Basin) and activation matching on data,
with the tap model that computes every tensor a permutation group lives on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from kmerge.errors import InvalidArgumentError
from kmerge.graph import replay
from kmerge.graph.rebuild import input_specs, rebuild
from kmerge.weights.spec import Spec, SpecWalk, creates_units, permuted


# ------------------------------------------------------------------------------- matching
def weight_matching(spec: Spec, ref: dict[int, np.ndarray], ref_ids: dict[int, int],
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
                b = permuted(spec, b64, perms, skip=(vid, k), ids=[vid])[vid]
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


def tap_model(walk: SpecWalk, taps: Sequence[tuple[int, int, str]]) -> tuple[keras.Model, Any]:
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


TIE_BREAK = 1e-3  # weight of pre-activation correlations in activation matching


def has_activation(layer) -> bool:
    """Whether ``layer`` applies a non-linear activation after its affine part."""
    act = getattr(layer, "activation", None)
    return act is not None and getattr(act, "__name__", "linear") != "linear"


def activation_matching(spec: Spec, ref_walk: SpecWalk, data: Any, batch_size: int
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
                if creates_units(layer) and has_activation(layer) and type(layer).__name__ != \
                        "Embedding":
                    taps.append((n, j, "pre"))
                    where.append((g, pos))
                    scale.append(TIE_BREAK)
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

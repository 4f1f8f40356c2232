"""ZipIt! (Stoica et al., 2024): merge features within and across models by correlation.

Permutation alignment (:mod:`kmerge.weights.align`) pairs every unit of one model with one
unit of the other. ZipIt! instead looks at the correlation matrix of *all* the features of
both models side by side (``2n x 2n`` for two models of width ``n``) and greedily merges the
most correlated pair, whichever models they come from, until ``n`` features are left: a
feature of A may absorb a redundant feature of A, and the B feature that had no partner is
kept on its own. Each group of units gets a *merge* matrix ``M = [M_a, M_b]`` (``n x 2n``,
averaging the features of each cluster) and an *unmerge* matrix ``U = [U_a; U_b]``
(``2n x n``, copying each merged feature back to its members), and every weight is rewritten:

* the output axis of a Dense/Conv (and its bias, and per-unit weights such as BatchNorm's)
  becomes ``sum_i M_i W_i``;
* the input axis of the next Dense/Conv kernel becomes ``W_i U_i``: model ``i``'s layer reads
  the merged features as if they were its own.

**Partial zipping**: with ``zip_until=<layer>``, the layers up to that one (and the per-unit
layers right after it: BatchNorm, activations, pooling, Flatten) are zipped into one trunk;
every later layer stays a separate branch per source, with ``U_i`` folded into the branch's
first kernel, and the branches' outputs are averaged (or kept apart, one output per source,
for models trained on different tasks). Later layers cost parameters but recover accuracy.

The permutation groups (which units must be transformed together: residual streams, Flatten
after a conv, Concatenate) come from the same graph-derived spec as :func:`kmerge.align`.
All matching math is float64 NumPy, so every backend gives the same matrices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from kmerge.arguments import integer, model_inputs, number
from kmerge.errors import IncompatibleModelsError, InvalidArgumentError, InvalidModelError
from kmerge.graph import replay
from kmerge.graph.rebuild import Copier, check_model, input_specs, is_graph_model
from kmerge.metadata import attach, derivation
from kmerge.weights.matching import TIE_BREAK, has_activation, run_taps, tap_model
from kmerge.weights.spec import (
    Axis,
    Spec,
    SpecWalk,
    creates_units,
    layer_weights,
    spec_walk,
)
from kmerge.weights.validate import layer_config_difference

__all__ = ["zip_merge", "zipit_matching", "HEADS"]

HEADS = ("auto", "average", "separate")
ZIP_REPAIRS = ("bn", "repair")
# Layers whose kernel can absorb an unmerge matrix on its input axis.
_FOLDABLE = {"Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
             "Conv3DTranspose"}


# ---------------------------------------------------------------------------- the matching
def zipit_matching(corr: np.ndarray, n_models: int, *, alpha: float = 1e-4, beta: float = 0.075,
                   weights: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ZipIt!'s greedy matching on the correlation of the concatenated features.

    Args:
        corr: ``(N*n, N*n)`` correlation of the features of ``N`` models side by side
            (model 0's ``n`` features first).
        n_models: ``N``.
        alpha: After two features merge, the merged feature's correlations are the minimum
            of the two, times ``alpha``: small values keep clusters at two members.
        beta: Share of the merges that may pair two features of the same model, per model
            (``beta * (N - 1) * n / N`` merges each); 0 permits only merges across models,
            which is a permutation when ``N = 2``.
        weights: One weight per model: a merged feature is the ``weights``-weighted mean of
            its members (default: their plain mean, as ZipIt!).

    Returns:
        ``(merge, unmerge)``: ``merge`` is ``(n, N*n)`` with rows summing to one,
        ``unmerge`` is ``(N*n, n)`` with a single one per row (which merged feature each
        source feature becomes).
    """
    corr = np.array(corr, np.float64)
    total = corr.shape[0]
    n = total // n_models
    origin = np.repeat(np.arange(n_models), n)
    unmerge = np.eye(total)
    sims = np.where(np.isfinite(corr), corr, 0.0)
    np.fill_diagonal(sims, -np.inf)
    budget = np.full(n_models, int((total - n) // n_models * beta + 1e-4))
    for o in np.flatnonzero(budget <= 0):  # the reference still lets one merge through
        own = origin == o
        sims[np.ix_(own, own)] = -np.inf
    while unmerge.shape[1] > n:
        flat = int(np.argmax(sims))
        i, j = divmod(flat, sims.shape[1])
        if i > j:
            i, j = j, i
        same = origin[i] == origin[j]
        unmerge[:, i] += unmerge[:, j]
        unmerge = np.delete(unmerge, j, axis=1)
        col = np.minimum(sims[:, i], sims[:, j])
        row = np.minimum(sims[i, :], sims[j, :])
        if alpha <= 0:
            for o in (origin[i], origin[j]):
                col[origin == o] = -np.inf
                row[origin == o] = -np.inf
        else:
            col, row = col * alpha, row * alpha
        sims[:, i], sims[i, :] = col, row
        sims[i, i] = -np.inf
        sims = np.delete(np.delete(sims, j, axis=0), j, axis=1)
        origin = np.delete(origin, j)
        if same:
            budget[origin[i]] -= 1
            if budget[origin[i]] <= 0:  # no more merges inside this model
                own = origin == origin[i]
                sims[np.ix_(own, own)] = -np.inf
    w = np.ones(n_models) if weights is None else np.asarray(weights, np.float64)
    weighted = unmerge * np.repeat(w, n)[:, None]
    merge = (weighted / np.maximum(weighted.sum(0, keepdims=True), 1e-300)).T
    return merge, unmerge


# ------------------------------------------------------------------------- trunk and walks
@dataclasses.dataclass
class _Plan:
    walks: list[SpecWalk]  # one per model
    size: int  # number of leaf calls in the trunk (a prefix of every walk)
    until: str | None  # the layer named (None: zip the whole model)
    heads: str  # "average" or "separate"
    spec: Spec  # the trunk's permutation groups (model 0's walk, trunk calls only)
    trunk_tensors: set[int]


def _input_names(model: keras.Model) -> list[str]:
    """The InputLayer names (``input_layer``) and the input tensors' names."""
    layers = [op.name for op in getattr(replay.graph_of(model), "layers", [])
              if isinstance(op, keras.layers.InputLayer)]
    return list(dict.fromkeys(layers + [name for _, _, name in input_specs(model)]))


def _valid_names(walk: SpecWalk, model: keras.Model) -> list[str]:
    return _input_names(model) + [walk.names[n.layer] for n in walk.nodes
                                  if creates_units(walk.layers[n.layer])]


def _output_side(walk: SpecWalk) -> set[int]:
    """Nodes from the last creator before each output on (the head of each output)."""
    side_t = set(walk.outputs)
    nodes = set()
    for k in range(len(walk.nodes) - 1, -1, -1):
        node = walk.nodes[k]
        if any(t in side_t for t in node.outputs):
            nodes.add(k)
            if not creates_units(walk.layers[node.layer]):
                side_t.update(node.inputs)
    return nodes


def _extend(walk: SpecWalk, size: int) -> int:
    """Grow a trunk of ``size`` calls over the per-unit layers that follow it."""
    from kmerge.weights.rules import RULES

    have = set(walk.inputs)
    for node in walk.nodes[:size]:
        have.update(node.outputs)
    while size < len(walk.nodes):
        node = walk.nodes[size]
        layer = walk.layers[node.layer]
        if creates_units(layer) or type(layer).__name__ not in RULES \
                or not all(t in have for t in node.inputs):
            break
        have.update(node.outputs)
        size += 1
    return size


def _trunk_size(walk: SpecWalk, model: keras.Model, until: str | None, heads: str) -> int:
    if until is None:
        if heads == "average":
            return len(walk.nodes)
        head = _output_side(walk)
        first = min(head) if head else len(walk.nodes)
        body = [k for k in range(first) if creates_units(walk.layers[walk.nodes[k].layer])]
        if not body:
            raise InvalidArgumentError(
                f"model {model.name!r} has no hidden Dense/Conv layer before its output "
                "layer(s), so there is nothing to zip under separate heads")
        return _extend(walk, body[-1] + 1)
    if not isinstance(until, str):
        raise InvalidArgumentError(f"zip_until must be a layer name (a string) or None, got "
                                   f"{until!r}")
    if until in _input_names(model):
        return 0
    calls = [k for k, node in enumerate(walk.nodes) if walk.names[node.layer] == until]
    if not calls:
        raise InvalidArgumentError(
            f"zip_until={until!r} is not a layer of model {model.name!r}; valid names are "
            f"{', '.join(_valid_names(walk, model))} (an input name zips nothing: the "
            "ensemble)")
    return _extend(walk, max(calls) + 1)


def _check_prefix(walks: list[SpecWalk], size: int, names: list[str]) -> None:
    ref = walks[0]
    for w, name in zip(walks[1:], names[1:]):
        if len(w.inputs) != len(ref.inputs) or \
                [ref.shapes[t] for t in ref.inputs] != [w.shapes[t] for t in w.inputs]:
            raise IncompatibleModelsError(
                f"models {names[0]!r} and {name!r} take different inputs: "
                f"{[ref.shapes[t] for t in ref.inputs]} vs {[w.shapes[t] for t in w.inputs]}")
        if len(w.nodes) < size:
            raise IncompatibleModelsError(
                f"model {name!r} has {len(w.nodes)} calls, fewer than the {size} the zipped "
                f"trunk of {names[0]!r} needs; zip fewer layers (zip_until=...)")
        for k in range(size):
            na, nb = ref.nodes[k], w.nodes[k]
            la, lb = ref.layers[na.layer], w.layers[nb.layer]
            where = f"layer {ref.names[na.layer]!r} ({name!r}: {w.names[nb.layer]!r})"
            sa = [tuple(v.shape) for v in layer_weights(la)]
            sb = [tuple(v.shape) for v in layer_weights(lb)]
            if type(la) is not type(lb) or sa != sb or \
                    layer_config_difference(la, lb) is not None or \
                    (na.layer, na.inputs, na.outputs) != (nb.layer, nb.inputs, nb.outputs):
                raise IncompatibleModelsError(
                    f"models {names[0]!r} and {name!r} differ at {where} "
                    f"({type(la).__name__} {sa} vs {type(lb).__name__} {sb}), inside the "
                    "zipped trunk; the layers up to zip_until must have the same architecture: "
                    "pass an earlier zip_until")


def _plan(models: list[keras.Model], until: str | None, heads: str) -> _Plan:
    walks = [spec_walk(m) for m in models]
    names = [m.name for m in models]
    out_shapes = [[w.shapes[t] for t in w.outputs] for w in walks]
    same_outputs = all(s == out_shapes[0] for s in out_shapes)
    if heads == "auto":
        heads = "average" if same_outputs else "separate"
    if heads == "average" and not same_outputs:
        raise IncompatibleModelsError(
            f"heads='average' needs the same outputs, but the models give {out_shapes}; use "
            "heads='separate' (one output per source)")
    ref = walks[0]
    size = _trunk_size(ref, models[0], until, heads)
    if until is None and heads == "average" and not all(len(w.nodes) == size for w in walks):
        raise IncompatibleModelsError(
            "the models differ in architecture, so they cannot be zipped whole; name the last "
            f"shared layer with zip_until= (valid: {', '.join(_valid_names(ref, models[0]))})")
    _check_prefix(walks, size, names)
    trunk_t = set(ref.inputs)
    for node in ref.nodes[:size]:
        trunk_t.update(node.outputs)
    if heads == "separate" and any(t in trunk_t for t in ref.outputs):
        raise InvalidArgumentError(
            f"zip_until={until!r} zips an output layer of {names[0]!r}, but heads='separate' "
            "keeps each source's output layers apart; pass an earlier zip_until")
    truncated = dataclasses.replace(ref, nodes=ref.nodes[:size],
                                    outputs=[t for t in ref.outputs if t in trunk_t])
    return _Plan(walks, size, until, heads, Spec(truncated), trunk_t)


# ---------------------------------------------------------------------------- statistics
def _zip_groups(spec: Spec) -> list[int]:
    """Active root groups with a creator in the trunk."""
    made = {spec.find(g) for g, where in spec.creators.items() if where}
    return [g for g in spec.active() if g in made]


def _correlations(plan: _Plan, models: list[keras.Model], groups: list[int], data: Any,
                  batch_size: int) -> dict[int, np.ndarray]:
    """Per group: the correlation of every model's features side by side, summed over the
    trunk tensors the group lives on (post-activation; pre-activations break ties)."""
    spec, walk = plan.spec, plan.walks[0]
    taps, where, scale = [], [], []
    for k, node in enumerate(spec.walk.nodes):
        layer = walk.layers[node.layer]
        for j, t in enumerate(node.outputs):
            for g in groups:
                pos = spec.positions(spec.tensors[t], g)
                if not len(pos):
                    continue
                kinds = [("out", 1.0)]
                if creates_units(layer) and has_activation(layer) and \
                        type(layer).__name__ != "Embedding":
                    kinds.append(("pre", TIE_BREAK))
                for kind, w in kinds:
                    taps.append((k, j, kind))
                    where.append((g, pos))
                    scale.append(w)
    subs = [tap_model(w, taps)[0] for w in plan.walks]
    stats: list[Any] = [None] * len(taps)
    for outs in zip(*(run_taps(s, data, batch_size) for s in subs)):
        for i, (_, pos) in enumerate(where):
            n = pos.shape[1]
            x = np.concatenate([o[i][..., pos].reshape(-1, n) for o in outs], axis=1)
            x = x.astype(np.float64)
            s = (len(x), x.sum(0), x.T @ x)
            stats[i] = s if stats[i] is None else tuple(p + q for p, q in zip(stats[i], s))
    corr = {g: 0.0 for g in groups}
    for (g, _), w, (m, s, ss) in zip(where, scale, stats):
        mean = s / m
        cov = ss / m - np.outer(mean, mean)
        std = np.sqrt(np.maximum(np.diag(cov), 0.0))
        denom = np.outer(std, std)
        corr[g] = corr[g] + w * np.where(denom > 1e-12, cov / np.maximum(denom, 1e-300), 0.0)
    return corr


# ------------------------------------------------------------------------ weight transform
def _kernel_input_axis(layer: Any, var: Any) -> int | None:
    kind = type(layer).__name__
    if kind == "Dense" and var is layer.kernel:
        return 0
    if kind in _FOLDABLE and var is layer.kernel:
        return len(var.shape) - (1 if kind.endswith("Transpose") else 2)
    if kind.startswith("SeparableConv") and var is layer.pointwise_kernel:
        return len(var.shape) - 2
    return None


def _along(arr: np.ndarray, axis: int, ax: Axis, spec: Spec, mats: dict[int, np.ndarray],
           rest: float) -> np.ndarray:
    """``arr`` with ``mats[g]`` (``new = A @ old``) applied to each group's indices of
    ``axis``; other indices multiplied by ``rest``."""
    x = np.moveaxis(arr, axis, 0)
    out = x * rest
    roots = spec.roots(ax)
    for g, a in mats.items():
        if not np.any(roots == g):
            continue
        pos = spec.positions(ax, g)
        out[pos] = np.einsum("un,bn...->bu...", a, x[pos])
    return np.moveaxis(out, 0, axis)


def _trunk_arrays(plan: _Plan, models: list[keras.Model], merges: dict[int, np.ndarray],
                  unmerges: dict[int, np.ndarray], weights: list[float]
                  ) -> dict[int, np.ndarray]:
    """id(model 0's variable) -> merged value, for every variable of a trunk layer."""
    spec, walks = plan.spec, plan.walks
    n_models = len(models)
    sizes = {g: spec.groups[g].size for g in merges}
    out: dict[int, np.ndarray] = {}
    layer_ids = sorted({node.layer for node in spec.walk.nodes})
    for li in layer_ids:
        per_model = [layer_weights(w.layers[li]) for w in walks]
        layer = walks[0].layers[li]
        for vi, var in enumerate(per_model[0]):
            arrays = [np.asarray(keras.ops.convert_to_numpy(p[vi].value), np.float64)
                      for p in per_model]
            dtype = keras.backend.standardize_dtype(var.dtype)
            if not np.issubdtype(np.dtype(dtype.replace("bfloat16", "float32")), np.floating):
                out[id(var)] = np.array(keras.ops.convert_to_numpy(var.value), copy=True)
                continue
            bound = spec.bindings.get(id(var))
            axes = bound[1] if bound is not None else [None] * arrays[0].ndim
            k_in = _kernel_input_axis(layer, var)
            total = 0.0
            for i in range(n_models):
                x = arrays[i]
                merged_axis = False
                for k, ax in enumerate(axes):
                    if ax is None:
                        continue
                    if k == k_in:
                        mats = {g: unmerges[g][i * s:(i + 1) * s].T for g, s in sizes.items()}
                        x = _along(x, k, ax, spec, mats, 1.0)
                    elif not merged_axis:
                        mats = {g: merges[g][:, i * s:(i + 1) * s] for g, s in sizes.items()}
                        x = _along(x, k, ax, spec, mats, weights[i])
                        merged_axis = True
                total = total + (x if merged_axis else weights[i] * x)
            out[id(var)] = np.asarray(total).astype(dtype)
    return out


def _unmerge_matrix(spec: Spec, ax: Axis, unmerges: dict[int, np.ndarray], i: int
                    ) -> np.ndarray | None:
    """``E`` with ``x_i = x_merged @ E`` on a trunk tensor's feature axis (None: identity)."""
    mats = {g: u[i * spec.groups[g].size:(i + 1) * spec.groups[g].size].T
            for g, u in unmerges.items()}
    e = _along(np.eye(len(ax)), 0, ax, spec, mats, 1.0)  # e[u, j] = U_i[j, u]
    return None if np.allclose(e, np.eye(len(ax))) else e


# ---------------------------------------------------------------------------- assembling
def _assign(layer: Any, values: list[np.ndarray]) -> None:
    for v, a in zip(layer.weights, values):
        v.assign(np.asarray(a).astype(keras.backend.standardize_dtype(v.dtype)))


def _whole(model: keras.Model, arrays: dict[int, np.ndarray]) -> keras.Model:
    from kmerge.weights.align import model_with

    full = {id(v): arrays.get(id(v), np.array(keras.ops.convert_to_numpy(v.value)))
            for v in model.weights}
    return model_with(model, full)


def _assemble(plan: _Plan, models: list[keras.Model], names: list[str],
              arrays: dict[int, np.ndarray], unmerges: dict[int, np.ndarray],
              weights: list[float]
              ) -> tuple[keras.Model, list[dict], list[str], list[tuple[int, int, str]]]:
    """The zipped trunk (model 0's layers, merged weights) and one branch per source."""
    ref = plan.walks[0]
    inputs = [keras.Input(shape=s, dtype=d, name=n) for s, d, n in input_specs(models[0])]
    taken: set[str] = {t.name for t in inputs}
    full_walks = [replay.walk(m) for m in models]
    trunk_calls = full_walks[0].leaf_calls[:plan.size]
    copier = Copier("", freeze=False, taken=taken, copy=True)  # model 0's own layer names
    values = replay.replay(full_walks[0], dict(zip(full_walks[0].inputs, inputs)), copier,
                           calls=trunk_calls)
    for li in sorted({node.layer for node in plan.spec.walk.nodes}):
        layer = ref.layers[li]
        if layer_weights(layer):
            _assign(copier.layers[id(layer)], [arrays[id(v)] for v in layer_weights(layer)])
    branches, unmerge_layers = [], []
    entries: list[tuple[int, int, str]] = []  # (source, its walk's layer index, copy name)
    for i, fw in enumerate(full_walks):
        rest = fw.leaf_calls[plan.size:]
        consumers: dict[int, list] = {}
        for c in rest:
            for t in c.inputs:
                if t in plan.trunk_tensors:
                    consumers.setdefault(t, []).append(c)
        seeded = {t: values[t] for t in fw.inputs}
        folds: dict[int, tuple[int, np.ndarray]] = {}  # id(op) -> (tensor, E)
        for t, calls in consumers.items():
            e = _unmerge_matrix(plan.spec, plan.spec.tensors[t], unmerges, i)
            if e is None:
                seeded[t] = values[t]
                continue
            foldable = all(type(c.op).__name__ in _FOLDABLE and len(c.inputs) == 1
                           and len(fw.calls_of(c.op)) == 1 for c in calls)
            if foldable:
                seeded[t] = values[t]
                for c in calls:
                    folds[id(c.op)] = (t, e)
            else:
                name = copier.new_name((), f"{names[i]}_unmerge_{len(unmerge_layers)}")
                layer = keras.layers.Dense(e.shape[1], use_bias=False, name=name)
                seeded[t] = layer(values[t])
                layer.kernel.assign(e.astype(keras.backend.standardize_dtype(
                    layer.kernel.dtype)))
                unmerge_layers.append(name)
        for t in plan.trunk_tensors:
            seeded.setdefault(t, values[t])
        bcopier = Copier(names[i], freeze=False, taken=taken, copy=True)
        bvalues = replay.replay(fw, seeded, bcopier, calls=rest)
        index = {id(layer): li for li, layer in enumerate(plan.walks[i].layers)}
        for op_id, (_, e) in folds.items():
            new = bcopier.layers[op_id]
            entries.append((i, index[op_id], new.name))
            k = _kernel_input_axis(new, new.kernel)
            kernel = np.asarray(keras.ops.convert_to_numpy(new.kernel.value), np.float64)
            kernel = np.moveaxis(np.tensordot(e, np.moveaxis(kernel, k, 0), axes=1), 0, k)
            new.kernel.assign(kernel.astype(keras.backend.standardize_dtype(new.kernel.dtype)))
        branches.append({"source": names[i], "layers": [bcopier.layers[id(c.op)].name
                                                         for c in rest
                                                         if id(c.op) in bcopier.layers],
                         "outputs": [bvalues.get(t) for t in fw.outputs]})
    outputs = []
    if plan.heads == "average":
        for j, t in enumerate(full_walks[0].outputs):
            if t in plan.trunk_tensors:
                outputs.append(values[t])
                continue
            outs = [b["outputs"][j] for b in branches]
            name = copier.new_name((), f"zip_average_{j}")
            if len(set(weights)) == 1:
                outputs.append(keras.layers.Average(name=name)(outs))
            else:
                from kmerge.graph.layers import WeightedSum

                outputs.append(WeightedSum(list(weights), name=name)(outs))
    else:
        outputs = [o for b in branches for o in b["outputs"]]
    for b in branches:
        b.pop("outputs")
    model = replay.submodel(inputs, outputs if len(outputs) > 1 else outputs[0],
                            name=f"{models[0].name}_zip")
    return model, branches, unmerge_layers, entries


# ------------------------------------------------------------------------------ repairing
def _rescale(mwalk: SpecWalk, li: int, mean_t: np.ndarray, std_t: np.ndarray, data: Any,
             batch_size: int) -> dict:
    """Give layer ``li`` of the merged model the pre-activation mean ``mean_t`` and std
    ``std_t`` per channel, through its kernel and bias (REPAIR's update)."""
    from kmerge.weights.repair import pre_stats, rescale

    mine = pre_stats(mwalk, [li], data, batch_size)[li]
    scale = std_t / np.maximum(np.sqrt(mine.var), 1e-8)
    rescale(mwalk.layers[li], scale, mine.mean, mean_t)
    return {"layer": mwalk.names[li], "channels": int(len(scale)),
            "scale_min": float(scale.min()), "scale_max": float(scale.max())}


def _zip_repair(merged: keras.Model, plan: _Plan, merges: dict[int, np.ndarray],
                weights: list[float], entries: list[tuple[int, int, str]], data: Any,
                batch_size: int) -> list[dict]:
    """REPAIR of a zip, in graph order. Each hidden trunk Dense/Conv pre-activation channel
    gets the mean and std of the source features merged into it (``M @ [mu_0; mu_1]``, same
    for std); then each branch's first Dense/Conv gets its own source's statistics back."""
    from kmerge.weights.repair import REPAIRABLE, pre_stats

    ref, spec = plan.walks[0], plan.spec
    side = _output_side(ref)
    targets = []
    for k, node in enumerate(spec.walk.nodes):
        layer = ref.layers[node.layer]
        if type(layer).__name__ in REPAIRABLE and k not in side and node.layer not in targets \
                and getattr(layer, "data_format", "channels_last") != "channels_first":
            targets.append(node.layer)
    mwalk = spec_walk(merged)
    by_name = {mwalk.names[i]: i for i in range(len(mwalk.layers))}
    done = []
    source_stats = [pre_stats(w, targets, data, batch_size) for w in plan.walks] \
        if targets else []
    sizes = {g: spec.groups[g].size for g in merges}
    for li in targets:
        first = next(n for n in ref.nodes if n.layer == li)
        ax = spec.tensors[first.outputs[0]]
        mean_t, std_t = np.zeros(len(ax)), np.zeros(len(ax))
        for i, s in enumerate(source_stats):
            mats = {g: merges[g][:, i * n:(i + 1) * n] for g, n in sizes.items()}
            mean_t += _along(s[li].mean, 0, ax, spec, mats, weights[i])
            std_t += _along(np.sqrt(s[li].var), 0, ax, spec, mats, weights[i])
        # The merged model holds model 0's layer under its name (a whole zip is a clone) or,
        # in a partial zip's flat graph, under its nested path joined with "_".
        mli = by_name.get(ref.names[li], by_name.get(ref.names[li].replace("/", "_")))
        if mli is not None:
            done.append(_rescale(mwalk, mli, mean_t, std_t, data, batch_size))
    for i, li, copy in entries:
        layer = plan.walks[i].layers[li]
        if type(layer).__name__ not in REPAIRABLE or copy not in by_name:
            continue
        own = pre_stats(plan.walks[i], [li], data, batch_size)[li]
        done.append(_rescale(mwalk, by_name[copy], own.mean, np.sqrt(own.var), data,
                             batch_size))
    return done


# ------------------------------------------------------------------------------- the API
def zip_merge(
    models: Sequence[keras.Model],
    *,
    data: Any,
    zip_until: str | None = None,
    heads: str = "auto",
    weights: Sequence[float] | None = None,
    alpha: float = 1e-4,
    beta: float = 0.075,
    repair: str | None = None,
    batch_size: int = 256,
) -> keras.Model:
    """Zip models into one (ZipIt!, Stoica et al. 2024), optionally only partly.

    Args:
        models: Two or more Functional/Sequential models whose layers up to ``zip_until``
            have the same architecture (later layers may differ, e.g. different label sets).
        data: Inputs (no labels needed) to correlate the features on: a few hundred to a few
            thousand training examples; an ``(x, y)`` tuple is accepted and ``y`` ignored.
        zip_until: The last layer zipped (a name of model 0's layers, nested ones as
            ``'block/dense'``). The per-unit layers right after it (BatchNorm, activation,
            pooling, Flatten) are zipped with it; every later layer stays one branch per
            source. ``None`` zips the whole model (``heads='average'``) or everything up to
            the output layers (``heads='separate'``). An input's name zips nothing: the
            result is the output ensemble.
        heads: ``"average"``: the branches' outputs are averaged (weighted by ``weights``),
            one output per model output; ``"separate"``: every source keeps its own outputs
            (models trained on different tasks); ``"auto"``: average when every model has the
            same output shapes, separate otherwise.
        weights: One weight per model (normalised): a merged feature is the weighted mean of
            its members, and averaged heads are weighted the same way. Default uniform.
        alpha: ZipIt!'s alpha (see :func:`zipit_matching`); the default, with ``beta``'s,
            is the ZipIt! authors' best CIFAR setting (clusters stay at two features).
        beta: ZipIt!'s beta: the share of merges allowed within one model.
        repair: ``None``, ``"bn"`` (reset every BatchNorm's statistics on ``data``, as
            ZipIt! does) or ``"repair"`` (REPAIR of the zipped trunk: each hidden Dense/Conv
            channel rescaled to the mean and std of the features merged into it).
        batch_size: Batch size of the statistics passes.

    Returns:
        A new ``keras.Model``. Zipping the whole model gives model 0's architecture (a
        clone, same layer names); a partial zip gives a Functional graph: the trunk under
        model 0's layer names, each branch's layers prefixed with its source's name, and a
        ``zip_average_<j>`` layer per averaged output. ``kmerge.info(m)`` records
        ``zip_until``, the groups zipped (how many merges paired two models and how many one
        model's own features), the branches, any explicit unmerge layers and the parameter
        count against model 0's.

    Raises:
        InvalidArgumentError: Bad ``zip_until`` (the message lists valid names), ``heads``,
            ``alpha``/``beta``/``weights``, or no data.
        IncompatibleModelsError: The models differ before ``zip_until`` or, with averaged
            heads, in their outputs.
        InvalidModelError: A subclassed or unbuilt model.

    Example:
        >>> m = zip_merge([a, b], data=x_train[:2000], zip_until="dense_1")
        >>> kmerge.info(m)["zip"]["param_ratio"]
        1.41
    """
    from kmerge.arguments import normalised_weights
    from kmerge.weights.repair import repair as repair_fn

    if isinstance(models, keras.Model) or not isinstance(models, Sequence) or len(models) < 2:
        raise InvalidArgumentError("zip_merge needs a list of two or more models")
    models = list(models)
    if heads not in HEADS:
        raise InvalidArgumentError(f"unknown heads {heads!r}; valid: {', '.join(HEADS)}")
    if repair is not None and repair not in ZIP_REPAIRS:
        raise InvalidArgumentError(f"unknown repair {repair!r}; valid: "
                                   f"{', '.join(ZIP_REPAIRS)} (or None)")
    alpha = number(alpha, "alpha", low=0.0, high=1.0)
    beta = number(beta, "beta", low=0.0, high=1.0)
    batch_size = integer(batch_size, "batch_size")
    w = normalised_weights(weights, len(models), what="model")
    if data is None:
        raise InvalidArgumentError(
            "zipping needs data: pass data=<inputs> (a few hundred to a few thousand training "
            "examples); ZipIt! matches features by their correlation on it")
    if isinstance(data, tuple) and len(data) == 2:
        data = data[0]
    for i, m in enumerate(models):
        check_model(m, f"models[{i}]")
        if not is_graph_model(m):
            raise InvalidModelError(
                f"models[{i}] ({m.name!r}) is a subclassed model ({type(m).__name__}); "
                "zipping needs a Functional or Sequential graph")
    xs = model_inputs(models[0], data, "data")
    for m in models[1:]:
        model_inputs(m, xs, "data")
    data = xs[0] if len(xs) == 1 else xs

    plan = _plan(models, zip_until, heads)
    names = _unique([m.name for m in models])
    groups = _zip_groups(plan.spec)
    corr = _correlations(plan, models, groups, data, batch_size) if groups else {}
    merges, unmerges, described = {}, {}, []
    for g in groups:
        merges[g], unmerges[g] = zipit_matching(corr[g], len(models), alpha=alpha, beta=beta,
                                                weights=w)
        n = plan.spec.groups[g].size
        origin = np.repeat(np.arange(len(models)), n)
        members = [origin[unmerges[g][:, c] > 0] for c in range(n)]
        described.append({
            "size": n, "layers": list(dict.fromkeys(plan.spec.groups[g].layers)),
            "across": sum(len(set(o.tolist())) > 1 for o in members),
            "within": sum(len(o) > 1 and len(set(o.tolist())) == 1 for o in members),
            "single": sum(len(o) == 1 for o in members)})
    arrays = _trunk_arrays(plan, models, merges, unmerges, w)
    whole = plan.size == len(plan.walks[0].nodes) and plan.heads == "average"
    if whole:
        merged, branches, explicit, entries = _whole(models[0], arrays), [], [], []
    else:
        merged, branches, explicit, entries = _assemble(plan, models, names, arrays, unmerges,
                                                        w)
    repaired: Any = None
    if repair == "bn":
        if any(isinstance(v, keras.layers.BatchNormalization)
               for v in spec_walk(merged).layers):
            repair_fn(merged, method="bn", data=data, batch_size=batch_size)
            repaired = "bn"
    elif repair == "repair":
        repaired = _zip_repair(merged, plan, merges, w, entries, data, batch_size)
    params = int(merged.count_params())
    attach(merged, {
        "kind": "weights", "method": "linear", "align": "zip",
        "zip_until": zip_until, "heads": plan.heads, "weights": w,
        "source_names": [m.name for m in models],
        **derivation(*models),
        "repair": repair, "repair_report": repaired,
        "zip": {"alpha": alpha, "beta": beta, "groups": described,
                "trunk_layers": list(dict.fromkeys(plan.walks[0].names[n.layer]
                                                   for n in plan.spec.walk.nodes)),
                "branches": branches, "unmerge_layers": explicit,
                "fenced": list(plan.spec.fenced), "params": params,
                "param_ratio": round(params / max(int(models[0].count_params()), 1), 4)},
    })
    return merged


def _unique(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        candidate, k = n, 1
        while candidate in out:
            candidate = f"{n}_{k}"
            k += 1
        out.append(candidate)
    return out


# ------------------------------------------------------- merge_weights(align="zip"/"auto")
ZIP_PARAMS = ("alpha", "beta", "heads")


def _accuracy(model: keras.Model, x: Any, y: Any) -> float:
    from kmerge.weights.apply import accuracy

    return accuracy(model, x, y)


def _has_bn(model: keras.Model) -> bool:
    return any(isinstance(layer, keras.layers.BatchNormalization)
               for layer in spec_walk(model).layers)


def merge_zip(models: Sequence[Any], *, method: str, align: str, base: Any = None,
              weights: Sequence[float] | None = None, data: Any = None,
              repair: str | None = None, zip_until: str | None = None,
              params: Any = None, exclude: Any = None, **method_params: Any) -> keras.Model:
    """:func:`kmerge.merge_weights` with ``align="zip"`` (:func:`zip_merge`) or
    ``align="auto"`` (:func:`auto_merge`); its other arguments are checked here."""
    from kmerge.weights.validate import as_model, split_data

    what = f"align={align!r}"
    if base is not None or params or exclude:
        raise InvalidArgumentError(
            f"{what} merges whole features, so base=, params= and exclude= do not apply; "
            "drop them, or use align='weights' / 'activations'")
    x, y = split_data(data)
    if x is None:
        raise InvalidArgumentError(
            f"{what} needs data=x (or (x, y)): a few hundred to a few thousand training "
            "examples" + ("; 'auto' needs labels, data=(x, y), to score the candidates"
                          if align == "auto" else ""))
    loaded = [as_model(m, f"models[{i}]") for i, m in enumerate(models)]
    if align == "auto":
        if y is None:
            raise InvalidArgumentError(
                "align='auto' keeps the best merge by held-out accuracy, so it needs labels: "
                "pass data=(x, y) (held-out examples the models were not trained on)")
        return auto_merge(loaded, x=x, y=y, method=method, weights=weights, repair=repair,
                          zip_until=zip_until, **method_params)
    if method != "linear":
        raise InvalidArgumentError(
            f"align='zip' averages the features it merges (ZipIt!), so method must be "
            f"'linear', not {method!r}")
    unknown = sorted(set(method_params) - set(ZIP_PARAMS))
    if unknown:
        raise InvalidArgumentError(
            f"align='zip' takes the parameters {', '.join(ZIP_PARAMS)}; unknown: "
            f"{', '.join(unknown)}")
    merged = zip_merge(loaded, data=x, zip_until=zip_until, weights=weights, repair=repair,
                       **method_params)
    if y is not None and len(merged.outputs) == 1:
        from kmerge.metadata import meta_of

        meta_of(merged)["accuracy"] = {"sources": [_accuracy(m, x, y) for m in loaded],
                                       "merged": _accuracy(merged, x, y)}
    return merged


def auto_merge(models: Sequence[keras.Model], *, x: Any, y: Any, method: str = "linear",
               weights: Sequence[float] | None = None, repair: str | None = None,
               zip_until: str | None = None, max_ratio: float = 1.5,
               **method_params: Any) -> keras.Model:
    """Try the alignments and repairs kmerge offers; keep the most accurate on ``(x, y)``.

    Candidates: no alignment, weight matching and activation matching (with ``method``),
    and, when ``method`` is ``"linear"``, ZipIt! of the whole model and partial zips at each
    hidden Dense/Conv (or only at ``zip_until``) whose parameter count stays within
    ``max_ratio`` times the first model's; each with and without repair (``"bn"`` for models
    with BatchNorm, REPAIR otherwise; only ``repair`` when given). Every candidate is scored
    by accuracy on ``(x, y)``; ties go to the smaller, then the earlier candidate.

    Returns:
        The best candidate; ``kmerge.info(m)["auto"]`` lists every candidate (``align``,
        ``repair``, ``zip_until``, ``accuracy``, ``param_ratio``, or ``error``) and ``chosen``,
        the index of the one returned.
    """
    import warnings

    from kmerge.weights.apply import merge_weights

    if len(models) < 2:
        raise InvalidArgumentError("align='auto' needs two or more models")
    max_ratio = number(max_ratio, "max_ratio", low=1.0)
    fix = repair if repair is not None else ("bn" if _has_bn(models[0]) else "repair")
    repairs = [repair] if repair is not None else [None, fix]
    plans: list[dict] = [{"align": a, "repair": r} for a in (None, "weights", "activations")
                         for r in repairs]
    if method == "linear":
        zip_kw = {k: method_params[k] for k in ZIP_PARAMS if k in method_params}
        walk = spec_walk(models[0])
        side = _output_side(walk)
        points = [zip_until] if zip_until is not None else list(dict.fromkeys(
            walk.names[n.layer] for k, n in enumerate(walk.nodes)
            if creates_units(walk.layers[n.layer]) and k not in side))
        for until in [None, *points]:
            plans += [{"align": "zip", "repair": r, "zip_until": until, **zip_kw}
                      for r in repairs]
        method_params = {k: v for k, v in method_params.items() if k not in ZIP_PARAMS}
    base_params = int(models[0].count_params())
    candidates, best, best_key = [], None, None
    for plan in plans:
        row = {"align": plan["align"], "repair": plan["repair"],
               "zip_until": plan.get("zip_until")}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a collapsed candidate is scored, not shown
                if plan["align"] == "zip":
                    extra = {k: v for k, v in plan.items() if k in ZIP_PARAMS}
                    m = zip_merge(models, data=x, zip_until=plan["zip_until"], weights=weights,
                                  repair=plan["repair"], **extra)
                else:
                    m = merge_weights(models, method=method, weights=weights,
                                      align=plan["align"], repair=plan["repair"], data=x,
                                      **method_params)
        except (InvalidArgumentError, IncompatibleModelsError) as exc:
            row["error"] = str(exc)
            candidates.append(row)
            continue
        row["param_ratio"] = round(int(m.count_params()) / max(base_params, 1), 4)
        if row["param_ratio"] > max_ratio:
            row["skipped"] = f"more than max_ratio={max_ratio} times the parameters"
            candidates.append(row)
            continue
        row["accuracy"] = _accuracy(m, x, y)
        candidates.append(row)
        key = (row["accuracy"], -row["param_ratio"])
        if best_key is None or key > best_key:
            best, best_key, chosen = m, key, len(candidates) - 1
    if best is None:
        raise InvalidArgumentError(
            "align='auto': no candidate merge succeeded: "
            + "; ".join(f"{c['align']}/{c['repair']}: {c.get('error') or c.get('skipped')}"
                        for c in candidates))
    from kmerge.metadata import meta_of

    meta = meta_of(best)
    meta["auto"] = {"candidates": candidates, "chosen": chosen, "max_ratio": max_ratio,
                    "scored_on": int(len(y))}
    meta["align_chosen"] = meta.get("align")
    meta["align"] = "auto"
    meta["accuracy"] = {"sources": [_accuracy(m, x, y) for m in models],
                        "merged": candidates[chosen]["accuracy"]}
    return best

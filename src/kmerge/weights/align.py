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

from typing import Any

import keras
import numpy as np

from kmerge.arguments import integer, model_inputs
from kmerge.errors import InvalidArgumentError, InvalidModelError
from kmerge.graph.rebuild import check_model, is_graph_model
from kmerge.metadata import attach, derivation
from kmerge.weights.matching import activation_matching, weight_matching
from kmerge.weights.spec import Spec, check_same, layer_weights, permuted, spec_walk

METHODS = ("weights", "activations")

__all__ = ["align", "random_permute", "METHODS"]



# ------------------------------------------------------------------------------ applying
def _arrays(model: keras.Model) -> dict[int, np.ndarray]:
    return {id(v): np.array(keras.ops.convert_to_numpy(v.value), copy=True) for v in model.weights}


def model_with(model: keras.Model, arrays: dict[int, np.ndarray]) -> keras.Model:
    """A copy of ``model`` (``keras.models.clone_model``) whose variables hold ``arrays``
    (``{id(variable of model): array}``, one per variable); ``model`` is not changed."""
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
    new = model_with(model, permuted(spec, _arrays(model), perms))
    attach(new, {"kind": "random_permute", **derivation(model),
                                             "perms": [perms[g].tolist() for g in perms]})
    return new


# ------------------------------------------------------------------------------- the API
def _spec_for(model: keras.Model, name: str) -> Spec:
    if not is_graph_model(model):
        raise InvalidModelError(
            f"model {name!r} is a subclassed model ({type(model).__name__}); kmerge derives "
            "permutations from a Functional or Sequential graph. Rebuild it as a Functional "
            "model to align it"
        )
    return Spec(spec_walk(model))


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
    seed = integer(seed, "seed", low=0)
    if data is not None:  # checked against both models before either runs
        xs = model_inputs(reference, data, "data")
        model_inputs(other, xs, "data")
        data = xs[0] if len(xs) == 1 else xs
    ref_spec = _spec_for(reference, reference.name)
    spec = _spec_for(other, other.name)
    check_same(ref_spec.walk, spec.walk, (reference.name, other.name))
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
        for va, vb in zip(layer_weights(la), layer_weights(lb)):
            ref_ids[id(vb)] = id(va)
    ref_arrays, other_arrays = _arrays(reference), _arrays(other)
    if method == "weights":
        perms, iterations = weight_matching(spec, ref_arrays, ref_ids, other_arrays,
                                             max_iter=max_iter, seed=seed)
    else:
        perms, iterations = activation_matching(spec, ref_spec.walk, data, batch_size), 1
    new = model_with(other, permuted(spec, other_arrays, perms))
    attach(new, {
        "kind": "align",
        **derivation(other, reference),
        "method": method,
        "groups": spec.describe(),
        "fenced": list(spec.fenced),
        "iterations": iterations,
    })
    return new

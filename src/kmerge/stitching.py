"""Model stitching (Lenc & Vedaldi 2015; Bansal et al. 2021): A's bottom, a trainable stitch,
B's top.

``at=("conv_2", "conv_3")`` means: model A up to and including its layer ``conv_2`` (frozen),
then a trainable stitching layer that maps A's ``conv_2`` activations to the activations of B's
layer ``conv_3`` (that is, to what B's layers *after* ``conv_3`` read), then B from the layers
that consume ``conv_3``'s output onward (frozen). B's ``conv_3`` itself and everything before it
are not used. The stitch is a 1x1 ``Conv2D`` for feature maps (a ``Resizing`` first when the
spatial sizes differ) or a ``Dense`` for vectors (a ``Flatten`` first when A gives a feature
map), initialised by least squares on ``x`` and then trained with :func:`kmerge.fit_head`,
which computes A's frozen features only once.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from kmerge.arguments import integer, labels, model_inputs
from kmerge.errors import IncompatibleModelsError, InvalidArgumentError, TapError
from kmerge.graph import compiled
from kmerge.graph.rebuild import Copier, LayerRef, check_model, input_specs, rebuild
from kmerge.graph.replay import Call, is_graph_model, replay, resolve_ref, submodel, walk
from kmerge.metadata import attach, derivation, own_path
from kmerge.training.losses import check_loss, check_verbose

__all__ = ["stitch", "rebuild_from"]

_MAX_ROWS = 200_000  # rows (samples x positions) used by the least-squares fit


def _cut(model: keras.Model, ref: LayerRef, *, source: str):
    """The walk of ``model`` and the single call of its top-level layer ``ref`` (the cut)."""
    if not is_graph_model(model):
        raise TapError(
            f"model {source!r} is a subclassed {type(model).__name__}; stitching needs a "
            "Functional or Sequential model to cut"
        )
    layer, _, _ = resolve_ref(model, ref, source=source)  # LayerNotFoundError, nearest names
    w = walk(model)
    calls = [c for c in w.calls_of(layer) if not c.path]
    if not calls:
        raise TapError(
            f"layer {ref!r} of model {source!r} is inside a nested model or not connected; "
            f"stitch at a top-level layer of {source!r}: {[la.name for la in model.layers]}"
        )
    if len(calls) > 1 or len(calls[0].outputs) != 1:
        raise TapError(
            f"layer {ref!r} of model {source!r} is called {len(calls)} times or has several "
            "outputs; stitch at a layer with a single call and a single output"
        )
    return w, calls[0]


def rebuild_from(
    model: keras.Model,
    ref: LayerRef,
    tensor: Any,
    *,
    name: str,
    freeze: bool = True,
    taken: set[str] | None = None,
) -> list:
    """Copy the part of ``model`` after layer ``ref`` onto ``tensor``; returns its outputs.

    ``tensor`` takes the place of the output of layer ``ref``: every layer that (directly or
    through others) reads it is copied with a prefixed name and the source's exact state,
    as :func:`kmerge.graph.rebuild.rebuild` copies a whole model. Layer ``ref`` and everything
    before it are not copied.

    Args:
        model: A Functional or Sequential model.
        ref: A top-level layer name or index of ``model``.
        tensor: A symbolic tensor with the shape of that layer's output.
        name: Prefix for the copied layers.
        freeze: Make the copies non-trainable (dropout becomes Identity).
        taken: Layer names already used in the graph being built (updated).

    Raises:
        IncompatibleModelsError: a layer after the cut also reads a tensor from before it
            (a skip connection or a second input), or an output does not depend on the cut.

    >>> head_of_b = rebuild_from(b, "conv_3", stitched_tensor, name="b")
    """
    w, cut = _cut(model, ref, source=name)
    want = w.shape(cut.outputs[0])[1:]
    got = tuple(tensor.shape[1:])
    if want != got:
        raise IncompatibleModelsError(
            f"the tensor fed after layer {ref!r} of model {name!r} has shape {got}, but the "
            f"layer gives {want}"
        )
    copier = Copier(name, freeze=freeze, taken=taken if taken is not None else set(), copy=True)

    def partial(call: Call, missing: list[int]) -> None:
        names = [w.name_of(i) for i in missing]
        raise IncompatibleModelsError(
            f"layer {call.name!r} of model {name!r} comes after {ref!r} but also reads "
            f"{names}, from before it (a skip connection or another input); stitch at a layer "
            "that cuts the graph in two, e.g. the end of a residual block"
        )

    values = replay(w, {cut.outputs[0]: tensor}, copier, on_partial=partial)
    missing = [w.name_of(i) for i in w.outputs if i not in values]
    if missing:
        raise IncompatibleModelsError(
            f"output(s) {missing} of model {name!r} do not depend on layer {ref!r}; stitch at a "
            "layer on the path to every output"
        )
    return [values[i] for i in w.outputs]


def _stitch_layers(src_shape: tuple, dst_shape: tuple, *, taken: set[str]) -> list:
    """The layers mapping A's features (src) to B's (dst): pre-processing, then the stitch."""
    def fresh(base: str) -> str:
        n, k = base, 1
        while n in taken:
            n, k = f"{base}_{k}", k + 1
        taken.add(n)
        return n

    if len(dst_shape) == 3 and len(src_shape) == 3:
        pre = []
        if src_shape[:2] != dst_shape[:2]:
            pre.append(keras.layers.Resizing(dst_shape[0], dst_shape[1],
                                             name=fresh("stitch_resize")))
        return [*pre, keras.layers.Conv2D(dst_shape[-1], 1, name=fresh("stitch"))]
    if len(dst_shape) == 1:
        pre = [keras.layers.Flatten(name=fresh("stitch_flatten"))] if len(src_shape) > 1 else []
        return [*pre, keras.layers.Dense(dst_shape[0], name=fresh("stitch"))]
    raise IncompatibleModelsError(
        f"cannot stitch features of shape {src_shape} from model 'a' to shape {dst_shape} of "
        "model 'b': kmerge stitches feature maps to feature maps (1x1 conv, resized) and "
        "anything to vectors (Dense); pick layers whose outputs are (H, W, C) or (C,)"
    )


def _least_squares(stitch_layer, fa: np.ndarray, fb: np.ndarray, seed: int) -> float:
    """Set the stitch to the least-squares map fa -> fb (per position for 1x1 conv)."""
    a = fa.reshape(-1, fa.shape[-1]).astype("float64")
    b = fb.reshape(-1, fb.shape[-1]).astype("float64")
    if len(a) > _MAX_ROWS:
        idx = np.random.default_rng(seed).choice(len(a), _MAX_ROWS, replace=False)
        a, b = a[idx], b[idx]
    design = np.concatenate([a, np.ones((len(a), 1))], axis=1)
    # A tiny ridge keeps rank-deficient features (dead ReLUs) well posed.
    gram = design.T @ design
    gram += 1e-6 * np.trace(gram) / len(gram) * np.eye(len(gram))
    coef = np.linalg.solve(gram, design.T @ b)
    kernel, bias = coef[:-1], coef[-1]
    k_shape = tuple(stitch_layer.kernel.shape)
    stitch_layer.kernel.assign(kernel.reshape(k_shape).astype("float32"))
    stitch_layer.bias.assign(bias.astype("float32"))
    resid = b - design @ coef
    return float(1.0 - resid.var() / max(b.var(), 1e-12))  # R^2 of the fit


def _score(model: keras.Model, x: Any, y: np.ndarray, batch_size: int) -> tuple[str, float]:
    pred = compiled.predict(model, x, batch_size=max(batch_size, 256))[0]
    y = np.asarray(y)
    if pred.ndim == 2 and pred.shape[1] > 1 and np.issubdtype(y.dtype, np.integer):
        return "accuracy", float(np.mean(np.argmax(pred, -1) == y.reshape(-1)))
    return "mse", float(np.mean((pred.reshape(len(pred), -1) - y.reshape(len(y), -1)) ** 2))


def stitch(
    a: keras.Model,
    b: keras.Model,
    *,
    at: tuple[LayerRef, LayerRef],
    x: Any,
    y: Any,
    epochs: int,
    batch_size: int = 32,
    validation_data: tuple[Any, Any] | None = None,
    loss: Any = None,
    seed: int | None = None,
    verbose: int | str = "auto",
    name: str | None = None,
) -> keras.Model:
    """Stitch the bottom of ``a`` to the top of ``b`` with a trained linear layer.

    Convention: ``at=("conv_2", "conv_3")`` keeps ``a`` up to and including ``conv_2`` and
    ``b`` from the layers *after* ``conv_3``; the stitch maps ``a``'s ``conv_2`` output to
    ``b``'s ``conv_3`` output (what ``b``'s next layers read). Least squares on ``x`` (A's
    features -> B's features, per spatial position for 1x1 conv) gives the initial stitch;
    :func:`kmerge.fit_head` then trains it on ``(x, y)`` with A's features cached. Both models
    stay frozen and untouched.

    The stitching penalty is reported on ``kmerge.info(model)["stitch"]``: the score of ``b``
    alone, of the stitched model after least squares and after training (accuracy for class
    labels, else mean squared error), on ``validation_data`` if given, else on ``(x, y)``, and
    ``penalty = b_score - stitched_score``.

    Args:
        a: The model whose bottom is kept (Functional or Sequential).
        b: The model whose top is kept; its layer after the cut must read only the cut.
        at: ``(layer of a, layer of b)``: names or indices of top-level layers.
        x: Array inputs for ``a``: least-squares fit and training.
        y: Targets for ``b``'s output.
        epochs: Training epochs for the stitch (0 keeps the least-squares stitch).
        batch_size: Batch size for training.
        validation_data: ``(x_val, y_val)`` to measure the penalty on.
        loss: Loss for training; None infers it from ``b``'s output.
        seed: Seeds batch order and subsampling.
        verbose: As in ``fit``.
        name: Name of the stitched model.

    Returns:
        A new ``keras.Model``: ``a_*`` layers, ``stitch``, ``b_*`` layers.

    Raises:
        LayerNotFoundError: ``at`` names a layer that does not exist (the nearest are listed).
        IncompatibleModelsError: shapes that cannot be stitched, or ``b`` has a skip
            connection across the cut.

    >>> m = kmerge.stitch(a, b, at=("conv_2", "conv_3"), x=x, y=y, epochs=3)
    >>> meta_of(m)["stitch"]["penalty"]
    0.004
    """
    a = check_model(a, "a")
    b = check_model(b, "b")
    if not isinstance(at, tuple | list) or len(at) != 2:
        raise InvalidArgumentError(
            f"at must be a pair (layer of a, layer of b), e.g. at=('conv_2', 'conv_3'); got {at!r}"
        )
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise InvalidArgumentError(f"epochs must be a non-negative integer, got {epochs!r}")
    if len(input_specs(a)) != 1:
        raise IncompatibleModelsError("stitch supports models 'a' with a single input")
    seed = integer(seed, "seed", low=0, optional=True)
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31 - 1))
    ref_a, ref_b = at
    if not is_graph_model(a):
        raise TapError(f"model 'a' is a subclassed {type(a).__name__}; it cannot be cut")
    resolve_ref(a, ref_a, source="a")  # fail early with the nearest names
    walk_b, cut_b = _cut(b, ref_b, source="b")
    # every array is checked against both models before anything runs (see kmerge.arguments)
    batch_size = integer(batch_size, "batch_size")
    loss = check_loss(loss)
    check_verbose(verbose)
    (x_np,) = model_inputs(a, x, "x")
    model_inputs(b, x_np, "x (b alone is scored on it: the penalty's baseline)")
    y_np = labels(y, len(x_np), "y")
    if validation_data is not None:
        if not isinstance(validation_data, tuple | list) or len(validation_data) != 2:
            raise InvalidArgumentError(
                "validation_data must be a pair (x_val, y_val); received "
                f"{type(validation_data).__name__}")
        (xv,) = model_inputs(a, validation_data[0], "validation_data x")
        model_inputs(b, xv, "validation_data x")
        validation_data = (xv, labels(validation_data[1], len(xv), "validation_data y"))

    taken: set[str] = set()
    (shape, dtype, _), = input_specs(a)
    taken.add("input")
    inp = keras.Input(shape=shape, dtype=dtype, name="input")
    ra = rebuild(a, [inp], name="a", freeze=True, taken=taken)
    feat_a = ra.tap(ref_a)
    dst = walk_b.shape(cut_b.outputs[0])[1:]
    layers = _stitch_layers(tuple(feat_a.shape[1:]), dst, taken=taken)
    h = feat_a
    for layer in layers[:-1]:
        h = layer(h)
    pre = h
    stitched_t = layers[-1](pre)
    outs = rebuild_from(b, ref_b, stitched_t, name="b", freeze=True, taken=taken)
    model = keras.Model(inp, outs[0] if len(outs) == 1 else outs,
                        name=name or f"kmerge_stitch_{a.name}_{b.name}")

    # Least squares: A's (resized / flattened) features -> B's features at the cut.
    fa = compiled.predict(keras.Model(inp, pre), x_np)[0]
    b_ins = [walk_b.tensors[i] for i in walk_b.inputs]
    fb = compiled.predict(submodel(b_ins, walk_b.tensors[cut_b.outputs[0]]), x_np)[0]
    r2 = _least_squares(layers[-1], fa, fb, seed)

    xv, yv = (validation_data if validation_data is not None else (x_np, y_np))
    metric, b_score = _score(b, xv, yv, batch_size)
    _, ls_score = _score(model, xv, yv, batch_size)
    history = None
    if epochs > 0:
        history = _fit_stitch(model, x_np, y_np, epochs=epochs, batch_size=batch_size,
                              validation_data=validation_data, loss=loss, seed=seed,
                              verbose=verbose)
    _, score = _score(model, xv, yv, batch_size)
    better = 1.0 if metric == "accuracy" else -1.0
    meta = {
        "kind": "stitch",
        "sources": {
            "a": {"frozen": True, "layer": str(ref_a), "path": own_path(a)},
            "b": {"frozen": True, "layer": str(ref_b), "path": own_path(b)},
        },
        **derivation(a, b),
        "stitch": {
            "at": [str(ref_a), str(ref_b)],
            "layers": [la.name for la in layers],
            "from_shape": list(feat_a.shape[1:]),
            "to_shape": list(dst),
            "least_squares_r2": r2,
            "metric": metric,
            "b_score": b_score,
            "least_squares_score": ls_score,
            "stitched_score": score,
            "penalty": better * (b_score - score),
            "evaluated_on": "validation_data" if validation_data is not None else "x",
            "epochs": epochs,
            "history": None if history is None else dict(history.history),
        },
        "notes": [f"a: {n}" for n in ra.notes],
    }
    attach(model, meta)
    return model


def _fit_stitch(model, x, y, *, epochs, batch_size, validation_data, loss, seed, verbose):
    from kmerge.training.fit import fit_head

    return fit_head(model, x, y, epochs=epochs, batch_size=batch_size,
                    validation_data=validation_data, loss=loss, seed=seed, verbose=verbose)

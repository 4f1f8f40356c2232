"""Train what is trainable in a merged model, fast: frozen-feature caching and fine-tuning.

A merged model is mostly frozen sources with a small trainable part on top (a head, an
adapter, a stitch). ``model.fit`` runs every frozen source forward again each epoch, although
its output never changes. :func:`fit_head` finds the boundary between the frozen part and the
trainable part of the graph, computes the boundary tensors once, and trains a sub-model made of
the *same* trainable layer objects on them, so the trained weights are the full model's weights.

The split is :mod:`kmerge.training.split`: the frozen part is every call that has no trainable
weights, is not random in training mode, and reads only frozen tensors.

:func:`fine_tune` unfreezes the last few weighted layers of each frozen source (BatchNorm stays
frozen, in inference mode) and trains with a small learning rate, through the same machinery:
whatever stays frozen below the unfrozen layers is still computed only once.

Every training function here feeds batches through one data pipeline
(:class:`kmerge.training.data.Feed`): a seeded
permutation per epoch that the cached and the uncached paths share, so their losses agree, and
batches padded to a multiple of the device count (zero sample weight) under an active
``keras.distribution``, so data-parallel training never fails on a short batch.
"""

from __future__ import annotations

import difflib
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from kmerge import _keras
from kmerge.arguments import integer
from kmerge.errors import InvalidArgumentError, LayerNotFoundError
from kmerge.graph.replay import submodel
from kmerge.metadata import meta_of
from kmerge.training.data import CHUNK, Feed, Source, as_list, device_count, pad, to_numpy, unpack
from kmerge.training.guard import unchanged_on_failure
from kmerge.training.losses import (
    check_labels,
    check_loss,
    check_verbose,
    fresh_optimizer,
    infer_loss,
)
from kmerge.training.spill import Spool
from kmerge.training.split import (
    checked_walk,
    frozen_submodel,
    no_new_nodes,
    split,
    trainable_submodel,
)

__all__ = ["fit_head", "fine_tune", "choose_layers", "StaleCacheWarning"]

_CACHE_MODES = ("auto", "memory", "disk", None)


class StaleCacheWarning(UserWarning):
    """The input pipeline looks random (augmentation): cached features would be stale."""



@dataclass
class _Prepared:
    xs: list
    y: np.ndarray
    sw: np.ndarray | None
    blocks: list | None


def _extract(extractor: keras.Model | None, src: Source, *, mode: str, folder, devices: int,
             verbose: int, label: str) -> tuple[_Prepared, bool]:
    """Run ``extractor`` (the frozen part) once over ``src``; None keeps raw inputs."""
    n_out = len(extractor.outputs) if extractor is not None else len(src.model.inputs)
    spools = [Spool(mode, folder, f"{label}_{i}") for i in range(n_out)]
    ys, sws, blocks, start = [], [], [], 0
    total = None
    if src.arrays is not None:
        total = math.ceil(src.n / CHUNK)
    elif src.dataset is not None:
        total = len(src.dataset)
    bar = None
    if verbose:
        what = "caching frozen features" if label == "train" else f"caching {label} features"
        if extractor is None:
            what = "reading the training data"
        print(f"{what}{'' if total is None else f' ({total} batches)'}", flush=True)
        bar = keras.utils.Progbar(total, unit_name="batch")
    for k, (xs, y, sw) in enumerate(src.batches()):
        if extractor is None:
            feats = xs
        else:
            n = len(y)
            padded = pad(xs, y, None, devices)[0] if devices > 1 else (
                xs[0] if len(xs) == 1 else tuple(xs))
            out = extractor.predict_on_batch(padded)
            feats = [to_numpy(o)[:n] for o in (out if isinstance(out, list | tuple) else [out])]
        for s, f in zip(spools, feats):
            s.add(f)
        ys.append(y)
        if sw is not None:
            sws.append(sw)
        blocks.append((start, start + len(y)))
        start += len(y)
        if bar is not None:
            bar.update(k + 1)
    arrays = [s.finish() for s in spools]
    on_disk = any(s.on_disk for s in spools)
    y_all = np.concatenate(ys)
    sw_all = np.concatenate(sws) if sws else None
    return _Prepared(arrays, y_all, sw_all, None if src.arrays is not None else blocks), on_disk


def _feed(p: _Prepared, *, batch_size: int, shuffle: bool, seed: int, devices: int) -> Feed:
    return Feed(xs=p.xs, y=p.y, sw=p.sw, batch_size=batch_size, blocks=p.blocks,
                 shuffle=shuffle, seed=seed, devices=devices)


def _task_view(model: keras.Model) -> tuple[keras.Model, list[str]]:
    """What :func:`fit_head` trains: ``model`` itself, or - when its outputs are named (a
    dict, as in a multi-task merge made with ``keep_outputs=True``) and some of them are
    computed by the frozen part alone - the same layers with only the outputs that can learn,
    and their names.

    A frozen output (a source's own, kept unchanged) has nothing to learn and no labels here:
    its loss is off. Training the view is ``fit`` on the whole model with those losses off
    (the frozen outputs get no gradient either way), without computing the frozen outputs.
    """
    if not _keras.is_functional(model) or not isinstance(model.output, Mapping):
        return model, []
    named = dict(model.output)
    s = split(model)
    learning = {id(c) for c in s.trainable_calls}
    position = {id(t): j for j, t in enumerate(model.outputs)}
    learn = {}
    for key, t in named.items():
        call = s.walk.producer_call(s.walk.outputs[position[id(t)]])
        if call is not None and id(call) in learning:
            learn[key] = t
    if not learn or len(learn) == len(named):
        return model, []
    outs = next(iter(learn.values())) if len(learn) == 1 else learn
    return submodel(model.inputs, outs, name=f"{model.name}_task"), list(learn)


def _hand_over(model: keras.Model, view: keras.Model, trained: Any, optimizer: Any, *,
               loss: Any, metrics: Any, keys: list[str]) -> None:
    """Leave ``model`` compiled as it trained (see :func:`hand_over_optimizer`); a task view
    (:func:`_task_view`) trained only the outputs ``keys``: the model's loss is on those
    alone. Keras's metrics need labels for every named output, so a multi-task model is
    compiled with its loss only."""
    if view is model:
        hand_over_optimizer(model, trained, optimizer, loss=loss, metrics=metrics)
        return
    losses = dict(loss) if isinstance(loss, Mapping) else {k: loss for k in keys}
    hand_over_optimizer(model, trained, optimizer, loss=losses, metrics=None)


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _validation_source(validation_data: Any, model: keras.Model, batch_size: int) -> Source:
    if isinstance(validation_data, tuple) and len(validation_data) in (2, 3):
        if len(validation_data) == 3:
            raise InvalidArgumentError(
                "validation_data with sample weights is not supported; pass (x_val, y_val)"
            )
        return Source(validation_data[0], validation_data[1], model, batch_size=batch_size,
                       what="validation_data")
    return Source(validation_data, None, model, batch_size=batch_size, what="validation_data")


def fit_head(
    model: keras.Model,
    x: Any,
    y: Any = None,
    *,
    epochs: int,
    batch_size: int = 32,
    validation_data: Any = None,
    cache: str | None = "auto",
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
    optimizer: str | keras.optimizers.Optimizer = "adam",
    loss: Any = None,
    metrics: Sequence[Any] | None = None,
    seed: int | None = None,
    shuffle: bool = True,
) -> keras.callbacks.History:
    """Train only what is trainable in ``model``; frozen features are computed once.

    The frozen part of the graph (layers without trainable weights, deterministic, fed only by
    frozen tensors) runs once over ``x``; its output tensors are kept in memory, or in a
    memory-mapped file in a temporary folder when they do not fit (set
    ``KMERGE_CACHE_MEMORY=<bytes>`` to change the limit). The trainable layers, the same objects
    as in ``model``, then train on them for ``epochs`` epochs: the trained weights are in
    ``model`` when this returns. Caching changes nothing observable: with the same ``seed`` the
    losses match ``cache=None`` (plain ``fit`` on the whole model, same batch order).

    Cached features are stale when the input pipeline is random (augmentation): a PyDataset,
    a generator function or a ``tf.data.Dataset`` that returns a different first batch when read
    twice triggers a :class:`StaleCacheWarning`; pass ``cache=None`` then. A one-shot generator
    cannot be checked.

    Under an active ``keras.distribution`` (e.g. ``DataParallel``) every batch is padded to a
    multiple of the device count with zero-weight samples (the loss is still the mean over the
    real samples), so no batch size fails.

    A multi-task merge (``kmerge.parallel(..., keep_outputs=True)`` or ``fuse``) trains its new
    output (``"head"``) alone, on ``y`` labelled for it: the kept outputs are the frozen
    sources' own, computed by the frozen part, and their losses are off (Keras multi-output
    training with a loss on one output). Afterwards the model is compiled with
    ``loss={"head": ...}`` (no metrics: Keras's metrics want labels for every output), so
    ``model.evaluate(x, {"head": y})`` works.

    Args:
        model: A Functional or Sequential model (e.g. from ``kmerge.parallel``) with some
            trainable layers.
        x: Inputs: NumPy array(s) (with ``y``), a ``keras.utils.PyDataset``, a generator or a
            function returning one (finite; yields ``(x, y)`` or ``(x, y, sample_weight)``),
            or a ``tf.data.Dataset`` of batches on the tensorflow backend.
        y: Targets for array inputs; None for the others.
        epochs: Passes over the data.
        batch_size: Samples per batch for array inputs (datasets keep their own batches).
        validation_data: ``(x_val, y_val)`` or a dataset; its frozen features are cached too.
        cache: ``"auto"`` (memory, or disk when too large), ``"memory"``, ``"disk"``, or None
            for plain ``fit`` on the whole model.
        callbacks: Keras callbacks. With caching they see the trainable sub-model as
            ``callback.model`` (its layers are the full model's layers).
        verbose: As in ``fit``; also shows a progress bar while features are computed.
        optimizer: A name or an optimizer; a fresh copy is made, so compiling is never stale.
        loss: A Keras loss; None infers it (softmax output + integer labels: sparse
            categorical crossentropy; one-hot: categorical; sigmoid: binary; linear output +
            integer labels: sparse from logits; linear + float targets: mse).
        metrics: Keras metrics; None gives ``["accuracy"]`` for classification.
        seed: Seeds the batch order (and Keras's global RNG); None draws one.
        shuffle: Shuffle the batch order each epoch (seeded).

    Returns:
        The ``keras.callbacks.History``; ``history.model`` is ``model`` and
        ``history.kmerge`` says what was cached (``{"cache": "memory" | "disk" | None,
        "boundary": [...], "feature_seconds": ..., "outputs": [...]}``; ``outputs`` names
        the outputs trained when some were left out, as in a multi-task merge).

    Raises:
        InvalidArgumentError: nothing trainable, ``x`` and ``y`` lengths differ, labels outside
            the head's classes, inconsistent batch shapes, no loss can be inferred.

    >>> m = kmerge.parallel({"a": a, "b": b}, head=kmerge.heads.classifier(10))
    >>> history = kmerge.fit_head(m, x_train, y_train, epochs=10)
    """
    epochs = _check_positive("epochs", epochs)
    batch_size = _check_positive("batch_size", batch_size)
    if cache not in _CACHE_MODES:
        raise InvalidArgumentError(f"cache must be one of {list(_CACHE_MODES)}, got {cache!r}")
    check_verbose(verbose)
    fresh_optimizer(optimizer)  # an unknown name fails here, before any work
    loss = check_loss(loss)
    checked_walk(model)
    if not model.trainable_weights:
        raise InvalidArgumentError(
            f"model {model.name!r} has nothing trainable: every layer is frozen. Add a head "
            "(kmerge.parallel(..., head=kmerge.heads.classifier(n))), build the merge with "
            "freeze=False, or unfreeze layers with kmerge.fine_tune"
        )
    seed = integer(seed, "seed", low=0, optional=True)
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31 - 1))
    keras.utils.set_random_seed(seed)
    verbose_i = check_verbose(verbose)
    devices = device_count()
    view, keys = _task_view(model)  # a multi-task merge trains its new output alone
    with unchanged_on_failure(model, "fit_head"):
        src = Source(x, y, view, batch_size=batch_size)
        if cache is not None and src.kind != "arrays" and src.looks_random():
            warnings.warn(
                "the input pipeline returns different inputs when the same batch is read twice "
                "(data augmentation?): fit_head caches the frozen features once, so augmentation "
                "would be frozen at its first draw. Pass cache=None to augment every epoch",
                StaleCacheWarning, stacklevel=2,
            )
        if cache is None and src.kind in ("factory", "once"):
            history = _plain_fit(view, src, x, epochs=epochs, validation_data=validation_data,
                                 callbacks=callbacks, verbose=verbose, optimizer=optimizer,
                                 loss=loss, metrics=metrics)
            if view is not model:
                _hand_over(model, view, view.optimizer, optimizer, loss=loss, metrics=metrics,
                           keys=keys)
                history.set_model(model)
            history.kmerge["outputs"] = keys
            return history

        folder: list[str] = []

        def temp_folder() -> str:
            if not folder:
                folder.append(tempfile.mkdtemp(prefix="kmerge-cache-"))
            return folder[0]

        # the sub-models call the model's own layers: their nodes go when training ends
        nodes = no_new_nodes(model)
        nodes.__enter__()
        try:
            t0 = time.perf_counter()
            if cache is None:
                s = None
                train_model = view
                extractor = None
            else:
                s = split(view)
                extractor = frozen_submodel(view, s)
                train_model = trainable_submodel(view, s)
            mode = cache if cache in ("memory", "disk") else "auto"
            if src.kind == "pydataset" and cache is None:
                prepared, on_disk = None, False
            else:
                prepared, on_disk = _extract(extractor, src, mode=mode, folder=temp_folder,
                                             devices=devices, verbose=verbose_i, label="train")
            if prepared is not None:
                y_check = prepared.y
            else:
                y_check = to_numpy(unpack(src.dataset[0], "x")[1])
            if loss is None:
                loss, default_metrics = infer_loss(view, y_check)
                if metrics is None:
                    metrics = default_metrics
            if prepared is not None:
                check_labels(view, prepared.y, loss)
            if prepared is not None:
                feed = _feed(prepared, batch_size=batch_size, shuffle=shuffle, seed=seed,
                             devices=devices)
            else:
                ds = src.dataset

                def fetch(i: int):
                    bx, by, bw = unpack(ds[i], "x")
                    return ([to_numpy(a) for a in as_list(bx, view)], to_numpy(by),
                            None if bw is None else to_numpy(bw))

                feed = Feed(fetch=fetch, n_blocks=len(ds), shuffle=shuffle, seed=seed,
                             devices=devices)
            val_feed = None
            if validation_data is not None:
                vsrc = _validation_source(validation_data, view, batch_size)
                vprep, _ = _extract(extractor, vsrc, mode=mode, folder=temp_folder, devices=devices,
                                    verbose=0, label="val")
                val_feed = _feed(vprep, batch_size=batch_size, shuffle=False, seed=seed,
                                 devices=devices)
            feature_seconds = time.perf_counter() - t0
            train_model.compile(optimizer=fresh_optimizer(optimizer), loss=loss,
                                metrics=list(metrics or []))
            history = train_model.fit(feed, epochs=epochs, validation_data=val_feed,
                                      callbacks=list(callbacks or []), verbose=verbose,
                                      shuffle=False)
            if train_model is not model:
                # Leave the full model ready for evaluate/predict with the loss it trained on,
                # and with the optimizer state it trained with (built for the full model's
                # variables: a saved model reloads it without a mismatch).
                _hand_over(model, view, train_model.optimizer, optimizer, loss=loss,
                           metrics=metrics, keys=keys)
        finally:
            nodes.__exit__(None, None, None)
            if folder:
                shutil.rmtree(folder[0], ignore_errors=True)
        history.set_model(model)
        history.kmerge = {
            "cache": None if cache is None else ("disk" if on_disk else "memory"),
            "boundary": [] if s is None else [s.walk.shape(i)[1:] for i in s.boundary],
            "summary": "plain fit" if s is None else s.describe(),
            "feature_seconds": feature_seconds,
            "seed": seed,
            "devices": devices,
            "outputs": keys,
        }
        return history


def hand_over_optimizer(model: keras.Model, trained: keras.optimizers.Optimizer,
                        optimizer: Any, *, loss: Any, metrics: Any) -> None:
    """Compile ``model`` with a copy of ``optimizer`` built for ``model``'s trainable
    variables, holding the state of ``trained`` (which trained the same variables through a
    sub-model): iteration count, learning rate and every slot (Adam's moments, ...).

    The optimizer state is then what ``model.fit`` on the whole model would have left, and a
    saved model reloads it with ``keras.models.load_model`` (Keras rebuilds the optimizer for
    the model's trainable variables and loads the saved state by position). Slots are matched
    by name (Keras names a slot after its variable's path); a slot without a match keeps its
    fresh value.
    """
    opt = fresh_optimizer(optimizer)
    # no metrics argument at all without metrics: an empty list still makes Keras match
    # labels to every named output of a multi-task model
    model.compile(optimizer=opt, loss=loss, **({"metrics": list(metrics)} if metrics else {}))
    opt.build(model.trainable_variables)
    if trained is None or not getattr(trained, "built", False):
        return
    by_name: dict[str, Any] = {}
    for v in trained.variables:
        by_name[v.name] = None if v.name in by_name else v  # ambiguous names: not copied
    for v in opt.variables:
        t = by_name.get(v.name)
        if t is not None and tuple(t.shape) == tuple(v.shape) and t.dtype == v.dtype:
            v.assign(t.value)


def _plain_fit(model, src, x, *, epochs, validation_data, callbacks, verbose, optimizer, loss,
               metrics) -> keras.callbacks.History:
    """cache=None with a generator or tf.data: ``fit`` as the user would call it."""
    if loss is None:
        raise InvalidArgumentError(
            "with cache=None and a generator or tf.data input, kmerge cannot look at the "
            "targets to infer a loss; pass loss=..."
        )
    if device_count() > 1:
        raise InvalidArgumentError(
            "cache=None with a generator under a multi-device distribution cannot pad short "
            "batches; pass NumPy arrays or a keras.utils.PyDataset, or use cache='auto'"
        )
    data = src.factory() if src.factory is not None else src.once
    model.compile(optimizer=fresh_optimizer(optimizer), loss=loss, metrics=list(metrics or []))
    history = model.fit(data, epochs=epochs, validation_data=validation_data,
                        callbacks=list(callbacks or []), verbose=verbose)
    history.kmerge = {"cache": None, "boundary": [], "summary": "plain fit",
                      "feature_seconds": 0.0, "seed": None, "devices": 1}
    return history


# ----------------------------------------------------------------------------------------
# fine_tune
# ----------------------------------------------------------------------------------------
def _source_layers(model: keras.Model) -> dict[str, list[keras.layers.Layer]]:
    """The merged model's layers per source, in graph order, as the metadata records them."""
    meta = meta_of(model)
    if not meta or not meta.get("sources"):
        raise InvalidArgumentError(
            f"model {model.name!r} was not built by kmerge (no kmerge metadata), so its sources "
            "are unknown; pass unfreeze=[layer names] instead of 'top:N'"
        )
    out: dict[str, list] = {n: [] for n in meta["sources"]}
    recorded = {n: set(e["layers"]) for n, e in meta["sources"].items()
                if isinstance(e, dict) and isinstance(e.get("layers"), list)}
    if len(recorded) == len(out):
        for layer in model.layers:
            for n, names in recorded.items():
                if layer.name in names:
                    out[n].append(layer)
        return out
    names = sorted(meta["sources"], key=len, reverse=True)  # kmerge 0.1 files: by prefix
    for layer in model.layers:
        for n in names:
            if layer.name.startswith(n + "_"):
                out[n].append(layer)
                break
    return out


def _is_bn(layer: Any) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization) or "Normalization" in type(
        layer).__name__ and "Batch" in type(layer).__name__


def choose_layers(model: keras.Model, unfreeze: str | Sequence[str]) -> list[str]:
    """The merged-model layer names that ``unfreeze`` selects (BatchNorm never)."""
    if isinstance(unfreeze, str):
        if not unfreeze.startswith("top:") or not unfreeze[4:].isdigit() or int(unfreeze[4:]) < 1:
            raise InvalidArgumentError(
                f"unfreeze={unfreeze!r} is not understood; use 'top:N' (the last N weighted "
                "layers of each frozen source, N >= 1) or a list of layer names"
            )
        k = int(unfreeze[4:])
        meta = meta_of(model) or {}
        chosen = []
        for src, layers in _source_layers(model).items():
            if not meta["sources"][src].get("frozen", True):
                continue
            weighted = [la for la in layers if la.weights and not _is_bn(la)]
            chosen.extend(la.name for la in weighted[-k:])
        if not chosen:
            raise InvalidArgumentError(
                f"unfreeze={unfreeze!r} selects no layer: model {model.name!r} has no frozen "
                "source with weighted layers"
            )
        return chosen
    if not isinstance(unfreeze, Sequence) or not all(isinstance(n, str) for n in unfreeze):
        raise InvalidArgumentError(
            f"unfreeze must be 'top:N' or a list of layer names; received {unfreeze!r}")
    names = list(unfreeze)
    existing = [layer.name for layer in model.layers]
    chosen = []
    for n in names:
        if n not in existing:
            close = difflib.get_close_matches(str(n), existing, n=3, cutoff=0.4)
            hint = f" Nearest: {', '.join(close)}." if close else ""
            raise LayerNotFoundError(
                f"model {model.name!r} has no layer {n!r}.{hint} Existing layers are: "
                f"{', '.join(existing[:40])}{' ...' if len(existing) > 40 else ''}"
            )
        layer = model.get_layer(n)
        if _is_bn(layer):
            raise InvalidArgumentError(
                f"layer {n!r} is BatchNormalization; fine_tune keeps BatchNorm frozen in "
                "inference mode (its statistics would drift on small batches). Drop it from "
                "unfreeze"
            )
        if not layer.weights:
            raise InvalidArgumentError(f"layer {n!r} has no weights; there is nothing to unfreeze")
        chosen.append(n)
    return chosen


def fine_tune(
    model: keras.Model,
    x: Any,
    y: Any = None,
    *,
    unfreeze: str | Sequence[str] = "top:2",
    learning_rate: float = 1e-5,
    epochs: int,
    batch_size: int = 32,
    validation_data: Any = None,
    cache: str | None = "auto",
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
    optimizer: str | keras.optimizers.Optimizer = "adam",
    loss: Any = None,
    metrics: Sequence[Any] | None = None,
    seed: int | None = None,
) -> keras.callbacks.History:
    """Unfreeze the top layers of the frozen sources and train everything trainable, gently.

    ``unfreeze="top:N"`` picks the last N weighted layers (BatchNorm excluded) of each frozen
    source, as ``kmerge.info(model)["sources"][name]["layers"]`` records them; a list
    names merged-model layers (``"a_dense_1"``). BatchNormalization stays frozen, so it keeps
    running in inference mode with its moving statistics. The model is compiled afresh with
    ``optimizer`` at ``learning_rate`` and trained with :func:`fit_head`, so whatever stays
    frozen below the unfrozen layers is still computed only once. The unfrozen layers stay
    trainable afterwards (freeze them again with ``layer.trainable = False``).

    Args:
        model: A kmerge merged model (for ``top:N``) or any Functional model (for names).
        x: Inputs, as in :func:`fit_head`.
        y: Targets for array inputs.
        unfreeze: ``"top:N"`` or a list of layer names.
        learning_rate: Learning rate of the fresh optimizer (small: the sources are trained).
        epochs: Passes over the data.
        batch_size, validation_data, cache, callbacks, verbose, optimizer, loss, metrics,
            seed: As in :func:`fit_head`.

    Returns:
        The ``History``; ``history.unfrozen`` lists the layers that were unfrozen.

    >>> history = kmerge.fine_tune(m, x, y, unfreeze="top:1", epochs=2)
    >>> history.unfrozen
    ['a_dense_1', 'b_dense']
    """
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, int | float) or not (
            learning_rate > 0):
        raise InvalidArgumentError(f"learning_rate must be a positive number, got {learning_rate!r}")
    checked_walk(model)
    kept = ((meta_of(model) or {}).get("keep_outputs") or {}).get("kept")
    if kept:
        raise InvalidArgumentError(
            f"model {model.name!r} keeps its sources' outputs {sorted(sum(kept.values(), []))} "
            "unchanged (keep_outputs=True); fine_tune would unfreeze source layers and change "
            "them. Train the new head with kmerge.fit_head, or merge without keep_outputs to "
            "fine-tune")
    chosen = choose_layers(model, unfreeze)
    before = {n: model.get_layer(n).trainable for n in chosen}
    for n in chosen:
        model.get_layer(n).trainable = True
    try:
        history = fit_head(model, x, y, epochs=epochs, batch_size=batch_size,
                           validation_data=validation_data, cache=cache, callbacks=callbacks,
                           verbose=verbose, optimizer=fresh_optimizer(optimizer, learning_rate),
                           loss=loss, metrics=metrics, seed=seed)
    except BaseException:
        for n, flag in before.items():
            model.get_layer(n).trainable = flag
        raise
    history.unfrozen = chosen
    history.kmerge["unfrozen"] = chosen
    return history

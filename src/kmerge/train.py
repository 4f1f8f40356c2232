"""Train what is trainable in a merged model, fast: frozen-feature caching and fine-tuning.

A merged model is mostly frozen sources with a small trainable part on top (a head, an
adapter, a stitch). ``model.fit`` runs every frozen source forward again each epoch, although
its output never changes. :func:`fit_head` finds the boundary between the frozen part and the
trainable part of the graph, computes the boundary tensors once, and trains a sub-model made of
the *same* trainable layer objects on them, so the trained weights are the full model's weights.

The frozen part is every layer that has no trainable weights, is deterministic, and reads only
frozen tensors (model inputs are frozen). Stochastic layers without weights (dropout, noise,
random augmentation) end it: their output differs from call to call, so it cannot be cached.

:func:`fine_tune` unfreezes the last few weighted layers of each frozen source (BatchNorm stays
frozen, in inference mode) and trains with a small learning rate, through the same machinery:
whatever stays frozen below the unfrozen layers is still computed only once.

Every training function here feeds batches through one data pipeline (:class:`_Feed`): a seeded
permutation per epoch that the cached and the uncached paths share, so their losses agree, and
batches padded to a multiple of the device count (zero sample weight) under an active
``keras.distribution``, so data-parallel training never fails on a short batch.
"""

from __future__ import annotations

import difflib
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from kmerge import _keras
from kmerge.errors import InvalidArgumentError, InvalidModelError, LayerNotFoundError
from kmerge.graph import inference
from kmerge.graph.replay import Walk, is_graph_model, replay, run_source_ops, submodel, walk
from kmerge.metadata import meta_of

__all__ = ["fit_head", "fine_tune", "StaleCacheWarning"]

_CACHE_MODES = ("auto", "memory", "disk", None)
_CHUNK = 256  # samples per forward pass of the frozen part


class StaleCacheWarning(UserWarning):
    """The input pipeline looks random (augmentation): cached features would be stale."""


# ----------------------------------------------------------------------------------------
# the frozen / trainable split
# ----------------------------------------------------------------------------------------
def _walk(model: keras.Model) -> Walk:
    if not isinstance(model, keras.Model):
        raise InvalidModelError(f"expected a keras.Model, got {type(model).__name__}")
    if not is_graph_model(model):
        raise InvalidModelError(
            f"model {model.name!r} is a subclassed {type(model).__name__}; kmerge can only split "
            "Functional and Sequential models into frozen and trainable parts. Call "
            "model.fit directly, or pass cache=None"
        )
    return walk(model)


def _has_trainable(op: Any) -> bool:
    return bool(getattr(op, "trainable_weights", None))


@dataclass
class Split:
    """Where a model's frozen part ends: the tensors the trainable part reads from it."""

    walk: Walk
    boundary: list[int]  # walk ids of frozen tensors read by trainable calls (or outputs)
    frozen_layers: list[str]
    trainable_layers: list[str]
    trainable_calls: list = field(default_factory=list)

    @property
    def boundary_tensors(self) -> list:
        return [self.walk.tensors[i] for i in self.boundary]

    def describe(self) -> str:
        shapes = ", ".join(str(self.walk.shape(i)[1:]) for i in self.boundary)
        return (f"{len(self.frozen_layers)} frozen layers computed once; "
                f"{len(self.trainable_layers)} layers train on {len(self.boundary)} cached "
                f"tensor(s) of shape {shapes}")


def split(model: keras.Model) -> Split:
    """Find the boundary between the frozen part and the trainable part of ``model``.

    The frozen part is every call of an operation without trainable weights that is not
    random in training mode (:func:`kmerge.graph.inference.is_random`) and reads only frozen
    tensors.

    >>> s = split(merged)
    >>> s.boundary_tensors  # the tensors computed once by fit_head
    """
    w = _walk(model)
    frozen: set[int] = set(w.inputs)
    trainable_calls, frozen_names, train_names = [], [], []
    for call in w.leaf_calls:
        op = call.op
        if (all(i in frozen for i in call.inputs) and not _has_trainable(op)
                and not inference.is_random(op)):
            frozen.update(call.outputs)
            frozen_names.append(call.name)
        else:
            trainable_calls.append(call)
            train_names.append(call.name)
    boundary: list[int] = []
    for i in [i for c in trainable_calls for i in c.inputs] + list(w.outputs):
        if i in frozen and i not in boundary:
            boundary.append(i)
    return Split(w, boundary, _unique(frozen_names), _unique(train_names), trainable_calls)


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _frozen_submodel(model: keras.Model, s: Split) -> keras.Model:
    """The frozen part: the model's inputs to the boundary tensors."""
    w = s.walk
    if all(c is None or not c.path for c in map(w.producer_call, s.boundary)):
        inputs, outputs = [w.tensors[i] for i in w.inputs], s.boundary_tensors
    else:  # boundary inside a nested model: replay the frozen calls on new inputs
        inputs = [keras.Input(shape=w.shape(i)[1:], dtype=w.tensors[i].dtype) for i in w.inputs]
        trainable = {id(c) for c in s.trainable_calls}
        values = replay(w, dict(zip(w.inputs, inputs)), run_source_ops,
                        calls=[c for c in w.leaf_calls if id(c) not in trainable])
        outputs = [values[i] for i in s.boundary]
    return submodel(inputs, outputs, name=f"{model.name}_frozen_part")


def _trainable_submodel(model: keras.Model, s: Split) -> keras.Model:
    """The trainable part as its own model on the boundary tensors, with the SAME layers."""
    w = s.walk
    inputs = [keras.Input(shape=w.shape(i)[1:], dtype=w.tensors[i].dtype, name=f"boundary_{k}")
              for k, i in enumerate(s.boundary)]
    values = replay(w, dict(zip(s.boundary, inputs)), run_source_ops, calls=s.trainable_calls)
    outputs = [values[i] for i in w.outputs]
    return keras.Model(inputs[0] if len(inputs) == 1 else inputs,
                       outputs[0] if len(outputs) == 1 else outputs,
                       name=f"{model.name}_trainable_part")


# ----------------------------------------------------------------------------------------
# data: arrays, PyDataset, generators, tf.data -> (x list, y, sample weight) batches
# ----------------------------------------------------------------------------------------
def _as_list(x: Any, model: keras.Model, what: str = "x") -> list:
    names = [t.name for t in model.inputs]
    if isinstance(x, dict):
        missing = [n for n in names if n not in x]
        if missing:
            raise InvalidArgumentError(
                f"{what} is a dict without the model's input(s) {missing}; its keys are "
                f"{sorted(x)}. Use the input names {names}"
            )
        return [x[n] for n in names]
    if isinstance(x, list | tuple):
        xs = list(x)
    else:
        xs = [x]
    if len(xs) != len(names):
        raise InvalidArgumentError(
            f"model {model.name!r} has {len(names)} input(s) {names} but {what} holds "
            f"{len(xs)} array(s); pass one array per input (a list, or a dict by input name)"
        )
    return xs


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    return np.asarray(keras.ops.convert_to_numpy(a))


def _is_arraylike(x: Any) -> bool:
    if isinstance(x, dict):
        return all(_is_arraylike(v) for v in x.values())
    if isinstance(x, list | tuple):
        return len(x) > 0 and all(_is_arraylike(v) for v in x)
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _is_tf_dataset(x: Any) -> bool:
    return type(x).__module__.startswith("tensorflow") and hasattr(x, "element_spec")


def _unpack(batch: Any, where: str) -> tuple[Any, Any, Any]:
    if isinstance(batch, tuple | list) and len(batch) in (2, 3):
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)
    raise InvalidArgumentError(
        f"{where} yielded a {type(batch).__name__}; training needs (x, y) or "
        "(x, y, sample_weight) tuples"
    )


class _Source:
    """One pass over the training data as (x list, y, sample_weight) batches."""

    def __init__(self, x: Any, y: Any, model: keras.Model, *, batch_size: int, what: str = "x"):
        self.model = model
        self.what = what
        self.batch_size = batch_size
        self.kind: str
        self.arrays: tuple | None = None
        self.dataset = None
        self.factory: Callable[[], Iterable] | None = None
        self.once: Iterable | None = None
        if isinstance(x, keras.utils.PyDataset):
            self._no_y(y, "a keras.utils.PyDataset")
            self.kind, self.dataset = "pydataset", x
        elif _is_arraylike(x):
            xs = [_to_numpy(a) for a in _as_list(x, model, what)]
            if y is None:
                raise InvalidArgumentError(
                    f"{what} is an array but y is None; pass the targets as y=..., or pass a "
                    "PyDataset / generator that yields (x, y) batches"
                )
            ys = _to_numpy(y)
            sizes = {len(a) for a in xs}
            if len(sizes) != 1 or len(ys) not in sizes:
                raise InvalidArgumentError(
                    f"{what} and y have different lengths: {what} has "
                    f"{sorted(sizes) if len(sizes) > 1 else len(xs[0])} samples, y has "
                    f"{len(ys)}; pass one target per sample"
                )
            self.kind, self.arrays = "arrays", (xs, ys, None)
        elif _is_tf_dataset(x) or (callable(x) and not isinstance(x, keras.Model)):
            self._no_y(y, "a dataset or generator")
            self.kind, self.factory = "factory", (x if callable(x) else (lambda: x))
        elif isinstance(x, Iterable):
            self._no_y(y, "a generator")
            self.kind, self.once = "once", x
        else:
            raise InvalidArgumentError(
                f"{what} is a {type(x).__name__}; pass NumPy arrays (with y), a "
                "keras.utils.PyDataset, a generator (or a function returning one) of (x, y) "
                "batches, or a tf.data.Dataset on the tensorflow backend"
            )

    def _no_y(self, y: Any, kind: str) -> None:
        if y is not None:
            raise InvalidArgumentError(
                f"{self.what} is {kind}, which yields its own targets; drop y=... (got an "
                f"object of type {type(y).__name__})"
            )

    @property
    def n(self) -> int | None:
        return len(self.arrays[0][0]) if self.arrays else None

    def batches(self) -> Iterable[tuple[list, Any, Any]]:
        """Yield (x list, y, sample_weight) batches: one pass, checked for consistent shapes."""
        if self.arrays is not None:
            xs, ys, sw = self.arrays
            for i in range(0, len(ys), _CHUNK):
                yield [a[i:i + _CHUNK] for a in xs], ys[i:i + _CHUNK], None
            return
        if self.dataset is not None:
            it: Iterable = (self.dataset[i] for i in range(len(self.dataset)))
        elif self.factory is not None:
            it = self.factory()
        else:
            it = self.once
        first = None
        for k, batch in enumerate(it):
            bx, by, bw = _unpack(batch, self.what)
            xs = [_to_numpy(a) for a in _as_list(bx, self.model, self.what)]
            by = _to_numpy(by)
            bw = None if bw is None else _to_numpy(bw)
            shapes = ([a.shape[1:] for a in xs], by.shape[1:], None if bw is None else bw.shape[1:])
            if first is None:
                first = shapes
                self._check_input_shapes(xs)
            elif shapes != first:
                raise InvalidArgumentError(
                    f"{self.what} yielded batches of inconsistent shapes: batch 0 had x "
                    f"{_fmt(first[0])}, y {tuple(first[1])}; batch {k} has x {_fmt(shapes[0])}, "
                    f"y {tuple(shapes[1])}. Make every batch the same per-sample shape (pad or "
                    "resize in the pipeline)"
                )
            if any(len(a) != len(by) for a in xs):
                raise InvalidArgumentError(
                    f"{self.what} batch {k} has {len(xs[0])} inputs but {len(by)} targets; "
                    "each batch needs one target per sample"
                )
            yield xs, by, bw
        if first is None:
            raise InvalidArgumentError(f"{self.what} yielded no batches")

    def _check_input_shapes(self, xs: list) -> None:
        for a, t in zip(xs, self.model.inputs):
            want = tuple(t.shape[1:])
            got = tuple(a.shape[1:])
            if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
                raise InvalidArgumentError(
                    f"{self.what} gives samples of shape {got} for input {t.name!r}, which "
                    f"expects {want}; reshape the data to match"
                )

    def looks_random(self) -> bool:
        """True when reading the same batch twice gives different x (augmentation)."""
        try:
            if self.dataset is not None:
                a, b = self.dataset[0], self.dataset[0]
            elif self.factory is not None:
                a, b = next(iter(self.factory())), next(iter(self.factory()))
            else:
                return False
        except Exception:  # a pipeline that cannot be read twice: nothing to compare
            return False
        xa = _as_list(_unpack(a, self.what)[0], self.model, self.what)
        xb = _as_list(_unpack(b, self.what)[0], self.model, self.what)
        return any(np.shape(p) != np.shape(q) or not np.array_equal(_to_numpy(p), _to_numpy(q))
                   for p, q in zip(xa, xb))


def _fmt(shapes: list) -> str:
    return ", ".join(str(tuple(s)) for s in shapes)


# ----------------------------------------------------------------------------------------
# storage for computed features: memory, or a memory-mapped file when it does not fit
# ----------------------------------------------------------------------------------------
def _memory_budget() -> int:
    override = os.environ.get("KMERGE_CACHE_MEMORY")
    if override:
        return int(float(override))
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 << 30
    return int(min(4 << 30, avail // 4))


class _Spool:
    """Append batches of one array stream; keep them in memory or spill to a disk file."""

    def __init__(self, mode: str, folder: Callable[[], str], name: str):
        self.mode = mode  # "memory", "disk" or "auto"
        self.folder = folder
        self.name = name
        self.parts: list[np.ndarray] = []
        self.bytes = 0
        self.file = None
        self.path = ""
        self.n = 0
        self.tail: tuple = ()
        self.dtype = None

    def add(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        if self.dtype is None:
            self.dtype, self.tail = a.dtype, a.shape[1:]
        self.n += len(a)
        if self.file is None and (self.mode == "disk" or (
                self.mode == "auto" and self.bytes + a.nbytes > _memory_budget())):
            self.path = os.path.join(self.folder(), f"{self.name}.bin")
            self.file = open(self.path, "wb")  # noqa: SIM115 (closed in finish)
            for p in self.parts:
                self.file.write(p.tobytes())
            self.parts = []
        if self.file is not None:
            self.file.write(a.tobytes())
        else:
            self.parts.append(a)
        self.bytes += a.nbytes

    def finish(self) -> np.ndarray:
        if self.file is not None:
            self.file.close()
            return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n, *self.tail))
        return np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]

    @property
    def on_disk(self) -> bool:
        return self.file is not None


# ----------------------------------------------------------------------------------------
# the batch feed shared by the cached and the uncached paths
# ----------------------------------------------------------------------------------------
def device_count() -> int:
    """Devices the active ``keras.distribution`` splits each batch over (1 without one)."""
    dist = keras.distribution.distribution()
    if dist is None:
        return 1
    mesh = getattr(dist, "device_mesh", None)
    if mesh is None:
        return 1
    spec = getattr(dist, "batch_dim_name", None)
    shape = dict(zip(mesh.axis_names, mesh.shape))
    return int(shape.get(spec, int(np.prod(mesh.shape))))


class _Feed(keras.utils.PyDataset):
    """Batches in a seeded order per epoch, padded for data parallelism.

    ``rows`` mode: ``xs``, ``y`` and ``sw`` are per-sample arrays; each epoch draws a
    permutation of the samples and cuts it into batches. ``blocks`` mode: the data keeps its
    own batches (``blocks`` are (start, stop) rows, or ``fetch(i)`` returns batch ``i``), and
    each epoch permutes the batch order.
    """

    def __init__(self, *, xs=None, y=None, sw=None, batch_size: int = 32, blocks=None,
                 fetch=None, n_blocks: int = 0, shuffle: bool, seed: int, devices: int):
        super().__init__()
        self.xs, self.y, self.sw = xs, y, sw
        self.batch_size = batch_size
        self.blocks, self.fetch = blocks, fetch
        self.shuffle, self.seed, self.devices = shuffle, seed, devices
        if fetch is not None:
            self.count = n_blocks
        elif blocks is not None:
            self.count = len(blocks)
        else:
            self.count = math.ceil(len(y) / batch_size)
        self.epoch = 0
        self._order = None
        self._order_epoch = -1

    def __len__(self) -> int:
        return self.count

    def on_epoch_end(self) -> None:
        self.epoch += 1

    def _order_now(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            size = len(self.y) if (self.blocks is None and self.fetch is None) else self.count
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                self._order = rng.permutation(size)
            else:
                self._order = np.arange(size)
            self._order_epoch = self.epoch
        return self._order

    def __getitem__(self, i: int):
        order = self._order_now()
        if self.fetch is not None:
            xs, y, sw = self.fetch(int(order[i]))
        elif self.blocks is not None:
            start, stop = self.blocks[int(order[i])]
            xs = [a[start:stop] for a in self.xs]
            y = self.y[start:stop]
            sw = None if self.sw is None else self.sw[start:stop]
        else:
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            xs = [np.asarray(a[idx]) for a in self.xs]
            y = np.asarray(self.y[idx])
            sw = None if self.sw is None else np.asarray(self.sw[idx])
        return _pad(xs, y, sw, self.devices)


def _pad(xs: list, y, sw, devices: int):
    """Pad a batch to a multiple of ``devices`` with zero-weight copies of its first sample.

    Real samples get weight ``padded / real`` so that Keras's mean over the padded batch equals
    the mean over the real samples: the loss (and its gradient) is the unpadded one.
    """
    x_out = xs[0] if len(xs) == 1 else tuple(xs)
    if devices <= 1:
        return (x_out, y) if sw is None else (x_out, y, sw)
    real = len(y)
    total = -(-real // devices) * devices
    w = np.ones(real, "float32") if sw is None else np.asarray(sw, "float32")
    if total == real:
        return x_out, y, w
    extra = total - real
    xs = [np.concatenate([a, np.repeat(a[:1], extra, axis=0)]) for a in xs]
    y = np.concatenate([y, np.repeat(y[:1], extra, axis=0)])
    w = np.concatenate([w * (total / real), np.zeros(extra, "float32")])
    return (xs[0] if len(xs) == 1 else tuple(xs)), y, w


# ----------------------------------------------------------------------------------------
# loss inference and label checks
# ----------------------------------------------------------------------------------------
def output_activation(model: keras.Model) -> str | None:
    """Name of the activation the single output ends with ('softmax', 'sigmoid', ...)."""
    try:
        layer = _keras.history(model.outputs[0])[0]
    except (AttributeError, IndexError, ValueError):
        return None
    if type(layer).__name__ == "Softmax":
        return "softmax"
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", None) if act is not None else None


def infer_loss(model: keras.Model, y: np.ndarray | None) -> tuple[Any, list]:
    """(loss, default metrics) for ``model``'s single output and targets ``y``."""
    if len(model.outputs) != 1:
        raise InvalidArgumentError(
            f"model {model.name!r} has {len(model.outputs)} outputs; kmerge infers a loss only "
            "for a single output. Pass loss=... (one per output)"
        )
    units = model.outputs[0].shape[-1]
    act = output_activation(model)
    integer = y is not None and np.issubdtype(y.dtype, np.integer)
    sparse = integer and (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1))
    if act == "softmax":
        if sparse:
            return "sparse_categorical_crossentropy", ["accuracy"]
        if y is not None and y.ndim == 2 and y.shape[1] == units:
            return "categorical_crossentropy", ["accuracy"]
    elif act == "sigmoid":
        return "binary_crossentropy", ["accuracy"]
    elif act in (None, "linear"):
        if sparse and units and units > 1:
            return keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]
        if y is not None and np.issubdtype(y.dtype, np.floating):
            return "mse", []
    raise InvalidArgumentError(
        f"cannot infer a loss for model {model.name!r}: output activation {act!r}, "
        f"{units} units, targets of dtype {None if y is None else y.dtype} and shape "
        f"{None if y is None else y.shape}. Pass loss=... (e.g. "
        "'sparse_categorical_crossentropy' for integer class labels)"
    )


def check_labels(model: keras.Model, y: np.ndarray, loss: Any) -> None:
    """Integer class labels must be classes of the head: 0 .. units-1."""
    name = loss if isinstance(loss, str) else type(loss).__name__
    if "sparse" not in str(name).lower() or not np.issubdtype(y.dtype, np.integer) or not len(y):
        return
    units = model.outputs[0].shape[-1]
    lo, hi = int(np.min(y)), int(np.max(y))
    if lo < 0 or (units is not None and hi >= units):
        raise InvalidArgumentError(
            f"labels range over {lo}..{hi} but the head of model {model.name!r} has {units} "
            f"classes (labels 0..{units - 1}); give the head {hi + 1} classes "
            f"(kmerge.heads.classifier({hi + 1})) or remap the labels"
        )


def _fresh_optimizer(optimizer: Any, learning_rate: float | None = None):
    if isinstance(optimizer, str):
        opt = keras.optimizers.get(optimizer)
        opt = type(opt).from_config(opt.get_config())
    elif isinstance(optimizer, keras.optimizers.Optimizer):
        opt = type(optimizer).from_config(optimizer.get_config())  # never a used instance
    else:
        raise InvalidArgumentError(
            f"optimizer must be a name ('adam') or a keras.optimizers.Optimizer, got "
            f"{type(optimizer).__name__}"
        )
    if learning_rate is not None:
        opt.learning_rate = learning_rate
    return opt


# ----------------------------------------------------------------------------------------
# fit_head
# ----------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    xs: list
    y: np.ndarray
    sw: np.ndarray | None
    blocks: list | None


def _extract(extractor: keras.Model | None, src: _Source, *, mode: str, folder, devices: int,
             verbose: int, label: str) -> tuple[_Prepared, bool]:
    """Run ``extractor`` (the frozen part) once over ``src``; None keeps raw inputs."""
    n_out = len(extractor.outputs) if extractor is not None else len(src.model.inputs)
    spools = [_Spool(mode, folder, f"{label}_{i}") for i in range(n_out)]
    ys, sws, blocks, start = [], [], [], 0
    total = None
    if src.arrays is not None:
        total = math.ceil(src.n / _CHUNK)
    elif src.dataset is not None:
        total = len(src.dataset)
    bar = keras.utils.Progbar(total, unit_name="batch") if verbose else None
    for k, (xs, y, sw) in enumerate(src.batches()):
        if extractor is None:
            feats = xs
        else:
            n = len(y)
            padded = _pad(xs, y, None, devices)[0] if devices > 1 else (
                xs[0] if len(xs) == 1 else tuple(xs))
            out = extractor.predict_on_batch(padded)
            feats = [_to_numpy(o)[:n] for o in (out if isinstance(out, list | tuple) else [out])]
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


def _feed(p: _Prepared, *, batch_size: int, shuffle: bool, seed: int, devices: int) -> _Feed:
    return _Feed(xs=p.xs, y=p.y, sw=p.sw, batch_size=batch_size, blocks=p.blocks,
                 shuffle=shuffle, seed=seed, devices=devices)


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _verbose(verbose: Any) -> int:
    if verbose == "auto":
        return 1
    return int(verbose)


def _validation_source(validation_data: Any, model: keras.Model, batch_size: int) -> _Source:
    if isinstance(validation_data, tuple) and len(validation_data) in (2, 3):
        if len(validation_data) == 3:
            raise InvalidArgumentError(
                "validation_data with sample weights is not supported; pass (x_val, y_val)"
            )
        return _Source(validation_data[0], validation_data[1], model, batch_size=batch_size,
                       what="validation_data")
    return _Source(validation_data, None, model, batch_size=batch_size, what="validation_data")


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
        "boundary": [...], "feature_seconds": ...}``).

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
    _walk(model)
    if not model.trainable_weights:
        raise InvalidArgumentError(
            f"model {model.name!r} has nothing trainable: every layer is frozen. Add a head "
            "(kmerge.parallel(..., head=kmerge.heads.classifier(n))), build the merge with "
            "freeze=False, or unfreeze layers with kmerge.fine_tune"
        )
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31 - 1))
    keras.utils.set_random_seed(seed)
    verbose_i = _verbose(verbose)
    devices = device_count()
    src = _Source(x, y, model, batch_size=batch_size)
    if cache is not None and src.kind != "arrays" and src.looks_random():
        warnings.warn(
            "the input pipeline returns different inputs when the same batch is read twice "
            "(data augmentation?): fit_head caches the frozen features once, so augmentation "
            "would be frozen at its first draw. Pass cache=None to augment every epoch",
            StaleCacheWarning, stacklevel=2,
        )
    if cache is None and src.kind in ("factory", "once"):
        return _plain_fit(model, src, x, epochs=epochs, validation_data=validation_data,
                          callbacks=callbacks, verbose=verbose, optimizer=optimizer, loss=loss,
                          metrics=metrics)

    folder: list[str] = []

    def temp_folder() -> str:
        if not folder:
            folder.append(tempfile.mkdtemp(prefix="kmerge-cache-"))
        return folder[0]

    try:
        t0 = time.perf_counter()
        if cache is None:
            s = None
            train_model = model
            extractor = None
        else:
            s = split(model)
            extractor = _frozen_submodel(model, s)
            train_model = _trainable_submodel(model, s)
        mode = cache if cache in ("memory", "disk") else "auto"
        if src.kind == "pydataset" and cache is None:
            prepared, on_disk = None, False
        else:
            prepared, on_disk = _extract(extractor, src, mode=mode, folder=temp_folder,
                                         devices=devices, verbose=verbose_i, label="train")
        if prepared is not None:
            y_check = prepared.y
        else:
            y_check = _to_numpy(_unpack(src.dataset[0], "x")[1])
        if loss is None:
            loss, default_metrics = infer_loss(model, y_check)
            if metrics is None:
                metrics = default_metrics
        if prepared is not None:
            check_labels(model, prepared.y, loss)
        if prepared is not None:
            feed = _feed(prepared, batch_size=batch_size, shuffle=shuffle, seed=seed,
                         devices=devices)
        else:
            ds = src.dataset

            def fetch(i: int):
                bx, by, bw = _unpack(ds[i], "x")
                return ([_to_numpy(a) for a in _as_list(bx, model)], _to_numpy(by),
                        None if bw is None else _to_numpy(bw))

            feed = _Feed(fetch=fetch, n_blocks=len(ds), shuffle=shuffle, seed=seed,
                         devices=devices)
        val_feed = None
        if validation_data is not None:
            vsrc = _validation_source(validation_data, model, batch_size)
            vprep, _ = _extract(extractor, vsrc, mode=mode, folder=temp_folder, devices=devices,
                                verbose=0, label="val")
            val_feed = _feed(vprep, batch_size=batch_size, shuffle=False, seed=seed,
                             devices=devices)
        feature_seconds = time.perf_counter() - t0
        train_model.compile(optimizer=_fresh_optimizer(optimizer), loss=loss,
                            metrics=list(metrics or []))
        history = train_model.fit(feed, epochs=epochs, validation_data=val_feed,
                                  callbacks=list(callbacks or []), verbose=verbose, shuffle=False)
        if train_model is not model:
            # Leave the full model ready for evaluate/predict with the loss it trained on.
            model.compile(optimizer=_fresh_optimizer(optimizer), loss=loss,
                          metrics=list(metrics or []))
    finally:
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
    }
    return history


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
    model.compile(optimizer=_fresh_optimizer(optimizer), loss=loss, metrics=list(metrics or []))
    history = model.fit(data, epochs=epochs, validation_data=validation_data,
                        callbacks=list(callbacks or []), verbose=verbose)
    history.kmerge = {"cache": None, "boundary": [], "summary": "plain fit",
                      "feature_seconds": 0.0, "seed": None, "devices": 1}
    return history


# ----------------------------------------------------------------------------------------
# fine_tune
# ----------------------------------------------------------------------------------------
def _source_layers(model: keras.Model) -> dict[str, list[keras.layers.Layer]]:
    """The merged model's layers per source, in graph order, by their name prefix."""
    meta = meta_of(model)
    if not meta or not meta.get("sources"):
        raise InvalidArgumentError(
            f"model {model.name!r} was not built by kmerge (no kmerge metadata), so its sources "
            "are unknown; pass unfreeze=[layer names] instead of 'top:N'"
        )
    names = sorted(meta["sources"], key=len, reverse=True)  # longest prefix wins
    out: dict[str, list] = {n: [] for n in meta["sources"]}
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
    names = [unfreeze] if isinstance(unfreeze, str) else list(unfreeze)
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
    source, found by the layer-name prefixes in ``kmerge.info(model)["sources"]``; a list
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
    _walk(model)
    chosen = choose_layers(model, unfreeze)
    before = {n: model.get_layer(n).trainable for n in chosen}
    for n in chosen:
        model.get_layer(n).trainable = True
    try:
        history = fit_head(model, x, y, epochs=epochs, batch_size=batch_size,
                           validation_data=validation_data, cache=cache, callbacks=callbacks,
                           verbose=verbose, optimizer=_fresh_optimizer(optimizer, learning_rate),
                           loss=loss, metrics=metrics, seed=seed)
    except BaseException:
        for n, flag in before.items():
            model.get_layer(n).trainable = flag
        raise
    history.unfrozen = chosen
    history.kmerge["unfrozen"] = chosen
    return history

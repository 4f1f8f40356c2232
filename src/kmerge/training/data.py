"""Training data in every form Keras accepts -> (x list, y, sample weight) batches, and the
batch feed shared by the cached and the uncached training paths.

The feed draws a seeded permutation per epoch (the cached and uncached paths see the same
batches, so their losses agree) and pads batches to a multiple of the device count (zero
sample weight) under an active ``keras.distribution``, so data-parallel training never fails
on a short batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np

from kmerge.arguments import labels, model_inputs
from kmerge.errors import InvalidArgumentError

CHUNK = 256  # samples per forward pass of the frozen part


def as_list(x: Any, model: keras.Model, what: str = "x") -> list:
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


def to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    return np.asarray(keras.ops.convert_to_numpy(a))


def is_arraylike(x: Any) -> bool:
    if isinstance(x, dict):
        return all(is_arraylike(v) for v in x.values())
    if isinstance(x, list | tuple):
        return len(x) > 0 and all(is_arraylike(v) for v in x)
    return hasattr(x, "shape") and hasattr(x, "dtype")


def is_tf_dataset(x: Any) -> bool:
    return type(x).__module__.startswith("tensorflow") and hasattr(x, "element_spec")


def unpack(batch: Any, where: str) -> tuple[Any, Any, Any]:
    if isinstance(batch, tuple | list) and len(batch) in (2, 3):
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)
    raise InvalidArgumentError(
        f"{where} yielded a {type(batch).__name__}; training needs (x, y) or "
        "(x, y, sample_weight) tuples"
    )


class Source:
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
        elif is_arraylike(x):
            xs = model_inputs(model, x, what)  # shapes, numbers, finite, non-empty
            if y is None:
                raise InvalidArgumentError(
                    f"{what} is an array but y is None; pass the targets as y=..., or pass a "
                    "PyDataset / generator that yields (x, y) batches"
                )
            ys = to_numpy(y)
            sizes = {len(a) for a in xs}
            if len(sizes) != 1 or len(ys) not in sizes:
                raise InvalidArgumentError(
                    f"{what} and y have different lengths: {what} has "
                    f"{sorted(sizes) if len(sizes) > 1 else len(xs[0])} samples, y has "
                    f"{len(ys)}; pass one target per sample"
                )
            if not isinstance(y, list | tuple | dict):
                ys = labels(ys, len(ys), "y")  # numbers, finite
            self.kind, self.arrays = "arrays", (xs, ys, None)
        elif is_tf_dataset(x) or (callable(x) and not isinstance(x, keras.Model)):
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
            for i in range(0, len(ys), CHUNK):
                yield [a[i:i + CHUNK] for a in xs], ys[i:i + CHUNK], None
            return
        if self.dataset is not None:
            it: Iterable = (self.dataset[i] for i in range(len(self.dataset)))
        elif self.factory is not None:
            it = self.factory()
        else:
            it = self.once
        first = None
        for k, batch in enumerate(it):
            bx, by, bw = unpack(batch, self.what)
            xs = [to_numpy(a) for a in as_list(bx, self.model, self.what)]
            by = to_numpy(by)
            bw = None if bw is None else to_numpy(bw)
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
            if any(a.dtype.kind == "f" and not np.all(np.isfinite(a)) for a in [*xs, by]):
                raise InvalidArgumentError(
                    f"{self.what} batch {k} holds NaN or infinite values; clean the pipeline "
                    "first: one NaN turns every trained weight into NaN")
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
        xa = as_list(unpack(a, self.what)[0], self.model, self.what)
        xb = as_list(unpack(b, self.what)[0], self.model, self.what)
        return any(np.shape(p) != np.shape(q) or not np.array_equal(to_numpy(p), to_numpy(q))
                   for p, q in zip(xa, xb))


def _fmt(shapes: list) -> str:
    return ", ".join(str(tuple(s)) for s in shapes)




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


class Feed(keras.utils.PyDataset):
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
        return pad(xs, y, sw, self.devices)


def pad(xs: list, y, sw, devices: int):
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

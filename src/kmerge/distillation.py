"""Knowledge distillation (Hinton et al. 2015) of a model or an ensemble into a student.

The loss is ``alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(y, s)``
(teacher logits ``t``, student logits ``s``, temperature ``T``); without labels it is the KL
term alone. It is the loss of Keras 3's ``keras.distillation.LogitsDistillation`` (a test pins
the two together), computed per sample so that zero-weight padding under data parallelism
leaves it unchanged. Keras's ``Distiller`` runs the teacher on every batch of every epoch;
here the teacher outputs are computed once, before training, and fed as targets: for an
ensemble teacher that is most of the cost of distillation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from kmerge import _keras
from kmerge.arguments import integer, model_inputs, number
from kmerge.arguments import labels as check_targets
from kmerge.errors import IncompatibleModelsError, InvalidArgumentError
from kmerge.graph.rebuild import check_model
from kmerge.metadata import attach, derivation, meta_of
from kmerge.training.guard import unchanged_on_failure

__all__ = ["distill", "teacher_logits"]

_EPS = 1e-12


def _is_probabilities(p: np.ndarray) -> bool:
    return bool(p.ndim == 2 and np.all(p >= 0) and np.allclose(p.sum(-1), 1.0, atol=1e-3))


def _output_layer(model: keras.Model):
    try:
        return _keras.history(model.outputs[0])[0]
    except (AttributeError, IndexError, ValueError):
        return None


def teacher_logits(teachers: Sequence[keras.Model], x: np.ndarray, *, batch_size: int = 256
                   ) -> np.ndarray:
    """Average logits of ``teachers`` on ``x``; softmax outputs count as log-probabilities.

    >>> t = teacher_logits([a, b], x)  # (n, classes)
    """
    from kmerge.training.data import device_count, pad

    devices = device_count()
    total = None
    for t in teachers:
        parts = []
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            padded = pad([xb], np.zeros(len(xb)), None, devices)[0]
            parts.append(np.asarray(keras.ops.convert_to_numpy(t.predict_on_batch(padded)))[
                :len(xb)])
        out = np.concatenate(parts).astype("float64")
        if _is_probabilities(out):
            out = np.log(np.clip(out, _EPS, 1.0))
        total = out if total is None else total + out
    return (total / len(teachers)).astype("float32")


class _Trainer(keras.Model):
    """Wraps the student; targets are [teacher logits | labels]."""

    def __init__(self, student: keras.Model, *, classes: int, temperature: float, alpha: float,
                 labels: str, student_probs: bool):
        super().__init__(name=f"{student.name}_distill")
        self.student = student
        self.classes = classes
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.labels = labels  # "none" | "sparse" | "onehot"
        self.student_probs = student_probs
        self._kl = keras.losses.KLDivergence(reduction=None)

    def call(self, x, training=False):
        return self.student(x, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        ops = keras.ops
        s = ops.cast(y_pred, "float32")
        if self.student_probs:
            s = ops.log(ops.clip(s, _EPS, 1.0))
        t = y[:, :self.classes]
        temp = self.temperature
        kd = self._kl(ops.softmax(t / temp, axis=-1), ops.softmax(s / temp, axis=-1)) * temp ** 2
        if self.labels == "none":
            per_sample = kd
        else:
            if self.labels == "sparse":
                ce = keras.losses.sparse_categorical_crossentropy(
                    ops.cast(y[:, self.classes], "int32"), s, from_logits=True)
            else:
                ce = keras.losses.categorical_crossentropy(y[:, self.classes:], s,
                                                           from_logits=True)
            per_sample = self.alpha * kd + (1.0 - self.alpha) * ce
        if sample_weight is not None:
            per_sample = per_sample * ops.cast(ops.reshape(sample_weight, (-1,)), "float32")
        loss = ops.mean(per_sample)
        if self.losses:
            loss = loss + ops.sum(ops.stack(self.losses))
        return loss


def distill(
    teacher: keras.Model | Sequence[keras.Model],
    student: keras.Model,
    x: Any,
    *,
    y: Any = None,
    temperature: float = 3.0,
    alpha: float = 0.9,
    epochs: int,
    batch_size: int = 32,
    optimizer: str | keras.optimizers.Optimizer = "adam",
    seed: int | None = None,
    verbose: int | str = "auto",
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
) -> keras.Model:
    """Train ``student`` to imitate ``teacher`` (a model or an ensemble); returns the student.

    The teacher outputs are computed once over ``x`` and cached. A list of teachers is an
    ensemble: their logits are averaged. A model whose outputs are probabilities (rows that are
    non-negative and sum to 1, e.g. a softmax output or a merged average of softmax outputs)
    contributes log-probabilities as logits. The student is trained in place (its softmax
    output, if any, is read as log-probabilities, which is exact) and returned.

    Loss: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(y, student)`` when
    ``y`` is given, else the KL term alone (Hinton et al. 2015). Runs under the active
    ``keras.distribution`` like :func:`kmerge.fit_head` (short batches padded, zero weight).

    Args:
        teacher: A model, or a list of models with the same output shape.
        student: A built model with the teacher's output shape (see
            :func:`kmerge.students.like`).
        x: Inputs (NumPy array, one input).
        y: Optional integer class labels (or one-hot).
        temperature: Softening temperature T > 0.
        alpha: Weight of the distillation term, in [0, 1].
        epochs: Training epochs.
        batch_size: Batch size.
        optimizer: A name or an optimizer (a fresh copy is used).
        seed: Seeds batch order and Keras's RNG.
        verbose: As in ``fit``.
        callbacks: Keras callbacks (they see the training wrapper; ``.student`` is the student).

    Returns:
        The trained ``student``; ``kmerge.info(student)["distill"]`` holds the loss history.

    Raises:
        IncompatibleModelsError: the teacher and student output shapes differ.

    >>> student = kmerge.distill([a, b], kmerge.students.like(a, width=0.5), x, y=y, epochs=5)
    """
    from kmerge.training.data import Feed, device_count
    from kmerge.training.losses import (
        check_labels,
        check_verbose,
        fresh_optimizer,
        output_activation,
    )

    teachers = list(teacher) if isinstance(teacher, list | tuple) else [teacher]
    if not teachers:
        raise InvalidArgumentError("teacher is an empty list; pass a model or a list of models")
    teachers = [check_model(t, f"teacher {i}") for i, t in enumerate(teachers)]
    student = check_model(student, "student")
    epochs = integer(epochs, "epochs")
    check_verbose(verbose)
    fresh_optimizer(optimizer)  # an unknown name fails here, before any teacher runs
    batch_size = integer(batch_size, "batch_size")
    temperature = number(temperature, "temperature", low=0, low_open=True)
    alpha = number(alpha, "alpha", low=0.0, high=1.0)
    s_shape = tuple(student.outputs[0].shape[1:]) if len(student.outputs) == 1 else None
    for t in teachers:
        t_shape = tuple(t.outputs[0].shape[1:]) if len(t.outputs) == 1 else None
        if t_shape is None or s_shape is None or t_shape != s_shape or len(t_shape) != 1:
            raise IncompatibleModelsError(
                f"teacher {t.name!r} outputs {t_shape if t_shape else 'several tensors'} but "
                f"student {student.name!r} outputs {s_shape if s_shape else 'several tensors'}; "
                "distillation needs one output of the same shape (classes,) on both. Build "
                "the student with kmerge.students.like(teacher) or give it the teacher's "
                "output layer size"
            )
    if not hasattr(x, "shape"):
        raise InvalidArgumentError(
            f"distill takes x as a NumPy array, got {type(x).__name__}; the teacher outputs "
            "are computed once over it"
        )
    # x checked against every model before any of them runs (see kmerge.arguments)
    (x,) = model_inputs(student, x, "x")
    for t in teachers:
        model_inputs(t, x, f"x (for teacher {t.name!r})")
    classes = int(s_shape[0])
    seed = integer(seed, "seed", low=0, optional=True)
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31 - 1))
    keras.utils.set_random_seed(seed)

    logits = teacher_logits(teachers, x)
    labels = "none"
    packed = logits
    if y is not None and alpha < 1.0:
        y = np.asarray(keras.ops.convert_to_numpy(y))
        if len(y) != len(x):
            raise InvalidArgumentError(
                f"x has {len(x)} samples but y has {len(y)}; pass one label per sample"
            )
        y = check_targets(y, len(x), "y")
        if np.issubdtype(y.dtype, np.integer) and y.reshape(len(y), -1).shape[1] == 1:
            check_labels(student, y.reshape(-1), "sparse")
            labels = "sparse"
            packed = np.concatenate([logits, y.reshape(-1, 1).astype("float32")], axis=1)
        elif y.ndim == 2 and y.shape[1] == classes:
            labels = "onehot"
            packed = np.concatenate([logits, y.astype("float32")], axis=1)
        else:
            raise InvalidArgumentError(
                f"y must be integer class labels (n,) or one-hot (n, {classes}); got dtype "
                f"{y.dtype} and shape {y.shape}"
            )

    # The student's softmax is switched off while it trains, so it gives logits exactly.
    out_layer = _output_layer(student)
    swap = output_activation(student) == "softmax" and hasattr(out_layer, "activation")
    probe = None if swap else np.asarray(keras.ops.convert_to_numpy(
        student(x[: min(len(x), 8)], training=False)))
    student_probs = bool(not swap and probe is not None and _is_probabilities(probe))
    saved = out_layer.activation if swap else None
    trainer = _Trainer(student, classes=classes, temperature=temperature, alpha=alpha,
                       labels=labels, student_probs=student_probs)
    feed = Feed(xs=[x], y=packed, batch_size=batch_size, shuffle=True, seed=seed,
                 devices=device_count())
    with unchanged_on_failure(student, "distill"):
        try:
            if swap:
                out_layer.activation = keras.activations.linear
            trainer.compile(optimizer=fresh_optimizer(optimizer))
            history = trainer.fit(feed, epochs=epochs, verbose=verbose, shuffle=False,
                                  callbacks=list(callbacks or []))
        finally:
            if swap:
                out_layer.activation = saved
    meta = meta_of(student) or {}
    attach(student, {**meta, **derivation(*teachers, result=student), "distill": {
        "teachers": [t.name for t in teachers],
        "temperature": float(temperature),
        "alpha": float(alpha),
        "labels": labels,
        "history": dict(history.history),
        "seed": seed,
    }})
    return student

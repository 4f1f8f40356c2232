"""Knowledge distillation (Hinton et al. 2015) of a model or an ensemble into a student.

Per example ``i`` the loss is ``a_i * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - a_i) *
CE(y, s)`` (teacher logits ``t``, student logits ``s``, temperature ``T``); without labels it is
the KL term alone. With an explicit ``alpha`` every ``a_i = alpha``: the loss of Keras 3's
``keras.distillation.LogitsDistillation`` (a test pins the two together). With ``alpha="auto"``
``a_i = alpha * trust_i``, where ``trust_i`` is the teacher's probability of the true label over
its top probability (1 where the teacher is right, less where it is wrong), and ``alpha`` and
``T`` are chosen by short trial runs scored on a seeded held-out split, labels alone
(``alpha = 0``) being one of the candidates: distillation is used only where it beats the labels.
The loss is computed per sample so that zero-weight padding under data parallelism leaves it
unchanged. Keras's ``Distiller`` runs the teacher on every batch of every epoch; here the teacher
outputs are computed once, before training, and fed as targets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from kmerge import _keras
from kmerge.arguments import integer, model_inputs, number
from kmerge.arguments import labels as check_targets
from kmerge.errors import IncompatibleModelsError, InvalidArgumentError
from kmerge.graph.build import task_model
from kmerge.graph.rebuild import check_model
from kmerge.metadata import attach, derivation, meta_of
from kmerge.training.guard import unchanged_on_failure

__all__ = ["distill", "teacher_logits"]

_EPS = 1e-12
# alpha="auto": labels alone, and these (alpha, temperature) pairs, each tried on a held-out split
# (measured: T=1 suits teachers no more confident than the labels, T=4 confident ones; see
# docs/training.md "Distillation")
AUTO_CANDIDATES = ((0.5, 1.0), (0.9, 4.0))
DEFAULT_TEMPERATURE = 3.0  # an explicit alpha without a temperature: Hinton's usual T, as before

# Layers whose output is a convex combination of their inputs: probabilities in, probabilities out.
_CONVEX = ("Average", "LearnedWeights", "Gate")


def _is_probabilities(p: np.ndarray) -> bool:
    """Values test, for outputs whose last layer says nothing (rows >= 0 that sum to 1)."""
    return bool(p.ndim == 2 and np.all(p >= 0) and np.allclose(p.sum(-1), 1.0, atol=1e-3))


def _output_layer(model: keras.Model):
    try:
        return _keras.history(model.outputs[0])[0]
    except (AttributeError, IndexError, ValueError):
        return None


def output_kind(model: keras.Model) -> str | None:
    """``"probabilities"`` or ``"logits"`` as the model's final layers say, None when they do not.

    A softmax (layer or activation) makes probabilities; a linear or log-softmax activation
    makes logits (log-probabilities are logits up to a constant); an average of probabilities
    (``Average``, kmerge's ``LearnedWeights``/``Gate``, a ``WeightedSum`` whose coefficients
    sum to 1) is probabilities. Anything else: None (the caller tests the values).
    """
    from kmerge.graph.replay import walk

    try:
        w = walk(model)
    except Exception:  # a subclassed model: no graph to read
        return None
    if len(w.outputs) != 1:
        return None

    def kind(wid: int, depth: int = 0) -> str | None:
        call = w.producer_call(wid)
        if call is None or depth > 8:
            return None
        op = getattr(call.op, "layer", call.op)  # kmerge's Inference wrapper: the wrapped layer
        name = type(op).__name__
        if name == "Softmax":
            return "probabilities"
        act = getattr(getattr(op, "activation", None), "__name__", None)
        if act == "softmax":
            return "probabilities"
        if act in ("linear", "log_softmax"):
            return "logits"
        ins = list(call.inputs)
        if name == "Gate":
            ins = ins[1:]
        convex = name in _CONVEX or (
            name == "WeightedSum" and math.isclose(sum(op.coefficients), 1.0, abs_tol=1e-6)
            and min(op.coefficients) >= 0)
        if convex and ins and all(kind(i, depth + 1) == "probabilities" for i in ins):
            return "probabilities"
        return None

    return kind(w.outputs[0])


def _predict(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``model`` on ``x`` in batches of one shape (the last one padded): one compiled
    function, and batches that divide over the devices of the active distribution."""
    from kmerge.training.data import device_count

    devices = device_count()
    batch = max(devices, -(-min(batch_size, len(x)) // devices) * devices)
    parts = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        if len(xb) < batch:
            xb = np.concatenate([xb, np.repeat(xb[:1], batch - len(xb), axis=0)])
        out = model.predict_on_batch(xb)
        parts.append(np.asarray(keras.ops.convert_to_numpy(out))[:min(batch, len(x) - i)])
    return np.concatenate(parts)


def teacher_logits(teachers: Sequence[keras.Model], x: np.ndarray, *, batch_size: int = 256
                   ) -> np.ndarray:
    """Average logits of ``teachers`` on ``x``; probability outputs count as log-probabilities.

    Whether a teacher outputs probabilities is read from its final layers (:func:`output_kind`);
    only when they do not say (e.g. a custom layer) are the values tested.

    >>> t = teacher_logits([a, b], x)  # (n, classes)
    """
    total = None
    for t in teachers:
        out = _predict(t, x, batch_size).astype("float64")
        kind = output_kind(t)
        if kind == "probabilities" or (kind is None and _is_probabilities(out)):
            out = np.log(np.clip(out, _EPS, 1.0))
        total = out if total is None else total + out
    return (total / len(teachers)).astype("float32")


def teacher_trust(logits: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    """Per example, the teacher's probability of the true class over its top probability:
    1 where the teacher is right, towards 0 where it is confidently wrong."""
    z = logits.astype("float64")
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return ((p * onehot).sum(-1) / p.max(-1)).astype("float32")


class _Trainer(keras.Model):
    """Wraps the student. Targets are [teacher logits | labels], or with ``per_sample``
    [teacher logits | labels | a_i | T]: the weight of the distillation term and the
    temperature per row, so that one compiled training step serves every candidate."""

    def __init__(self, student: keras.Model, *, classes: int, temperature: float, alpha: float,
                 labels: str, student_probs: bool, per_sample: bool = False):
        super().__init__(name=f"{student.name}_distill")
        self.student = student
        self.classes = classes
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.labels = labels  # "none" | "sparse" | "onehot"
        self.student_probs = student_probs
        self.per_sample = per_sample

    def call(self, x, training=False):
        return self.student(x, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        ops = keras.ops
        s = ops.cast(y_pred, "float32")
        y = ops.cast(y, "float32")
        if self.student_probs:
            s = ops.log(ops.clip(s, _EPS, 1.0))
        c = self.classes
        t = y[:, :c]
        if self.per_sample:
            alpha, temp = y[:, -2], ops.reshape(y[:, -1], (-1, 1))
        else:
            alpha, temp = self.alpha, self.temperature
        # KL(teacher_T || student_T) from log-softmax: exact where the student's probabilities
        # are tiny (Keras's KLDivergence clips them at 1e-7, which stops their gradient)
        log_pt = ops.log_softmax(t / temp, axis=-1)
        log_ps = ops.log_softmax(s / temp, axis=-1)
        kd = ops.sum(ops.exp(log_pt) * (log_pt - log_ps), axis=-1)
        kd = kd * ops.square(ops.reshape(temp, (-1,)) if self.per_sample else temp)
        if self.labels == "none":
            per_sample = kd
        else:
            if self.labels == "sparse":
                ce = keras.losses.sparse_categorical_crossentropy(
                    ops.cast(y[:, c], "int32"), s, from_logits=True)
            else:
                ce = keras.losses.categorical_crossentropy(y[:, c:2 * c], s, from_logits=True)
            per_sample = alpha * kd + (1.0 - alpha) * ce
        if sample_weight is not None:
            per_sample = per_sample * ops.cast(ops.reshape(sample_weight, (-1,)), "float32")
        loss = ops.mean(per_sample)
        if self.losses:
            loss = loss + ops.sum(ops.stack(self.losses))
        return loss


def _holdout(classes_of: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded, stratified held-out mask: ``fraction`` of each class (rounded, at least one
    of every class with two or more examples)."""
    rng = np.random.default_rng([seed, 12])
    mask = np.zeros(len(classes_of), bool)
    for c in np.unique(classes_of):
        idx = np.flatnonzero(classes_of == c)
        if len(idx) < 2:
            continue
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        mask[rng.permutation(idx)[:k]] = True
    return mask


def _choose(scores: list[dict], right: list[np.ndarray]) -> dict:
    """The labels-only candidate (first) unless a distillation candidate is more accurate on
    the held-out examples by more than one standard error of the paired difference
    (McNemar: examples it gets right and labels alone wrong, minus the reverse, against the
    square root of their sum); among those, the most accurate, then the lowest loss."""
    best, base = scores[0], right[0]
    for c, r in zip(scores[1:], right[1:]):
        wins, losses = int(np.sum(r & ~base)), int(np.sum(~r & base))
        c["wins"], c["losses"] = wins, losses
        if wins - losses <= math.sqrt(wins + losses):
            continue
        if best is scores[0] or (c["accuracy"], -c["loss"]) > (best["accuracy"], -best["loss"]):
            best = c
    return best


def distill(
    teacher: keras.Model | Sequence[keras.Model],
    student: keras.Model,
    x: Any,
    *,
    y: Any = None,
    temperature: float | None = None,
    alpha: float | str = "auto",
    epochs: int,
    batch_size: int = 32,
    optimizer: str | keras.optimizers.Optimizer = "adam",
    validation_split: float = 0.15,
    trial_epochs: int | None = None,
    trust: str = "auto",
    seed: int | None = None,
    verbose: int | str = "auto",
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
) -> keras.Model:
    """Train ``student`` to imitate ``teacher`` (a model or an ensemble); returns the student.

    The teacher outputs are computed once over ``x`` and cached. A list of teachers is an
    ensemble: their logits are averaged. A teacher whose final layer is a softmax (or an
    average of softmax outputs, e.g. a merged ensemble) contributes log-probabilities as
    logits. The student is trained in place (its softmax output, if any, is switched off while
    it trains, so its logits are exact) and returned.

    ``alpha="auto"`` (with labels ``y``): each example's distillation weight is ``alpha`` times
    the teacher's *trust* on it (its probability of the true label over its top probability),
    so examples the teacher gets wrong lean on the labels. ``alpha`` and ``temperature`` are
    chosen among labels alone (``alpha=0``) and ``AUTO_CANDIDATES`` (alpha 0.5 at T=1, 0.9 at
    T=4; with a given ``temperature``, those alphas at it) by trial runs of ``trial_epochs``
    from the student's initial weights on ``1 - validation_split`` of the data, scored by
    accuracy on the rest (seeded, stratified). Distillation is chosen only if it is more
    accurate than labels alone by more than one standard error of the paired difference. The
    chosen setting then trains the student from its initial weights on all of ``x`` for
    ``epochs``: the search costs about ``len(candidates) * (1 - validation_split)`` trainings
    more (recorded). Without ``y`` there is
    nothing to choose on: the KL term alone at ``temperature`` (default 3).

    A number ``alpha`` is plain Hinton distillation, as before: ``alpha * T^2 *
    KL(teacher_T || student_T) + (1 - alpha) * CE(y, student)`` (``temperature`` default 3),
    no trial runs. Runs under the active ``keras.distribution`` like :func:`kmerge.fit_head`
    (short batches padded, zero weight).

    Args:
        teacher: A model, or a list of models with the same output shape.
        student: A built model with the teacher's output shape (see
            :func:`kmerge.students.like`).
        x: Inputs (NumPy array, one input).
        y: Optional integer class labels (or one-hot).
        temperature: Softening temperature T > 0; None: chosen (``alpha="auto"``) or 3.
        alpha: ``"auto"``, or the weight of the distillation term, in [0, 1].
        epochs: Training epochs of the student (trial runs not included).
        batch_size: Batch size.
        optimizer: A name or an optimizer (a fresh copy is used for every run).
        validation_split: ``alpha="auto"``: the held-out fraction the candidates are scored on.
        trial_epochs: ``alpha="auto"``: epochs of each trial run (default ``epochs``: shorter
            trials are cheaper but rank the candidates by their early progress, which
            distillation often leads and loses later).
        trust: ``"confidence"``: weight the distillation term per example by the teacher's
            trust; ``"uniform"``: the same weight everywhere; ``"auto"``: confidence with
            ``alpha="auto"``, uniform with a number.
        seed: Seeds the held-out split, batch order and Keras's RNG.
        verbose: As in ``fit`` (for the final run).
        callbacks: Keras callbacks of the final run (they see the training wrapper;
            ``.student`` is the student).

    Returns:
        The trained ``student``. ``kmerge.info(student)["distill"]`` holds the alpha and
        temperature used, the loss history and, for ``alpha="auto"``, ``"search"``: every
        candidate's held-out accuracy and loss, the labels-only ``baseline``, the split and
        what the search cost (epochs, seconds).

    Raises:
        IncompatibleModelsError: the teacher and student output shapes differ.
        InvalidArgumentError: a bad alpha, temperature, split or data (before any training).

    >>> student = kmerge.distill([a, b], kmerge.students.like(a, width=0.5), x, y=y, epochs=5)
    >>> kmerge.info(student)["distill"]["search"]["baseline"]
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
    # a multi-task merge (keep_outputs=True) teaches through its new output
    views = [task_model(t) for t in teachers]
    student = check_model(student, "student")
    epochs = integer(epochs, "epochs")
    check_verbose(verbose)
    fresh_optimizer(optimizer)  # an unknown name fails here, before any teacher runs
    batch_size = integer(batch_size, "batch_size")
    auto = isinstance(alpha, str)
    if auto and alpha != "auto":
        raise InvalidArgumentError(
            f"alpha must be 'auto' or a number in [0, 1]; received {alpha!r}")
    if not auto:
        alpha = number(alpha, "alpha", low=0.0, high=1.0)
    temperature = number(temperature, "temperature", low=0, low_open=True, optional=True)
    validation_split = number(validation_split, "validation_split", low=0, high=1,
                              low_open=True, high_open=True)
    trial_epochs = integer(trial_epochs, "trial_epochs", optional=True)
    if not isinstance(trust, str) or trust not in ("auto", "confidence", "uniform"):
        raise InvalidArgumentError(
            f"trust must be 'auto', 'confidence' or 'uniform'; received {trust!r}")
    s_shape = tuple(student.outputs[0].shape[1:]) if len(student.outputs) == 1 else None
    for t in views:
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
    for t in views:
        model_inputs(t, x, f"x (for teacher {t.name!r})")
    classes = int(s_shape[0])
    seed = integer(seed, "seed", low=0, optional=True)
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31 - 1))

    labels, label_cols, onehot = "none", np.zeros((len(x), 0), "float32"), None
    if y is not None and (auto or alpha < 1.0):
        y = np.asarray(keras.ops.convert_to_numpy(y))
        if len(y) != len(x):
            raise InvalidArgumentError(
                f"x has {len(x)} samples but y has {len(y)}; pass one label per sample"
            )
        y = check_targets(y, len(x), "y")
        if np.issubdtype(y.dtype, np.integer) and y.reshape(len(y), -1).shape[1] == 1:
            check_labels(student, y.reshape(-1), "sparse")
            labels = "sparse"
            label_cols = y.reshape(-1, 1).astype("float32")
            onehot = np.eye(classes, dtype="float32")[y.reshape(-1)]
        elif y.ndim == 2 and y.shape[1] == classes:
            labels = "onehot"
            label_cols = onehot = y.astype("float32")
        else:
            raise InvalidArgumentError(
                f"y must be integer class labels (n,) or one-hot (n, {classes}); got dtype "
                f"{y.dtype} and shape {y.shape}"
            )
    search = auto and labels != "none"
    confident = labels != "none" and (trust == "confidence" or (trust == "auto" and auto))
    mask = None
    if search:
        mask = _holdout(onehot.argmax(-1), validation_split, seed)
        if mask.sum() < 1 or (~mask).sum() < 1:
            raise InvalidArgumentError(
                f"alpha='auto' holds out {validation_split:g} of the {len(x)} examples to choose "
                "alpha and temperature, which leaves no examples to train or to score on; pass "
                "more data, or a number alpha (e.g. alpha=0.5, temperature=3)")
    keras.utils.set_random_seed(seed)

    logits = teacher_logits(views, x)
    weight = teacher_trust(logits, onehot) if confident else np.ones(len(x), "float32")

    def packed(a: float, temp: float, rows=slice(None)) -> np.ndarray:
        n = len(logits[rows])
        return np.concatenate([logits[rows], label_cols[rows], (a * weight[rows])[:, None],
                               np.full((n, 1), temp, "float32")], axis=1).astype("float32")

    # The student's softmax is switched off while it trains, so it gives logits exactly.
    out_layer = _output_layer(student)
    swap = output_activation(student) == "softmax" and hasattr(out_layer, "activation")
    probe = None if swap else np.asarray(keras.ops.convert_to_numpy(
        student(x[: min(len(x), 8)], training=False)))
    student_probs = bool(not swap and probe is not None and _is_probabilities(probe))
    saved = out_layer.activation if swap else None
    trainer = _Trainer(student, classes=classes, temperature=temperature or DEFAULT_TEMPERATURE,
                       alpha=0.0 if auto else alpha, labels=labels, student_probs=student_probs,
                       per_sample=True)
    devices = device_count()
    record: dict[str, Any] = {}
    with unchanged_on_failure(student, "distill"):
        try:
            if swap:
                out_layer.activation = keras.activations.linear
            trainer.compile(optimizer=fresh_optimizer(optimizer))
            trainer.optimizer.build(trainer.trainable_variables)
            start = ([np.array(keras.ops.convert_to_numpy(v.value)) for v in student.variables],
                     [np.array(keras.ops.convert_to_numpy(v.value))
                      for v in trainer.optimizer.variables])

            def run(targets, rows, n_epochs, *, verbose_=0, callbacks_=()):
                for v, a in zip(student.variables, start[0]):
                    v.assign(a)
                for v, a in zip(trainer.optimizer.variables, start[1]):
                    v.assign(a)
                keras.utils.set_random_seed(seed)
                feed = Feed(xs=[x[rows]], y=targets, batch_size=batch_size, shuffle=True,
                            seed=seed, devices=devices)
                return trainer.fit(feed, epochs=n_epochs, verbose=verbose_, shuffle=False,
                                   callbacks=list(callbacks_))

            if search:
                t0 = time.perf_counter()
                cands = ([(a, temperature) for a in dict.fromkeys(a for a, _ in AUTO_CANDIDATES)]
                         if temperature is not None else list(AUTO_CANDIDATES))
                cands = [(0.0, None), *cands]
                r = trial_epochs or epochs
                fit_rows, held = ~mask, mask
                y_held = onehot[held].argmax(-1)
                scores, right = [], []
                for a, tt in cands:
                    run(packed(a, tt or DEFAULT_TEMPERATURE, fit_rows), fit_rows, r)
                    s = _predict(trainer, x[held]).astype("float64")
                    logp = s - s.max(-1, keepdims=True)
                    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
                    right.append(s.argmax(-1) == y_held)
                    scores.append({
                        "alpha": a, "temperature": tt,
                        "accuracy": float(np.mean(right[-1])),
                        "loss": float(-np.mean(logp[np.arange(len(y_held)), y_held]))})
                best = _choose(scores, right)
                alpha = best["alpha"]
                temperature = best["temperature"]
                record = {
                    "candidates": scores, "baseline": scores[0], "chosen": best,
                    "validation_split": float(validation_split), "held_out": int(held.sum()),
                    "trial_epochs": r,
                    "cost_epochs": round(r * len(cands) * float(fit_rows.mean()), 3),
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            elif auto:
                alpha = 1.0
            temperature = temperature or DEFAULT_TEMPERATURE
            history = run(packed(alpha, temperature), slice(None), epochs, verbose_=verbose,
                          callbacks_=callbacks or ())
        finally:
            if swap:
                out_layer.activation = saved
    meta = meta_of(student) or {}
    result = {
        "teachers": [t.name for t in teachers],
        "temperature": float(temperature),
        "alpha": float(alpha),
        "auto": bool(auto),
        "trust": "confidence" if confident else "uniform",
        "labels": labels,
        "trust_mean": float(weight.mean()),
        "history": dict(history.history),
        "seed": seed,
    }
    if record:
        result["search"] = record
    attach(student, {**meta, **derivation(*teachers, result=student), "distill": result})
    return student

"""Default students for :func:`kmerge.distill`: a source architecture at a chosen width.

>>> student = kmerge.students.like(teacher, width=0.5)
"""

from __future__ import annotations

import keras

from kmerge import _keras
from kmerge.arguments import integer, number
from kmerge.errors import InvalidModelError
from kmerge.graph.build import task_model
from kmerge.graph.rebuild import is_graph_model
from kmerge.metadata import meta_of

__all__ = ["like", "count_flops"]

_WIDTH_KEYS = ("units", "filters")


def like(model: keras.Model, width: float = 0.5, *, seed: int | None = None,
         name: str | None = None) -> keras.Model:
    """A fresh model of ``model``'s architecture with hidden widths scaled by ``width``.

    Every ``Dense`` (``units``), convolution (``filters``) and recurrent layer (``units``)
    gets ``max(1, round(width * size))``, except the layers that produce the model's outputs,
    and, in a merge kmerge built, the layers that produce each source's output, which keep their
    size so the student's outputs match the teacher's (of a multi-task merge,
    ``keep_outputs=True``, only its new output, the one :func:`kmerge.distill` teaches
    through). Weights are freshly initialised (seeded by ``seed``); ``model`` is not changed.
    Layers whose configuration hard-codes a width elsewhere (a ``Reshape`` after a ``Dense``)
    may not fit the narrower student: build such students by hand.

    Args:
        model: A Functional or Sequential model.
        width: Width multiplier (> 0); 0.5 makes Dense layers about 4x cheaper.
        seed: Seed for the fresh weights.
        name: Name of the student (default ``<model>_student``).

    Returns:
        A new, uncompiled ``keras.Model``.

    >>> student = like(teacher, width=0.5)
    """
    if not isinstance(model, keras.Model) or not is_graph_model(model):
        raise InvalidModelError(
            f"students.like needs a Functional or Sequential model, got {type(model).__name__}; "
            "build the student by hand for subclassed models"
        )
    # a student wider than 16x its teacher is a mistake (and would exhaust memory), not a student
    # a kmerge merge: its sources' output layers keep their size too (a class count that the
    # merge's combine and head were built on, e.g. a 3-class softmax, not a hidden width)
    sources = (meta_of(model) or {}).get("sources", {})
    kept = {out[0] for src in sources.values() for out in src.get("outputs", [])}
    model = task_model(model)  # a multi-task merge: a student of its new output
    width = number(width, "width", low=0.0, low_open=True, high=16.0)
    seed = integer(seed, "seed", low=0, optional=True)
    outputs = {id(_keras.history(t)[0]) for t in model.outputs}

    def scaled(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if id(layer) not in outputs and layer.name not in kept:
            for key in _WIDTH_KEYS:
                value = config.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    config[key] = max(1, round(width * value))
        return type(layer).from_config(config)

    if seed is not None:
        keras.utils.set_random_seed(seed)
    student = keras.models.clone_model(model, clone_function=scaled)
    student.name = name or f"{model.name}_student"
    return student


def count_flops(model: keras.Model) -> int:
    """Multiply-adds per sample of the Dense and convolution layers of ``model`` (x2 = FLOPs).

    A quick estimate for comparing a student with its teacher; other layers are ignored.

    >>> count_flops(like(teacher, 0.5)) < count_flops(teacher) / 2
    True
    """
    total = 0
    for layer in _all_layers(model):
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        k = 1
        for d in kernel.shape:
            k *= int(d)
        out_shape = getattr(layer, "output", None)
        positions = 1
        if out_shape is not None and isinstance(layer, keras.layers.Conv2D | keras.layers.Conv1D):
            for d in out_shape.shape[1:-1]:
                positions *= int(d)
        total += k * positions
    return 2 * total


def _all_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        else:
            yield layer

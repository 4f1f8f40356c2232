"""Run a model's inference function as ONE compiled function (jit on jax, tf.function on
tensorflow; torch runs eagerly), with its variables passed in as plain tensors.

Keras's eager ``model(x)`` on jax compiles every operation separately (hundreds of XLA
compilations for a ResNet); one ``jax.jit`` of ``stateless_call`` compiles the graph once.
The variables are detached host copies: on torch, whether a weight requires grad changes
which matmul kernel runs (a frozen copy of an LSTM would differ from its trainable source in
the last bit). Nothing is written into the model's variables, so a failure cannot leave the
caller's model empty (unlike ``predict`` on jax).

:func:`run_all` runs several models; on jax, models whose lowered programs are identical
(a source and its frozen copy in a merge: same operations, same shapes, only the variable
values differ) are compiled once and the executable is run with each model's own values.
Identical program text is the proof that the two graphs compute the same function of their
variables; the bit-exact comparison of the outputs then checks the values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import tree

from kmerge import _keras


def _detached(variable: Any) -> Any:
    return keras.ops.convert_to_tensor(np.array(keras.ops.convert_to_numpy(variable.value)))


@dataclass
class Job:
    """One model to run on one list of input arrays."""

    model: keras.Model
    flat: list


def _pure_fn(model: keras.Model) -> tuple[Callable, list]:
    """``fn(values, inputs)`` computing ``model`` in inference mode, and its ``values``.

    ``values`` are the model's variables in ``model.variables`` order (the graph's layer
    order), so a source and its copy get their parameters in the same order. The states of
    random generators are constants instead: inference does not read them (dropout of a
    source, absent from its frozen copy), so the two programs keep the same parameters.
    """
    seeds = {id(g.state): g.state for g in _keras.seed_generators(model)}
    constants = {i: _detached(v) for i, v in seeds.items()}
    variables = [v for v in model.variables if id(v) not in seeds]
    ids = [id(v) for v in variables]
    trainable = [id(v) for v in model.trainable_variables]
    non_trainable = [id(v) for v in model.non_trainable_variables]
    kwargs = {"training": False} if _keras.call_has_training_arg(model) else {}
    struct = _keras.inputs_struct(model)

    def pack(flat: list) -> Any:
        if struct is not None:
            return tree.pack_sequence_as(struct, list(flat))
        return flat[0] if len(flat) == 1 else list(flat)

    def kmerge_inference(values, flat):
        by_id = {**constants, **dict(zip(ids, values))}
        outputs, _ = model.stateless_call([by_id[i] for i in trainable],
                                          [by_id[i] for i in non_trainable], pack(flat),
                                          **kwargs)
        return tree.flatten(outputs)

    return kmerge_inference, [_detached(v) for v in variables]


def _numpy(outs: Any) -> list[np.ndarray]:
    return [np.asarray(keras.ops.convert_to_numpy(o)) for o in outs]


def run_all(jobs: list[Job]) -> list[list[np.ndarray]]:
    """Each job's outputs (NumPy), every model run as one compiled function."""
    return list(stream(jobs))


def stream(jobs: Any) -> Any:
    """:func:`run_all` one job at a time: yields each job's outputs as it is computed, so a
    caller that reduces them (kmerge.probe pools and projects each batch) never holds all of
    them. ``jobs`` may be any iterable (a generator of batches)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        executables: dict[str, Any] = {}  # argument counts + program text -> executable
        prepared: dict[int, tuple] = {}  # id(model) -> (fn, values)
        known: dict[tuple, Any] = {}  # (id(model), input shapes) -> executable
        for job in jobs:
            if id(job.model) not in prepared:
                prepared[id(job.model)] = _pure_fn(job.model)
            fn, values = prepared[id(job.model)]
            inputs = [keras.ops.convert_to_tensor(a) for a in job.flat]
            signature = (id(job.model), *((tuple(a.shape), str(a.dtype)) for a in inputs))
            if signature not in known:
                lowered = jax.jit(fn).lower(values, inputs)
                # the executable also fixes the argument structure (unused ones included)
                key = f"{len(values)}:{len(inputs)}:{_program_text(lowered)}"
                if key not in executables:
                    executables[key] = lowered.compile()
                known[signature] = executables[key]
            yield _numpy(known[signature](values, inputs))
        return
    functions: dict[int, tuple] = {}  # id(model) -> (traced function, values)
    for job in jobs:
        if id(job.model) not in functions:
            fn, values = _pure_fn(job.model)
            if backend == "tensorflow":
                import tensorflow as tf

                fn = tf.function(fn)  # one trace per input signature, reused across batches
            functions[id(job.model)] = (fn, values)
        fn, values = functions[id(job.model)]
        inputs = [keras.ops.convert_to_tensor(a) for a in job.flat]
        if backend == "torch":
            import torch

            with torch.no_grad():  # left before yielding: the caller's code keeps its grad mode
                out = _numpy(fn(values, inputs))
            yield out
        else:
            yield _numpy(fn(values, inputs))


def _program_text(lowered: Any) -> str:
    """The lowered program without debug information (layer names live only there)."""
    try:
        return lowered.as_text(debug_info=False)
    except TypeError:  # older jax: no debug_info switch; names then keep programs apart
        return lowered.as_text()


def predict(model: keras.Model, x: Any, *, batch_size: int = 256) -> list[np.ndarray]:
    """``model``'s outputs on ``x`` (an array or a list of arrays), batch by batch, each batch
    through the compiled function; the model's variables are never touched."""
    xs = [np.asarray(a) for a in (x if isinstance(x, list | tuple) else [x])]
    parts = run_all([Job(model, [a[s:s + batch_size] for a in xs])
                     for s in range(0, len(xs[0]), batch_size)])
    return [np.concatenate(p, axis=0) for p in zip(*parts)]

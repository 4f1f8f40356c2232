"""Run a model's inference function as ONE compiled function (jit on jax, tf.function on
tensorflow; torch runs eagerly), with its weights passed in as plain tensors.

Keras's eager ``model(x)`` on jax compiles every operation separately (hundreds of XLA
compilations for a ResNet); one ``jax.jit`` of ``stateless_call`` compiles the graph once.
The weights are detached host copies on both sides of a comparison: on torch, whether a
weight requires grad changes which matmul kernel runs (a frozen copy of an LSTM would differ
from its trainable source in the last bit). Nothing is written into the model's variables,
so a failure cannot leave the caller's model empty (unlike ``predict`` on jax).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import tree

from kmerge import _keras


def _detached(variable: Any) -> Any:
    return keras.ops.convert_to_tensor(np.array(keras.ops.convert_to_numpy(variable.value)))


def inference_fn(model: keras.Model) -> Callable[[list], list[np.ndarray]]:
    """``fn(flat_inputs) -> flat outputs`` (NumPy) computing ``model`` in inference mode."""
    trainable = [_detached(v) for v in model.trainable_variables]
    non_trainable = [_detached(v) for v in model.non_trainable_variables]
    kwargs = {"training": False} if _keras.call_has_training_arg(model) else {}
    struct = _keras.inputs_struct(model)

    def pack(flat: list) -> Any:
        if struct is not None:
            return tree.pack_sequence_as(struct, list(flat))
        return flat[0] if len(flat) == 1 else list(flat)

    def run(tv, ntv, flat):
        outputs, _ = model.stateless_call(tv, ntv, pack(flat), **kwargs)
        return tree.flatten(outputs)

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        compiled = jax.jit(run)
    elif backend == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(run)
    else:
        compiled = run

    def call(flat: list) -> list[np.ndarray]:
        tensors = [keras.ops.convert_to_tensor(a) for a in flat]
        if backend == "torch":
            import torch

            with torch.no_grad():
                outs = compiled(trainable, non_trainable, tensors)
        else:
            outs = compiled(trainable, non_trainable, tensors)
        return [np.asarray(keras.ops.convert_to_numpy(o)) for o in outs]

    return call


def predict(model: keras.Model, x: Any, *, batch_size: int = 256) -> list[np.ndarray]:
    """``model``'s outputs on ``x`` (an array or a list of arrays), batch by batch, through
    one compiled function; the model's variables are never touched (see module doc)."""
    xs = [np.asarray(a) for a in (x if isinstance(x, list | tuple) else [x])]
    fn = inference_fn(model)
    parts: list[list[np.ndarray]] = []
    for start in range(0, len(xs[0]), batch_size):
        parts.append(fn([a[start:start + batch_size] for a in xs]))
    return [np.concatenate(p, axis=0) for p in zip(*parts)]

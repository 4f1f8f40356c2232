"""Loss inference from the model's output activation and the labels, label checks, and
fresh optimizers (a compiled optimizer is never reused across trainings)."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from kmerge import _keras
from kmerge.errors import InvalidArgumentError


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


def fresh_optimizer(optimizer: Any, learning_rate: float | None = None):
    if isinstance(optimizer, str):
        try:
            opt = keras.optimizers.get(optimizer)
        except ValueError:
            raise InvalidArgumentError(
                f"unknown optimizer {optimizer!r}; use a Keras optimizer name ('adam', 'sgd', "
                "'rmsprop', 'adamw', ...) or a keras.optimizers.Optimizer") from None
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


def check_loss(loss: Any) -> Any:
    """``loss`` unchanged if Keras can use it (None: inferred later); unknown names refused
    before any work."""
    if isinstance(loss, str):
        try:
            keras.losses.get(loss)
        except ValueError:
            raise InvalidArgumentError(
                f"unknown loss {loss!r}; use a Keras loss name ('sparse_categorical_crossentropy', "
                "'mse', ...), a keras.losses.Loss, or None to let kmerge infer it") from None
    return loss


def check_verbose(verbose: Any) -> int:
    """Keras's verbosity: ``"auto"`` (1), 0, 1 or 2."""
    if verbose == "auto":
        return 1
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise InvalidArgumentError(f"verbose must be 'auto', 0, 1 or 2; received {verbose!r}")
    return int(verbose)

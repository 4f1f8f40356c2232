"""Checking user data and numbers before anything runs, so a bad call fails with a typed error
naming the model, the input and the shapes, and never half-way through a forward pass.

This matters beyond the message: on jax, ``model.predict`` empties a model's variables while it
runs and does not put them back when it raises, so a forward pass on bad data could leave the
caller's model unusable. kmerge checks data here first, then runs models only through
:func:`outputs` (one compiled stateless function; the variables are never written).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from kmerge.errors import InvalidArgumentError

__all__ = ["model_inputs", "labels", "number", "integer", "flag", "model_name",
           "normalised_weights", "outputs", "load_if_path"]


def load_if_path(m: Any) -> Any:
    """``m`` itself, or the model at path ``m`` (:func:`kmerge.load`)."""
    if isinstance(m, str | os.PathLike):
        from kmerge.io import load

        return load(m)
    return m


def _shape(dims) -> str:
    return f"(batch, {', '.join('?' if d is None else str(d) for d in dims)})"


def _array(a: Any, what: str) -> np.ndarray:
    if a is None:
        raise InvalidArgumentError(f"{what} is None; pass a NumPy array of inputs")
    try:
        from kmerge.training.data import to_numpy

        arr = to_numpy(a)
    except Exception as exc:  # ragged lists, objects NumPy cannot hold
        raise InvalidArgumentError(
            f"{what} cannot be read as an array ({type(exc).__name__}: {exc}); pass a NumPy "
            "array with one row per example") from None
    if arr.dtype.kind not in "biuf":
        raise InvalidArgumentError(
            f"{what} has dtype {arr.dtype} (not numbers); pass numeric arrays (convert strings "
            "or objects to float32 first)")
    return arr


def model_inputs(model: Any, x: Any, what: str = "x", *, finite: bool = True,
                 at_least: int = 1) -> list[np.ndarray]:
    """``x`` (an array, a list of arrays, or a dict by input name) as one NumPy array per input
    of ``model``, each checked against the input's shape; same batch size for all; at least
    ``at_least`` examples; NaN/inf refused when ``finite``.

    Raises:
        InvalidArgumentError: naming the model, the input, the shapes and what to pass.
    """
    inputs = list(getattr(model, "inputs", None) or [])
    name = getattr(model, "name", type(model).__name__)
    if not inputs:
        return [_array(a, what) for a in (x if isinstance(x, list | tuple) else [x])]
    names = [t.name for t in inputs]
    if isinstance(x, Mapping):
        missing = [n for n in names if n not in x]
        if missing:
            raise InvalidArgumentError(
                f"{what} is a dict without input(s) {missing} of model {name!r}; its keys are "
                f"{sorted(map(str, x))}; use the input names {names}")
        xs = [x[n] for n in names]
    else:
        xs = list(x) if isinstance(x, list | tuple) else [x]
        if isinstance(x, list | tuple) and len(names) == 1 and len(xs) != 1:
            xs = [x]  # a plain list of examples for a one-input model
    if len(xs) != len(names):
        raise InvalidArgumentError(
            f"model {name!r} has {len(names)} input(s) {names} but {what} holds {len(xs)} "
            "array(s); pass one array per input (a list, or a dict by input name)")
    arrays = []
    for t, n, a in zip(inputs, names, xs):
        where = f"{what}" if len(names) == 1 else f"{what}[{n!r}]"
        arr = _array(a, where)
        want = tuple(t.shape[1:])
        if arr.ndim != len(want) + 1 or any(
                w is not None and w != g for w, g in zip(want, arr.shape[1:])):
            raise InvalidArgumentError(
                f"{where} has shape {arr.shape}, but input {n!r} of model {name!r} takes "
                f"{_shape(want)}; reshape the data to match (one row per example)")
        if len(arr) < at_least:
            raise InvalidArgumentError(
                f"{where} holds {len(arr)} example(s); at least {at_least} needed")
        if finite and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise InvalidArgumentError(
                f"{where} holds {bad} NaN or infinite value(s) (input {n!r} of model {name!r}); "
                "clean or impute them first: a single NaN turns every trained weight into NaN")
        arrays.append(arr)
    sizes = {len(a) for a in arrays}
    if len(sizes) > 1:
        raise InvalidArgumentError(
            f"{what}: the arrays for the inputs {names} of model {name!r} have different "
            f"numbers of examples {[len(a) for a in arrays]}; pass one row per example in each")
    return arrays


def labels(y: Any, n: int, what: str = "y") -> np.ndarray:
    """Targets for ``n`` examples: numeric, finite, one per example."""
    if y is None:
        raise InvalidArgumentError(f"{what} is None; pass one target per example")
    try:
        arr = np.asarray(y)
    except Exception as exc:
        raise InvalidArgumentError(f"{what} cannot be read as an array ({exc})") from None
    if arr.dtype.kind not in "biuf":
        sample = arr.reshape(-1)[:3].tolist() if arr.size else []
        raise InvalidArgumentError(
            f"{what} has dtype {arr.dtype} (e.g. {sample}), not numbers; map the labels to "
            "integers 0..K-1 first, e.g. np.unique(y, return_inverse=True)[1]")
    if arr.ndim == 0 or len(arr) != n:
        raise InvalidArgumentError(
            f"{what} has {arr.shape[0] if arr.ndim else 0} target(s) for {n} example(s); pass "
            "one target per example")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise InvalidArgumentError(f"{what} holds NaN or infinite targets; drop those examples")
    return arr


def number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, integer: bool = False,
           optional: bool = False) -> Any:
    """``value`` as a finite int/float within [low, high] (open ends when asked), else a typed
    error naming the argument and the range."""
    if value is None and optional:
        return None
    kind = "an integer" if integer else "a number"
    ok_type = (isinstance(value, numbers.Integral) if integer
               else isinstance(value, numbers.Real)) and not isinstance(value, bool)
    if integer and not ok_type and isinstance(value, float) and value.is_integer():
        value, ok_type = int(value), True
    if not ok_type or (not integer and not math.isfinite(float(value))):
        raise InvalidArgumentError(f"{name} must be {kind}{_range(low, high, low_open, high_open)}"
                                   f"; received {value!r}")
    v = float(value)
    if ((low is not None and (v < low or (low_open and v == low)))
            or (high is not None and (v > high or (high_open and v == high)))):
        raise InvalidArgumentError(f"{name} must be {kind}{_range(low, high, low_open, high_open)}"
                                   f"; received {value!r}")
    return int(value) if integer else value


def flag(value: Any, name: str) -> bool:
    """A real boolean (``"no"`` or ``0`` for a switch is a mistake, not False)."""
    if not isinstance(value, bool | np.bool_):
        raise InvalidArgumentError(f"{name} must be True or False; received {value!r}")
    return bool(value)


def model_name(value: Any, what: str = "name") -> str | None:
    """None (kmerge picks one) or a non-empty string Keras accepts as a model name."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or "/" in value:
        raise InvalidArgumentError(
            f"{what} must be a non-empty string without '/' (or None for a default); received "
            f"{value!r}")
    return value


def normalised_weights(weights: Any, n: int, *, what: str = "model") -> list[float]:
    """``n`` finite, non-negative numbers with a positive sum, normalised to sum 1 (uniform
    when None). Scaled by the largest first, so ``[1e308, 1e308]`` is ``[0.5, 0.5]``."""
    if weights is None:
        return [1.0 / n] * n
    if isinstance(weights, str | bytes | Mapping) or not hasattr(weights, "__len__"):
        raise InvalidArgumentError(f"weights must be a list of {n} numbers, one per {what}; "
                                   f"received {weights!r}")
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in weights):
        raise InvalidArgumentError(f"weights must be a list of {n} numbers, one per {what}; "
                                   f"received {list(weights)!r}")
    w = np.asarray(list(weights), dtype=np.float64)
    if w.ndim != 1 or len(w) != n:
        raise InvalidArgumentError(f"weights must have one entry per {what} ({n}); received "
                                   f"{len(w)}: {w.tolist()}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InvalidArgumentError(f"weights must be finite and non-negative; received "
                                   f"{w.tolist()}")
    if w.max() <= 0:
        raise InvalidArgumentError(f"weights sum to zero ({w.tolist()}); give at least one "
                                   f"{what} a positive weight, e.g. weights={[1] * n}")
    w = w / w.max()  # scale first: [1e308, 1e308] would overflow the sum to inf
    return (w / w.sum()).tolist()


def integer(value: Any, name: str, *, low: int | None = 1, optional: bool = False) -> Any:
    """A positive (by default) integer argument such as ``epochs`` or ``batch_size``."""
    return number(value, name, low=low, integer=True, optional=optional)


def _range(low, high, low_open, high_open) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f" {'<' if high_open else '<='} {high:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def outputs(model: Any, x: Any, what: str = "x", *, batch_size: int = 256) -> list[np.ndarray]:
    """``model``'s outputs on ``x``, checked first and run through one compiled stateless
    function: the model's variables are never written, whatever happens."""
    from kmerge.graph.compiled import predict

    return predict(model, model_inputs(model, x, what), batch_size=batch_size)

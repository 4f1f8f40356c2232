"""Training in place without leaving a broken model behind.

:func:`unchanged_on_failure` snapshots every variable training can change (the trainable
variables, and the non-trainable state of trainable layers such as a head's BatchNorm moving
statistics), then puts them back when training raises (bad data half-way through, a callback
error, Ctrl-C) or ends with non-finite weights (a diverged run, NaN in a generator's data). The
caller's model is then exactly as it was before the call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from kmerge import _keras
from kmerge.errors import InvalidArgumentError


def _changeable(model: Any) -> list:
    seen: dict[int, Any] = {id(v): v for v in model.trainable_variables}
    for layer in _keras.sublayers(model):
        if layer.trainable:
            for v in layer.non_trainable_variables:
                seen.setdefault(id(v), v)
    return list(seen.values())


def _value(v: Any) -> np.ndarray:
    import keras

    return np.array(keras.ops.convert_to_numpy(v.value))


@contextlib.contextmanager
def unchanged_on_failure(model: Any, what: str) -> Iterator[None]:
    """Run the body; on any exception, or non-finite weights afterwards, restore ``model``'s
    changeable variables and raise (an :class:`InvalidArgumentError` for divergence)."""
    variables = _changeable(model)
    saved = [_value(v) for v in variables]

    def restore() -> None:
        for v, a in zip(variables, saved):
            v.assign(a)

    try:
        yield
    except BaseException:
        restore()
        raise
    bad = [v.path for v in variables
           if np.issubdtype(np.dtype(str(v.dtype).replace("bfloat16", "float32")), np.floating)
           and not np.all(np.isfinite(_value(v)))]
    if bad:
        restore()
        raise InvalidArgumentError(
            f"{what} of model {model.name!r} diverged: {len(bad)} variable(s) became NaN or "
            f"infinite (first: {bad[0]!r}); the model's weights were restored. Check the data for "
            "NaN/inf values and labels out of range, or lower the learning rate")

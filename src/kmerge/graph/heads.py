"""Heads: the trainable layers on top of a merge.

A head is anything callable on a tensor: kmerge's own :func:`classifier` and
:func:`regressor` (which create fresh layers, named after the merge, each time they are
applied), or any Keras layer or model.

kmerge's heads are seeded: every layer they create gets an initializer (and a dropout layer a
seed generator) seeded from the head's ``seed`` (default 0) and the layer's position in the
head. The same head on the same merge therefore starts from the same weights in every process,
whatever ran before and whatever Keras's global seed is, so ``fit_head(..., seed=s)`` on a
fresh merge gives the same weights every time. Pass ``seed=`` for another draw (an ensemble of
heads). A Keras layer passed as a head keeps its own initializers (seed them yourself).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

from kmerge.arguments import integer, number
from kmerge.errors import InvalidArgumentError


@dataclass(frozen=True)
class Head:
    """A head recipe: hidden Dense layers, dropout, and an output layer."""

    units: int
    activation: str | None
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    hidden_activation: str = "relu"
    seed: int = 0

    def layer_seed(self, position: int) -> int:
        """The seed of the head's ``position``-th random layer: a function of ``seed`` only."""
        state = np.random.SeedSequence([self.seed, position]).generate_state(1)[0]
        return int(state) % (2**31 - 1)

    def __call__(self, tensor, *, name: str = "head"):
        x = tensor
        if len(x.shape) > 2:
            x = keras.layers.Flatten(name=f"{name}_flatten")(x)
        k = 0
        for i, width in enumerate(self.hidden):
            x = keras.layers.Dense(width, activation=self.hidden_activation,
                                   kernel_initializer=self._glorot(k),
                                   name=f"{name}_dense_{i}")(x)
            k += 1
            if self.dropout:
                x = keras.layers.Dropout(self.dropout, seed=self.layer_seed(k),
                                         name=f"{name}_dropout_{i}")(x)
                k += 1
        return keras.layers.Dense(self.units, activation=self.activation,
                                  kernel_initializer=self._glorot(k), name=f"{name}_output")(x)

    def _glorot(self, position: int):
        return keras.initializers.GlorotUniform(seed=self.layer_seed(position))

    def describe(self) -> str:
        parts = [f"Dense({w}, {self.hidden_activation})" for w in self.hidden]
        parts.append(f"Dense({self.units}, {self.activation or 'linear'})")
        return " -> ".join(parts)


def _check(units: int, hidden: Sequence[int], dropout: float, what: str) -> tuple[int, ...]:
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        raise InvalidArgumentError(f"{what} needs a positive integer size, got {units!r}")
    if isinstance(hidden, str) or not isinstance(hidden, Sequence):
        raise InvalidArgumentError(f"{what}: hidden must be a list of layer sizes, e.g. [64]; "
                                   f"got {hidden!r}")
    hidden = tuple(hidden)
    if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise InvalidArgumentError(f"{what}: hidden sizes must be positive integers, got {hidden}")
    number(dropout, f"{what}: dropout", low=0.0, high=1.0, high_open=True)
    return hidden


def classifier(n_classes: int, *, hidden: Sequence[int] = (), dropout: float = 0.0,
               seed: int = 0) -> Head:
    """A softmax classifier head (``sigmoid`` for ``n_classes=1``).

    ``seed`` seeds the initial weights and the dropout masks (see the module docstring): the
    same ``seed`` gives the same head in every process.

    >>> head = classifier(10, hidden=[64])
    """
    hidden = _check(n_classes, hidden, dropout, "classifier")
    seed = integer(seed, "classifier: seed", low=0)
    return Head(n_classes, "sigmoid" if n_classes == 1 else "softmax", hidden, float(dropout),
                seed=seed)


def regressor(n_outputs: int = 1, *, hidden: Sequence[int] = (), dropout: float = 0.0,
              seed: int = 0) -> Head:
    """A linear regression head (``seed`` as in :func:`classifier`).

    >>> head = regressor(1, hidden=[32])
    """
    hidden = _check(n_outputs, hidden, dropout, "regressor")
    seed = integer(seed, "regressor: seed", low=0)
    return Head(n_outputs, None, hidden, float(dropout), seed=seed)


def apply_head(head, tensor, *, name: str):
    """Apply a kmerge :class:`Head`, or any Keras layer/model, to ``tensor``."""
    if head is None:
        return tensor
    if isinstance(head, Head):
        return head(tensor, name=name)
    if isinstance(head, keras.layers.Layer):
        return head(tensor)
    raise InvalidArgumentError(
        f"head must be kmerge.heads.classifier(...)/regressor(...) or a Keras layer or "
        f"model, got {type(head).__name__}"
    )


def describe_head(head) -> str:
    if head is None:
        return "none"
    if isinstance(head, Head):
        return head.describe()
    return f"{type(head).__name__} {head.name!r}"

"""Frozen means inference: the one rule for layers whose training-mode output is random.

Used by the graph rebuild (a frozen source computes its inference function, inside ``fit``
too) and by :func:`kmerge.fit_head` (a random layer ends the part whose output is cached).

- Weightless training-only layers (dropout, noise) are exactly the identity at inference:
  a frozen copy is an ``Identity`` layer.
- Any other layer that is random in training mode - recurrent or attention dropout inside
  an RNN, ``MultiHeadAttention`` or ``Attention``, random augmentation, a custom layer
  holding a ``keras.random.SeedGenerator`` at any depth - is wrapped in
  :class:`kmerge.graph.layers.Inference`, which always calls it with ``training=False``.
"""

from __future__ import annotations

from typing import Any

from kmerge import _keras

# Weightless layers that compute the identity at inference.
TRAINING_ONLY = frozenset({
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout",
    "GaussianNoise", "AlphaDropout", "ActivityRegularization",
})
# Config keys of Keras layers that switch on randomness inside the layer when non-zero.
RATE_KEYS = frozenset({"dropout", "recurrent_dropout", "attention_dropout"})


def is_training_only(layer: Any) -> bool:
    """Weightless and the identity at inference (a frozen copy may be ``Identity``)."""
    return type(layer).__name__ in TRAINING_ONLY and not getattr(layer, "weights", None)


def _rates(config: Any) -> bool:
    if isinstance(config, dict):
        for k, v in config.items():
            if k in RATE_KEYS and isinstance(v, int | float) and not isinstance(v, bool) and v:
                return True
            if isinstance(v, dict | list) and _rates(v):
                return True
    elif isinstance(config, list):
        return any(_rates(v) for v in config)
    return False


def is_random(op: Any) -> bool:
    """True when ``op``'s output in training mode is random (so it cannot be cached, and a
    frozen copy must be forced to inference)."""
    from keras.layers import Layer

    from kmerge.graph.layers import Inference

    if not isinstance(op, Layer) or isinstance(op, Inference):
        return False
    kind = type(op).__name__
    if kind in TRAINING_ONLY - {"ActivityRegularization"}:
        return True
    try:
        config = op.get_config()
    except Exception:  # custom layers without a config: judged by their generators below
        config = {}
    if _rates(config):
        return True
    if not any(True for _ in _keras.seed_generators(op)):
        return False
    # Keras's own layers use their generator only through the rates checked above, except
    # random augmentation; for any other class a generator means randomness.
    return kind.startswith("Random") or not type(op).__module__.startswith("keras.")

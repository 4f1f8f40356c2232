"""Keras 2 activations whose Keras 3 namesakes compute something else.

Registered with Keras (package ``kmerge``) on import, so a repaired Keras 2 model that uses one
saves as ``.keras`` and loads back with ``kmerge.load``, or with plain
``keras.models.load_model`` once this module is imported.
"""

from __future__ import annotations

import keras
from keras import ops

__all__ = ["keras2_hard_sigmoid", "REPLACEMENTS"]


@keras.saving.register_keras_serializable(package="kmerge")
def keras2_hard_sigmoid(x):
    """Keras 2's ``hard_sigmoid``: ``clip(0.2 * x + 0.5, 0, 1)``.

    Keras 3's ``hard_sigmoid`` is ``relu6(x + 3) / 6`` (slope 1/6): a Keras 2 model that names
    ``"hard_sigmoid"`` (the default ``recurrent_activation`` of LSTM/GRU before TF 2.0) computes
    another function in Keras 3 unless it is given this one.
    """
    x = ops.convert_to_tensor(x)
    return ops.clip(ops.add(ops.multiply(x, 0.2), 0.5), 0.0, 1.0)


# Keras 2 activation name -> (the exact Keras 2 function, what it computes)
REPLACEMENTS = {"hard_sigmoid": (keras2_hard_sigmoid, "clip(0.2x + 0.5, 0, 1)")}

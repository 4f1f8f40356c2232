"""kmerge's own Keras layers. Each is serializable, so merged models load with plain
``keras.models.load_model`` once ``kmerge`` is imported."""

from __future__ import annotations

import keras
from keras import ops

_register = keras.saving.register_keras_serializable(package="kmerge")


@_register
class WeightedSum(keras.layers.Layer):
    """Sum of inputs with fixed, non-trainable weights: ``sum_i w_i * x_i``."""

    def __init__(self, coefficients, **kwargs):
        super().__init__(**kwargs)
        self.coefficients = tuple(float(w) for w in coefficients)

    def call(self, inputs):
        return sum(w * x for w, x in zip(self.coefficients, inputs))

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "coefficients": list(self.coefficients)}


@_register
class LearnedWeights(keras.layers.Layer):
    """Trainable softmax-normalised weight per input: ``sum_i softmax(l)_i * x_i``.

    The logits start at zero, i.e. at the plain average.
    """

    def build(self, input_shape):
        self.logits = self.add_weight(
            name="logits", shape=(len(input_shape),), initializer="zeros", trainable=True
        )

    def call(self, inputs):
        w = ops.softmax(self.logits)
        return sum(w[i] * x for i, x in enumerate(inputs))

    def compute_output_shape(self, input_shape):
        return input_shape[0]


@_register
class Gate(keras.layers.Layer):
    """Input-dependent gating, a small mixture of experts.

    Called on ``[context, expert_1, ..., expert_n]``: a softmax over ``n`` logits computed
    from the (flattened) context weights each expert per example.
    """

    def build(self, input_shape):
        context, *experts = input_shape
        features = 1
        for d in context[1:]:
            features *= int(d)
        self.kernel = self.add_weight(
            name="kernel", shape=(features, len(experts)), initializer="zeros"
        )
        self.bias = self.add_weight(name="bias", shape=(len(experts),), initializer="zeros")

    def call(self, inputs):
        context, *experts = inputs
        flat = ops.reshape(context, (ops.shape(context)[0], -1))
        gates = ops.softmax(ops.matmul(ops.cast(flat, self.compute_dtype), self.kernel) + self.bias)
        out = 0
        for i, x in enumerate(experts):
            g = gates[:, i]
            out = out + ops.reshape(g, (-1,) + (1,) * (len(x.shape) - 1)) * x
        return out

    def compute_output_shape(self, input_shape):
        return input_shape[1]


@_register
class Stack(keras.layers.Layer):
    """Stack same-shaped inputs on a new axis 1: ``(batch, n_models, ...)``."""

    def call(self, inputs):
        return ops.stack(inputs, axis=1)

    def compute_output_shape(self, input_shape):
        first = tuple(input_shape[0])
        return (first[0], len(input_shape), *first[1:])


@_register
class Inference(keras.layers.Layer):
    """Runs the wrapped (frozen) layer in inference mode on every call, inside ``fit`` too.

    A Keras functional graph passes the fit-time ``training=True`` to every layer that takes
    ``training``; a frozen source must still compute its inference function. Layers whose
    randomness lives inside them (recurrent and attention dropout, random augmentation, a
    custom layer holding a ``SeedGenerator``) are wrapped in this layer, which takes no
    ``training`` itself and calls the wrapped layer with ``training=False``. The wrapped layer
    keeps its weights and config; the wrapper serializes it, so the merge saves and loads.
    """

    def __init__(self, layer, **kwargs):
        if isinstance(layer, dict):
            layer = keras.saving.deserialize_keras_object(layer)
        super().__init__(**kwargs)
        self.layer = layer
        self.supports_masking = True
        # The wrapped layer builds itself on its first call; the wrapper has no state.
        self.built = True
        params = _call_params(layer)
        self._inner_training = "training" in params
        self._inner_mask = "mask" in params

    def call(self, inputs, *args, mask=None, **kwargs):
        if mask is not None and self._inner_mask and "mask" not in kwargs:
            kwargs["mask"] = mask
        if self._inner_training:
            kwargs["training"] = False
        return self.layer(inputs, *args, **kwargs)

    def compute_mask(self, inputs, previous_mask=None):
        return self.layer.compute_mask(inputs, previous_mask)

    def get_config(self):
        return {**super().get_config(),
                "layer": keras.saving.serialize_keras_object(self.layer)}


def _call_params(layer) -> tuple[str, ...]:
    import inspect

    try:
        return tuple(inspect.signature(layer.call).parameters)
    except (TypeError, ValueError):
        return ()

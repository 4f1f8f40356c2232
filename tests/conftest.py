"""Tiny model factories and trained digit models shared by the tests.

Models are small (Dense-heavy, a few hundred parameters) so the suite stays fast on every
backend; trained models are session-scoped and saved the way users save them.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import _speed  # noqa: E402

_speed.configure()  # jax: persistent compilation cache (see tests/_speed.py)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def mlp(name: str | None = None, *, inputs: int = 8, hidden: int = 16, outputs: int = 3,
        dropout: float = 0.0, seed: int = 0) -> keras.Model:
    """A Sequential MLP with Keras's default layer names (as users make them)."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((inputs,)), keras.layers.Dense(hidden, activation="relu")]
    if dropout:
        layers.append(keras.layers.Dropout(dropout))
    layers.append(keras.layers.Dense(outputs, activation="softmax"))
    return keras.Sequential(layers, name=name)


def cnn(name: str | None = None, *, shape=(8, 8, 1), filters: int = 4, outputs: int = 3,
        seed: int = 0) -> keras.Model:
    """A small functional CNN with BatchNorm (moving statistics made non-trivial)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape)
    x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(outputs, activation="softmax")(x)
    model = keras.Model(inp, out, name=name)
    bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)][0]
    rng = np.random.default_rng(seed)
    bn.moving_mean.assign(rng.normal(size=filters).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=filters).astype("float32"))
    return model


def nested(name: str | None = None, *, seed: int = 0) -> keras.Model:
    """Functional model with a nested Sequential block and a shared layer."""
    keras.utils.set_random_seed(seed)
    block = keras.Sequential([keras.Input((6,)), keras.layers.Dense(6, activation="relu",
                              name="conv"), keras.layers.BatchNormalization(name="bn")],
                             name="block_1")
    inp = keras.Input((8,))
    x = keras.layers.Dense(6, name="stem")(inp)
    x = block(x)
    shared = keras.layers.Dense(6, activation="tanh", name="shared")
    y = shared(x)
    z = shared(y)
    out = keras.layers.Dense(3, name="out")(keras.layers.Add(name="add")([y, z]))
    return keras.Model(inp, out, name=name)


def x_for(model: keras.Model, n: int = 5, seed: int = 1) -> np.ndarray:
    shape = (n, *model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def weights_of(model: keras.Model) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(w)) for w in model.weights]


def same_weights(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def predict(model, x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))


@pytest.fixture(scope="session")
def digits():
    from kmerge.demo import digits as load

    x_tr, x_te, y_tr, y_te = load(0)
    return x_tr, y_tr, x_te, y_te


@pytest.fixture(scope="session")
def trained(digits, tmp_path_factory):
    """Two different models trained on digits, saved as users do (.h5 and .keras)."""
    x_tr, y_tr, _, _ = digits
    keras.utils.set_random_seed(0)
    a = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                          keras.layers.Dense(32, activation="relu"),
                          keras.layers.Dense(10, activation="softmax")])
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    x = keras.layers.Dropout(0.2)(x)
    b = keras.Model(inp, keras.layers.Dense(10, activation="softmax")(x))
    for m in (a, b):
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        m.fit(x_tr, y_tr, epochs=8, batch_size=32, verbose=0)
    d = tmp_path_factory.mktemp("trained")
    a.save(d / "model_a.h5")
    b.save(d / "model_b.keras")
    return d / "model_a.h5", d / "model_b.keras"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`kmerge demo --epochs 2` run once per test process: ``(folder, what it printed)``.

    Tests that use it carry ``@pytest.mark.xdist_group("demo")`` so that pytest-xdist
    (``make test`` runs ``--dist loadgroup``) sends them to one worker and the demo runs once.
    """
    import contextlib
    import io

    from kmerge.cli import main

    d = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(d), "--epochs", "2"]) == 0
    return d, printed.getvalue()

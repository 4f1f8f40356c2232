"""Write the genuine Keras 2 (tf_keras) fixtures used by tests/test_legacy.py and tests/test_io.py.

tf_keras must not go into the project venv; run this with a separate one::

    python3 -m venv /tmp/venv-tfk
    /tmp/venv-tfk/bin/pip install tensorflow-cpu==2.21.0 h5py numpy
    /tmp/venv-tfk/bin/pip install tf-keras==2.21.0 --no-deps
    /tmp/venv-tfk/bin/python tests/data/make_legacy.py            # every fixture (rewrites all)
    /tmp/venv-tfk/bin/python tests/data/make_legacy.py repairs    # only the named group(s)

Each ``NAME.h5`` gets a ``NAME.npz`` with a reference input ``x`` and the output ``y`` tf_keras
computed. Files named ``*_old*.h5`` are copies whose stored ``model_config`` JSON was edited to
reproduce quirks of older Keras 2 releases (2.0-2.3 / TF 2.0-2.12) that tf_keras 2.x no longer
writes; their weights are untouched, so the reference outputs still hold. ``keras2_arch.json`` +
``keras2_arch_weights.h5`` are ``model.to_json()`` and ``model.save_weights()`` of one model.
``keras38_nested.keras`` is written by genuine Keras 3.8.0: see ``make_keras38.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import tf_keras as k  # noqa: E402

OUT = Path(__file__).parent / "legacy"
L = k.layers


@k.utils.register_keras_serializable(package="fixture")
class Scale(L.Layer):
    """A custom layer the loader cannot know about."""

    def __init__(self, factor: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def _save(model: k.Model, name: str, x: np.ndarray) -> None:
    model.save(OUT / f"{name}.h5", save_format="h5")
    y = model(x, training=False)
    np.savez(OUT / f"{name}.npz", x=x, y=np.asarray(y))


def _edit(src: str, dst: str, fn) -> None:
    """Copy ``src`` to ``dst`` and rewrite its attrs with ``fn(attrs_dict) -> attrs_dict``."""
    shutil.copy(OUT / f"{src}.h5", OUT / f"{dst}.h5")
    shutil.copy(OUT / f"{src}.npz", OUT / f"{dst}.npz")
    with h5py.File(OUT / f"{dst}.h5", "r+") as f:
        attrs = {key: f.attrs[key] for key in f.attrs}
        attrs["model_config"] = json.loads(attrs["model_config"])
        new = fn(attrs)
        for key in list(f.attrs):
            del f.attrs[key]
        for key, value in new.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value


def _walk(obj, fn) -> None:
    if isinstance(obj, dict):
        fn(obj)
        for v in obj.values():
            _walk(v, fn)
    elif isinstance(obj, list):
        for v in obj:
            _walk(v, fn)


def original() -> None:
    """The first fixtures: MLP, CNN, RNN, Embedding, nested models, custom layer, Lambda."""
    rng = np.random.default_rng(0)
    k.utils.set_random_seed(0)

    # 1. Old-style Sequential MLP with default layer names, compiled (training_config stored).
    mlp = k.Sequential([L.Dense(8, activation="relu", input_shape=(4,)), L.Dropout(0.1),
                        L.Dense(3, activation="softmax")])
    mlp.compile(optimizer=k.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    _save(mlp, "mlp", rng.normal(size=(5, 4)).astype("float32"))
    mlp.save_weights(OUT / "mlp_weights_only.h5")

    # 2. CNN on digits-sized input.
    i = k.Input((8, 8, 1))
    x = L.Conv2D(4, 3, padding="same", activation="relu")(i)
    x = L.SeparableConv2D(4, 3, padding="same")(x)
    x = L.BatchNormalization()(x)
    x = L.MaxPooling2D()(x)
    x = L.Dropout(0.2)(x)
    x = L.Flatten()(x)
    cnn = k.Model(i, L.Dense(10, activation="softmax")(x))
    # Non-trivial BN statistics so the parity check sees them.
    bn = cnn.layers[3]
    bn.set_weights([w + rng.uniform(0.1, 0.5, w.shape).astype("float32") for w in bn.get_weights()])
    _save(cnn, "cnn", rng.normal(size=(3, 8, 8, 1)).astype("float32"))

    # 3. Recurrent: LSTM then Bidirectional GRU (tf_keras still writes time_major).
    i = k.Input((5, 3))
    x = L.LSTM(4, return_sequences=True)(i)
    x = L.Bidirectional(L.GRU(3))(x)
    rnn = k.Model(i, L.Dense(2)(x))
    _save(rnn, "rnn", rng.normal(size=(2, 5, 3)).astype("float32"))

    # 4. Embedding + SimpleRNN Sequential (Embedding carries input_length).
    emb = k.Sequential([L.Embedding(20, 4, input_length=6), L.SimpleRNN(4), L.Dense(2)])
    _save(emb, "embedding", rng.integers(0, 20, size=(3, 6)).astype("int32"))

    # 5. Functional with a nested functional sub-model (holding BatchNormalization).
    ii = k.Input((6,))
    h = L.Dense(5, activation="relu")(ii)
    h = L.BatchNormalization()(h)
    inner = k.Model(ii, L.Dense(4)(h), name="encoder")
    inner.layers[2].set_weights(
        [w + rng.uniform(0.1, 0.5, w.shape).astype("float32") for w in inner.layers[2].get_weights()])
    i = k.Input((6,))
    nested = k.Model(i, L.Dense(2, name="head")(inner(i)), name="outer")
    _save(nested, "nested", rng.normal(size=(4, 6)).astype("float32"))

    # 5b. A Sequential built with an input shape, nested in a functional model.
    block = k.Sequential([L.Dense(3, activation="tanh", input_shape=(4,))], name="block")
    i = k.Input((4,))
    _save(k.Model(i, L.Dense(2, name="head")(block(i))), "nested_sequential",
          rng.normal(size=(3, 4)).astype("float32"))

    # 6. Custom layer (unknown to the loader) and a Lambda layer.
    i = k.Input((3,))
    _save(k.Model(i, Scale(3.0)(L.Dense(2)(i))), "custom_layer", np.ones((1, 3), "float32"))
    i = k.Input((3,))
    _save(k.Model(i, L.Lambda(lambda t: t * 2.0)(L.Dense(2)(i))), "lambda",
          np.ones((1, 3), "float32"))

    # ---- older-era quirks, reproduced on copies ----
    def old_sequential(attrs):
        # Keras 2.0-2.3: no InputLayer in Sequential configs; batch_input_shape on the first layer;
        # "input_dtype"-era dtype key; optimizer saved with `lr`; keras_version 2.2.4.
        cfg = attrs["model_config"]
        layers = cfg["config"]["layers"]
        first = layers.pop(0)
        assert first["class_name"] == "InputLayer"
        layers[0]["config"]["batch_input_shape"] = first["config"]["batch_input_shape"]
        attrs["training_config"] = {
            "optimizer_config": {"class_name": "Adam", "config": {"lr": 0.001, "decay": 0.0}},
            "loss": "categorical_crossentropy", "metrics": ["acc"], "sample_weight_mode": None,
            "loss_weights": None}
        attrs["keras_version"] = "2.2.4"
        attrs["backend"] = "tensorflow"
        return attrs

    _edit("mlp", "mlp_old", old_sequential)

    def old_embedding(attrs):
        attrs["model_config"]["config"]["layers"].pop(0)  # batch_input_shape already on Embedding
        attrs["keras_version"] = "2.3.1"
        return attrs

    _edit("embedding", "embedding_old", old_embedding)

    def old_functional(attrs):
        # Keras <= 2.3 wrote "Model" for functional models; TF 2.4-2.12 stored dtype policies
        # as dicts; Keras 2.0-2.2 VarianceScaling used distribution="normal".
        cfg = attrs["model_config"]
        cfg["class_name"] = "Model"

        def fix(d):
            c = d.get("config")
            if isinstance(c, dict) and c.get("dtype") == "float32":
                c["dtype"] = {"class_name": "Policy", "config": {"name": "float32"}}
            if d.get("class_name") == "GlorotUniform":
                d.update(class_name="VarianceScaling",
                         config={"scale": 1.0, "mode": "fan_avg", "distribution": "normal",
                                 "seed": None})
                d.pop("module", None)
                d.pop("registered_name", None)

        _walk(cfg, fix)
        attrs["keras_version"] = "2.4.0"
        return attrs

    _edit("cnn", "cnn_old", old_functional)
    _edit("nested", "nested_old", old_functional)



def _strip_modules(obj) -> None:
    """Keras 2 before 2.13 wrote no ``module``/``registered_name`` in configs."""
    def fix(d):
        d.pop("module", None)
        d.pop("registered_name", None)
    _walk(obj, fix)


def repairs() -> None:
    """Keras 2 semantics Keras 3 changed: hard_sigmoid, GRU reset_after, list-form Sequential,
    wrappers whose inner layer has no module."""
    rng = np.random.default_rng(1)
    k.utils.set_random_seed(1)

    # hard_sigmoid everywhere an activation is named (recurrent and plain); inputs scaled so
    # that every branch of clip(0.2x + 0.5, 0, 1) is used.
    i = k.Input((5, 3))
    x = L.LSTM(4, recurrent_activation="hard_sigmoid", return_sequences=True)(i)
    x = L.GRU(3, recurrent_activation="hard_sigmoid", return_sequences=True)(x)
    x = L.SimpleRNN(3, activation="hard_sigmoid")(x)
    x = L.Dense(4, activation="hard_sigmoid")(x)
    x = L.Activation("hard_sigmoid")(L.Dense(3)(x))
    _save(k.Model(i, x), "hard_sigmoid", 4.0 * rng.normal(size=(3, 5, 3)).astype("float32"))

    # GRU without reset_after (Keras <= 2.1.4 did not write it and computed reset_after=False):
    # a plain GRU and an RNN(GRUCell); written by tf_keras with reset_after=False, key removed.
    i = k.Input((4, 3))
    x = L.GRU(4, reset_after=False, return_sequences=True)(i)
    x = L.RNN(L.GRUCell(3, reset_after=False))(x)
    _save(k.Model(i, L.Dense(2)(x)), "gru_src", rng.normal(size=(2, 4, 3)).astype("float32"))

    def no_reset_after(attrs):
        def fix(d):
            if d.get("class_name") in ("GRU", "GRUCell"):
                assert d["config"].pop("reset_after") is False
        _walk(attrs["model_config"], fix)
        attrs["keras_version"] = "2.1.4"
        return attrs

    _edit("gru_src", "gru_old", no_reset_after)

    # Keras 2.0-2.2.2 Sequential: the config is a bare list of layers (no InputLayer, no name);
    # Bidirectional/TimeDistributed inner layers without module (shakkala's real files).
    seq = k.Sequential([
        L.Embedding(12, 4, input_length=6),
        L.Bidirectional(L.GRU(3, reset_after=False, recurrent_activation="hard_sigmoid",
                              return_sequences=True)),
        L.Bidirectional(L.LSTM(2, recurrent_activation="hard_sigmoid", return_sequences=True)),
        L.TimeDistributed(L.Dense(3, activation="softmax")),
    ])
    _save(seq, "seq_src", rng.integers(0, 12, size=(3, 6)).astype("int32"))

    def list_form(attrs):
        cfg = attrs["model_config"]
        layers = cfg["config"]["layers"]
        first = layers.pop(0)
        assert first["class_name"] == "InputLayer"
        layers[0]["config"]["batch_input_shape"] = first["config"]["batch_input_shape"]
        cfg["config"] = layers
        _strip_modules(cfg)

        def fix(d):
            if d.get("class_name") == "GRU":
                d["config"].pop("reset_after")
        _walk(cfg, fix)
        attrs["keras_version"] = "2.1.6"
        return attrs

    _edit("seq_src", "sequential_list_old", list_form)
    for name in ("gru_src", "seq_src"):
        (OUT / f"{name}.h5").unlink()
        (OUT / f"{name}.npz").unlink()


def json_architecture() -> None:
    """model.to_json() + model.save_weights() of a Keras 2 model (repairs needed: InputLayer
    batch_input_shape, time_major, hard_sigmoid)."""
    rng = np.random.default_rng(2)
    k.utils.set_random_seed(2)
    i = k.Input((4, 3))
    x = L.LSTM(3, recurrent_activation="hard_sigmoid")(i)
    x = L.BatchNormalization()(L.Dense(4, activation="relu")(x))
    model = k.Model(i, L.Dense(2)(x))
    bn = model.layers[3]
    bn.set_weights([w + rng.uniform(0.1, 0.5, w.shape).astype("float32") for w in bn.get_weights()])
    (OUT / "keras2_arch.json").write_text(model.to_json())
    model.save_weights(OUT / "keras2_arch_weights.h5")
    x = rng.normal(size=(2, 4, 3)).astype("float32")
    np.savez(OUT / "keras2_arch.npz", x=x, y=np.asarray(model(x, training=False)))


GROUPS = {"original": original, "repairs": repairs, "json": json_architecture}


def main(names: list[str]) -> None:
    OUT.mkdir(exist_ok=True)
    unknown = sorted(set(names) - set(GROUPS))
    if unknown:
        sys.exit(f"unknown group(s) {unknown}; choose from {sorted(GROUPS)}")
    if not names:
        for p in OUT.glob("*"):
            p.unlink()
    for name in names or list(GROUPS):
        GROUPS[name]()
    for p in sorted(OUT.glob("*")):
        print(f"{p.name:28s} {p.stat().st_size:8d} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])

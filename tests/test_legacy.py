"""kmerge.legacy: genuine Keras 2 (tf_keras) .h5 files load in Keras 3 with the same outputs.

The fixtures in tests/data/legacy/ come from tests/data/make_legacy.py (run with tf_keras);
each NAME.npz holds the reference input ``x`` and the output ``y`` tf_keras computed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from kmerge.errors import ModelLoadError
from kmerge.io import load, load_info
from kmerge.legacy import repair_config

DATA = Path(__file__).parent / "data" / "legacy"

# fixture -> phrases its repairs must contain (each one a change Keras 3.15 needs or a Keras 2 quirk)
EXPECTED = {
    "mlp": ["InputLayer"],
    "mlp_old": ["batch_input_shape [None, 4] -> InputLayer 'dense_input'"],
    "cnn": ["'separable_conv2d': dropped Keras 2 argument kernel_initializer",
            "'separable_conv2d': dropped Keras 2 argument groups=1",
            "'batch_normalization': axis [3] -> 3", "single input 'input_1' unwrapped"],
    "cnn_old": ["class name Model -> Functional", "dtype policy dict Policy -> 'float32'",
                "VarianceScaling distribution 'normal' -> 'truncated_normal'"],
    "rnn": ["layer 'lstm': dropped Keras 2 argument time_major=False",
            "layer 'gru': dropped Keras 2 argument time_major=False"],
    "embedding": ["'embedding': dropped Keras 2 argument input_length=6",
                  "'simple_rnn': dropped Keras 2 argument time_major=False"],
    "embedding_old": ["'embedding': batch_input_shape [None, 6] -> InputLayer"],
    "nested": ["layer 'head': input from nested model 'encoder' re-indexed to Keras 3 node 0"],
    "nested_sequential": ["layer 'head': input from nested model 'block' re-indexed"],
    "nested_old": ["class name Model -> Functional", "nested model 'encoder'"],
}


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_loads_with_reference_outputs(name):
    path = DATA / f"{name}.h5"
    before = _digest(path)
    model = load(path)
    ref = np.load(DATA / f"{name}.npz")
    y = keras.ops.convert_to_numpy(model(ref["x"], training=False))
    np.testing.assert_allclose(y, ref["y"], atol=1e-5, rtol=0)
    info = load_info(model)
    assert info.format == "h5-keras2" and info.keras_version.startswith("2.")
    assert not info.inference_only and not model.compiled
    text = "\n".join(info.repairs)
    for phrase in EXPECTED[name]:
        assert phrase in text, f"{phrase!r} not in repairs:\n{text}"
    assert _digest(path) == before


def test_old_training_config_is_ignored():
    with h5py.File(DATA / "mlp_old.h5") as f:
        assert '"lr": 0.001' in f.attrs["training_config"]
    assert not load(DATA / "mlp_old.h5").compiled


def test_nested_model_is_a_real_submodel():
    model = load(DATA / "nested.h5")
    encoder = model.get_layer("encoder")
    assert isinstance(encoder, keras.Model)
    bn = encoder.get_layer("batch_normalization_1")
    with h5py.File(DATA / "nested.h5") as f:
        mean = f["model_weights/encoder/batch_normalization_1/moving_mean:0"][()]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_mean), mean)


def test_keras2_weights_only_file():
    with pytest.raises(ModelLoadError, match=r"mlp_weights_only\.h5: holds only weights.*"
                                             r"build the architecture.*model\.load_weights"):
        load(DATA / "mlp_weights_only.h5")


def test_keras2_lambda_refused_under_safe_mode():
    with pytest.raises(ModelLoadError, match=r"lambda\.h5: contains a Lambda layer.*"
                                             r"safe_mode=False only if you trust the file"):
        load(DATA / "lambda.h5")


class Scale(keras.layers.Layer):
    def __init__(self, factor: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def test_keras2_unknown_custom_layer():
    with pytest.raises(ModelLoadError, match=r"custom_layer\.h5: uses the custom class 'Scale'.*"
                                             r"custom_objects="):
        load(DATA / "custom_layer.h5")
    model = load(DATA / "custom_layer.h5", custom_objects={"fixture>Scale": Scale})
    ref = np.load(DATA / "custom_layer.npz")
    y = keras.ops.convert_to_numpy(model(ref["x"], training=False))
    np.testing.assert_allclose(y, ref["y"], atol=1e-5, rtol=0)


def _edited_copy(tmp_path: Path, name: str, edit) -> Path:
    dst = tmp_path / f"{name}.h5"
    shutil.copy(DATA / f"{name}.h5", dst)
    with h5py.File(dst, "r+") as f:
        cfg = json.loads(f.attrs["model_config"])
        edit(cfg)
        f.attrs["model_config"] = json.dumps(cfg)
    return dst


def _layer_cfg(cfg: dict, name: str) -> dict:
    return next(lyr for lyr in cfg["config"]["layers"] if lyr["config"]["name"] == name)


def test_weight_shape_mismatch_names_layer_and_shapes(tmp_path):
    path = _edited_copy(tmp_path, "nested", lambda c: _layer_cfg(c, "head")["config"].update(units=3))
    with pytest.raises(ModelLoadError, match=r"nested\.h5: layer 'head' weight 'head/kernel:0' has "
                                             r"shape \(4, 2\) in the file but the rebuilt layer "
                                             r"expects \(4, 3\)"):
        load(path)


def test_time_major_true_is_refused(tmp_path):
    path = _edited_copy(tmp_path, "rnn",
                        lambda c: _layer_cfg(c, "lstm")["config"].update(time_major=True))
    with pytest.raises(ModelLoadError, match=r"rnn\.h5: layer 'lstm' \(LSTM\) was saved with "
                                             r"time_major=True"):
        load(path)


def test_unknown_meaningful_argument_is_refused(tmp_path):
    path = _edited_copy(tmp_path, "mlp",
                        lambda c: c["config"]["layers"][1]["config"].update(magic=3))
    with pytest.raises(ModelLoadError, match=r"mlp\.h5: layer 'dense' \(Dense\) uses the Keras 2 "
                                             r"argument magic=3"):
        load(path)


def test_repair_config_does_not_mutate_and_builds_input_layer():
    cfg = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "Dense", "config": {"name": "d", "units": 2, "input_dim": 3,
                                           "input_dtype": "float32"}}]}}
    original = json.dumps(cfg)
    fixed, repairs = repair_config(cfg)
    assert json.dumps(cfg) == original
    first = fixed["config"]["layers"][0]
    assert first == {"class_name": "InputLayer",
                     "config": {"batch_shape": [None, 3], "dtype": "float32", "name": "d_input"}}
    assert "input_dim" not in fixed["config"]["layers"][1]["config"]
    assert any("InputLayer 'd_input'" in r for r in repairs)
    model = keras.Sequential.from_config(fixed["config"])
    assert model.input_shape == (None, 3)


def test_rnn_implementation_1_is_normalized_and_reported(tmp_path):
    """Keras 3 does not save ``implementation``: a model kept at 1 would change in the last bit
    after a save and load (and its merge would no longer verify against it)."""
    path = _edited_copy(tmp_path, "rnn",
                        lambda c: _layer_cfg(c, "lstm")["config"].update(implementation=1))
    model = load(path)
    assert "layer 'lstm': implementation 1 -> 2" in "\n".join(load_info(model).repairs)
    ref = np.load(DATA / "rnn.npz")
    y = keras.ops.convert_to_numpy(model(ref["x"], training=False))
    np.testing.assert_allclose(y, ref["y"], atol=1e-5, rtol=0)
    assert model.get_layer("lstm").cell.implementation == 2

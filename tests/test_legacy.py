"""kmerge.legacy: genuine Keras 2 (tf_keras) .h5 files load in Keras 3 with the same outputs.

The fixtures in tests/data/legacy/ come from tests/data/make_legacy.py (run with tf_keras);
each NAME.npz holds the reference input ``x`` and the output ``y`` tf_keras computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

import kmerge
from kmerge.errors import InvalidArgumentError, ModelLoadError
from kmerge.io import load, load_info, save
from kmerge.legacy import repair_config
from kmerge.legacy_activations import keras2_hard_sigmoid

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
    # Keras 2 hard_sigmoid is clip(0.2x + 0.5, 0, 1), Keras 3's relu6(x + 3) / 6
    "hard_sigmoid": [f"layer '{name}': {key} 'hard_sigmoid' -> kmerge>keras2_hard_sigmoid"
                     for name, key in [("lstm", "recurrent_activation"),
                                       ("gru", "recurrent_activation"),
                                       ("simple_rnn", "activation"), ("dense", "activation"),
                                       ("activation", "activation")]],
    # Keras <= 2.1.4 wrote no reset_after and computed reset_after=False (Keras 3 default: True)
    "gru_old": ["layer 'gru_1': no reset_after", "layer 'gru_cell': no reset_after"],
    # Keras 2.0-2.2.2: a Sequential config is a bare list; wrapped layers carry no module
    "sequential_list_old": [
        "model 'sequential': Keras 2.0-2.2 list-form Sequential config",
        "batch_input_shape [None, 6] -> InputLayer 'embedding_input'",
        "layer 'bidirectional': inner GRU 'gru_2' given module 'keras.layers'",
        "layer 'bidirectional_1': inner LSTM 'lstm_1' given module 'keras.layers'",
        "layer 'time_distributed': inner Dense 'dense_3' given module 'keras.layers'",
        "layer 'gru_2': no reset_after",
        "layer 'lstm_1': recurrent_activation 'hard_sigmoid' -> kmerge>keras2_hard_sigmoid"],
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


# ---- Keras 2 semantics Keras 3 changed -------------------------------------------------------------

def test_keras2_hard_sigmoid_is_the_keras2_function():
    x = np.linspace(-6, 6, 49, dtype="float32")
    y = keras.ops.convert_to_numpy(keras2_hard_sigmoid(x))
    np.testing.assert_allclose(y, np.clip(0.2 * x + 0.5, 0.0, 1.0), atol=1e-7, rtol=0)
    # why the repair exists: Keras 3's hard_sigmoid has slope 1/6, not 0.2
    k3 = keras.ops.convert_to_numpy(keras.activations.hard_sigmoid(x))
    assert np.abs(k3 - y).max() > 0.08  # 1/12 at x = +-2.5


def test_repaired_keras2_model_saves_merges_and_reloads(tmp_path):
    """The replacement activation is serializable: kmerge.save -> kmerge.load (no
    custom_objects) and plain keras.models.load_model, also for a merge of the model."""
    model = load(DATA / "hard_sigmoid.h5")
    ref = np.load(DATA / "hard_sigmoid.npz")
    saved = save(model, tmp_path / "hs.keras")
    for again in (load(saved), keras.models.load_model(saved, compile=False)):
        y = keras.ops.convert_to_numpy(again(ref["x"], training=False))
        np.testing.assert_allclose(y, ref["y"], atol=1e-5, rtol=0)
    merged = kmerge.parallel({"a": model, "b": load(DATA / "hard_sigmoid.h5")}, combine="average")
    back = load(save(merged, tmp_path / "merged.keras"))
    y = keras.ops.convert_to_numpy(back(ref["x"], training=False))
    np.testing.assert_allclose(y, ref["y"], atol=1e-5, rtol=0)


def test_plain_keras_loads_a_repaired_model_after_import_kmerge(tmp_path):
    saved = save(load(DATA / "hard_sigmoid.h5"), tmp_path / "hs.keras")
    code = ("import kmerge, keras, numpy as np, sys; "
            "m = keras.models.load_model(sys.argv[1], compile=False); "
            "print(m.get_layer('lstm').cell.recurrent_activation.__name__)")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code, str(saved)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("keras2_hard_sigmoid")


def test_gru_with_reset_after_is_left_alone():
    cfg = {"class_name": "GRU", "config": {"name": "g", "units": 2, "reset_after": True,
                                           "recurrent_activation": "sigmoid"}}
    fixed, repairs = repair_config(cfg)
    assert fixed == cfg and repairs == []


def test_keras2_serialized_hard_sigmoid_dict_is_repaired():
    """tf_keras 2.13+ may serialize an activation as a function dict, not a string."""
    cfg = {"class_name": "Dense", "config": {"name": "d", "units": 2, "activation": {
        "module": "keras.activations", "class_name": "function", "config": "hard_sigmoid",
        "registered_name": "hard_sigmoid"}}}
    fixed, repairs = repair_config(cfg)
    layer = keras.layers.Dense.from_config(fixed["config"])
    assert layer.activation is keras2_hard_sigmoid
    assert repairs == ["layer 'd': activation 'hard_sigmoid' -> kmerge>keras2_hard_sigmoid "
                       "(Keras 2's hard_sigmoid is clip(0.2x + 0.5, 0, 1); Keras 3's is another "
                       "function)"]


# ---- Keras 2 JSON architecture + weights ---------------------------------------------------------

def test_keras2_json_with_weights_loads_with_reference_outputs():
    arch, weights = DATA / "keras2_arch.json", DATA / "keras2_arch_weights.h5"
    before = (_digest(arch), _digest(weights))
    model = load(arch, weights=weights)
    ref = np.load(DATA / "keras2_arch.npz")
    y = keras.ops.convert_to_numpy(model(ref["x"], training=False))
    np.testing.assert_allclose(y, ref["y"], atol=1e-5, rtol=0)
    info = load_info(model)
    assert info.format == "json-keras2" and info.keras_version.startswith("2.")
    assert info.path == str(arch) and info.weights == str(weights)
    assert "layer 'lstm_2': recurrent_activation 'hard_sigmoid' -> kmerge>keras2_hard_sigmoid" \
        in "\n".join(info.repairs)
    assert (_digest(arch), _digest(weights)) == before


def test_keras2_json_weights_from_a_whole_model_file_with_other_layers_is_refused():
    with pytest.raises(ModelLoadError, match=r"mlp\.h5: the file holds weights for layer 'dense'.*"
                                             r"pass the weights saved from the model in "
                                             r"keras2_arch\.json"):
        load(DATA / "keras2_arch.json", weights=DATA / "mlp.h5")


def test_json_without_weights_says_weights_are_needed():
    with pytest.raises(ModelLoadError, match=r"keras2_arch\.json: is a model architecture without "
                                             r"weights; pass the weights file too: "
                                             r"kmerge\.load\('keras2_arch\.json', weights="):
        load(DATA / "keras2_arch.json")


def test_weights_argument_only_for_json():
    with pytest.raises(InvalidArgumentError, match=r"mlp\.h5: weights= is only for a \.json"):
        load(DATA / "mlp.h5", weights=DATA / "keras2_arch_weights.h5")


# ---- Keras 3.0-3.10 .keras archives --------------------------------------------------------------

def test_keras38_single_tensor_lists_are_unwrapped(tmp_path):
    path = DATA / "keras38_nested.keras"
    before = _digest(path)
    model = load(path)
    ref = np.load(DATA / "keras38_nested.npz")
    # under filterwarnings=error this call also proves the structure warning is gone
    y = keras.ops.convert_to_numpy(model(ref["x"], training=False))
    np.testing.assert_allclose(y, ref["y"], atol=1e-6, rtol=0)
    info = load_info(model)
    assert info.format == "keras" and info.keras_version == "3.8.0"
    assert info.repairs == tuple(
        f"model '{m}': single {k} '{t}' unwrapped from a one-element list (Keras 3.8.0 wrote "
        "single tensors that way)" for m, k, t in [("outer", "input", "x"),
                                                   ("outer", "output", "head"),
                                                   ("encoder", "input", "enc_in"),
                                                   ("encoder", "output", "enc_out")])
    assert _digest(path) == before
    assert isinstance(model.get_layer("encoder").output, keras.KerasTensor)
    # the repaired model saves and loads as a current .keras, with nothing left to repair
    again = load(save(model, tmp_path / "now.keras"))
    assert load_info(again).repairs == ()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(again(ref["x"])), ref["y"], atol=1e-6)

"""The graph replay engine on the graphs that broke kmerge 0.1: masks, keras.ops, siamese
nested models, init-time weights, layers with state outside their weights, layers with inner
randomness, multi-output taps. Every merge is compared with its source bit-exactly."""

import keras
import numpy as np
import pytest
from conftest import predict

import kmerge
from kmerge.errors import TapError, VerificationError
from kmerge.graph.replay import walk


def _tokens(n=6, steps=7, seed=0):
    """Padded id sequences: trailing zeros of different lengths (mask_zero pads)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 20, size=(n, steps)).astype("int32")
    for i in range(n):
        x[i, rng.integers(2, steps):] = 0
    return x


def _text_model(kind: str, *, seed=0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((7,), dtype="int32")
    h = keras.layers.Embedding(20, 5, mask_zero=True)(inp)
    rnn = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}[kind]
    h = rnn(4, return_sequences=True)(h)
    h = rnn(3)(h)
    return keras.Model(inp, keras.layers.Dense(2, activation="softmax")(h))


def _masking_gru(seed=0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((7, 3))
    h = keras.layers.Masking(0.0)(inp)
    h = keras.layers.GRU(4)(h)
    return keras.Model(inp, keras.layers.Dense(2)(h))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_embedding_mask_zero_merges_bit_exactly_on_padded_input(kind):
    a, b = _text_model(kind, seed=0), _text_model(kind, seed=1)
    m = kmerge.parallel({"a": a, "b": b}, combine="concat")
    x = _tokens()
    out = predict(m, x)
    np.testing.assert_array_equal(out[:, :2], predict(a, x))
    np.testing.assert_array_equal(out[:, 2:], predict(b, x))
    assert kmerge.verify(m, {"a": a, "b": b}, x=x).ok
    assert any(type(op).__name__ == "NotEqual" for op in m.operations)  # the mask is computed
    plan = kmerge.parallel({"a": a, "b": b}, combine="concat", dry_run=True)
    assert "a" in str(plan)


def test_masking_layer_then_gru():
    a = _masking_gru()
    x = np.random.default_rng(0).normal(size=(5, 7, 3)).astype("float32")
    x[:, 4:] = 0.0  # padded steps
    m = kmerge.parallel({"a": a, "b": _masking_gru(seed=1)}, combine="concat")
    np.testing.assert_array_equal(predict(m, x)[:, :2], predict(a, x))
    assert kmerge.verify(m, {"a": a}, x=x).ok


def _pooled_text_model(seed):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((7,), dtype="int32")
    h = keras.layers.Embedding(20, 5, mask_zero=True)(inp)
    h = keras.layers.GlobalAveragePooling1D()(h)  # mask-aware
    h = keras.layers.Dense(8, activation="relu")(h)
    return keras.Model(inp, keras.layers.Dense(2)(h))


def test_masked_models_align_and_merge_in_weight_space():
    from kmerge.errors import InvalidArgumentError

    a, c = _pooled_text_model(0), _pooled_text_model(2)
    aligned = kmerge.align(a, c, method="weights")
    np.testing.assert_allclose(predict(aligned, _tokens()), predict(c, _tokens()), atol=1e-5)
    soup = kmerge.merge_weights([a, c], method="linear", align="weights")
    assert np.all(np.isfinite(predict(soup, _tokens())))
    # recurrent units are not permuted: a typed error that says so, not a crash
    with pytest.raises(InvalidArgumentError, match="recurrent layer"):
        kmerge.merge_weights([_text_model("gru", seed=0), _text_model("gru", seed=2)],
                             method="linear", align="weights")


def test_keras_ops_in_the_graph():
    def model(seed):
        keras.utils.set_random_seed(seed)
        inp = keras.Input((4,))
        h = keras.layers.Dense(3)(inp)
        h = h * 2.0 + keras.ops.relu(h)
        return keras.Model(inp, keras.layers.Dense(2)(keras.ops.tanh(h)))

    a, b = model(0), model(1)  # both hold operations named 'multiply', 'add', ...
    m = kmerge.parallel({"a": a, "b": b}, combine="concat")
    names = [op.name for op in m.operations]
    assert len(names) == len(set(names))
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    np.testing.assert_array_equal(predict(m, x)[:, :2], predict(a, x))
    np.testing.assert_array_equal(predict(m, x)[:, 2:], predict(b, x))
    relu = [op.name for op in a.operations if type(op).__name__ == "Relu"][0]
    add = [op.name for op in b.operations if type(op).__name__ == "Add"][0]
    f = kmerge.fuse({"a": (a, relu), "b": (b, add)}, combine="concat")
    assert kmerge.verify(f, {"a": a, "b": b}).ok


def test_siamese_encoder_inner_taps_use_one_numbering(tmp_path):
    keras.utils.set_random_seed(0)
    enc = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="e1"),
                            keras.layers.Dense(2, name="e2")], name="encoder")
    left, right = keras.Input((4,)), keras.Input((4,))
    d = keras.layers.Subtract()([enc(left), enc(right)])
    siamese = keras.Model([left, right], keras.layers.Dense(1)(d))
    w = walk(siamese)
    assert [c.index for c in w.calls_of(enc.get_layer("e1"))] == [0, 1]
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    f = kmerge.fuse({"s": (siamese, ["encoder/e1@0", "encoder/e1@1", "encoder@1"]),
                     "o": (other, -1)}, combine="concat", share_inputs=False)
    report = kmerge.verify(f, {"s": siamese, "o": other})
    assert [c.what for c in report.checks if c.source == "s"][-3:] == [
        "tap 'encoder/e1@0'", "tap 'encoder/e1@1'", "tap 'encoder@1'"]
    with pytest.raises(TapError, match="called 2 times.*'encoder/e1@0' .. 'encoder/e1@1'"):
        kmerge.fuse({"s": (siamese, ["encoder/e1"]), "o": (other, -1)}, share_inputs=False)
    path = tmp_path / "f.keras"
    kmerge.save(f, path)
    assert kmerge.verify(kmerge.load(path), {"s": siamese, "o": other}).ok


@keras.saving.register_keras_serializable(package="kmerge_tests")
class InitWeights(keras.layers.Layer):
    """A custom layer that creates its weights in __init__ (built before any call)."""

    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.w = self.add_weight(shape=(4, units), initializer="random_normal", name="w")
        self.built = True

    def call(self, x):
        return keras.ops.matmul(x, self.w)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def test_weights_created_in_init_are_copied():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    a = keras.Model(inp, InitWeights()(inp))
    m = kmerge.parallel({"a": a, "b": a}, combine="concat", verify=False)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    np.testing.assert_array_equal(predict(m, x)[:, :3], predict(a, x))


def _adapted(layer, data):
    try:
        layer.adapt(data)
    except ImportError as exc:  # Keras < 3.13 adapts some layers through tensorflow only
        pytest.skip(f"{type(layer).__name__}.adapt needs tensorflow in this Keras: {exc}")
    return layer


@pytest.mark.parametrize("kind", ["Normalization", "Discretization"])
def test_adapted_preprocessing_layers_keep_their_state(kind):
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(64, 4)) * 5 + 3).astype("float32")
    layer = _adapted(keras.layers.Normalization() if kind == "Normalization"
                     else keras.layers.Discretization(num_bins=4), data)
    inp = keras.Input((4,))
    a = keras.Model(inp, keras.ops.cast(layer(inp), "float32"))
    m = kmerge.parallel({"a": a, "b": a}, combine="concat", verify=False)
    x = data[:5]
    want = predict(a, x)
    np.testing.assert_array_equal(predict(m, x)[:, :4], want)
    if kind == "Normalization":
        assert abs(float(want.mean())) < 1.0  # really normalized, not passed through
    else:
        assert len(np.unique(want)) > 1  # really binned


def test_adapted_lookup_layers_keep_their_vocabulary():
    pytest.importorskip("tensorflow")
    words = np.array([["a", "b"], ["c", "a"], ["b", "b"]])
    lookup = keras.layers.StringLookup()
    lookup.adapt(words)
    ints = keras.layers.IntegerLookup()
    ints.adapt(np.array([[7, 9], [9, 11]]))
    s_in = keras.Input((2,), dtype="string")
    i_in = keras.Input((2,), dtype="int64")
    a = keras.Model([s_in, i_in], keras.layers.Concatenate()([
        keras.ops.cast(lookup(s_in), "float32"), keras.ops.cast(ints(i_in), "float32")]))
    from kmerge.graph.rebuild import rebuild

    ins = [keras.Input((2,), dtype="string"), keras.Input((2,), dtype="int64")]
    r = rebuild(a, ins, name="a", freeze=True, taken=set())
    copy = r.copy_of(lookup)
    assert copy.get_vocabulary() == lookup.get_vocabulary()
    assert r.copy_of(ints).get_vocabulary() == ints.get_vocabulary()


def _dropout_sources(seed):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5, 3))
    h = keras.layers.LSTM(4, dropout=0.5, recurrent_dropout=0.3, return_sequences=True)(inp)
    h = keras.layers.MultiHeadAttention(2, 4, dropout=0.5)(h, h)
    h = keras.layers.Attention(dropout=0.5)([h, h])
    h = keras.layers.GRU(3, dropout=0.5)(h)
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax")(h))


def test_frozen_sources_with_inner_randomness_compute_inference_in_fit():
    a, b = _dropout_sources(0), _dropout_sources(1)
    m = kmerge.parallel({"a": a, "b": b}, head=kmerge.heads.classifier(3))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5, 3)).astype("float32")
    y = rng.integers(0, 3, size=40)
    assert kmerge.verify(m, {"a": a, "b": b}).ok
    start = m.get_weights()
    cached = kmerge.fit_head(m, x, y, epochs=2, batch_size=10, seed=3, verbose=0)
    assert cached.kmerge["cache"] is not None
    m.set_weights(start)
    plain = kmerge.fit_head(m, x, y, epochs=2, batch_size=10, seed=3, verbose=0, cache=None)
    np.testing.assert_allclose(cached.history["loss"], plain.history["loss"], rtol=1e-5,
                               atol=1e-6)


def test_plain_fit_moves_no_frozen_variable_of_any_layer_kind():
    a, b = _dropout_sources(0), _dropout_sources(1)
    m = kmerge.parallel({"a": a, "b": b}, head=kmerge.heads.classifier(3))
    frozen = {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in m.weights
              if not v.trainable}
    assert not any(v.trainable for v in m.weights if v.path.startswith(("a_", "b_")))
    m.compile("adam", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    m.fit(rng.normal(size=(20, 5, 3)).astype("float32"), rng.integers(0, 3, 20), epochs=2,
          verbose=0)
    for v in m.weights:
        if v.path in frozen:
            np.testing.assert_array_equal(np.array(keras.ops.convert_to_numpy(v)),
                                          frozen[v.path], err_msg=v.path)
    assert kmerge.verify(m, {"a": a, "b": b}).ok


def test_frozen_random_layers_survive_save_and_load(tmp_path):
    a, b = _dropout_sources(0), _dropout_sources(1)
    m = kmerge.parallel({"a": a, "b": b}, combine="concat")
    path = tmp_path / "m.keras"
    kmerge.save(m, path)
    back = kmerge.load(path)
    x = np.random.default_rng(0).normal(size=(4, 5, 3)).astype("float32")
    np.testing.assert_array_equal(predict(back, x), predict(m, x))
    assert kmerge.verify(back, {"a": a, "b": b}).ok


def test_tap_one_output_of_a_multi_output_layer():
    keras.utils.set_random_seed(0)
    inp = keras.Input((5, 3))
    seq, h, c = keras.layers.LSTM(4, return_sequences=True, return_state=True, name="lstm")(inp)
    a = keras.Model(inp, keras.layers.Dense(2)(h))
    f = kmerge.fuse({"a": (a, ["lstm[1]", "lstm[2]"])}, combine="concat")
    report = kmerge.verify(f, {"a": a})
    assert [c.what for c in report.checks][-2:] == ["tap 'lstm[1]'", "tap 'lstm[2]'"]
    with pytest.raises(TapError, match=r"3 outputs.*lstm\[0\]"):
        kmerge.fuse({"a": (a, ["lstm", "dense"])})
    with pytest.raises(TapError, match=r"outputs \[0\]..\[2\], not \[3\]"):
        kmerge.fuse({"a": (a, ["lstm[3]", "dense"])})


def test_verify_refuses_checks_that_compare_nothing():
    keras.utils.set_random_seed(0)
    a = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    m = kmerge.parallel({"a": a, "b": a}, combine="concat")
    with pytest.raises(VerificationError, match="empty batch"):
        kmerge.verify(m, {"a": a}, batch=0)
    with pytest.raises(VerificationError, match="no example"):
        kmerge.verify(m, {"a": a}, x=np.zeros((0, 4), "float32"))
    with pytest.raises(VerificationError, match="NaN"):
        kmerge.verify(m, {"a": a}, x=np.full((3, 4), np.nan, "float32"))
    with pytest.raises(VerificationError, match="no source given"):
        kmerge.verify(m, {})
    meta = kmerge.info(m)
    assert meta["sources"]["a"]["outputs"]
    from kmerge.metadata import meta_of

    for entry in meta_of(m)["sources"].values():
        entry["outputs"], entry["taps"] = [], []
    with pytest.raises(VerificationError, match="nothing to compare"):
        kmerge.verify(m, {"a": a})


def test_verify_refuses_non_finite_outputs():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    a = keras.Model(inp, keras.ops.log(keras.layers.Dense(2)(inp)))  # log of negatives: NaN
    with pytest.raises(VerificationError, match="NaN or infinite"):
        kmerge.parallel({"a": a, "b": a}, combine="concat")


def test_kmerge_info_is_a_copy():
    keras.utils.set_random_seed(0)
    a = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    m = kmerge.parallel({"a": a, "b": a}, combine="concat")
    meta = kmerge.info(m)
    meta["kind"] = "edited"
    assert kmerge.info(m)["kind"] == "parallel"
    assert kmerge.info(a) is None


def test_state_outside_the_config_is_copied():
    """Keras's LSTM/GRU config omits ``implementation``; a copy from config alone computes with
    the default (2), which rounds differently from the source's 1 (a real packaged Keras 2 model,
    ethnicolr's nc_voter LSTM, differed by 6e-7)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 3))
    h = keras.layers.LSTM(5, implementation=1, return_sequences=True)(inp)
    a = keras.Model(inp, keras.layers.GRU(4, implementation=1)(h))
    m = kmerge.parallel({"a": a, "b": a}, combine="concat")  # verify inside
    x = np.random.default_rng(0).normal(size=(4, 6, 3)).astype("float32")
    # weights detached on both sides (on torch a frozen weight takes another matmul path)
    from kmerge.graph.compiled import predict as detached

    np.testing.assert_array_equal(detached(m, x)[0][:, :4], detached(a, x)[0])


def test_merge_of_merges_with_frozen_random_layers():
    a, b = _dropout_sources(0), _dropout_sources(1)
    first = kmerge.parallel({"a": a, "b": b}, combine="concat")  # holds Inference wrappers
    again = kmerge.parallel({"m": first, "c": _dropout_sources(2)}, combine="concat")
    assert kmerge.verify(again, {"m": first}).ok
    x = np.random.default_rng(0).normal(size=(3, 5, 3)).astype("float32")
    from kmerge.graph.compiled import predict as detached

    np.testing.assert_array_equal(detached(again, x)[0][:, :6], detached(first, x)[0])

"""Graph rebuild: prefixed copies, exact weights, taps, nested models, sources untouched."""

import keras
import numpy as np
import pytest
from conftest import cnn, mlp, nested, predict, same_weights, weights_of, x_for

import kmerge
from kmerge.errors import InvalidModelError, LayerNotFoundError, TapError
from kmerge.graph.replay import walk


def test_same_model_twice_and_identical_names():
    a, b = mlp(), mlp(seed=1)  # both: layers "dense", "dense_1"-style default names
    m = kmerge.parallel([a, a, b], combine="concat")
    names = [layer.name for layer in m.layers]
    assert len(names) == len(set(names))
    x = x_for(a)
    out = predict(m, x)
    np.testing.assert_array_equal(out[:, :3], predict(a, x))
    np.testing.assert_array_equal(out[:, 3:6], predict(a, x))
    np.testing.assert_array_equal(out[:, 6:], predict(b, x))


def test_sources_never_modified():
    a, b = cnn(), nested()
    before = [(weights_of(m), [layer.name for layer in m.layers],
               [layer.trainable for layer in m.layers]) for m in (a, b)]
    m = kmerge.parallel({"a": a, "b": mlp(inputs=8)}, combine="concat", freeze=False,
                        share_inputs=False)
    m.compile(optimizer="sgd", loss="mse")
    m.fit([x_for(a, 8), x_for(mlp(), 8)], np.ones((8, 6)), epochs=1, verbose=0)
    after = [(weights_of(x), [layer.name for layer in x.layers],
              [layer.trainable for layer in x.layers]) for x in (a, b)]
    for (w0, n0, t0), (w1, n1, t1) in zip(before, after):
        assert same_weights(w0, w1) and n0 == n1 and t0 == t1


def test_nested_model_inlined_and_tappable_by_path():
    src = nested()
    m = kmerge.fuse({"a": (src, ["block_1/conv", "out"])}, head=None, pooling="auto")
    # nested layers become ordinary layers of the merged graph; each runs once
    assert "a_block_1_conv" in [layer.name for layer in m.layers]
    w = walk(m)
    assert all(len(w.calls_of(layer)) == 1 for layer in m.layers
               if layer.name.startswith("a_") and layer.name != "a_shared")
    x = x_for(src)
    inner = keras.Model(src.get_layer("block_1").inputs[0],
                        src.get_layer("block_1").get_layer("conv").output)
    stem = keras.Model(src.inputs[0], src.get_layer("stem").output)
    expected = np.concatenate([predict(inner, predict(stem, x)), predict(src, x)], axis=-1)
    np.testing.assert_array_equal(predict(m, x), expected)


def test_shared_layer_needs_call_index():
    src = nested()
    with pytest.raises(TapError, match="called 2 times.*shared@0"):
        kmerge.fuse({"a": (src, ["shared", "out"])})
    m = kmerge.fuse({"a": (src, ["shared@0", "shared@1"])})
    assert m.output.shape[-1] == 12


def test_tap_by_index_and_negative_index():
    src = mlp(hidden=5)
    m = kmerge.fuse({"a": (src, [0, -1])})
    assert tuple(m.output.shape) == (None, 5 + 3)
    x = x_for(src)
    hidden = keras.Model(src.inputs[0], src.layers[0].output)
    np.testing.assert_array_equal(predict(m, x),
                                  np.concatenate([predict(hidden, x), predict(src, x)], axis=-1))


def test_unknown_layer_lists_nearest():
    with pytest.raises(LayerNotFoundError, match=r"no layer 'block_1/cnv'.*Nearest: block_1/conv"):
        kmerge.fuse({"a": (nested(), ["block_1/cnv", "out"])})
    with pytest.raises(LayerNotFoundError, match="out of range"):
        kmerge.fuse({"a": (mlp(), [0, 7])})


class Sub(keras.Model):
    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.d1 = keras.layers.Dense(5, activation="relu")
        self.d2 = keras.layers.Dense(units)

    def call(self, x):
        return self.d2(self.d1(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def _built_sub():
    keras.utils.set_random_seed(0)
    s = Sub(name="sub")
    s(np.zeros((1, 8), "float32"))
    return s


def test_subclassed_model_is_an_opaque_block():
    s, a = _built_sub(), mlp()
    m = kmerge.parallel({"s": s, "a": a}, combine="concat")
    x = x_for(a)
    np.testing.assert_array_equal(predict(m, x)[:, :3], predict(s, x))
    with pytest.raises(TapError, match="subclassed.*opaque"):
        kmerge.fuse({"s": (s, "d1"), "a": (a, 0)})


def test_unbuilt_and_non_keras_inputs_are_refused():
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(InvalidModelError, match="not been built"):
        kmerge.parallel([unbuilt, mlp()])
    with pytest.raises(InvalidModelError, match="not a keras.Model"):
        kmerge.parallel({"a": mlp(), "b": object()})
    sub = Sub()
    with pytest.raises(InvalidModelError, match="not built"):
        kmerge.parallel({"a": mlp(), "s": sub})


def test_multi_input_multi_output_source():
    keras.utils.set_random_seed(0)
    i1, i2 = keras.Input((4,), name="left"), keras.Input((3,), name="right")
    h = keras.layers.Concatenate()([keras.layers.Dense(5)(i1), keras.layers.Dense(5)(i2)])
    o1 = keras.layers.Dense(2, name="head_a")(h)
    o2 = keras.layers.Dense(4, name="head_b")(h)
    src = keras.Model([i1, i2], [o1, o2])
    other = keras.Model([i1, i2], o1)
    with pytest.raises(kmerge.errors.IncompatibleModelsError, match="2 outputs.*output="):
        kmerge.parallel({"s": src, "o": other})
    m = kmerge.parallel({"s": src, "o": other}, output={"s": "head_b"})
    assert [t.name for t in m.inputs] == ["left", "right"]
    x = [np.ones((2, 4), "float32"), np.ones((2, 3), "float32")]
    np_ = keras.ops.convert_to_numpy
    out = np_(m(x))
    np.testing.assert_array_equal(out[:, :4], np_(src(x)[1]))
    m1 = kmerge.parallel({"s": src, "o": other}, output={"s": 0}, combine="average")
    np.testing.assert_allclose(np_(m1(x)), (np_(src(x)[0]) + np_(other(x))) / 2, rtol=1e-6)

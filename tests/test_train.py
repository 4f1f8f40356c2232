"""fit_head (frozen-feature cache) and fine_tune: equivalence with plain fit, frozen weights
bit-identical, data sources, and every bad-input error."""

import keras
import numpy as np
import pytest
from conftest import cnn, mlp, same_weights

import kmerge
from kmerge.errors import InvalidArgumentError, LayerNotFoundError
from kmerge.train import StaleCacheWarning, split


def _data(n=48, seed=0, classes=3, shape=(8, 8, 1)):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, *shape)).astype("float32"),
            rng.integers(0, classes, n).astype("int32"))


def _merged(hidden=(8,)):
    a, b = cnn("a", seed=0), cnn("b", seed=1)
    return kmerge.parallel({"a": a, "b": b}, combine="concat",
                           head=kmerge.heads.classifier(3, hidden=list(hidden))), a, b


def _source_weights(model, prefix):
    return [np.array(w) for layer in model.layers if layer.name.startswith(prefix)
            for w in layer.get_weights()]


def test_split_finds_the_boundary_at_the_first_trainable_layer():
    m, _, _ = _merged()
    s = split(m)
    assert [tuple(t.shape[1:]) for t in s.boundary_tensors] == [(6,)]  # the concat of two (3,) outputs
    assert "head_dense_0" in s.trainable_layers and "head_output" in s.trainable_layers
    assert "combine_concat" in s.frozen_layers
    assert any(name.startswith("a_conv2d") for name in s.frozen_layers)


def test_stochastic_weightless_layers_end_the_frozen_part():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    h = keras.layers.Dense(4, trainable=False, name="frozen")(inp)
    h = keras.layers.Dropout(0.5, name="drop")(h)  # random in training mode: not cacheable
    out = keras.layers.Dense(2, activation="softmax", name="head")(h)
    s = split(keras.Model(inp, out))
    assert "drop" in s.trainable_layers and "frozen" in s.frozen_layers
    assert [t._keras_history[0].name for t in s.boundary_tensors] == ["frozen"]


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_losses_match_plain_fit_and_frozen_weights_stay(cache):
    m, a, b = _merged()
    x, y = _data()
    start = m.get_weights()
    frozen = [_source_weights(m, "a_"), _source_weights(m, "b_")]
    cached = kmerge.fit_head(m, x, y, epochs=3, batch_size=10, cache=cache, seed=3, verbose=0)
    trained = m.get_weights()
    assert cached.kmerge["cache"] == cache
    m.set_weights(start)
    plain = kmerge.fit_head(m, x, y, epochs=3, batch_size=10, cache=None, seed=3, verbose=0)
    np.testing.assert_allclose(cached.history["loss"], plain.history["loss"], rtol=1e-5, atol=1e-6)
    for w1, w2 in zip(trained, m.get_weights()):
        np.testing.assert_allclose(w1, w2, rtol=1e-4, atol=1e-6)
    assert not same_weights(start, trained)  # the head trained
    # frozen copies bit-identical, and equal to the untouched sources
    assert same_weights(frozen[0], _source_weights(m, "a_"))
    assert same_weights(frozen[1], _source_weights(m, "b_"))
    assert same_weights(frozen[0], [np.array(w) for w in a.get_weights()])
    assert cached.model is m


def test_validation_data_and_history_metrics():
    m, _, _ = _merged()
    x, y = _data()
    h = kmerge.fit_head(m, x, y, epochs=2, validation_data=_data(20, seed=1), seed=0, verbose=0)
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(h.history)
    assert len(h.history["val_loss"]) == 2
    m.evaluate(x, y, verbose=0)  # left compiled with the loss it trained on


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y, size=8, noise=0.0):
        super().__init__()
        self.x, self.y, self.size, self.noise = x, y, size, noise
        self.rng = np.random.default_rng(0)

    def __len__(self):
        return len(self.y) // self.size

    def __getitem__(self, i):
        sl = slice(i * self.size, (i + 1) * self.size)
        xb = self.x[sl]
        if self.noise:
            xb = xb + self.rng.normal(0, self.noise, xb.shape).astype("float32")
        return xb, self.y[sl]


def test_pydataset_cached_matches_uncached():
    m, _, _ = _merged()
    x, y = _data()
    start = m.get_weights()
    h1 = kmerge.fit_head(m, _Batches(x, y), epochs=2, seed=1, verbose=0)
    m.set_weights(start)
    h2 = kmerge.fit_head(m, _Batches(x, y), epochs=2, seed=1, verbose=0, cache=None)
    np.testing.assert_allclose(h1.history["loss"], h2.history["loss"], rtol=1e-5, atol=1e-6)


def test_generator_function_and_one_shot_generator():
    m, _, _ = _merged()
    x, y = _data()

    def gen():
        for i in range(0, len(y), 16):
            yield x[i:i + 16], y[i:i + 16]

    h = kmerge.fit_head(m, gen, epochs=2, seed=0, verbose=0)
    assert len(h.history["loss"]) == 2
    h = kmerge.fit_head(m, gen(), epochs=2, seed=0, verbose=0)
    assert len(h.history["loss"]) == 2


def test_augmentation_is_detected_and_cache_none_is_the_answer():
    m, _, _ = _merged()
    x, y = _data()
    with pytest.warns(StaleCacheWarning, match="cache=None"):
        kmerge.fit_head(m, _Batches(x, y, noise=0.1), epochs=1, seed=0, verbose=0)
    kmerge.fit_head(m, _Batches(x, y, noise=0.1), epochs=1, seed=0, verbose=0, cache=None)


def test_nothing_trainable_is_an_error():
    a, b = cnn(seed=0), cnn(seed=1)
    m = kmerge.parallel({"a": a, "b": b}, combine="average")
    x, y = _data()
    with pytest.raises(InvalidArgumentError, match="nothing trainable.*head"):
        kmerge.fit_head(m, x, y, epochs=1)


def test_length_mismatch_is_an_error():
    m, _, _ = _merged()
    x, y = _data()
    with pytest.raises(InvalidArgumentError, match="48 samples, y has 47"):
        kmerge.fit_head(m, x, y[:-1], epochs=1)


def test_labels_outside_the_head_classes_are_an_error():
    m, _, _ = _merged()
    x, _ = _data()
    y = np.arange(48, dtype="int32") % 5
    with pytest.raises(InvalidArgumentError, match=r"0\.\.4 but the head .* 3 classes.*classifier\(5\)"):
        kmerge.fit_head(m, x, y, epochs=1)


def test_inconsistent_generator_shapes_are_an_error():
    m, _, _ = _merged()

    def gen():
        yield np.zeros((4, 8, 8, 1), "float32"), np.zeros(4, "int32")
        yield np.zeros((4, 8, 9, 1), "float32"), np.zeros(4, "int32")

    with pytest.raises(InvalidArgumentError, match="inconsistent shapes.*batch 1"):
        kmerge.fit_head(m, gen, epochs=1, verbose=0)


def test_loss_cannot_be_inferred_without_a_hint():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="tanh")])
    with pytest.raises(InvalidArgumentError, match="Pass loss="):
        kmerge.fit_head(model, np.zeros((4, 4), "float32"), np.zeros((4, 2), "float32"),
                        epochs=1)
    h = kmerge.fit_head(model, np.zeros((4, 4), "float32"), np.zeros((4, 2), "float32"),
                        epochs=1, loss="mse", verbose=0)
    assert len(h.history["loss"]) == 1


def test_bad_arguments():
    m, _, _ = _merged()
    x, y = _data()
    with pytest.raises(InvalidArgumentError, match="cache must be"):
        kmerge.fit_head(m, x, y, epochs=1, cache="gpu")
    with pytest.raises(InvalidArgumentError, match="epochs"):
        kmerge.fit_head(m, x, y, epochs=0)
    with pytest.raises(InvalidArgumentError, match="drop y"):
        kmerge.fit_head(m, _Batches(x, y), y, epochs=1)


def test_fine_tune_unfreezes_top_layers_only_and_keeps_bn_frozen():
    m, _, _ = _merged(hidden=())
    x, y = _data()
    kmerge.fit_head(m, x, y, epochs=1, seed=0, verbose=0)
    before = {layer.name: [np.array(w) for w in layer.get_weights()] for layer in m.layers}
    h = kmerge.fine_tune(m, x, y, unfreeze="top:1", learning_rate=1e-3, epochs=2, seed=0,
                         verbose=0)
    dense = [la.name for la in m.layers if isinstance(la, keras.layers.Dense)
             and la.name[:2] in ("a_", "b_")]
    assert h.unfrozen == dense and len(dense) == 2
    for layer in m.layers:
        same = same_weights(before[layer.name], [np.array(w) for w in layer.get_weights()])
        if layer.name in (*dense, "head_output"):
            assert not same, layer.name
        else:
            assert same, layer.name  # conv and BatchNorm (moving stats too) untouched
    assert not any(la.trainable for la in m.layers
                   if isinstance(la, keras.layers.BatchNormalization))


def test_fine_tune_by_names_and_errors():
    m, _, _ = _merged(hidden=())
    x, y = _data()
    conv = [la.name for la in m.layers if isinstance(la, keras.layers.Conv2D)][0]
    bn = [la.name for la in m.layers if isinstance(la, keras.layers.BatchNormalization)][0]
    h = kmerge.fine_tune(m, x, y, unfreeze=[conv], epochs=1, seed=0, verbose=0)
    assert h.unfrozen == [conv]
    with pytest.raises(LayerNotFoundError, match=f"no layer '{conv}x'.*Nearest: {conv}"):
        kmerge.fine_tune(m, x, y, unfreeze=[conv + "x"], epochs=1)
    with pytest.raises(InvalidArgumentError, match="BatchNorm"):
        kmerge.fine_tune(m, x, y, unfreeze=[bn], epochs=1)
    with pytest.raises(InvalidArgumentError, match="top:N"):
        kmerge.fine_tune(m, x, y, unfreeze="bottom:1", epochs=1)


def test_sequential_model_with_trainable_head():
    model = mlp(seed=0)
    model.layers[0].trainable = False
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    y = np.arange(32, dtype="int32") % 3
    first = [np.array(w) for w in model.layers[0].get_weights()]
    h = kmerge.fit_head(model, x, y, epochs=2, seed=0, verbose=0)
    assert h.kmerge["boundary"] == [(16,)]
    assert same_weights(first, [np.array(w) for w in model.layers[0].get_weights()])


def _named(model_name, layer_names, seed):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name=layer_names[0])(inp)
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax", name=layer_names[1])(h),
                       name=model_name)


def test_sources_named_like_kmerge_layers_keep_their_own_layers():
    """A source named "head" (layers "fuse", "head") must not claim kmerge's head_* layers."""
    a = _named("head", ("fuse", "head"), 0)
    b = _named("combine", ("combine", "head"), 1)
    m = kmerge.fuse({"head": (a, ["fuse"]), "combine": (b, ["combine"])},
                    head=kmerge.heads.classifier(3))  # verified on build
    layers = kmerge.info(m)["sources"]
    assert layers["head"]["layers"] == ["head_fuse"]
    assert layers["combine"]["layers"] == ["combine_combine"]
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    y = np.arange(32) % 3
    history = kmerge.fine_tune(m, x, y, unfreeze="top:1", epochs=1, seed=0, verbose=0)
    assert sorted(history.unfrozen) == ["combine_combine", "head_fuse"]
    p = kmerge.parallel({"head": a, "combine": b}, head=kmerge.heads.classifier(3))
    sources = kmerge.info(p)["sources"]
    assert sources["head"]["layers"] == ["head_fuse", "head_head"]
    assert sources["combine"]["layers"] == ["combine_combine", "combine_head"]
    assert {layer.name for layer in p.layers} - {"input"} - set(
        sources["head"]["layers"]) - set(sources["combine"]["layers"]) == {
        "combine2_concat", "head2_output"}  # kmerge's own layers: no source's prefix


# -- a model kmerge hands back is clean (issue 10, item 4) -----------------------------------

def _node_counts(model) -> dict:
    from kmerge.training.split import _graph_operations

    return {id(op): (op.name, len(op._inbound_nodes), len(op._outbound_nodes))
            for op in _graph_operations(model)}


def _assert_clean(model, before: dict) -> None:
    assert _node_counts(model) == before  # every node a sub-model added is gone
    for layer in model.layers:
        assert len(layer._inbound_nodes) == 1, layer.name
        for node in layer._inbound_nodes:  # what plot_model draws as the layer's inputs
            for t in node.input_tensors:
                assert "CLONE" not in t.name and "boundary" not in t.name, (layer.name, t.name)


def test_fit_head_leaves_one_graph_and_a_consistent_optimizer(tmp_path):
    import json
    import warnings

    from kmerge.report import _text_diagram

    m, _, _ = _merged()
    x, y = _data()
    before = _node_counts(m)
    kmerge.fit_head(m, x, y, epochs=3, batch_size=10, seed=0, verbose=0)
    _assert_clean(m, before)
    text = "\n".join(_text_diagram(m)) + json.dumps(kmerge.info(m), default=str)
    assert "boundary" not in text and "CLONE" not in text
    # the full model holds the optimizer state it trained with, built for its own variables
    opt = m.optimizer
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 3 * 5
    assert len(opt.variables) == 2 + 2 * len(m.trainable_variables)  # Adam: m and v per variable
    moments = [v for v in opt.variables if v.name.endswith("_momentum")]
    assert moments and all(np.any(keras.ops.convert_to_numpy(v) != 0) for v in moments)
    path = tmp_path / "m.keras"
    kmerge.save(m, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Skipping variable loading for optimizer ..." fails
        loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(m(x)), keras.ops.convert_to_numpy(
        loaded(x)))
    assert [v.name for v in loaded.optimizer.variables] == [v.name for v in opt.variables]
    for a, b in zip(opt.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    assert all(len(layer._inbound_nodes) == 1 for layer in loaded.layers)


def test_fine_tune_nested_sources_and_failures_leave_no_nodes():
    from conftest import nested

    a, b = nested("a", seed=0), nested("b", seed=1)
    m = kmerge.parallel({"a": a, "b": b}, head=kmerge.heads.classifier(3))
    x = np.random.default_rng(0).normal(size=(24, 8)).astype("float32")
    y = np.arange(24, dtype="int32") % 3
    before = _node_counts(m)
    kmerge.fine_tune(m, x, y, unfreeze="top:1", learning_rate=1e-3, epochs=1, seed=0, verbose=0)
    assert _node_counts(m) == before  # shared source layers keep their own two nodes only

    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        kmerge.fit_head(m, x, y, epochs=1, seed=0, verbose=0, callbacks=[Boom()])
    assert _node_counts(m) == before


def test_feature_cache_progress_bar_has_a_label(capsys):
    m, _, _ = _merged()
    x, y = _data()
    kmerge.fit_head(m, x, y, epochs=1, seed=0, verbose=1)
    assert "caching frozen features (1 batches)" in capsys.readouterr().out

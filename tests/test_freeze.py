"""Frozen sources stay bit-identical through fit (all backends; tensorflow is the one that
silently trains frozen weights when a model is not recompiled)."""

import numpy as np
from conftest import cnn, mlp, predict, same_weights, x_for

import kmerge


def _fit(model, x, y):
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)


def _copied(model, prefix):
    """Weights of the merged model's copy of a source, in the source's order."""
    return [np.array(w) for layer in model.layers if layer.name.startswith(prefix)
            for w in layer.get_weights()]


def test_frozen_weights_and_bn_statistics_unchanged_after_fit():
    a, b = cnn(), mlp(inputs=64, dropout=0.5, seed=1)
    m = kmerge.parallel({"a": a, "b": b}, combine="concat", head=kmerge.heads.classifier(3),
                        share_inputs=False)
    head_before = [np.array(w) for w in m.get_layer("head_output").get_weights()]
    x = x_for(a, 16)
    _fit(m, [x, x.reshape(16, -1)], np.arange(16) % 3)
    # get_weights includes BatchNorm's moving mean and variance
    assert same_weights(_copied(m, "a_"), [np.array(w) for w in a.get_weights()])
    assert same_weights(_copied(m, "b_"), [np.array(w) for w in b.get_weights()])
    head_after = [np.array(w) for w in m.get_layer("head_output").get_weights()]
    assert not same_weights(head_before, head_after)  # the head did train
    kmerge.verify(m, {"a": a, "b": b})  # and the frozen branches still reproduce the sources
    assert any("Dropout runs as Identity (frozen)" in n for n in kmerge.info(m)["notes"])


def test_freeze_set_trains_only_the_unfrozen_source():
    a, b = mlp(seed=0), mlp(seed=1)
    m = kmerge.parallel({"a": a, "b": b}, combine="concat", freeze={"a"})
    x = x_for(a, 16)
    m.compile(optimizer="adam", loss="mse")
    m.fit(x, np.ones((16, 6)), epochs=2, batch_size=4, verbose=0)
    assert same_weights(_copied(m, "a_"), [np.array(w) for w in a.get_weights()])
    assert not same_weights(_copied(m, "b_"), [np.array(w) for w in b.get_weights()])
    np.testing.assert_array_equal(predict(m, x)[:, :3], predict(a, x))


def test_freeze_false_keeps_source_training_flags():
    a = mlp()
    a.layers[0].trainable = False
    m = kmerge.parallel({"a": a, "b": mlp(seed=1)}, freeze=False)
    assert not m.get_layer("a_" + a.layers[0].name).trainable
    assert m.get_layer("a_" + a.layers[1].name).trainable

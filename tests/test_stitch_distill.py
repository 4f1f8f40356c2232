"""stitch (convention, least squares, frozen parts, penalty report) and distill (loss, teacher
cache, ensembles), students.like, and their error paths."""

import keras
import numpy as np
import pytest
from conftest import same_weights

import kmerge
from kmerge.distillation import _Trainer, teacher_logits
from kmerge.errors import IncompatibleModelsError, LayerNotFoundError


def convnet(seed, width=4, name=None):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="conv_1")(inp)
    h = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="conv_2")(h)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(8, activation="relu", name="fc")(h)
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="out")(h), name=name)


def _data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8, 8, 1)).astype("float32"), rng.integers(0, 3, n).astype("int32")


def test_stitch_convention_and_frozen_parts():
    a, b = convnet(0, name="a"), convnet(1, width=6, name="b")
    x, y = _data()
    wa, wb = [np.array(w) for w in a.get_weights()], [np.array(w) for w in b.get_weights()]
    m = kmerge.stitch(a, b, at=("conv_1", "conv_2"), x=x, y=y, epochs=1, seed=0, verbose=0)
    names = [la.name for la in m.layers]
    # a up to and including conv_1; b from the layer after conv_2; nothing else.
    assert names == ["input", "a_conv_1", "stitch", "b_pool", "b_flat", "b_fc", "b_out"]
    assert tuple(m.get_layer("stitch").kernel.shape) == (1, 1, 4, 6)
    assert same_weights(m.get_layer("a_conv_1").get_weights(), wa[:2])
    assert same_weights([np.array(w) for la in names[3:] for w in m.get_layer(la).get_weights()],
                        wb[4:])
    assert same_weights([np.array(w) for w in a.get_weights()], wa)  # sources untouched
    assert same_weights([np.array(w) for w in b.get_weights()], wb)
    report = kmerge.info(m)["stitch"]
    assert report["metric"] == "accuracy" and report["at"] == ["conv_1", "conv_2"]
    assert report["penalty"] == pytest.approx(report["b_score"] - report["stitched_score"])
    assert 0.0 < report["least_squares_r2"] <= 1.0  # least squares beats the mean


def test_least_squares_recovers_an_exact_linear_map():
    # b's conv_1 features are an invertible linear map of a's: stitching a's conv_1 to b's
    # conv_1 with least squares must reproduce b exactly (up to float error).
    a = convnet(0, name="a")
    b = convnet(0, name="b")
    perm = np.array([2, 0, 3, 1])
    k, bias = b.get_layer("conv_1").get_weights()
    b.get_layer("conv_1").set_weights([k[..., perm], bias[perm]])
    k2, b2 = b.get_layer("conv_2").get_weights()
    b.get_layer("conv_2").set_weights([k2[:, :, perm, :], b2])
    x, y = _data()
    m = kmerge.stitch(a, b, at=("conv_1", "conv_1"), x=x, y=y, epochs=0, seed=0)
    np.testing.assert_allclose(m.predict(x, verbose=0), b.predict(x, verbose=0), atol=1e-4)
    assert kmerge.info(m)["stitch"]["least_squares_r2"] > 0.9999


def test_stitch_resizes_and_flattens():
    a, b = convnet(0), convnet(1)
    x, y = _data()
    m = kmerge.stitch(a, b, at=("conv_2", "fc"), x=x, y=y, epochs=0, seed=0)
    assert [la.name for la in m.layers][-3:] == ["stitch_flatten", "stitch", "b_out"]
    m = kmerge.stitch(a, b, at=("pool", "conv_1"), x=x, y=y, epochs=0, seed=0)
    assert "stitch_resize" in [la.name for la in m.layers]


def test_stitch_unknown_layer_names_the_nearest():
    a, b = convnet(0), convnet(1)
    x, y = _data()
    with pytest.raises(LayerNotFoundError, match="no layer 'conv2'.*Nearest: conv_2"):
        kmerge.stitch(a, b, at=("conv2", "conv_2"), x=x, y=y, epochs=0)
    with pytest.raises(LayerNotFoundError, match="model 'b' has no layer 'fc_9'"):
        kmerge.stitch(a, b, at=("conv_2", "fc_9"), x=x, y=y, epochs=0)


def test_stitch_refuses_a_cut_across_a_skip_connection():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    h = keras.layers.Dense(4, name="d1")(inp)
    h2 = keras.layers.Dense(4, name="d2")(h)
    out = keras.layers.Dense(3, activation="softmax", name="out")(keras.layers.Add(name="add")(
        [h, h2]))
    b = keras.Model(inp, out)
    a = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, name="e1")])
    x = np.random.default_rng(0).normal(size=(20, 4)).astype("float32")
    with pytest.raises(IncompatibleModelsError, match="'add'.*reads \\['d1'\\].*skip"):
        kmerge.stitch(a, b, at=("e1", "d2"), x=x, y=np.zeros(20, "int32"), epochs=0)


def test_distill_loss_is_keras_logits_distillation():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(6, 3)).astype("float32")
    s = rng.normal(size=(6, 3)).astype("float32")
    student = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)])
    trainer = _Trainer(student, classes=3, temperature=3.0, alpha=0.9, labels="none",
                       student_probs=False)
    ours = float(keras.ops.convert_to_numpy(trainer.compute_loss(y=t, y_pred=s)))
    # A KLDivergence *instance*: keras.losses.get("kl_divergence") (the default string) is the
    # bare function, which LogitsDistillation then applies to logits, without softmax or T^2.
    ref = keras.distillation.LogitsDistillation(
        temperature=3.0, loss=keras.losses.KLDivergence()).compute_loss(t, s)
    assert ours == pytest.approx(float(keras.ops.convert_to_numpy(ref)), rel=1e-5)
    # with labels: alpha * KD + (1 - alpha) * CE
    y = np.array([0, 1, 2, 0, 1, 2])
    packed = np.concatenate([t, y[:, None].astype("float32")], axis=1)
    trainer.labels = "sparse"
    both = float(keras.ops.convert_to_numpy(trainer.compute_loss(y=packed, y_pred=s)))
    ce = float(keras.ops.convert_to_numpy(keras.ops.mean(
        keras.losses.sparse_categorical_crossentropy(y, s, from_logits=True))))
    assert both == pytest.approx(0.9 * ours + 0.1 * ce, rel=1e-5)


class _Counting(keras.layers.Layer):
    calls = 0

    def call(self, x):
        _Counting.calls += 1
        return x


def test_distill_ensemble_caches_teacher_outputs_and_learns():
    x, y = _data(90)
    a, b = convnet(0), convnet(1)
    for m in (a, b):
        m.compile("adam", "sparse_categorical_crossentropy")
        m.fit(x, y, epochs=3, verbose=0)
    ens = teacher_logits([a, b], x)
    pa, pb = a.predict(x, verbose=0), b.predict(x, verbose=0)
    np.testing.assert_allclose(ens, (np.log(pa) + np.log(pb)) / 2, atol=1e-4)
    spy = _Counting()
    inp = keras.Input((8, 8, 1))
    spy_teacher = keras.Model(inp, a(spy(inp)))
    student = kmerge.students.like(a, width=0.5, seed=0)
    w0 = [np.array(w) for w in student.get_weights()]
    _Counting.calls = 0
    out = kmerge.distill([spy_teacher, b], student, x, y=y, epochs=3, batch_size=16, seed=0,
                         verbose=0)
    assert out is student
    calls = _Counting.calls
    assert calls <= 2  # traced once (and maybe once more): not once per batch per epoch
    hist = kmerge.info(student)["distill"]["history"]["loss"]
    assert hist[-1] < hist[0]
    assert not same_weights(w0, [np.array(w) for w in student.get_weights()])
    assert student.get_layer("out").activation.__name__ == "softmax"  # restored


def test_distill_shape_mismatch_is_an_error():
    teacher = convnet(0)
    keras.utils.set_random_seed(0)
    student = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                keras.layers.Dense(5, activation="softmax")])
    x, _ = _data(8)
    with pytest.raises(IncompatibleModelsError, match=r"outputs \(3,\) but student .* \(5,\)"):
        kmerge.distill(teacher, student, x, epochs=1)


def test_students_like_scales_hidden_widths_only():
    teacher = convnet(0, width=8)
    student = kmerge.students.like(teacher, width=0.5, seed=0)
    assert student.get_layer("conv_1").filters == 4
    assert student.get_layer("fc").units == 4
    assert student.get_layer("out").units == 3
    assert student.output.shape == teacher.output.shape
    assert kmerge.students.count_flops(student) <= kmerge.students.count_flops(teacher) / 2
    assert same_weights([np.array(w) for w in teacher.get_weights()],
                        [np.array(w) for w in convnet(0, width=8).get_weights()])


def test_students_like_a_merge_keeps_its_sources_output_sizes():
    """A parallel merge's sources end in 3-class softmax layers that its head reads: a student
    like the merge scales their hidden layers and the head's, never those class counts (a
    3-class softmax at width 0.25 would have been 1 unit, always 1.0)."""
    from conftest import mlp

    a, b = mlp(seed=0), mlp(seed=1)
    merged = kmerge.parallel({"a": a, "b": b}, head=kmerge.heads.classifier(3, hidden=[8]))
    student = kmerge.students.like(merged, width=0.25, seed=0)
    units = {layer.name: getattr(layer, "units", None) for layer in student.layers}
    outs = [out[0] for src in kmerge.info(merged)["sources"].values() for out in src["outputs"]]
    assert outs and all(units[name] == 3 for name in outs)
    hidden = [n for n, u in units.items() if u is not None and n not in outs]
    assert {units[n] for n in hidden} == {4, 2, 3}  # sources' 16 -> 4, head's 8 -> 2, out 3
    out = student(np.random.default_rng(0).normal(size=(4, 8)).astype("float32"))
    assert out.shape == (4, 3)

"""parallel / fuse / sequential: inputs, outputs, weights, names, dry runs, bad input."""

import os

import keras
import numpy as np
import pytest
from conftest import cnn, mlp, predict, x_for

import kmerge
from kmerge.errors import IncompatibleModelsError, InvalidArgumentError, KmergeError


def test_shared_input_when_specs_agree_else_one_per_source():
    a, b, c = mlp(), mlp(seed=1), mlp(inputs=5)
    assert [t.name for t in kmerge.parallel([a, b]).inputs] == ["input"]
    m = kmerge.parallel({"a": a, "b": b}, share_inputs=False)
    assert [t.name for t in m.inputs] == ["a", "b"]
    m = kmerge.parallel({"a": a, "c": c})
    assert [t.name for t in m.inputs] == ["a", "c"]
    xa, xc = x_for(a), x_for(c)
    np.testing.assert_array_equal(predict(m, [xa, xc])[:, 3:], predict(c, xc))


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0], "one entry per model"),
        ([1.0, float("nan")], "finite and non-negative"),
        ([1.0, -1.0], "finite and non-negative"),
        ([0.0, 0.0], "sum to zero"),
        (None, "needs weights"),
    ],
)
def test_bad_weights(weights, match):
    with pytest.raises(InvalidArgumentError, match=match):
        kmerge.parallel([mlp(), mlp(seed=1)], combine="weighted", weights=weights)


def test_weights_with_other_op_and_bad_names():
    with pytest.raises(InvalidArgumentError, match="only apply to combine='weighted'"):
        kmerge.parallel([mlp(), mlp()], combine="average", weights=[1, 1])
    with pytest.raises(InvalidArgumentError, match="not usable as a layer-name prefix"):
        kmerge.parallel({"": mlp(), "b": mlp()})
    with pytest.raises(InvalidArgumentError, match="not usable"):
        kmerge.parallel({"a/b": mlp(), "b": mlp()})
    with pytest.raises(InvalidArgumentError, match="at least 2 models"):
        kmerge.parallel({"a": mlp()})
    with pytest.raises(InvalidArgumentError, match="list or a dict"):
        kmerge.parallel(mlp())
    with pytest.raises(InvalidArgumentError, match="not sources"):
        kmerge.parallel({"a": mlp(), "b": mlp()}, freeze={"c"})
    with pytest.raises(InvalidArgumentError, match="not sources"):
        kmerge.parallel({"a": mlp(), "b": mlp()}, output={"z": 0})


def test_list_names_are_made_unique():
    m = kmerge.parallel([mlp("net"), mlp("net", seed=1)])
    assert set(kmerge.info(m)["sources"]) == {"net", "net_2"}


def test_elementwise_unequal_shapes_raise_or_project():
    a, b = mlp(outputs=3), mlp(outputs=5)
    with pytest.raises(IncompatibleModelsError, match=r"\(None, 3\).*\(None, 5\).*adapter=\"auto\""):
        kmerge.parallel({"a": a, "b": b}, combine="add")
    m = kmerge.parallel({"a": a, "b": b}, combine="add", adapter="auto")
    assert tuple(m.output.shape) == (None, 3)
    assert kmerge.info(m)["adapters"][0]["where"] == "b"


def test_dry_run_is_a_plan_with_counts():
    a, b = cnn(), mlp(inputs=64, seed=1)
    plan = kmerge.parallel({"a": a, "b": b}, combine="concat",
                           head=kmerge.heads.classifier(4, hidden=[8]), dry_run=True)
    assert isinstance(plan, kmerge.Plan)
    text = str(plan)
    assert "branch" in text and "Dense(8, relu) -> Dense(4, softmax)" in text
    assert plan.trainable_params == (6 * 8 + 8) + (8 * 4 + 4)
    assert plan.frozen_params == a.count_params() + b.count_params()


def test_fuse_pooling_none_resizes_maps_to_common_grid():
    a, b = cnn(shape=(8, 8, 1)), cnn(shape=(8, 8, 1), filters=2, seed=1)
    m = kmerge.fuse({"a": (a, 1), "b": (b, 3)}, pooling="none")  # conv, max-pool
    assert tuple(m.output.shape) == (None, 4, 4, 6)
    with pytest.raises(IncompatibleModelsError, match="pooling='none'"):
        kmerge.fuse({"a": (a, 1), "b": (b, -1)}, pooling="none")
    with pytest.raises(InvalidArgumentError, match="pooling must be one of"):
        kmerge.fuse({"a": (a, 1), "b": (b, -1)}, pooling="mean")


def test_fuse_head_and_bad_taps():
    a = cnn()
    m = kmerge.fuse({"a": (a, [1, -1])}, head=kmerge.heads.regressor(2))
    assert tuple(m.output.shape) == (None, 2)
    with pytest.raises(InvalidArgumentError, match="at least two taps"):
        kmerge.fuse({"a": (a, 1)})
    with pytest.raises(InvalidArgumentError, match="pair"):
        kmerge.fuse({"a": a})


def test_heads_validate_their_arguments():
    with pytest.raises(InvalidArgumentError, match="positive integer"):
        kmerge.heads.classifier(0)
    with pytest.raises(InvalidArgumentError, match="dropout"):
        kmerge.heads.classifier(3, dropout=1.5)
    with pytest.raises(InvalidArgumentError, match="head must be"):
        kmerge.parallel([mlp(), mlp()], head="softmax")
    layer = keras.layers.Dense(2, name="my_head")
    m = kmerge.parallel([mlp(), mlp()], head=layer)
    assert m.layers[-1].name == "my_head"


def test_fuse_and_gate_merges_save_and_load_identically(tmp_path):
    a, b = cnn(), cnn(seed=1)
    x = x_for(a)
    for name, m in {
        "fuse": kmerge.fuse({"a": (a, [1, -1]), "b": (b, 3)}, head=kmerge.heads.classifier(3)),
        "gate": kmerge.parallel({"a": a, "b": b}, combine="gate", head=kmerge.heads.regressor(2)),
    }.items():
        path = kmerge.save(m, tmp_path / f"{name}.keras")
        np.testing.assert_array_equal(predict(keras.models.load_model(path), x), predict(m, x))
        assert kmerge.verify(kmerge.load(path), {"a": a, "b": b}).ok


def _two():
    return mlp(seed=0), mlp(seed=1)


@pytest.mark.parametrize("call, match", [
    (lambda a, b: kmerge.heads.classifier(3, dropout="x"), "dropout must be a number"),
    (lambda a, b: kmerge.heads.classifier(3, hidden="16"), "hidden must be a list"),
    (lambda a, b: kmerge.parallel([a, b], output="x"), "output must be"),
    (lambda a, b: kmerge.parallel([a, b], share_inputs="no"), "share_inputs must be True or"),
    (lambda a, b: kmerge.parallel([a, b], verify="x"), "verify must be True or False"),
    (lambda a, b: kmerge.sequential([a, b], dry_run=1), "dry_run must be True or False"),
    (lambda a, b: kmerge.parallel([a, b], name=3), "name must be a non-empty string"),
    (lambda a, b: kmerge.fuse({"a": (a, [1]), "b": (b, [1])}, name="a/b"), "without '/'"),
    (lambda a, b: kmerge.align(a, b, method="activations", data=np.zeros((4, 5))),
     r"has shape \(4, 5\)"),
    (lambda a, b: kmerge.stitch(a, b, at=(1, 1), x=np.zeros((4, 8), "float32"),
                                y=np.zeros(4), epochs=0, seed="x"), "seed must be an integer"),
    (lambda a, b: kmerge.save(a, None), "needs a file path"),
    (lambda a, b: kmerge.save(a, "/tmp/" + "x" * 300 + ".keras"), "cannot write there"),
    (lambda a, b: kmerge.save(a, "/tmp/kmerge-test-unused.keras", overwrite="no"),
     "overwrite must be True or False"),
], ids=["head-dropout", "head-hidden", "output", "share_inputs", "verify", "dry_run", "name",
        "name-slash", "align-data", "stitch-seed", "save-none", "save-long", "save-overwrite"])
def test_bad_argument_values_are_typed_errors(call, match):
    a, b = _two()
    with pytest.raises(KmergeError, match=match):
        call(a, b)
    assert not os.path.exists("/tmp/kmerge-test-unused.keras")

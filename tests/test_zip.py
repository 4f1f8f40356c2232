"""ZipIt! (align="zip") and align="auto": exact cases, partial zipping, heads, refusals."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import cnn, predict
from test_align import residual_mlp

import kmerge
from kmerge.errors import IncompatibleModelsError, InvalidArgumentError
from kmerge.weights.zip import zip_merge, zipit_matching


def tanh_mlp(seed: int = 0, outputs: int = 3, hidden: int = 6) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8,), name="x")
    h = keras.layers.Dense(hidden, activation="tanh", name="h1")(inp)
    h = keras.layers.Dense(hidden, activation="tanh", name="h2")(h)
    return keras.Model(inp, keras.layers.Dense(outputs, name="out")(h), name=f"m{seed}")


def x_data(n: int = 96, shape=(8,), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


def test_zipit_matching_pairs_across_models_and_rows_sum_to_one():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 400))
    other = feats[[2, 0, 4, 1, 3]] + 0.05 * rng.normal(size=(5, 400))  # B = A shuffled
    corr = np.corrcoef(np.concatenate([feats, other]))
    merge, unmerge = zipit_matching(corr, 2, beta=0.0)
    assert merge.shape == (5, 10) and unmerge.shape == (10, 5)
    np.testing.assert_allclose(merge.sum(1), 1.0)
    np.testing.assert_array_equal(unmerge.sum(1), 1.0)
    # A's feature k is zipped with the B feature that copies it: B[j] = A[[2,0,4,1,3][j]]
    for j, k in enumerate([2, 0, 4, 1, 3]):
        assert unmerge[k].argmax() == unmerge[5 + j].argmax()


def test_within_model_merges_follow_beta():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 300))
    a[1] = a[0] + 0.01 * rng.normal(size=300)  # A holds a duplicate feature
    b = rng.normal(size=(4, 300))
    corr = np.corrcoef(np.concatenate([a, b]))
    _, unmerge = zipit_matching(corr, 2, beta=1.0)
    assert unmerge[0].argmax() == unmerge[1].argmax()  # A's duplicates share one feature
    _, across = zipit_matching(corr, 2, beta=0.0, alpha=0.0)
    assert (across[:4].sum(0) == 1).all()  # alpha=0, beta=0: a permutation


@pytest.mark.parametrize("factory,until", [
    (tanh_mlp, None), (tanh_mlp, "h1"), (residual_mlp, None), (residual_mlp, "up_0"),
    (lambda seed=0: cnn(filters=4, seed=seed), None),
    (lambda seed=0: cnn(filters=4, seed=seed), "conv2d"),
])
def test_zipping_a_model_with_itself_keeps_its_function(factory, until):
    model = factory(0)
    if until == "conv2d":
        until = model.layers[1].name
    x = x_data(64, tuple(model.inputs[0].shape[1:]))
    zipped = zip_merge([model, model], data=x, zip_until=until)
    np.testing.assert_allclose(predict(zipped, x), predict(model, x), atol=1e-5)
    meta = kmerge.info(zipped)
    assert meta["align"] == "zip" and meta["zip_until"] == until
    assert all(g["across"] == g["size"] for g in meta["zip"]["groups"]), meta["zip"]["groups"]


def test_zip_until_an_input_is_the_ensemble_exactly():
    a, b = tanh_mlp(1), tanh_mlp(2)
    x = x_data()
    zipped = zip_merge([a, b], data=x, zip_until="x")
    np.testing.assert_allclose(predict(zipped, x), (predict(a, x) + predict(b, x)) / 2,
                               atol=1e-5)
    assert kmerge.info(zipped)["zip"]["param_ratio"] == pytest.approx(2.0, abs=0.01)


def test_partial_zip_saves_loads_and_costs_the_branches(tmp_path):
    a, b = tanh_mlp(1), tanh_mlp(2)
    x = x_data()
    whole = zip_merge([a, b], data=x)
    assert [layer.name for layer in whole.layers] == [layer.name for layer in a.layers]
    assert whole.count_params() == a.count_params()
    part = zip_merge([a, b], data=x, zip_until="h1", repair="repair")
    meta = kmerge.info(part)
    h2, out = 8 * 0 + 6 * 6 + 6, 6 * 3 + 3
    assert part.count_params() == a.count_params() + h2 + out
    assert meta["zip"]["trunk_layers"] == ["h1"] and len(meta["zip"]["branches"]) == 2
    assert [r["layer"] for r in meta["repair_report"]][0] == "h1"
    path = kmerge.save(part, str(tmp_path / "zip.keras"))
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(predict(loaded, x), predict(part, x), atol=1e-6)
    assert not np.allclose(predict(part, x), predict(whole, x), atol=1e-3)


def test_different_label_sets_keep_one_head_per_source():
    a = tanh_mlp(1, outputs=3)
    b = tanh_mlp(1, outputs=5)  # same trunk weights (same seed), a different head
    b.get_layer("out").set_weights([np.ones((6, 5), "float32"), np.zeros(5, "float32")])
    x = x_data()
    zipped = zip_merge([a, b], data=x)
    assert kmerge.info(zipped)["heads"] == "separate"
    out_a, out_b = zipped.predict(x, verbose=0)
    np.testing.assert_allclose(out_a, predict(a, x), atol=1e-5)
    np.testing.assert_allclose(out_b, predict(b, x), atol=1e-5)
    with pytest.raises(IncompatibleModelsError, match="heads='separate'"):
        zip_merge([a, b], data=x, heads="average")


def test_refusals_name_what_would_work():
    a, b = tanh_mlp(1), tanh_mlp(2)
    x = x_data()
    with pytest.raises(InvalidArgumentError, match=r"valid names are x, h1, h2, out"):
        zip_merge([a, b], data=x, zip_until="dense_7")
    with pytest.raises(InvalidArgumentError, match="needs data"):
        zip_merge([a, b], data=None)
    with pytest.raises(InvalidArgumentError, match="method must be 'linear'"):
        kmerge.merge_weights([a, b], method="slerp", align="zip", data=x)
    with pytest.raises(InvalidArgumentError, match="zip_until= goes with"):
        kmerge.merge_weights([a, b], method="linear", align="weights", zip_until="h1")
    with pytest.raises(InvalidArgumentError, match="needs labels"):
        kmerge.merge_weights([a, b], method="linear", align="auto", data=x)
    with pytest.raises(InvalidArgumentError, match="unknown: gamma"):
        kmerge.merge_weights([a, b], method="linear", align="zip", data=x, gamma=1)
    c = tanh_mlp(3, hidden=7)
    with pytest.raises(IncompatibleModelsError, match="inside the zipped trunk"):
        zip_merge([a, c], data=x, zip_until="h2")


@pytest.fixture(scope="module")
def digits_pair():
    from kmerge.demo import digits

    x_tr, x_te, y_tr, y_te = digits(0)
    x_tr, x_te = x_tr.reshape(len(x_tr), -1)[:600], x_te.reshape(len(x_te), -1)[:300]
    models = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        m = keras.Sequential([keras.Input((64,)), keras.layers.Dense(24, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        m.fit(x_tr, y_tr[:600], epochs=3, batch_size=32, verbose=0)
        models.append(m)
    return models, x_tr, x_te, y_te[:300]


def test_auto_reports_every_candidate_and_keeps_the_best(digits_pair):
    models, x_tr, x_val, y_val = digits_pair
    m = kmerge.merge_weights(models, method="linear", align="auto", repair="repair",
                             data=(x_val, y_val))
    meta = kmerge.info(m)
    cands = meta["auto"]["candidates"]
    assert {c["align"] for c in cands} == {None, "weights", "activations", "zip"}
    hidden = models[0].layers[0].name
    assert {c["zip_until"] for c in cands if c["align"] == "zip"} == {None, hidden}
    scored = [c for c in cands if "accuracy" in c]
    best = cands[meta["auto"]["chosen"]]
    assert best["accuracy"] == max(c["accuracy"] for c in scored)
    acc = float(np.mean(predict(m, x_val).argmax(-1) == y_val))
    assert acc == pytest.approx(best["accuracy"])
    assert meta["align"] == "auto" and meta["align_chosen"] == best["align"]
    # the partial zip keeps two heads: over 1.5x the parameters it is skipped, not scored
    part = next(c for c in cands if c["zip_until"] == hidden)
    assert ("skipped" in part) == (part["param_ratio"] > 1.5)

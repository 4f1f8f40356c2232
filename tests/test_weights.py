"""merge_weights and merge_weights_files: compatibility checks, per-tensor dispatch,
non-float variables, exclude/params, drift, round trips, greedy soup, streaming."""

from __future__ import annotations

import zipfile

import keras
import numpy as np
import pytest
from conftest import cnn, mlp, predict, same_weights, weights_of, x_for

import kmerge
from kmerge.errors import IncompatibleModelsError, InvalidArgumentError, SaveError
from kmerge.weights import MergeCollapseWarning, merge_weights_files
from kmerge.weights.methods import merge_methods
from kmerge.weights.validate import variable_paths


@keras.saving.register_keras_serializable(package="kmerge_tests")
class Counter(keras.layers.Layer):
    """Identity layer with an int32 counter (a non-float variable)."""

    def build(self, input_shape):
        self.count = self.add_weight(shape=(), dtype="int32", initializer="zeros",
                                     trainable=False, name="count")

    def call(self, x):
        return x


def counter_mlp(seed: int, count: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5), Counter(name="counter"),
                          keras.layers.Dense(2)])
    m.get_layer("counter").count.assign(count)
    return m


@pytest.fixture(scope="module")
def pair():
    return mlp("a", seed=0), mlp("b", seed=1)


@pytest.fixture(scope="module")
def finetunes(digits):
    """A briefly pretrained digits MLP and three fine-tunes with different learning rates."""
    x_tr, y_tr, x_te, y_te = digits
    xf = x_tr.reshape(len(x_tr), -1)
    keras.utils.set_random_seed(0)
    pre = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                            keras.layers.Dense(10, activation="softmax")], name="pre")
    pre.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    pre.fit(xf, y_tr, epochs=2, batch_size=64, verbose=0)
    fts = []
    for i, lr in enumerate([3e-3, 1e-2, 3e-2]):
        ft = keras.models.clone_model(pre)
        ft.set_weights(pre.get_weights())
        ft.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy")
        keras.utils.set_random_seed(10 + i)
        ft.fit(xf[i::3], y_tr[i::3], epochs=3, batch_size=32, verbose=0)
        fts.append(ft)
    return pre, fts, (x_te.reshape(len(x_te), -1), y_te)


# ----------------------------------------------------------------------------- methods


def test_linear_is_the_weighted_average(pair):
    a, b = pair
    m = kmerge.merge_weights([a, b], method="linear", weights=[1, 3])
    for got, wa, wb in zip(weights_of(m), weights_of(a), weights_of(b)):
        np.testing.assert_allclose(got, 0.25 * wa + 0.75 * wb, rtol=1e-6, atol=1e-7)
    assert m is not a and m.name == a.name


def test_task_methods_match_the_numpy_function_per_tensor(pair):
    a, b = pair
    base = mlp("base", seed=2)
    for method, kw in [("task_arithmetic", {"scale": 0.5}), ("ties", {"density": 0.5}),
                       ("dare", {"p": 0.3, "then": "ties"})]:
        m = kmerge.merge_weights([a, b], method=method, base=base, **kw)
        fn = merge_methods.get(method)
        for path, got, wa, wb, w0 in zip(variable_paths(m), weights_of(m), weights_of(a),
                                         weights_of(b), weights_of(base)):
            extra = {"path": path} if method == "dare" else {}  # canonical: no model name
            want = fn([wa, wb], weights=[.5, .5], base=w0, **kw, **extra)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", sorted([*merge_methods.names(), "greedy_soup"]))
def test_identical_models_merge_to_themselves(method):
    a = cnn(seed=0)
    b = keras.models.clone_model(a)
    b.set_weights(a.get_weights())
    kw = {}
    if method in ("task_arithmetic", "ties", "dare"):
        kw["base"] = b
    x = x_for(a, 16)
    if method in ("fisher", "regmean"):
        kw.update(data=x, samples=16)
    if method == "greedy_soup":
        kw["data"] = (x, np.zeros(16, "int32"))
    m = kmerge.merge_weights([a, b], method=method, **kw)
    for got, want in zip(weights_of(m), weights_of(a)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fisher_and_regmean_use_the_data(pair):
    a, b = pair
    x = x_for(a, 32)
    lin = weights_of(kmerge.merge_weights([a, b], method="linear"))
    f = kmerge.merge_weights([a, b], method="fisher", data=x, samples=32)
    r = kmerge.merge_weights([a, b], method="regmean", data=x, samples=32, alpha=0.5)
    assert not np.allclose(weights_of(f)[0], lin[0])
    # the first kernel sees the same inputs in both models (equal Grams: the average);
    # the second sees different hidden activations
    np.testing.assert_allclose(weights_of(r)[0], lin[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(weights_of(r)[2], lin[2])
    assert len(kmerge.info(r)["regmean_kernels"]) == 2


def test_greedy_soup_never_worse_than_best_single(finetunes):
    _, fts, (x, y) = finetunes
    m = kmerge.merge_weights(fts, method="greedy_soup", data=(x, y))
    meta = kmerge.info(m)
    best = max(meta["accuracy"]["sources"])
    assert meta["accuracy"]["merged"] >= best
    assert meta["greedy_soup"]["trace"][0]["accepted"]


def test_task_arithmetic_from_pretrained_reports_accuracy(finetunes):
    pre, fts, (x, y) = finetunes
    m = kmerge.merge_weights(fts, method="ties", base=pre, data=(x, y), density=0.5)
    acc = kmerge.info(m)["accuracy"]
    assert 0 <= acc["merged"] <= 1 and len(acc["sources"]) == 3


def test_collapse_warns(pair):
    a, b = pair
    x = x_for(a, 256)
    y = predict(a, x).argmax(-1)
    # the average of a and -a is the zero network: uniform outputs, argmax 0 everywhere; keep
    # the inputs a labels otherwise, so a scores 1.0 and the merge 0.0
    x, y = x[y != 0], y[y != 0]
    assert len(y) >= 10
    b2 = keras.models.clone_model(a)
    b2.set_weights([-w for w in a.get_weights()])
    with pytest.warns(MergeCollapseWarning, match="collapsed"):
        kmerge.merge_weights([a, b2], method="linear", data=(x, y))


# ----------------------------------------------------------------------------- bad inputs


def test_different_architectures_name_the_first_difference(pair):
    a, _ = pair
    first = a.layers[0].name  # default names depend on how many layers exist already
    with pytest.raises(IncompatibleModelsError,
                       match=rf"{first}/kernel.*\(8, 16\).*\(8, 32\)"):
        kmerge.merge_weights([a, mlp(hidden=32)], method="linear")
    with pytest.raises(IncompatibleModelsError, match="Dense.*Conv2D|Conv2D.*Dense"):
        kmerge.merge_weights([a, cnn()], method="linear")
    relu = mlp(seed=3)
    tanh = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dense(3, activation="softmax")])
    with pytest.raises(IncompatibleModelsError, match="config 'activation' is 'relu'"):
        kmerge.merge_weights([relu, tanh], method="linear")


def test_different_variable_counts(pair):
    a, _ = pair
    nobias = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, use_bias=False),
                               keras.layers.Dense(3)])
    with pytest.raises(IncompatibleModelsError, match="2 variables.*but 1"):
        kmerge.merge_weights([a, nobias], method="linear")


def test_sequential_and_functional_of_one_architecture_merge(pair):
    a, _ = pair
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu")(inp)
    f = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(h))
    merged = kmerge.merge_weights([a, f], method="linear")
    for got, wa, wf in zip(weights_of(merged), weights_of(a), weights_of(f)):
        np.testing.assert_allclose(got, (wa + wf) / 2, rtol=1e-6, atol=1e-7)
    x = x_for(a)
    want = keras.models.clone_model(a)
    want.set_weights([(wa + wf) / 2 for wa, wf in zip(weights_of(a), weights_of(f))])
    np.testing.assert_allclose(predict(merged, x), predict(want, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "slerp", "extra": True}, "exactly two models"),
    ({"method": "ties"}, "needs base="),
    ({"method": "linear", "weights": [1, 2, 3]}, "one entry per model"),
    ({"method": "linear", "weights": [0, 0]}, "sum to zero"),
    ({"method": "linear", "weights": [1, -1]}, "non-negative"),
    ({"method": "ties", "base": True, "density": 0.0}, r"density must be in \(0, 1\]"),
    ({"method": "ties", "base": True, "density": 1.5}, r"density must be in \(0, 1\]"),
    ({"method": "averge"}, "Did you mean 'average'|Valid merge methods: dare, fisher, greedy_soup"),
    ({"method": "ties", "base": True, "densty": 0.3}, "valid parameters: density, scale"),
    ({"method": "linear", "base": True}, "does not use base"),
    ({"method": "fisher"}, "needs data="),
    ({"method": "greedy_soup", "data": np.zeros((2, 8))}, "needs held-out data=\\(x, y\\)"),
    ({"method": "linear", "align": "weight"}, "valid: weights, activations"),
    ({"method": "linear", "repair": "bnn"}, "valid: bn, repair"),
    ({"method": "linear", "repair": "bn"}, "needs data="),
    ({"method": "linear", "params": {r".*kernel": {"t": 0.3}}}, "valid parameters: none"),
    ({"method": "linear", "params": {r"nothing_here": {}}}, "matches no variable"),
    ({"method": "linear", "exclude": ["nothing_here"]}, "matches no layer"),
])
def test_bad_inputs_raise_typed_errors_naming_the_fix(pair, kwargs, match):
    a, b = pair
    kwargs = dict(kwargs)
    models = [a, b, a] if kwargs.pop("extra", False) else [a, b]
    if kwargs.get("base") is True:
        kwargs["base"] = mlp(seed=5)
    with pytest.raises(InvalidArgumentError, match=match):
        kmerge.merge_weights(models, **kwargs)


def test_nan_result_refused(pair):
    a, _ = pair
    bad = keras.models.clone_model(a)
    ws = a.get_weights()
    ws[2] = ws[2].copy()
    ws[2][0, 0] = np.nan
    bad.set_weights(ws)
    second = a.layers[1].name
    with pytest.raises(InvalidArgumentError,
                       match=rf"'.*{second}/kernel' holds 1 NaN/Inf.*models\[1\]"):
        kmerge.merge_weights([a, bad], method="linear")
    base = mlp(seed=9)
    with pytest.raises(InvalidArgumentError, match="overflowed: lower scale"):
        kmerge.merge_weights([a, mlp(seed=4)], method="task_arithmetic", base=base, scale=1e39)


# ----------------------------------------------------------------------------- behaviour


def test_non_float_variables_copied_from_the_first_model():
    a, b = counter_mlp(0, count=7), counter_mlp(1, count=100)
    m = kmerge.merge_weights([a, b], method="linear")
    assert int(keras.ops.convert_to_numpy(m.get_layer("counter").count)) == 7
    assert any(p.endswith("count") for p in kmerge.info(m)["copied_non_float"])
    assert not any(p.endswith("count") for p in kmerge.info(m)["drift"])


def test_exclude_keeps_the_first_models_layer(pair):
    a, b = pair
    m = kmerge.merge_weights([a, b], method="linear", exclude=[a.layers[1].name])
    got, wa, wb = weights_of(m), weights_of(a), weights_of(b)
    np.testing.assert_array_equal(got[2], wa[2])  # dense_1 kernel, bias: from a
    np.testing.assert_array_equal(got[3], wa[3])
    np.testing.assert_allclose(got[0], (wa[0] + wb[0]) / 2, rtol=1e-6)
    assert len(kmerge.info(m)["excluded_variables"]) == 2


def test_params_regex_overrides_per_tensor(pair):
    a, b = pair
    base = mlp("base", seed=2)
    pattern = rf".*{a.layers[1].name}/kernel"
    m = kmerge.merge_weights([a, b], method="task_arithmetic", base=base, scale=1.0,
                             params={pattern: {"scale": 0.0}})
    got, w0, wa, wb = weights_of(m), weights_of(base), weights_of(a), weights_of(b)
    np.testing.assert_allclose(got[2], w0[2])  # scale 0: the base
    np.testing.assert_allclose(got[0], w0[0] + (wa[0] - w0[0]) + (wb[0] - w0[0]), rtol=1e-5,
                               atol=1e-6)
    assert kmerge.info(m)["params"] == {pattern: {"scale": 0.0}}


def test_drift_report(pair):
    a, b = pair
    m = kmerge.merge_weights([a, b], method="linear")
    meta = kmerge.info(m)
    assert meta["kind"] == "weights" and meta["method"] == "linear"
    path = variable_paths(m)[0]
    wa, wb, wm = weights_of(a)[0], weights_of(b)[0], weights_of(m)[0]
    want = [np.linalg.norm(wm - wa) / np.linalg.norm(wa), np.linalg.norm(wm - wb) / np.linalg.norm(wb)]
    np.testing.assert_allclose(meta["drift"][path], want, rtol=1e-5)
    assert meta["max_drift"]["value"] >= max(want) - 1e-9


def test_sources_unchanged_and_round_trip(pair, tmp_path):
    a, b = pair
    before = [weights_of(a), weights_of(b)]
    names = [a.name, b.name]
    m = kmerge.merge_weights([a, b], method="slerp", t=0.3)
    assert same_weights(weights_of(a), before[0]) and same_weights(weights_of(b), before[1])
    assert [a.name, b.name] == names
    path = kmerge.save(m, tmp_path / "merged.keras")
    back = kmerge.load(path)
    x = x_for(a)
    np.testing.assert_allclose(predict(back, x), predict(m, x), rtol=1e-6)
    assert kmerge.info(back)["method"] == "slerp"
    assert kmerge.info(back)["drift"].keys() == kmerge.info(m)["drift"].keys()


def test_merge_from_paths_records_them(pair, tmp_path):
    a, b = pair
    pa, pb = tmp_path / "a.keras", tmp_path / "b.h5"
    a.save(pa)
    b.save(pb)
    m = kmerge.merge_weights([str(pa), pb], method="linear")
    want = kmerge.merge_weights([a, b], method="linear")
    assert all(np.allclose(x, y) for x, y in zip(weights_of(m), weights_of(want)))
    assert sorted(kmerge.info(m)["source_paths"]) == sorted([str(pa), str(pb)])
    with pytest.raises(SaveError, match="source"):
        kmerge.save(m, pa, overwrite=True)


# ----------------------------------------------------------------------------- streaming


def test_streaming_matches_in_memory(tmp_path):
    a, b, base = cnn("a", seed=0), cnn("b", seed=1), cnn("base", seed=2)
    for m, n in [(a, "a"), (b, "b"), (base, "base")]:
        m.save(tmp_path / f"{n}.keras")
        m.save_weights(tmp_path / f"{n}.weights.h5")
    srcs = [tmp_path / "a.keras", tmp_path / "b.keras"]
    for method, kw in [("linear", {"weights": [1, 3]}), ("slerp", {"t": 0.7}),
                       ("ties", {"base": "base", "density": 0.5}),
                       ("dare", {"base": "base", "p": 0.5})]:
        kw = dict(kw)
        if "base" in kw:
            kw["base"] = tmp_path / "base.keras"
        out = merge_weights_files(srcs, tmp_path / f"{method}.keras", method=method, **kw)
        streamed = kmerge.load(out)
        kw["base"] = base if "base" in kw else None
        if kw["base"] is None:
            del kw["base"]
        memory = kmerge.merge_weights([a, b], method=method, **kw)
        for got, want, v in zip(weights_of(streamed), weights_of(memory), memory.weights):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{method} {v.path}")
        drift = kmerge.info(streamed)["drift"]
        assert kmerge.info(streamed)["streamed"]
        assert any(k.startswith("conv2d") and k.endswith("/kernel") for k in drift), drift
    out = merge_weights_files([tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"],
                              tmp_path / "out.weights.h5", method="linear",
                              exclude=["batch_normalization.*"],
                              params={r".*": {}})
    c = cnn(seed=7)
    c.load_weights(out)
    lin = kmerge.merge_weights([a, b], method="linear", exclude=["batch_normalization.*"])
    assert all(np.allclose(x, y) for x, y in zip(weights_of(c), weights_of(lin)))
    with zipfile.ZipFile(tmp_path / "linear.keras") as zf:
        assert zf.getinfo("model.weights.h5").compress_type == zipfile.ZIP_STORED


def test_streaming_refuses_bad_inputs(tmp_path):
    a, b = mlp(seed=0), mlp(hidden=32, seed=1)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    a.save(tmp_path / "a2.keras")
    with pytest.raises(IncompatibleModelsError, match="units"):
        merge_weights_files([tmp_path / "a.keras", tmp_path / "b.keras"], tmp_path / "o.keras",
                            method="linear")
    with pytest.raises(InvalidArgumentError, match="needs data"):
        merge_weights_files([tmp_path / "a.keras", tmp_path / "a2.keras"],
                            tmp_path / "o.keras", method="fisher")
    with pytest.raises(SaveError, match="source"):
        merge_weights_files([tmp_path / "a.keras", tmp_path / "a2.keras"],
                            tmp_path / "a.keras", method="linear", overwrite=True)
    with pytest.raises(SaveError, match="must end in .keras"):
        merge_weights_files([tmp_path / "a.keras", tmp_path / "a2.keras"],
                            tmp_path / "o.h5", method="linear")
    assert not (tmp_path / "o.keras").exists()


def test_align_and_repair_are_called_and_recorded():
    pytest.importorskip("kmerge.weights.align")
    pytest.importorskip("kmerge.weights.repair")
    a, b = cnn(seed=0), cnn(seed=1)
    x = x_for(a, 32)
    before = weights_of(b)
    m = kmerge.merge_weights([a, b], method="linear", align="weights", repair="bn", data=x)
    assert kmerge.info(m)["align"] == "weights" and kmerge.info(m)["repair"] == "bn"
    assert same_weights(weights_of(b), before)
    assert np.all(np.isfinite(predict(m, x)))


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "dare", "seed": "abc"}, "dare: seed must be an integer; received 'abc'"),
    ({"method": "task_arithmetic", "scale": "2"}, "scale must be a number; received '2'"),
    ({"method": "task_arithmetic", "scale": float("nan")}, "scale must be a number"),
    ({"method": "ties", "params": {".*kernel": {"density": "x"}}}, r"params\['.\*kernel'\]"),
    ({"method": "dare", "then": 3}, "then must be a string"),
    ({"method": "fisher", "samples": 0}, "samples must be an integer >= 1"),
    ({"method": "linear", "exclude": "nomatch"}, "exclude pattern 'nomatch'"),
])
def test_method_parameter_values_are_typed_before_anything_runs(kwargs, match):
    a, b, base = mlp(seed=0), mlp(seed=1), mlp(seed=2)
    if kwargs["method"] in ("dare", "ties", "task_arithmetic"):
        kwargs = {**kwargs, "base": base}
    if kwargs["method"] == "fisher":
        kwargs = {**kwargs, "data": np.zeros((4, 8), "float32")}
    with pytest.raises(InvalidArgumentError, match=match):
        kmerge.merge_weights([a, b], **kwargs)

"""Statistics and checks of weight merges: Fisher's probabilities-or-logits decided from the
model, REPAIR toward the merge's own coefficients, BatchNorm statistics kept valid, the probe
pass that refuses non-finite outputs, slerp's weights, TIES's model-wide trim."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import cnn, mlp, weights_of, x_for

import kmerge
from kmerge.errors import InvalidArgumentError
from kmerge.weights import merge_weights_files
from kmerge.weights.apply import first_non_finite_layer
from kmerge.weights.methods import merge_methods
from kmerge.weights.statistics import fisher_diagonals, output_kind


def dense(units: int, activation: str, *, seed: int = 0, scale: float = 1.0,
          shift: float = 0.1, name: str | None = None) -> keras.Model:
    keras.utils.set_random_seed(seed)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units, activation=activation)],
                         name=name)
    k, b = m.layers[0].get_weights()
    m.layers[0].set_weights([k * scale, b + shift])
    return m


def numpy_out(m: keras.Model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k, b = (w.astype(np.float64) for w in m.layers[0].get_weights())
    return x.astype(np.float64) @ k + b, k


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- Fisher


@pytest.mark.parametrize("case", ["logit-unit", "sigmoid-unit", "softmax", "logits"])
def test_fisher_against_hand_computed(case):
    """For z = xW + b: d log p_c / dW_ij = x_i (1[c=j] - p_j), so the exact Fisher is
    F_W[i, j] = mean x_i^2 p_j (1 - p_j) for a categorical output and for each sigmoid unit."""
    units, act = {"logit-unit": (1, "linear"), "sigmoid-unit": (1, "sigmoid"),
                  "softmax": (3, "softmax"), "logits": (3, "linear")}[case]
    m = dense(units, act, **({"scale": 0.05, "shift": 0.3} if case == "logit-unit" else {}))
    x = x_for(m, 12)
    z, _ = numpy_out(m, x)
    if case == "logit-unit":  # logits that look like probabilities: values decide wrongly
        assert 0 <= z.min() and z.max() <= 1
    p = sigmoid(z) if units == 1 else softmax(z)
    want_k = np.mean(x.astype(np.float64)[:, :, None] ** 2 * (p * (1 - p))[:, None, :], 0)
    want_b = np.mean(p * (1 - p), 0)
    got_k, got_b = fisher_diagonals(m, x, samples=12)
    np.testing.assert_allclose(got_k, want_k, rtol=2e-4, atol=1e-9)
    np.testing.assert_allclose(got_b, want_b, rtol=2e-4, atol=1e-9)
    kind = output_kind(m)
    assert kind.probabilities == (act in ("sigmoid", "softmax")) and act in kind.decided_by


def test_fisher_output_kind_refusals_and_overrides():
    relu = dense(3, "relu", name="relu_head")
    with pytest.raises(InvalidArgumentError, match=r"relu_head.*'relu'.*outputs='logits'"):
        output_kind(relu)
    assert not output_kind(relu, "logits").probabilities
    relu.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert "compiled loss" in output_kind(relu).decided_by  # the loss says logits
    soft = dense(3, "softmax", name="soft")
    soft.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    with pytest.raises(InvalidArgumentError, match=r"soft.*from_logits=True"):
        output_kind(soft)  # activation and loss disagree: kmerge does not guess
    with pytest.raises(InvalidArgumentError, match="applies 'relu'"):  # before computing
        kmerge.merge_weights([dense(3, "relu"), dense(3, "relu", seed=1)], method="fisher",
                             data=x_for(relu, 8))
    lin = dense(2, "linear", scale=10.0)
    with pytest.raises(InvalidArgumentError, match="not probabilities"):
        kmerge.merge_weights([lin, dense(2, "linear", seed=1)], method="fisher",
                             data=x_for(lin, 8), outputs="probabilities", samples=8)


def test_fisher_normalize_and_favor_target():
    a, b = dense(3, "softmax", seed=0), dense(3, "softmax", seed=1, scale=3.0)
    x = x_for(a, 10)
    fa, fb = (fisher_diagonals(m, x, samples=10) for m in (a, b))
    na, nb = (np.sqrt(sum(np.sum(f ** 2) for f in fs)) for fs in (fa, fb))
    m = kmerge.merge_weights([a, b], method="fisher", data=x, samples=10, normalize=True)
    fn = merge_methods.get("fisher")
    for got, ta, tb, ga, gb in zip(weights_of(m), weights_of(a), weights_of(b), fa, fb):
        want = fn([ta, tb], weights=[0.5 / na, 0.5 / nb], fishers=[ga, gb])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert na != pytest.approx(nb, rel=0.05)  # else normalisation changes nothing
    # favor_target: only the target's Fisher is floored; zero elsewhere keeps the target
    t = [np.array([1.0, 1.0]), np.array([3.0, 3.0])]
    f = [np.array([0.0, 1.0]), np.array([0.0, 1.0])]
    np.testing.assert_allclose(fn(t, weights=[.5, .5], fishers=f, favor_target=True), [1, 2])
    np.testing.assert_allclose(fn(t, weights=[.5, .5], fishers=f), [2, 2])


# ----------------------------------------------------------------------------- REPAIR


def test_repair_uses_the_merge_weights():
    a, b = mlp(seed=0), mlp(seed=1)
    x = x_for(a, 64)
    m = kmerge.merge_weights([a, b], method="linear", weights=[1, 3], repair="repair", data=x)
    info = kmerge.info(m)
    assert info["repair"] == "repair" and info["repair_report"]["weights"] == [0.25, 0.75]
    assert info["repair_report"]["layers"][0]["layer"] == m.layers[0].name

    def pre(model):
        k, bias = model.layers[0].get_weights()
        return x.astype(np.float64) @ k + bias

    want_mean = 0.25 * pre(a).mean(0) + 0.75 * pre(b).mean(0)
    want_std = 0.25 * pre(a).std(0) + 0.75 * pre(b).std(0)
    np.testing.assert_allclose(pre(m).mean(0), want_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pre(m).std(0), want_std, rtol=1e-4, atol=1e-5)
    uniform = 0.5 * pre(a).std(0) + 0.5 * pre(b).std(0)
    assert np.max(np.abs(uniform - want_std)) > 1e-2  # the uniform target is another model


# ----------------------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def bn_models():
    base, ft1, ft2 = cnn(seed=0), cnn(seed=1), cnn(seed=2)
    return base, ft1, ft2


def _bn(model):
    return next(la for la in model.layers if isinstance(la, keras.layers.BatchNormalization))


@pytest.mark.parametrize("method,kw", [("task_arithmetic", {"scale": 1.5}),
                                       ("dare", {"p": 0.9, "seed": 0})])
def test_batchnorm_statistics_stay_valid(bn_models, method, kw):
    base, ft1, ft2 = bn_models
    var = [np.asarray(_bn(m).moving_variance) for m in (base, ft1, ft2)]
    # what task arithmetic would do to the variance: negative somewhere (else no test)
    assert np.min(var[0] + 1.5 * ((var[1] - var[0]) + (var[2] - var[0]))) < 0
    m = kmerge.merge_weights([ft1, ft2], method=method, base=base, **kw)
    np.testing.assert_allclose(np.asarray(_bn(m).moving_variance), 0.5 * (var[1] + var[2]),
                               rtol=1e-6)
    mean = [np.asarray(_bn(x).moving_mean) for x in (ft1, ft2)]
    np.testing.assert_allclose(np.asarray(_bn(m).moving_mean), 0.5 * (mean[0] + mean[1]),
                               rtol=1e-6)
    info = kmerge.info(m)
    assert len(info["statistics"]["variables"]) == 2
    assert info["probe"] == {"inputs": "synthetic", "examples": 64, "finite": True}
    out = np.asarray(keras.ops.convert_to_numpy(m(x_for(m, 8), training=False)))
    assert np.all(np.isfinite(out))
    # the trainable BN weights still follow the method (gamma is not a statistic)
    fn = merge_methods.get("task_arithmetic")
    if method == "task_arithmetic":
        g = [np.asarray(_bn(x).gamma) for x in (base, ft1, ft2)]
        np.testing.assert_allclose(np.asarray(_bn(m).gamma),
                                   fn(g[1:], weights=[.5, .5], base=g[0], scale=1.5), rtol=1e-5)


def test_probe_refuses_non_finite_outputs_naming_the_layer():
    base, a, b = mlp(seed=0), mlp(seed=1), mlp(seed=2)
    # every weight finite (about 1e30), the output layer's product overflows float32
    with pytest.raises(InvalidArgumentError) as err:
        kmerge.merge_weights([a, b], method="task_arithmetic", base=base, scale=1e30)
    msg = str(err.value)
    assert f"{a.layers[-1].name!r} (Dense)" in msg and "overflow" in msg
    assert "synthetic probe" in msg
    # with data, the probe is the data's first examples and is recorded
    m = kmerge.merge_weights([a, b], method="linear", data=x_for(a, 10))
    assert kmerge.info(m)["probe"]["inputs"] == "data"


def test_first_non_finite_layer_names_a_negative_variance():
    m = cnn(seed=3)
    bn = _bn(m)
    bn.moving_variance.assign(-np.ones(bn.moving_variance.shape, "float32"))
    where = first_non_finite_layer(m, [x_for(m, 4)])
    assert where.startswith(f"{bn.name!r} (BatchNormalization)") and "negative" in where


# ----------------------------------------------------------------------------- slerp


def test_slerp_uses_weights(tmp_path):
    a, b = mlp(seed=0), mlp(seed=1)
    by_w = kmerge.merge_weights([a, b], method="slerp", weights=[1, 3])
    by_t = kmerge.merge_weights([a, b], method="slerp", t=0.75)
    for u, v in zip(weights_of(by_w), weights_of(by_t)):
        np.testing.assert_array_equal(u, v)
    half = kmerge.merge_weights([a, b], method="slerp")
    assert not np.array_equal(weights_of(half)[0], weights_of(by_w)[0])
    assert kmerge.info(by_w)["t"] == 0.75 and kmerge.info(half)["t"] == 0.5
    with pytest.raises(InvalidArgumentError, match="not both"):
        kmerge.merge_weights([a, b], method="slerp", weights=[1, 3], t=0.5)
    # streamed from files (what the CLI does): the same t
    files = [tmp_path / "a.keras", tmp_path / "b.keras"]
    for m, f in zip((a, b), files):
        kmerge.save(m, f)
    out = merge_weights_files(files, tmp_path / "s.keras", method="slerp", weights=[1, 3])
    for u, v in zip(weights_of(kmerge.load(out)), weights_of(by_t)):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    with pytest.raises(InvalidArgumentError, match="not both"):
        merge_weights_files(files, tmp_path / "n.keras", method="slerp", weights=[1, 3], t=0.5)
    assert not (tmp_path / "n.keras").exists()


# ----------------------------------------------------------------------------- TIES scope


def test_ties_model_scope_trims_the_whole_task_vector():
    def small(seed, spread):
        keras.utils.set_random_seed(seed)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        k, b = m.layers[0].get_weights()
        m.layers[0].set_weights([k * spread, b + np.float32(0.01 * seed)])
        return m

    base, a, b = small(0, 1.0), small(1, 1.0), small(2, 1.0)
    # the bias moved little, the kernel much: the model-wide top 20% holds no bias entry
    a.layers[0].set_weights([a.layers[0].get_weights()[0] * 5, a.layers[0].get_weights()[1]])
    density = 0.2
    taus = [np.concatenate([(w - w0).ravel().astype(np.float64)
                            for w, w0 in zip(weights_of(m), weights_of(base))]) for m in (a, b)]
    k = int(np.ceil(density * taus[0].size))  # 15 entries -> 3 kept per model
    kept = np.stack([np.where(np.abs(t) >= np.sort(np.abs(t))[-k], t, 0.0) for t in taus])
    assert (kept != 0).sum(1).tolist() == [k, k]
    sign = np.where(kept.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(kept) == sign) & (kept != 0)
    merged_tv = np.where(agree, kept, 0).sum(0) / np.maximum(agree.sum(0), 1)
    want = np.concatenate([w.ravel() for w in weights_of(base)]) + merged_tv
    m = kmerge.merge_weights([a, b], method="ties", base=base, density=density, scope="model")
    got = np.concatenate([w.ravel() for w in weights_of(m)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    per_tensor = kmerge.merge_weights([a, b], method="ties", base=base, density=density)
    got_t = np.concatenate([w.ravel() for w in weights_of(per_tensor)])
    assert not np.allclose(got_t, got)  # the scopes keep different entries here
    assert len(kmerge.info(m)["ties_thresholds"]) == 2
    with pytest.raises(InvalidArgumentError, match="per-tensor density needs scope='tensor'"):
        kmerge.merge_weights([a, b], method="ties", base=base, scope="model",
                             params={".*kernel": {"density": 0.5}})
    with pytest.raises(InvalidArgumentError, match="scope must be one of"):
        kmerge.merge_weights([a, b], method="ties", base=base, scope="global")

"""Reference tests for every weight-merge method against hand-computed NumPy values, and a
contract test over the registry."""

from __future__ import annotations

import numpy as np
import pytest

from kmerge.errors import InvalidArgumentError
from kmerge.weights.methods import merge_methods, supplied_params, user_params
from kmerge.weights.methods.sparse import disjoint_mean, elect_sign, trim_top_k


def call(name, tensors, **kw):
    return merge_methods.get(name)(tensors, **kw)


def test_linear_reference():
    a, b = np.array([[1.0, 2.0]]), np.array([[3.0, -2.0]])
    np.testing.assert_allclose(call("linear", [a, b], weights=[0.25, 0.75]), [[2.5, -1.0]])


def test_slerp_reference_and_fallback():
    a, b = np.array([2.0, 0.0]), np.array([0.0, 1.0])
    # theta = 90 deg: sin weights on the un-normalised tensors
    w = np.sin(np.pi / 4) / np.sin(np.pi / 2)
    np.testing.assert_allclose(call("slerp", [a, b], t=0.5), w * a + w * b)
    np.testing.assert_allclose(call("slerp", [a, b], t=0.0), a)
    np.testing.assert_allclose(call("slerp", [a, b], t=1.0), b, atol=1e-12)
    # nearly parallel (|cos| > 0.9995): plain lerp
    c = np.array([2.0, 1e-3])
    np.testing.assert_allclose(call("slerp", [a, c], t=0.3), 0.7 * a + 0.3 * c)


def test_task_arithmetic_reference():
    base = np.array([1.0, 1.0])
    t1, t2 = np.array([2.0, 1.0]), np.array([1.0, 3.0])
    # base + scale * (tau1 + tau2) with equal weights
    np.testing.assert_allclose(call("task_arithmetic", [t1, t2], weights=[.5, .5], base=base,
                                    scale=0.5), [1.5, 2.0])


def test_ties_reference():
    base = np.zeros(4)
    t1 = np.array([4.0, -1.0, 0.5, 2.0])
    t2 = np.array([-3.0, 2.0, 0.1, 1.0])
    t3 = np.array([-2.0, -0.2, 3.0, 0.3])
    # density 0.5 keeps 2 of 4 per task vector:
    # t1 -> [4, 0, 0, 2]; t2 -> [-3, 2, 0, 0]; t3 -> [-2, 0, 3, 0]
    # mass: [-1, 2, 3, 2] -> signs [-, +, +, +]; disjoint means: [-2.5, 2, 3, 2]
    out = call("ties", [t1, t2, t3], weights=[1 / 3] * 3, base=base, density=0.5)
    np.testing.assert_allclose(out, [-2.5, 2.0, 3.0, 2.0])
    # base 1: task vectors t - 1 -> trimmed [3, -2, 0, 0], [-4, 1, 0, 0], [-3, 0, 2, 0];
    # mass [-4/3, -1/3, 2/3, 0] -> disjoint means [-3.5, -2, 2, 0]; 1 + 2 * that
    out = call("ties", [t1, t2, t3], weights=[1 / 3] * 3, base=base + 1, density=0.5, scale=2)
    np.testing.assert_allclose(out, [-6.0, -3.0, 5.0, 1.0])


def test_sparse_helpers_shared():
    taus = np.array([[1.0, -5.0, 0.2], [-2.0, 1.0, 0.0]])
    np.testing.assert_array_equal(trim_top_k(taus, 1 / 3), [[0, -5, 0], [-2, 0, 0]])
    w = np.array([0.5, 0.5])
    sign = elect_sign(taus, w)
    np.testing.assert_array_equal(sign, [-1, -1, 1])
    np.testing.assert_allclose(disjoint_mean(taus, w, sign), [-2.0, -5.0, 0.2])


def test_dare_reference_seeded():
    base = np.zeros(1000)
    t = np.ones(1000)
    out = call("dare", [t], weights=[1.0], base=base, p=0.5, seed=3, path="d/kernel")
    kept = out != 0
    np.testing.assert_allclose(out[kept], 2.0)  # rescaled by 1/(1-p)
    assert 400 < kept.sum() < 600
    again = call("dare", [t], weights=[1.0], base=base, p=0.5, seed=3, path="d/kernel")
    np.testing.assert_array_equal(out, again)
    other = call("dare", [t], weights=[1.0], base=base, p=0.5, seed=4, path="d/kernel")
    assert not np.array_equal(out, other)
    # then="ties": same mask, sign election + disjoint mean
    t2 = -np.ones(1000)
    ties = call("dare", [t, t2], weights=[.5, .5], base=base, p=0.0, then="ties")
    np.testing.assert_allclose(ties, 1.0)  # mass 0 elects +; only t agrees
    ta = call("dare", [t, t2], weights=[.5, .5], base=base, p=0.0)
    np.testing.assert_allclose(ta, 0.0)


def test_fisher_reference_and_floor():
    t = [np.array([0.0, 0.0]), np.array([1.0, 1.0])]
    f = [np.array([1.0, 0.0]), np.array([3.0, 0.0])]
    out = call("fisher", t, weights=[.5, .5], fishers=f, floor=1e-6)
    np.testing.assert_allclose(out, [0.75, 0.5])  # floored zeros -> plain average


def test_regmean_reference():
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=(20, 3)), rng.normal(size=(20, 3))
    w1, w2 = rng.normal(size=(3, 2)), rng.normal(size=(3, 2))
    g1, g2 = x1.T @ x1, x2.T @ x2
    out = call("regmean", [w1, w2], weights=[.5, .5], grams=[g1, g2], alpha=1.0)
    # alpha=1: the least-squares solution of [x1; x2] W = [x1 w1; x2 w2]
    want = np.linalg.solve(g1 + g2, g1 @ w1 + g2 @ w2)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    # alpha=0 keeps only the diagonal: a per-input weighted average
    d1, d2 = np.diag(g1), np.diag(g2)
    want0 = (d1[:, None] * w1 + d2[:, None] * w2) / (d1 + d2)[:, None]
    np.testing.assert_allclose(call("regmean", [w1, w2], weights=[.5, .5], grams=[g1, g2],
                                    alpha=0.0), want0, rtol=1e-6)
    # no Gram matrix (biases, other variables): the weighted average
    np.testing.assert_allclose(call("regmean", [w1, w2], weights=[.5, .5]), (w1 + w2) / 2)


def _supplied(name, n, shape, rng):
    fn = merge_methods.get(name)
    sup = supplied_params(fn)
    kw = {}
    if "weights" in sup:
        kw["weights"] = [1.0 / n] * n
    if "base" in sup:
        kw["base"] = rng.normal(size=shape)
    if "path" in sup:
        kw["path"] = "dense/kernel"
    if "fishers" in sup:
        kw["fishers"] = [rng.uniform(0, 1, size=shape) for _ in range(n)]
    if "grams" in sup and len(shape) == 2:
        x = rng.normal(size=(10, shape[0]))
        kw["grams"] = [x.T @ x] * n
    return kw


@pytest.mark.parametrize("name", merge_methods.names())
def test_contract_identical_sources_merge_to_themselves(name):
    rng = np.random.default_rng(0)
    t = rng.normal(size=(4, 3))
    n = 2
    kw = _supplied(name, n, t.shape, rng)
    if "base" in kw:
        # task-vector methods: sources equal to the base give the base back
        kw["base"] = t.copy()
    out = merge_methods.get(name)([t.copy() for _ in range(n)], **kw)
    np.testing.assert_allclose(out, t, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", merge_methods.names())
def test_contract_signature_and_docstring(name):
    fn = merge_methods.get(name)
    doc = (fn.__doc__ or "").strip().splitlines()[0]
    assert "20" in doc or "19" in doc, f"{name}: the first docstring line should cite its paper"
    for param, default in user_params(fn).items():
        assert default is not __import__("inspect").Parameter.empty, (name, param)


def test_registering_twice_is_an_error():
    with pytest.raises(InvalidArgumentError, match="already registered"):
        merge_methods.register("linear")(lambda tensors, *, weights: tensors[0])


def test_bad_values():
    t = [np.zeros(3), np.ones(3)]
    with pytest.raises(InvalidArgumentError, match=r"density must be in \(0, 1\]"):
        call("ties", t, weights=[.5, .5], base=np.zeros(3), density=0.0)
    with pytest.raises(InvalidArgumentError, match=r"p must be in \[0, 1\)"):
        call("dare", t, weights=[.5, .5], base=np.zeros(3), p=1.0)
    with pytest.raises(InvalidArgumentError, match="then must be one of"):
        call("dare", t, weights=[.5, .5], base=np.zeros(3), then="linear")
    with pytest.raises(InvalidArgumentError, match="exactly two"):
        call("slerp", t + t)
    with pytest.raises(InvalidArgumentError, match=r"t must be in \[0, 1\]"):
        call("slerp", t, t=2)

"""Fault injection and fuzzing (issue 9): a failed call raises a one-line KmergeError (or the
CLI exits 1 with one ``error:`` line) and does no harm: no file created or changed, every
source file byte-identical, every in-memory model predicting exactly what it predicted before
(checked with kmerge's compiled inference, never ``model.predict``).

The harness and the test world (the ``e`` fixture: fresh copies of saved tiny models per test,
so one damaging case cannot break the next) are in ``tests/harm.py``. Cases still failing live
in the same tables of ``tests/test_harm_pending.py`` and move here when fixed.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from conftest import mlp
from harm import (  # noqa: F401 - harm_env and harm_library are fixtures
    X_EMPTY,
    X_WRONG,
    N,
    assert_harmless,
    assert_ok_or_harmless,
    cli_out,
    distilled,
    harm_env,
    harm_library,
    merge_of_loaded_merge,
    merge_of_merges,
    named,
    nan_x,
    outputs_of,
    run_call,
    run_cli,
    run_collision,
    run_lineage,
    str_y,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kmerge
from kmerge.errors import InvalidArgumentError, KmergeError, SaveError
from kmerge.report import write_report

FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])




@pytest.fixture
def e(request):
    """This test's world (see harm.Env)."""
    return request.getfixturevalue("harm_env")


# ------------------------------------------------------------------ 0. the harness itself
def test_harness_catches_harm(tmp_path):
    a = mlp("a")
    f = tmp_path / "f.bin"
    f.write_bytes(b"keep")

    def raises(exc):
        raise exc

    def spoil_weights():
        a.layers[0].kernel.assign(np.zeros(a.layers[0].kernel.shape, "float32"))
        raise InvalidArgumentError("bad")

    cases = [
        (lambda: None, "did not raise"),
        (lambda: raises(ValueError("raw")), "raised builtins.ValueError"),
        (lambda: raises(InvalidArgumentError("two\nlines")), "not one line"),
        (lambda: (f.write_bytes(b"changed"), raises(InvalidArgumentError("x"))), "changed"),
        (lambda: ((tmp_path / "new").write_text("x"), raises(InvalidArgumentError("x"))),
         "created"),
        (spoil_weights, "predicts differently"),
    ]
    for call, message in cases:
        with pytest.raises(pytest.fail.Exception, match=message):
            assert_harmless(call, models=[a], files=[f], dirs=[tmp_path])
        f.write_bytes(b"keep")
        (tmp_path / "new").unlink(missing_ok=True)


def test_harness_sees_a_model_emptied_by_predict():
    # Keras's predict with bad data raises a raw ValueError; on jax it also leaves the
    # model's variables empty, which the harness must report.
    a = mlp("a")
    expect = "raised builtins.ValueError"
    if keras.backend.backend() == "jax":
        expect += ".*(no longer runs|unreadable)"
    with pytest.raises(pytest.fail.Exception, match=expect):
        assert_harmless(lambda: a.predict(np.zeros((4, 5), "float32"), verbose=0), models=[a])


# ------------------------------------------------------------------ 1. failed calls on data
# On jax, Keras's model.predict empties a model's variables while it runs and does not restore
# them when it raises: every data-taking call must check the data first (or not use predict).
DAMAGE = {
    "merge_weights-linear-probe-x-wrong-shape":
        lambda e: kmerge.merge_weights([e.a, e.b], method="linear", data=(X_WRONG, e.y)),
    "merge_weights-linear-probe-y-wrong-length":
        lambda e: kmerge.merge_weights([e.a, e.b], method="linear", data=(e.x, e.y[:5])),
    "merge_weights-fisher-x-wrong-shape":
        lambda e: kmerge.merge_weights([e.a, e.b], method="fisher", data=X_WRONG),
    "merge_weights-regmean-x-wrong-shape":
        lambda e: kmerge.merge_weights([e.a, e.b], method="regmean", data=X_WRONG),
    "merge_weights-greedy_soup-x-wrong-shape":
        lambda e: kmerge.merge_weights([e.a, e.b], method="greedy_soup", data=(X_WRONG, e.y)),
    "merge_weights-align-activations-x-wrong-shape":
        lambda e: kmerge.merge_weights([e.a, e.b], method="linear", align="activations",
                                       data=X_WRONG),
    "merge_weights-repair-bn-x-wrong-shape":
        lambda e: kmerge.merge_weights([e.a, e.b], method="linear", repair="repair",
                                       data=X_WRONG),
    "align-activations-x-wrong-shape":
        lambda e: kmerge.align(e.a, e.b, method="activations", data=X_WRONG),
    "stitch-x-wrong-shape":
        lambda e: kmerge.stitch(e.a, e.b, at=(0, 0), x=X_WRONG, y=e.y, epochs=0, seed=0),
    "stitch-validation-x-wrong-shape":
        lambda e: kmerge.stitch(e.a, e.b, at=(0, 0), x=e.x, y=e.y, epochs=1, seed=0, verbose=0,
                                validation_data=(X_WRONG, e.y)),
    "stitch-validation-y-wrong-length":
        lambda e: kmerge.stitch(e.a, e.b, at=(0, 0), x=e.x, y=e.y, epochs=1, seed=0, verbose=0,
                                validation_data=(e.x, e.y[:3])),
    "stitch-validation-not-a-pair":
        lambda e: kmerge.stitch(e.a, e.b, at=(0, 0), x=e.x, y=e.y, epochs=1, seed=0, verbose=0,
                                validation_data="junk"),
    "write_report-x-wrong-shape":
        lambda e: write_report(e.out / "r", models={"a": e.a, "b": e.b, "m": e.m},
                                             x=X_WRONG, y=e.y, final="m"),
    "write_report-y-wrong-length":
        lambda e: write_report(e.out / "r", models={"a": e.a, "b": e.b, "m": e.m},
                                             x=e.x, y=e.y[:4], final="m"),
    "verify-x-wrong-shape":
        lambda e: kmerge.verify(e.m, {"a": e.a, "b": e.b}, x=X_WRONG),
    "fit_head-x-wrong-shape":
        lambda e: kmerge.fit_head(e.m, X_WRONG, e.y, epochs=1, verbose=0, seed=0),
    "fit_head-y-wrong-length":
        lambda e: kmerge.fit_head(e.m, e.x, e.y[:7], epochs=1, verbose=0, seed=0),
    "fit_head-validation-x-wrong-shape":
        lambda e: kmerge.fit_head(e.m, e.x, e.y, epochs=1, verbose=0, seed=0,
                                  validation_data=(X_WRONG, e.y)),
    "fit_head-cache-none-x-wrong-shape":
        lambda e: kmerge.fit_head(e.m, X_WRONG, e.y, epochs=1, verbose=0, seed=0, cache=None),
    "fine_tune-x-wrong-shape":
        lambda e: kmerge.fine_tune(e.m, X_WRONG, e.y, epochs=1, verbose=0, seed=0),
    "distill-x-wrong-shape":
        lambda e: kmerge.distill(e.a, e.student, X_WRONG, epochs=1, verbose=0, seed=0),
    "distill-ensemble-x-wrong-shape":
        lambda e: kmerge.distill([e.a, e.b], e.student, X_WRONG, epochs=1, verbose=0, seed=0),
    "distill-y-wrong-length":
        lambda e: kmerge.distill(e.a, e.student, e.x, y=e.y[:5], alpha=0.5, epochs=1,
                                 verbose=0, seed=0),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_failed_call_does_no_harm(e, case):
    run_call(e, DAMAGE[case])


def test_stitch_when_b_cannot_take_x(e):
    e.need(lambda: e.a)
    b6 = e.load("a6")  # 6 inputs: b alone cannot be scored on a's x
    assert_ok_or_harmless(
        lambda: kmerge.stitch(e.a, b6, at=(0, 0), x=e.x, y=e.y, epochs=1, seed=0, verbose=0),
        models=[*e.models, b6], files=e.files, dirs=[e.root],
        check=lambda m: isinstance(m, keras.Model))


# ------------------------------------------------------------------ 2. lineage
LINEAGE = {  # case -> (derived model factory, source file it must refuse)
    "parallel-a": (lambda e: kmerge.parallel([e.a, e.b], verify=False), "a"),
    "parallel-b": (lambda e: kmerge.parallel([e.a, e.b], verify=False), "b"),
    "parallel-of-paths": (lambda e: kmerge.parallel([e.path("a"), e.path("b")],
                                                    verify=False), "b"),
    "sequential-b": (lambda e: kmerge.sequential([e.a, e.b], verify=False), "b"),
    "fuse-a": (lambda e: kmerge.fuse({"a": (e.a, 0), "b": (e.b, 0)}, verify=False), "a"),
    "merge_weights-b": (lambda e: kmerge.merge_weights([e.a, e.b], method="linear"), "b"),
    "merge_weights-of-paths": (lambda e: kmerge.merge_weights([e.path("a"), e.path("b")],
                                                              method="linear"), "a"),
    "merge_weights-align-second": (lambda e: kmerge.merge_weights(
        [e.a, e.b], method="linear", align="weights"), "b"),
    "align-other": (lambda e: kmerge.align(e.a, e.b), "b"),
    "task_arithmetic-base": (lambda e: kmerge.merge_weights(
        [e.a, e.b], method="task_arithmetic", base=e.base), "base"),
    "ties-base": (lambda e: kmerge.merge_weights(
        [e.a, e.b], method="ties", base=e.base, density=0.5), "base"),
    "stitch-a": (lambda e: kmerge.stitch(e.a, e.b, at=(0, 0), x=e.x, y=e.y, epochs=0,
                                         seed=0), "a"),
    "stitch-b": (lambda e: kmerge.stitch(e.a, e.b, at=(0, 0), x=e.x, y=e.y, epochs=0,
                                         seed=0), "b"),
    "distill-teacher": (lambda e: distilled(e, e.a), "a"),
    "distill-ensemble-teacher": (lambda e: distilled(e, [e.a, e.b]), "b"),
    "merge-of-merges-grandparent": (merge_of_merges, "a"),
    "merge-of-loaded-merge-parent": (merge_of_loaded_merge, "m1"),
    "merge_weights-of-merges-grandparent": (lambda e: kmerge.merge_weights(
        [kmerge.parallel({"a": e.a, "b": e.b}, combine="average", verify=False),
         e.load("m1")], method="linear"), "a"),
    "merge-of-loaded-merge-grandparent": (merge_of_loaded_merge, "b"),
}


@pytest.mark.parametrize("case", list(LINEAGE))
def test_save_refuses_every_ancestor_file(e, case):
    run_lineage(e, *LINEAGE[case])


def test_save_refuses_an_ancestor_after_a_save_load_round_trip(e):
    m2 = merge_of_merges(e)
    kmerge.save(m2, e.out / "m2.keras")
    again = kmerge.load(e.out / "m2.keras")
    e.harmless(lambda: kmerge.save(again, e.path("a"), overwrite=True), extra=[again],
               error=SaveError)


# ------------------------------------------------------------------ 3. bad argument values
BAD = {
    # builders: models
    "parallel-models-none": lambda e: kmerge.parallel(None),
    "parallel-models-int": lambda e: kmerge.parallel(3),
    "parallel-one-model": lambda e: kmerge.parallel([e.a]),
    "parallel-empty-list": lambda e: kmerge.parallel([]),
    "parallel-list-of-non-models": lambda e: kmerge.parallel([e.a, 3]),
    "parallel-list-of-strings-missing": lambda e: kmerge.parallel([e.a, "missing.keras"]),
    "parallel-list-of-arrays": lambda e: kmerge.parallel([e.x, e.x]),
    "parallel-dict-none-value": lambda e: kmerge.parallel({"a": e.a, "b": None}),
    "parallel-dict-bad-name": lambda e: kmerge.parallel({"1a": e.a, "b": e.b}),
    "parallel-dict-int-name": lambda e: kmerge.parallel({1: e.a, "b": e.b}),
    "parallel-garbage-file": lambda e: kmerge.parallel([e.a, e.path("garbage")]),
    # builders: options
    "parallel-combine-unknown": lambda e: kmerge.parallel([e.a, e.b], combine="blend"),
    "parallel-combine-int": lambda e: kmerge.parallel([e.a, e.b], combine=3),
    "parallel-combine-none": lambda e: kmerge.parallel([e.a, e.b], combine=None),
    "parallel-weights-short": lambda e: kmerge.parallel([e.a, e.b], combine="weighted",
                                                        weights=[1.0]),
    "parallel-weights-long": lambda e: kmerge.parallel([e.a, e.b], combine="weighted",
                                                       weights=[1, 2, 3]),
    "parallel-weights-negative": lambda e: kmerge.parallel([e.a, e.b], combine="weighted",
                                                           weights=[-1, 2]),
    "parallel-weights-zero": lambda e: kmerge.parallel([e.a, e.b], combine="weighted",
                                                       weights=[0, 0]),
    "parallel-weights-nan": lambda e: kmerge.parallel([e.a, e.b], combine="weighted",
                                                      weights=[math.nan, 1]),
    "parallel-weights-inf": lambda e: kmerge.parallel([e.a, e.b], combine="weighted",
                                                      weights=[math.inf, 1]),
    "parallel-weights-missing": lambda e: kmerge.parallel([e.a, e.b], combine="weighted"),
    "parallel-weights-dict": lambda e: kmerge.parallel([e.a, e.b], combine="weighted",
                                                       weights={"a": 1, "b": 1}),
    "parallel-weights-for-concat": lambda e: kmerge.parallel([e.a, e.b], weights=[1, 1]),
    "parallel-head-string": lambda e: kmerge.parallel([e.a, e.b], head="classifier"),
    "parallel-head-int": lambda e: kmerge.parallel([e.a, e.b], head=10),
    "parallel-freeze-string": lambda e: kmerge.parallel([e.a, e.b], freeze="yes"),
    "parallel-freeze-unknown-name": lambda e: kmerge.parallel([e.a, e.b], freeze={"zz"}),
    "parallel-freeze-int": lambda e: kmerge.parallel([e.a, e.b], freeze=3),
    "parallel-output-unknown-source": lambda e: kmerge.parallel({"a": e.a, "b": e.b},
                                                                output={"zz": 0}),
    "parallel-output-index-out-of-range": lambda e: kmerge.parallel({"a": e.a, "b": e.b},
                                                                    output={"a": 5}),
    "parallel-output-unknown-name": lambda e: kmerge.parallel({"a": e.a, "b": e.b},
                                                              output={"a": "nope"}),
    "parallel-adapter-unknown": lambda e: kmerge.parallel([e.a, e.b], adapter="maybe"),
    "parallel-adapter-none-object": lambda e: kmerge.parallel([e.a, e.b], adapter=None),
    "parallel-name-int": lambda e: kmerge.parallel([e.a, e.b], name=3),
    "parallel-name-empty": lambda e: kmerge.parallel([e.a, e.b], name=""),
    "parallel-name-slash": lambda e: kmerge.parallel([e.a, e.b], name="a/b"),
    "parallel-elementwise-unequal-no-adapter": lambda e: kmerge.parallel(
        [e.a, e.load("w5")], combine="add"),
    "sequential-one-model": lambda e: kmerge.sequential([e.a]),
    "sequential-non-model": lambda e: kmerge.sequential([e.a, "x"]),
    "sequential-none": lambda e: kmerge.sequential(None),
    "sequential-adapter-unknown": lambda e: kmerge.sequential([e.a, e.b], adapter="yes"),
    "sequential-adapter-none-mismatch": lambda e: kmerge.sequential([e.a, e.b], adapter="none"),
    "sequential-freeze-string": lambda e: kmerge.sequential([e.a, e.b], freeze="no"),
    "fuse-unknown-layer": lambda e: kmerge.fuse({"a": (e.a, "nope"), "b": (e.b, 0)}),
    "fuse-index-out-of-range": lambda e: kmerge.fuse({"a": (e.a, 99), "b": (e.b, 0)}),
    "fuse-float-ref": lambda e: kmerge.fuse({"a": (e.a, 0.5), "b": (e.b, 0)}),
    "fuse-none-ref": lambda e: kmerge.fuse({"a": (e.a, None), "b": (e.b, 0)}),
    "fuse-empty-ref-list": lambda e: kmerge.fuse({"a": (e.a, []), "b": (e.b, 0)}),
    "fuse-not-a-pair": lambda e: kmerge.fuse({"a": e.a, "b": e.b}),
    "fuse-list": lambda e: kmerge.fuse([e.a, e.b]),
    "fuse-one-tap": lambda e: kmerge.fuse({"a": (e.a, 0)}),
    "fuse-pooling-unknown": lambda e: kmerge.fuse({"a": (e.a, 0), "b": (e.b, 0)},
                                                  pooling="median"),
    "fuse-weights-short": lambda e: kmerge.fuse({"a": (e.a, 0), "b": (e.b, 0)},
                                                combine="weighted", weights=[1]),
    "fuse-combine-unknown": lambda e: kmerge.fuse({"a": (e.a, 0), "b": (e.b, 0)},
                                                  combine="mix"),
    # heads
    "classifier-zero": lambda e: kmerge.heads.classifier(0),
    "classifier-negative": lambda e: kmerge.heads.classifier(-3),
    "classifier-string": lambda e: kmerge.heads.classifier("10"),
    "classifier-float": lambda e: kmerge.heads.classifier(2.5),
    "classifier-bool": lambda e: kmerge.heads.classifier(True),
    "classifier-none": lambda e: kmerge.heads.classifier(None),
    "classifier-hidden-zero": lambda e: kmerge.heads.classifier(3, hidden=[0]),
    "classifier-hidden-string": lambda e: kmerge.heads.classifier(3, hidden=["64"]),
    "classifier-hidden-int": lambda e: kmerge.heads.classifier(3, hidden=64),
    "classifier-hidden-none": lambda e: kmerge.heads.classifier(3, hidden=None),
    "classifier-hidden-string-whole": lambda e: kmerge.heads.classifier(3, hidden="64"),
    "classifier-dropout-one": lambda e: kmerge.heads.classifier(3, dropout=1.0),
    "classifier-dropout-negative": lambda e: kmerge.heads.classifier(3, dropout=-0.1),
    "classifier-dropout-nan": lambda e: kmerge.heads.classifier(3, dropout=math.nan),
    "classifier-dropout-string": lambda e: kmerge.heads.classifier(3, dropout="abc"),
    "classifier-dropout-none": lambda e: kmerge.heads.classifier(3, dropout=None),
    "regressor-zero": lambda e: kmerge.heads.regressor(0),
    "regressor-inf": lambda e: kmerge.heads.regressor(math.inf),
    "regressor-hidden-negative": lambda e: kmerge.heads.regressor(1, hidden=[-4]),
    # merge_weights: models and method
    "merge_weights-models-none": lambda e: kmerge.merge_weights(None, method="linear"),
    "merge_weights-models-model": lambda e: kmerge.merge_weights(e.a, method="linear"),
    "merge_weights-one-model": lambda e: kmerge.merge_weights([e.a], method="linear"),
    "merge_weights-non-model": lambda e: kmerge.merge_weights([e.a, 3], method="linear"),
    "merge_weights-missing-path": lambda e: kmerge.merge_weights([e.a, "missing.keras"],
                                                                 method="linear"),
    "merge_weights-garbage-file": lambda e: kmerge.merge_weights([e.a, e.path("garbage")],
                                                                 method="linear"),
    "merge_weights-architectures-differ": lambda e: kmerge.merge_weights(
        [e.a, e.load("a6")], method="linear"),
    "merge_weights-merged-and-source": lambda e: kmerge.merge_weights([e.a, e.m],
                                                                      method="linear"),
    "merge_weights-method-unknown": lambda e: kmerge.merge_weights([e.a, e.b], method="avg"),
    "merge_weights-method-none": lambda e: kmerge.merge_weights([e.a, e.b], method=None),
    "merge_weights-method-int": lambda e: kmerge.merge_weights([e.a, e.b], method=3),
    "merge_weights-unknown-param": lambda e: kmerge.merge_weights([e.a, e.b], method="linear",
                                                                  foo=1),
    # merge_weights: weights
    "merge_weights-weights-short": lambda e: kmerge.merge_weights([e.a, e.b], method="linear",
                                                                  weights=[1]),
    "merge_weights-weights-long": lambda e: kmerge.merge_weights([e.a, e.b], method="linear",
                                                                 weights=[1, 1, 1]),
    "merge_weights-weights-negative": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="linear", weights=[-1, 2]),
    "merge_weights-weights-zero": lambda e: kmerge.merge_weights([e.a, e.b], method="linear",
                                                                 weights=[0, 0]),
    "merge_weights-weights-nan": lambda e: kmerge.merge_weights([e.a, e.b], method="linear",
                                                                weights=[math.nan, 1]),
    "merge_weights-weights-inf": lambda e: kmerge.merge_weights([e.a, e.b], method="linear",
                                                                weights=[math.inf, 1]),
    "merge_weights-weights-strings": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="linear", weights=["a", "b"]),
    "merge_weights-weights-none-items": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="linear", weights=[None, 1]),
    # merge_weights: method parameters
    "slerp-t-string": lambda e: kmerge.merge_weights([e.a, e.b], method="slerp", t="0.5"),
    "slerp-t-negative": lambda e: kmerge.merge_weights([e.a, e.b], method="slerp", t=-0.5),
    "slerp-t-above-one": lambda e: kmerge.merge_weights([e.a, e.b], method="slerp", t=1.5),
    "slerp-t-nan": lambda e: kmerge.merge_weights([e.a, e.b], method="slerp", t=math.nan),
    "slerp-t-none": lambda e: kmerge.merge_weights([e.a, e.b], method="slerp", t=None),
    "slerp-three-models": lambda e: kmerge.merge_weights([e.a, e.b, e.base], method="slerp"),
    "task_arithmetic-no-base": lambda e: kmerge.merge_weights([e.a, e.b],
                                                              method="task_arithmetic"),
    "task_arithmetic-base-int": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="task_arithmetic", base=3),
    "task_arithmetic-scale-nan": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="task_arithmetic", base=e.base, scale=math.nan),
    "task_arithmetic-scale-inf": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="task_arithmetic", base=e.base, scale=math.inf),
    "task_arithmetic-scale-string": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="task_arithmetic", base=e.base, scale="1"),
    "ties-density-zero": lambda e: kmerge.merge_weights([e.a, e.b], method="ties", base=e.base,
                                                        density=0),
    "ties-density-negative": lambda e: kmerge.merge_weights([e.a, e.b], method="ties",
                                                            base=e.base, density=-0.2),
    "ties-density-two": lambda e: kmerge.merge_weights([e.a, e.b], method="ties", base=e.base,
                                                       density=2),
    "ties-density-nan": lambda e: kmerge.merge_weights([e.a, e.b], method="ties", base=e.base,
                                                       density=math.nan),
    "ties-density-string": lambda e: kmerge.merge_weights([e.a, e.b], method="ties",
                                                          base=e.base, density="dense"),
    "dare-p-one": lambda e: kmerge.merge_weights([e.a, e.b], method="dare", base=e.base, p=1.0),
    "dare-p-negative": lambda e: kmerge.merge_weights([e.a, e.b], method="dare", base=e.base,
                                                      p=-0.1),
    "dare-p-nan": lambda e: kmerge.merge_weights([e.a, e.b], method="dare", base=e.base,
                                                 p=math.nan),
    "dare-seed-string": lambda e: kmerge.merge_weights([e.a, e.b], method="dare", base=e.base,
                                                       seed="x"),
    "dare-seed-float": lambda e: kmerge.merge_weights([e.a, e.b], method="dare", base=e.base,
                                                      seed=0.5),
    "dare-then-unknown": lambda e: kmerge.merge_weights([e.a, e.b], method="dare", base=e.base,
                                                        then="magic"),
    "linear-base-refused": lambda e: kmerge.merge_weights([e.a, e.b], method="linear",
                                                          base=e.base),
    "fisher-no-data": lambda e: kmerge.merge_weights([e.a, e.b], method="fisher"),
    "fisher-samples-zero": lambda e: kmerge.merge_weights([e.a, e.b], method="fisher",
                                                          data=e.x, samples=0),
    "fisher-samples-negative": lambda e: kmerge.merge_weights([e.a, e.b], method="fisher",
                                                              data=e.x, samples=-5),
    "fisher-samples-string": lambda e: kmerge.merge_weights([e.a, e.b], method="fisher",
                                                            data=e.x, samples="many"),
    "fisher-samples-nan": lambda e: kmerge.merge_weights([e.a, e.b], method="fisher",
                                                         data=e.x, samples=math.nan),
    "fisher-floor-negative": lambda e: kmerge.merge_weights([e.a, e.b], method="fisher",
                                                            data=e.x, floor=-1.0),
    "fisher-x-empty": lambda e: kmerge.merge_weights([e.a, e.b], method="fisher", data=X_EMPTY),
    "fisher-x-nan": lambda e: kmerge.merge_weights([e.a, e.b], method="fisher", data=nan_x(e)),
    "fisher-data-string": lambda e: kmerge.merge_weights([e.a, e.b], method="fisher",
                                                         data="x.npy"),
    "regmean-alpha-negative": lambda e: kmerge.merge_weights([e.a, e.b], method="regmean",
                                                             data=e.x, alpha=-1.0),
    "regmean-alpha-nan": lambda e: kmerge.merge_weights([e.a, e.b], method="regmean",
                                                        data=e.x, alpha=math.nan),
    "regmean-x-empty": lambda e: kmerge.merge_weights([e.a, e.b], method="regmean",
                                                      data=X_EMPTY),
    "regmean-x-nan": lambda e: kmerge.merge_weights([e.a, e.b], method="regmean",
                                                    data=nan_x(e)),
    "greedy_soup-no-labels": lambda e: kmerge.merge_weights([e.a, e.b], method="greedy_soup",
                                                            data=e.x),
    "greedy_soup-string-labels": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="greedy_soup", data=(e.x, str_y(e))),
    "greedy_soup-weights": lambda e: kmerge.merge_weights([e.a, e.b], method="greedy_soup",
                                                          data=(e.x, e.y), weights=[1, 2]),
    "greedy_soup-x-empty": lambda e: kmerge.merge_weights([e.a, e.b], method="greedy_soup",
                                                          data=(X_EMPTY, e.y[:0])),
    "linear-probe-string-labels": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="linear", data=(e.x, str_y(e))),
    "linear-probe-x-nan": lambda e: kmerge.merge_weights([e.a, e.b], method="linear",
                                                         data=(nan_x(e), e.y)),
    "merge_weights-data-triple": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="linear", data=(e.x, e.y, e.y)),
    "merge_weights-align-unknown": lambda e: kmerge.merge_weights([e.a, e.b], method="linear",
                                                                  align="magic"),
    "merge_weights-align-activations-no-data": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="linear", align="activations"),
    "merge_weights-repair-unknown": lambda e: kmerge.merge_weights([e.a, e.b], method="linear",
                                                                   repair="fix"),
    "merge_weights-repair-no-data": lambda e: kmerge.merge_weights([e.a, e.b], method="linear",
                                                                   repair="bn"),
    "merge_weights-repair-x-empty": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="linear", repair="repair", data=X_EMPTY),
    "merge_weights-exclude-bad-regex": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="linear", exclude=["("]),
    "merge_weights-exclude-int": lambda e: kmerge.merge_weights([e.a, e.b], method="linear",
                                                                exclude=[3]),
    "merge_weights-exclude-no-match": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="linear", exclude=["nothing_matches"]),
    "merge_weights-params-bad-regex": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="ties", base=e.base, params={"(": {"density": 0.5}}),
    "merge_weights-params-not-dict": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="ties", base=e.base, params={".*": 0.5}),
    "merge_weights-params-bad-value": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="ties", base=e.base, params={".*kernel": {"density": 5}}),
    "merge_weights-params-list": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="ties", base=e.base, params=[("x", {})]),
    "merge_weights-mixed-float16-float32": lambda e: kmerge.merge_weights(
        [e.a, e.load("a16")], method="linear"),
    # align
    "align-method-unknown": lambda e: kmerge.align(e.a, e.b, method="magic"),
    "align-activations-no-data": lambda e: kmerge.align(e.a, e.b, method="activations"),
    "align-activations-x-empty": lambda e: kmerge.align(e.a, e.b, method="activations",
                                                        data=X_EMPTY),
    "align-activations-x-nan": lambda e: kmerge.align(e.a, e.b, method="activations",
                                                      data=nan_x(e)),
    "align-max_iter-negative": lambda e: kmerge.align(e.a, e.b, max_iter=-1),
    "align-max_iter-string": lambda e: kmerge.align(e.a, e.b, max_iter="10"),
    "align-seed-string": lambda e: kmerge.align(e.a, e.b, seed="x"),
    "align-batch_size-zero": lambda e: kmerge.align(e.a, e.b, method="activations", data=e.x,
                                                    batch_size=0),
    "align-other-not-model": lambda e: kmerge.align(e.a, 3),
    "align-architectures-differ": lambda e: kmerge.align(e.a, e.load("a6")),
    # verify
    "verify-plain-model": lambda e: kmerge.verify(e.a, {"a": e.a}),
    "verify-not-a-model": lambda e: kmerge.verify(3, {"a": e.a}),
    "verify-no-sources": lambda e: kmerge.verify(e.m, {}),
    "verify-unknown-source": lambda e: kmerge.verify(e.m, {"zz": e.a}),
    "verify-source-not-model": lambda e: kmerge.verify(e.m, {"a": 3}),
    "verify-sources-list-too-short": lambda e: kmerge.verify(e.m, [e.a]),
    "verify-sources-list-too-long": lambda e: kmerge.verify(e.m, [e.a, e.b, e.base]),
    "verify-atol-negative": lambda e: kmerge.verify(e.m, {"a": e.a}, atol=-1.0),
    "verify-atol-nan": lambda e: kmerge.verify(e.m, {"a": e.a}, atol=math.nan),
    "verify-atol-string": lambda e: kmerge.verify(e.m, {"a": e.a}, atol="0"),
    "verify-batch-zero": lambda e: kmerge.verify(e.m, {"a": e.a}, batch=0),
    "verify-batch-string": lambda e: kmerge.verify(e.m, {"a": e.a}, batch="4"),
    "verify-seed-string": lambda e: kmerge.verify(e.m, {"a": e.a}, seed="x"),
    "verify-x-empty": lambda e: kmerge.verify(e.m, {"a": e.a}, x=X_EMPTY),
    "verify-x-nan": lambda e: kmerge.verify(e.m, {"a": e.a}, x=nan_x(e)),
    "verify-x-dict-unknown-input": lambda e: kmerge.verify(e.m, {"a": e.a}, x={"zz": e.x}),
    # fit_head
    "fit_head-epochs-zero": lambda e: kmerge.fit_head(e.m, e.x, e.y, epochs=0, verbose=0),
    "fit_head-epochs-negative": lambda e: kmerge.fit_head(e.m, e.x, e.y, epochs=-1, verbose=0),
    "fit_head-epochs-string": lambda e: kmerge.fit_head(e.m, e.x, e.y, epochs="3", verbose=0),
    "fit_head-epochs-float": lambda e: kmerge.fit_head(e.m, e.x, e.y, epochs=1.5, verbose=0),
    "fit_head-epochs-nan": lambda e: kmerge.fit_head(e.m, e.x, e.y, epochs=math.nan,
                                                     verbose=0),
    "fit_head-batch_size-zero": lambda e: kmerge.fit_head(e.m, e.x, e.y, epochs=1,
                                                          batch_size=0, verbose=0),
    "fit_head-batch_size-string": lambda e: kmerge.fit_head(e.m, e.x, e.y, epochs=1,
                                                            batch_size="8", verbose=0),
    "fit_head-cache-unknown": lambda e: kmerge.fit_head(e.m, e.x, e.y, epochs=1,
                                                        cache="ram", verbose=0),
    "fit_head-model-int": lambda e: kmerge.fit_head(3, e.x, e.y, epochs=1, verbose=0),
    "fit_head-nothing-trainable": lambda e: kmerge.fit_head(
        kmerge.parallel([e.a, e.b], verify=False), e.x, e.y, epochs=1, verbose=0),
    "fit_head-x-none": lambda e: kmerge.fit_head(e.m, None, e.y, epochs=1, verbose=0),
    "fit_head-y-none": lambda e: kmerge.fit_head(e.m, e.x, None, epochs=1, verbose=0),
    "fit_head-x-empty": lambda e: kmerge.fit_head(e.m, X_EMPTY, e.y[:0], epochs=1, verbose=0),
    "fit_head-x-nan": lambda e: kmerge.fit_head(e.m, nan_x(e), e.y, epochs=1, verbose=0,
                                                seed=0),
    "fit_head-y-strings": lambda e: kmerge.fit_head(e.m, e.x, str_y(e), epochs=1, verbose=0,
                                                    seed=0),
    "fit_head-y-out-of-range": lambda e: kmerge.fit_head(e.m, e.x, e.y + 5, epochs=1,
                                                         verbose=0, seed=0),
    "fit_head-x-strings": lambda e: kmerge.fit_head(e.m, np.full((N, 8), "a"), e.y, epochs=1,
                                                    verbose=0, seed=0),
    "fit_head-validation-junk": lambda e: kmerge.fit_head(e.m, e.x, e.y, epochs=1, verbose=0,
                                                          validation_data="junk", seed=0),
    "fit_head-seed-string": lambda e: kmerge.fit_head(e.m, e.x, e.y, epochs=1, verbose=0,
                                                      seed="x"),
    # fine_tune
    "fine_tune-unfreeze-top-zero": lambda e: kmerge.fine_tune(e.m, e.x, e.y, epochs=1,
                                                              unfreeze="top:0", verbose=0),
    "fine_tune-unfreeze-top-string": lambda e: kmerge.fine_tune(e.m, e.x, e.y, epochs=1,
                                                                unfreeze="top:x", verbose=0),
    "fine_tune-unfreeze-unknown-layer": lambda e: kmerge.fine_tune(
        e.m, e.x, e.y, epochs=1, unfreeze=["no_such_layer"], verbose=0),
    "fine_tune-unfreeze-int": lambda e: kmerge.fine_tune(e.m, e.x, e.y, epochs=1, unfreeze=3,
                                                         verbose=0),
    "fine_tune-learning_rate-negative": lambda e: kmerge.fine_tune(
        e.m, e.x, e.y, epochs=1, learning_rate=-1e-3, verbose=0),
    "fine_tune-learning_rate-nan": lambda e: kmerge.fine_tune(
        e.m, e.x, e.y, epochs=1, learning_rate=math.nan, verbose=0),
    "fine_tune-learning_rate-string": lambda e: kmerge.fine_tune(
        e.m, e.x, e.y, epochs=1, learning_rate="fast", verbose=0),
    "fine_tune-y-strings": lambda e: kmerge.fine_tune(e.m, e.x, str_y(e), epochs=1, verbose=0),
    # distill
    "distill-temperature-zero": lambda e: kmerge.distill(e.a, e.student, e.x, epochs=1,
                                                         temperature=0, verbose=0),
    "distill-temperature-nan": lambda e: kmerge.distill(e.a, e.student, e.x, epochs=1,
                                                        temperature=math.nan, verbose=0),
    "distill-temperature-inf": lambda e: kmerge.distill(e.a, e.student, e.x, epochs=1,
                                                        temperature=math.inf, verbose=0),
    "distill-temperature-string": lambda e: kmerge.distill(e.a, e.student, e.x, epochs=1,
                                                           temperature="3", verbose=0),
    "distill-alpha-above-one": lambda e: kmerge.distill(e.a, e.student, e.x, epochs=1,
                                                        alpha=1.5, verbose=0),
    "distill-alpha-nan": lambda e: kmerge.distill(e.a, e.student, e.x, epochs=1,
                                                  alpha=math.nan, verbose=0),
    "distill-epochs-zero": lambda e: kmerge.distill(e.a, e.student, e.x, epochs=0, verbose=0),
    "distill-epochs-string": lambda e: kmerge.distill(e.a, e.student, e.x, epochs="1",
                                                      verbose=0),
    "distill-batch_size-zero": lambda e: kmerge.distill(e.a, e.student, e.x, epochs=1,
                                                        batch_size=0, verbose=0),
    "distill-teacher-none": lambda e: kmerge.distill(None, e.student, e.x, epochs=1, verbose=0),
    "distill-teacher-empty": lambda e: kmerge.distill([], e.student, e.x, epochs=1, verbose=0),
    "distill-teacher-list-of-non-models": lambda e: kmerge.distill([e.a, "b"], e.student, e.x,
                                                                   epochs=1, verbose=0),
    "distill-student-int": lambda e: kmerge.distill(e.a, 3, e.x, epochs=1, verbose=0),
    "distill-student-wrong-outputs": lambda e: kmerge.distill(
        e.a, mlp("s", outputs=5), e.x, epochs=1, verbose=0),
    "distill-x-list": lambda e: kmerge.distill(e.a, e.student, e.x.tolist(), epochs=1,
                                               verbose=0),
    "distill-x-empty": lambda e: kmerge.distill(e.a, e.student, X_EMPTY, epochs=1, verbose=0),
    "distill-x-nan": lambda e: kmerge.distill(e.a, e.student, nan_x(e), epochs=1, verbose=0,
                                              seed=0),
    "distill-y-strings": lambda e: kmerge.distill(e.a, e.student, e.x, y=str_y(e), alpha=0.5,
                                                  epochs=1, verbose=0, seed=0),
    # stitch
    "stitch-at-string": lambda e: kmerge.stitch(e.a, e.b, at="0,0", x=e.x, y=e.y, epochs=0),
    "stitch-at-one": lambda e: kmerge.stitch(e.a, e.b, at=(0,), x=e.x, y=e.y, epochs=0),
    "stitch-at-unknown-layer": lambda e: kmerge.stitch(e.a, e.b, at=("nope", 0), x=e.x, y=e.y,
                                                       epochs=0),
    "stitch-at-index-out-of-range": lambda e: kmerge.stitch(e.a, e.b, at=(0, 99), x=e.x,
                                                            y=e.y, epochs=0),
    "stitch-epochs-negative": lambda e: kmerge.stitch(e.a, e.b, at=(0, 0), x=e.x, y=e.y,
                                                      epochs=-1),
    "stitch-epochs-string": lambda e: kmerge.stitch(e.a, e.b, at=(0, 0), x=e.x, y=e.y,
                                                    epochs="1"),
    "stitch-batch_size-zero": lambda e: kmerge.stitch(e.a, e.b, at=(0, 0), x=e.x, y=e.y,
                                                      epochs=1, batch_size=0, verbose=0),
    "stitch-y-wrong-length": lambda e: kmerge.stitch(e.a, e.b, at=(0, 0), x=e.x, y=e.y[:3],
                                                     epochs=0),
    "stitch-y-strings": lambda e: kmerge.stitch(e.a, e.b, at=(0, 0), x=e.x, y=str_y(e),
                                                epochs=0),
    "stitch-x-empty": lambda e: kmerge.stitch(e.a, e.b, at=(0, 0), x=X_EMPTY, y=e.y[:0],
                                              epochs=0),
    "stitch-x-nan": lambda e: kmerge.stitch(e.a, e.b, at=(0, 0), x=nan_x(e), y=e.y, epochs=0),
    "stitch-x-none": lambda e: kmerge.stitch(e.a, e.b, at=(0, 0), x=None, y=e.y, epochs=0),
    "stitch-b-not-model": lambda e: kmerge.stitch(e.a, 3, at=(0, 0), x=e.x, y=e.y, epochs=0),
    # students
    "students-like-width-zero": lambda e: kmerge.students.like(e.a, width=0),
    "students-like-width-negative": lambda e: kmerge.students.like(e.a, width=-0.5),
    "students-like-width-nan": lambda e: kmerge.students.like(e.a, width=math.nan),
    "students-like-width-string": lambda e: kmerge.students.like(e.a, width="half"),
    "students-like-not-model": lambda e: kmerge.students.like(3),
    # write_report
    "write_report-models-empty": lambda e: write_report(
        e.out / "r", models={}, x=e.x, y=e.y, final="m"),
    "write_report-final-unknown": lambda e: write_report(
        e.out / "r", models={"a": e.a, "m": e.m}, x=e.x, y=e.y, final="zz"),
    "write_report-task-unknown": lambda e: write_report(
        e.out / "r", models={"a": e.a, "m": e.m}, x=e.x, y=e.y, final="m", task="ranking"),
    "write_report-batch_size-zero": lambda e: write_report(
        e.out / "r", models={"a": e.a, "m": e.m}, x=e.x, y=e.y, final="m", batch_size=0),
    "write_report-y-strings": lambda e: write_report(
        e.out / "r", models={"a": e.a, "m": e.m}, x=e.x, y=str_y(e), final="m"),
    "write_report-x-empty": lambda e: write_report(
        e.out / "r", models={"a": e.a, "m": e.m}, x=X_EMPTY, y=e.y[:0], final="m"),
    "write_report-x-nan": lambda e: write_report(
        e.out / "r", models={"a": e.a, "m": e.m}, x=nan_x(e), y=e.y, final="m"),
    "write_report-out-is-file": lambda e: write_report(
        e.path("a"), models={"a": e.a, "m": e.m}, x=e.x, y=e.y, final="m"),
    "write_report-model-not-model": lambda e: write_report(
        e.out / "r", models={"a": 3, "m": e.m}, x=e.x, y=e.y, final="m"),
    # save / load
    "save-bad-suffix": lambda e: kmerge.save(e.m, e.out / "m.txt"),
    "save-not-model": lambda e: kmerge.save(3, e.out / "m.keras"),
    "save-missing-dir": lambda e: kmerge.save(e.m, e.out / "no" / "m.keras"),
    "save-existing-no-overwrite": lambda e: kmerge.save(e.m, e.path("c")),
    "save-onto-directory": lambda e: kmerge.save(e.m, e.src / "dir.keras", overwrite=True),
    "save-source-file": lambda e: kmerge.save(e.a, e.path("a"), overwrite=True),
    "load-missing": lambda e: kmerge.load(e.out / "missing.keras"),
    "load-garbage": lambda e: kmerge.load(e.path("garbage")),
    "load-directory": lambda e: kmerge.load(e.out),
    "load-directory-keras-suffix": lambda e: kmerge.load(e.src / "dir.keras"),
    "load-int": lambda e: kmerge.load(3),
    "load-yaml": lambda e: kmerge.load(e.src / "bad.yaml"),
    "parallel-weights-strings": lambda e: kmerge.parallel([e.a, e.b], combine="weighted",
                                                          weights=["x", "y"]),
    "parallel-weights-string": lambda e: kmerge.parallel([e.a, e.b], combine="weighted",
                                                         weights="1,1"),
    "merge_weights-weights-string": lambda e: kmerge.merge_weights([e.a, e.b], method="linear",
                                                                   weights="11"),
    "task_arithmetic-scale-huge": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="task_arithmetic", base=e.base, scale=1e308),
    "greedy_soup-labels-out-of-range": lambda e: kmerge.merge_weights(
        [e.a, e.b], method="greedy_soup", data=(e.x, e.y + 7)),
    "verify-wrong-source": lambda e: kmerge.verify(e.m, {"a": e.b}),
    "verify-x-strings": lambda e: kmerge.verify(e.m, {"a": e.a}, x=np.full((4, 8), "a")),
    "fit_head-verbose-unknown": lambda e: kmerge.fit_head(e.m, e.x, e.y, epochs=1,
                                                          verbose="loud"),
    "fit_head-optimizer-unknown": lambda e: kmerge.fit_head(e.m, e.x, e.y, epochs=1, verbose=0,
                                                            optimizer="sgdx", seed=0),
    "fit_head-loss-unknown": lambda e: kmerge.fit_head(e.m, e.x, e.y, epochs=1, verbose=0,
                                                       loss="nonsense", seed=0),
    "distill-optimizer-unknown": lambda e: kmerge.distill(e.a, e.student, e.x, epochs=1,
                                                          optimizer="sgdx", verbose=0, seed=0),
    "stitch-loss-unknown": lambda e: kmerge.stitch(e.a, e.b, at=(0, 0), x=e.x, y=e.y, epochs=1,
                                                   loss="nonsense", verbose=0, seed=0),
    "students-like-width-inf": lambda e: kmerge.students.like(e.a, width=math.inf),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_argument_raises_kmerge_error_and_does_no_harm(e, case):
    run_call(e, BAD[case])


def test_mixed_float16_float32_sources_merge_or_refuse(e):
    e.need(lambda: e.a)
    a16 = e.load("a16")

    def check(m):
        assert kmerge.verify(m, {"a": e.a, "a16": a16}).ok
        assert all(np.all(np.isfinite(o)) for o in outputs_of([m])[0])

    for combine in ("concat", "average"):
        assert_ok_or_harmless(
            lambda c=combine: kmerge.parallel({"a": e.a, "a16": a16}, combine=c),
            models=[*e.models, a16], files=e.files, dirs=[e.root], check=check)


COLLIDE = {  # case -> sources factory, builder
    "source-named-gate": (
        lambda e: {"gate": named("gate", ["context", "flatten_input"]), "b": e.b},
        lambda s: kmerge.parallel(s, combine="gate")),
    "source-named-fuse": (
        lambda e: {"fuse": named("fuse", ["pool_0", "resize_1"]), "b": e.b},
        lambda s: kmerge.fuse({"fuse": (s["fuse"], 0), "b": (s["b"], 0)},
                              head=kmerge.heads.classifier(3))),
    "source-named-adapter": (
        lambda e: {"adapter": named("adapter", ["a_to_b", "b"]), "b": e.load("a6")},
        lambda s: kmerge.sequential(s, adapter="auto")),
    "layer-named-like-adapter": (
        lambda e: {"a": named("a", ["to_b", "adapter_a_to_b"]), "b": e.load("a6")},
        lambda s: kmerge.sequential(s, adapter="auto")),
    "layer-named-like-inference-wrapper": (
        lambda e: {"a": named("a", ["dense", "dropout_inference"], dropout=True), "b": e.b},
        lambda s: kmerge.parallel(s, combine="average")),
    "source-named-input": (
        lambda e: {"input": named("input", ["dense", "out"]), "b": e.b},
        lambda s: kmerge.parallel(s, combine="concat")),
    "sources-whose-prefixed-names-meet": (
        lambda e: {"a": named("a", ["b_dense", "x"]), "a_b": named("a_b", ["dense", "y"])},
        lambda s: kmerge.parallel(s, combine="concat")),
    "merge-of-merges-same-head-names": (
        lambda e: {"m1": kmerge.parallel({"a": e.a, "b": e.b},
                                         head=kmerge.heads.classifier(3), verify=False),
                   "m2": kmerge.parallel({"a": e.a, "b": e.b},
                                         head=kmerge.heads.classifier(3), verify=False)},
        lambda s: kmerge.parallel(s, combine="average", head=kmerge.heads.classifier(3))),
    "stitch-layer-named-stitch": (
        lambda e: {"a": named("a", ["stitch", "stitch_flatten"]),
                   "b": named("b", ["stitch", "input"], seed=1)},
        lambda s: kmerge.stitch(s["a"], s["b"], at=(0, 0),
                                x=np.ones((6, 8), "float32"), y=np.arange(6) % 3, epochs=0,
                                seed=0)),
    "source-named-head": (
        lambda e: {"head": named("head", ["dense_0", "output"]), "b": e.b},
        lambda s: kmerge.parallel(s, head=kmerge.heads.classifier(3, hidden=[4]))),
    "source-named-head-fuse": (
        lambda e: {"head": named("head", ["dense_0", "flatten"]), "b": e.b},
        lambda s: kmerge.fuse({"head": (s["head"], 0), "b": (s["b"], 0)},
                              head=kmerge.heads.classifier(3, hidden=[4]))),
    "source-named-combine": (
        lambda e: {"combine": named("combine", ["concat", "average"]), "b": e.b},
        lambda s: kmerge.parallel(s, combine="concat")),
    "source-named-combine-average": (
        lambda e: {"combine": named("combine", ["concat", "average"]), "b": e.b},
        lambda s: kmerge.parallel(s, combine="average")),
}


@pytest.mark.parametrize("case", list(COLLIDE))
def test_name_collisions_work_or_raise(e, case):
    run_collision(e, *COLLIDE[case])


# ------------------------------------------------------------------ 5. the command line
CLI = {
    "parallel-weights-not-numbers": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", cli_out(e), "--combine", "weighted",
        "--weights", "x,1"],
    "parallel-weights-short": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", cli_out(e), "--combine", "weighted",
        "--weights", "1"],
    "parallel-weights-negative": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", cli_out(e), "--combine", "weighted",
        "--weights=-1,2"],
    "parallel-weights-nan": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", cli_out(e), "--combine", "weighted",
        "--weights", "nan,1"],
    "parallel-weights-empty-item": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", cli_out(e), "--combine", "weighted",
        "--weights", "1,"],
    "parallel-weights-for-concat": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", cli_out(e), "--weights", "1,1"],
    "parallel-combine-unknown": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", cli_out(e), "--combine", "blend"],
    "parallel-head-zero": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", cli_out(e), "--head", "classifier:0"],
    "parallel-head-not-number": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", cli_out(e), "--head", "classifier:ten"],
    "parallel-head-hidden-zero": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", cli_out(e), "--head", "classifier:3:0"],
    "parallel-head-hidden-junk": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", cli_out(e), "--head", "classifier:3:a,b"],
    "parallel-head-unknown": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", cli_out(e), "--head", "svm:3"],
    "parallel-head-no-size": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", cli_out(e), "--head", "classifier"],
    "parallel-head-too-many-parts": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", cli_out(e), "--head", "classifier:3:4:5"],
    "parallel-head-negative-regressor": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", cli_out(e), "--head", "regressor:-1"],
    "parallel-one-model": lambda e: ["parallel", e.path("a"), "-o", cli_out(e)],
    "parallel-missing-model": lambda e: [
        "parallel", e.path("a"), e.src / "missing.keras", "-o", cli_out(e)],
    "parallel-garbage-model": lambda e: [
        "parallel", e.path("a"), e.path("garbage"), "-o", cli_out(e)],
    "parallel-output-is-source": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", e.path("a"), "--overwrite"],
    "parallel-output-exists": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", e.path("c")],
    "parallel-output-missing-dir": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", e.out / "no" / "m.keras"],
    "parallel-output-bad-suffix": lambda e: [
        "parallel", e.path("a"), e.path("b"), "-o", e.out / "m.txt"],
    "parallel-unequal-outputs-elementwise": lambda e: [
        "parallel", e.path("a"), e.path("w5"), "-o", cli_out(e), "--combine", "add"],
    "sequential-missing-model": lambda e: [
        "sequential", e.path("a"), e.src / "missing.keras", "-o", cli_out(e)],
    "fuse-unknown-layer": lambda e: [
        "fuse", f"{e.path('a')}:nope", f"{e.path('b')}:0", "-o", cli_out(e)],
    "fuse-no-layer": lambda e: ["fuse", str(e.path("a")), f"{e.path('b')}:0", "-o", cli_out(e)],
    "fuse-one-tap": lambda e: ["fuse", f"{e.path('a')}:0", "-o", cli_out(e)],
    "fuse-index-out-of-range": lambda e: [
        "fuse", f"{e.path('a')}:0", f"{e.path('b')}:42", "-o", cli_out(e)],
    "fuse-head-junk": lambda e: [
        "fuse", f"{e.path('a')}:0", f"{e.path('b')}:0", "-o", cli_out(e), "--head", "x:y"],
    "weights-method-unknown": lambda e: [
        "weights", e.path("a"), e.path("b"), "--method", "avg", "-o", cli_out(e)],
    "weights-param-no-equals": lambda e: [
        "weights", e.path("a"), e.path("b"), "--method", "slerp", "--param", "t", "-o",
        cli_out(e)],
    "weights-param-unknown": lambda e: [
        "weights", e.path("a"), e.path("b"), "--method", "linear", "--param", "foo=1", "-o",
        cli_out(e)],
    "weights-param-string-value": lambda e: [
        "weights", e.path("a"), e.path("b"), "--method", "slerp", "--param", "t=half", "-o",
        cli_out(e)],
    "weights-param-out-of-range": lambda e: [
        "weights", e.path("a"), e.path("b"), "--method", "ties", "--base", e.path("base"),
        "--param", "density=2", "-o", cli_out(e)],
    "weights-param-nan": lambda e: [
        "weights", e.path("a"), e.path("b"), "--method", "slerp", "--param", "t=nan", "-o",
        cli_out(e)],
    "weights-param-empty-key": lambda e: [
        "weights", e.path("a"), e.path("b"), "--method", "slerp", "--param", "=0.5", "-o",
        cli_out(e)],
    "weights-param-weights": lambda e: [
        "weights", e.path("a"), e.path("b"), "--method", "linear", "--param", "weights=1", "-o",
        cli_out(e)],
    "weights-param-data": lambda e: [
        "weights", e.path("a"), e.path("b"), "--method", "linear", "--param", "data=x", "-o",
        cli_out(e)],
    "weights-fisher-without-data": lambda e: [
        "weights", e.path("a"), e.path("b"), "--method", "fisher", "-o", cli_out(e)],
    "weights-ties-without-base": lambda e: [
        "weights", e.path("a"), e.path("b"), "--method", "ties", "-o", cli_out(e)],
    "weights-base-missing": lambda e: [
        "weights", e.path("a"), e.path("b"), "--method", "ties", "--base",
        e.src / "missing.keras", "-o", cli_out(e)],
    "weights-output-is-base": lambda e: [
        "weights", e.path("a"), e.path("b"), "--method", "task_arithmetic", "--base",
        e.path("base"), "-o", e.path("base"), "--overwrite"],
    "weights-architectures-differ": lambda e: [
        "weights", e.path("a"), e.path("a6"), "--method", "linear", "-o", cli_out(e)],
    "verify-plain-model": lambda e: ["verify", e.path("a"), e.path("a")],
    "verify-wrong-source": lambda e: ["verify", e.path("m1"), f"a={e.path('b')}"],
    "verify-unrecorded-source": lambda e: ["verify", e.path("m1"), e.path("c")],
    "verify-missing-merged": lambda e: ["verify", e.src / "missing.keras", e.path("a")],
    "inspect-missing": lambda e: ["inspect", e.src / "missing.keras"],
    "inspect-garbage": lambda e: ["inspect", e.path("garbage")],
    "validate-bad-yaml": lambda e: ["validate", e.src / "bad.yaml"],
    "validate-missing": lambda e: ["validate", e.src / "missing.yaml"],
    "run-bad-yaml": lambda e: ["run", e.src / "bad.yaml"],
    "plan-bad-yaml": lambda e: ["plan", e.src / "bad.yaml"],
    "parallel-output-is-grandparent": lambda e: [
        "parallel", e.path("m1"), e.path("c"), "-o", e.path("a"), "--overwrite",
        "--combine", "average"],
    "sequential-output-is-grandparent": lambda e: [
        "sequential", e.path("m1"), e.path("c"), "-o", e.path("b"), "--overwrite"],
    "weights-output-is-grandparent": lambda e: [
        "weights", e.path("m1"), e.path("m1"), "--method", "linear", "-o", e.path("a"),
        "--overwrite"],
}


@pytest.mark.parametrize("case", list(CLI))
def test_cli_error_is_one_line_and_writes_nothing(e, case, capsys):
    run_cli(e, CLI[case](e), capsys)


# ------------------------------------------------------------------ 6. fuzzing
WEIRD = st.one_of(
    st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, 0.5, 1.0, 1e308, -1e-300, 5e-324]), st.text(max_size=3), st.none(),
    st.booleans(), st.lists(st.floats(-1, 2), max_size=2))


@FUZZ
@given(units=WEIRD, hidden=st.one_of(st.lists(WEIRD, max_size=2), WEIRD), dropout=WEIRD,
       kind=st.sampled_from(["classifier", "regressor"]))
def test_fuzz_heads(units, hidden, dropout, kind):
    try:
        head = getattr(kmerge.heads, kind)(units, hidden=hidden, dropout=dropout)
    except KmergeError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip()
        return
    assert isinstance(head.units, int) and not isinstance(head.units, bool) and head.units >= 1
    assert all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in head.hidden)
    assert isinstance(head.dropout, float) and 0.0 <= head.dropout < 1.0


METHOD_PARAMS = {"linear": "weights", "slerp": "t", "task_arithmetic": "scale",
                 "ties": "density", "dare": "p"}


def _finite_model(m):
    assert isinstance(m, keras.Model)
    for w in m.weights:
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(w))), w.path


@pytest.fixture(scope="module")
def fuzz_models():
    return [mlp("fa", seed=0), mlp("fb", seed=1), mlp("fbase", seed=2)]


@FUZZ
@given(method=st.sampled_from(sorted(METHOD_PARAMS)), value=WEIRD)
def test_fuzz_merge_weights_params(fuzz_models, method, value):
    a, b, base = fuzz_models
    param = METHOD_PARAMS[method]
    kwargs = {param: value}
    if param == "weights" and not isinstance(value, list):
        kwargs = {"weights": [value, value]}
    if method in ("task_arithmetic", "ties", "dare"):
        kwargs["base"] = base
    assert_ok_or_harmless(lambda: kmerge.merge_weights([a, b], method=method, **kwargs),
                          models=[a, b, base], check=_finite_model)


@FUZZ
@given(combine=st.sampled_from(["concat", "average", "add", "stack", "weighted",
                                "learned_weights", "gate", "max", "", "WEIGHTED"]),
       weights=st.one_of(st.none(), st.lists(WEIRD, max_size=3)),
       adapter=st.sampled_from(["none", "auto", "Auto", ""]),
       fuse=st.booleans())
def test_fuzz_combine_options(fuzz_models, combine, weights, adapter, fuse):
    a, b, _ = fuzz_models

    def build():
        if fuse:
            return kmerge.fuse({"a": (a, 0), "b": (b, -1)}, combine=combine, weights=weights,
                               adapter=adapter, head=kmerge.heads.classifier(3))
        return kmerge.parallel({"a": a, "b": b}, combine=combine, weights=weights,
                               adapter=adapter)

    def check(m):
        assert kmerge.verify(m, {"a": a, "b": b}).ok
        assert all(np.all(np.isfinite(o)) for o in outputs_of([m])[0])

    assert_ok_or_harmless(build, models=[a, b], check=check)

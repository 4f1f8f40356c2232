"""Multi-task merges (``keep_outputs=True``): the sources' own outputs beside a new head, from
one graph; fit_head trains the head alone; verify checks the kept outputs; save/load; CLI and
recipes. The sources learned different label sets: A digits 0-4, B digits 5-9."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import weights_of

import kmerge
from kmerge.errors import InvalidArgumentError, RecipeError, VerificationError
from kmerge.graph import compiled
from kmerge.graph.replay import walk

EXAMPLE = Path(__file__).parent.parent / "examples" / "label_sets.py"


@pytest.fixture(scope="module")
def example():
    """examples/label_sets.py as a module: the tests use its sources and its comparison."""
    spec = importlib.util.spec_from_file_location("label_sets_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def label_sets(example, digits):
    """A (a CNN with BatchNorm and dropout) trained on digits 0-4, B (an MLP) on 5-9."""
    x, y, _, _ = digits
    return example.train_sources(x, y, seed=0, epochs=5)


def named(model, x) -> dict[str, np.ndarray]:
    """``{output name: array}`` through kmerge's compiled inference (variables untouched)."""
    by_id = dict(zip(map(id, model.outputs), compiled.predict(model, x)))
    return {k: by_id[id(t)] for k, t in model.output.items()}


def build(kind: str, a, b, **kw):
    """The multi-task merge of A and B (verified by the tests that are about verify)."""
    kw.setdefault("verify", False)
    if kind == "parallel":
        return kmerge.parallel({"a": a, "b": b}, head=kmerge.heads.classifier(10),
                               keep_outputs=True, **kw)
    return kmerge.fuse({"a": (a, "hidden"), "b": (b, "flat")},
                       head=kmerge.heads.classifier(10), keep_outputs=True, **kw)


@pytest.fixture(scope="module")
def compared(example, label_sets, digits):
    """The example's comparison, with short training: sources alone, the no-training rule,
    and the parallel and fuse multi-task merges with trained heads."""
    return example.compare(*label_sets, digits, seed=0, epochs=3, auto=False)


@pytest.mark.parametrize("kind", ["parallel", "fuse"])
def test_kept_outputs_are_the_sources_bit_exactly(label_sets, digits, kind):
    a, b = label_sets
    x = digits[2][:64]
    m = build(kind, a, b)
    out = named(m, x)
    assert list(out) == ["a", "b", "head"]
    assert out["head"].shape == (64, 10)
    np.testing.assert_array_equal(out["a"], compiled.predict(a, x)[0])
    np.testing.assert_array_equal(out["b"], compiled.predict(b, x)[0])
    assert kmerge.info(m)["keep_outputs"] == {"kept": {"a": ["a"], "b": ["b"]}, "new": "head"}
    report = kmerge.verify(m, {"a": a, "b": b}, x=x)
    kept = [c for c in report.checks if "kept as" in c.what]
    assert [c.source for c in kept] == ["a", "b"] and all(c.exact for c in kept)
    assert all(not w.trainable for w in m.weights if not w.path.startswith("head"))


def test_every_layer_runs_once(label_sets):
    """The kept outputs come from the copies the taps read: no layer is copied or called
    twice, and the model holds each source's layers once."""
    a, b = label_sets
    m = build("fuse", a, b)
    w = walk(m)
    calls = [len(w.calls_of(op)) for op in w.ops()]
    assert calls and set(calls) == {1}
    meta = kmerge.info(m)["sources"]
    for n, src in (("a", a), ("b", b)):
        assert len(meta[n]["layers"]) == len(walk(src).leaf_calls)
    plain = kmerge.fuse({"a": (a, "hidden"), "b": (b, "flat")}, head=kmerge.heads.classifier(10),
                        verify=False)
    # keep_outputs adds only the layers after the taps: a's drop and out, b's two Dense and out
    assert len(m.layers) - len(plain.layers) == 5


def test_fit_head_trains_only_the_head(label_sets, digits):
    a, b = label_sets
    x, y, x_te, y_te = digits
    x, y = x[:96], y[:96]
    cached, plain = build("parallel", a, b), build("parallel", a, b)
    before_w, before_out = weights_of(cached), named(cached, x_te[:32])
    h1 = kmerge.fit_head(cached, x, y, epochs=1, seed=0, verbose=0)
    h2 = kmerge.fit_head(plain, x, y, epochs=1, seed=0, verbose=0, cache=None)
    assert h1.kmerge["outputs"] == ["head"] and h1.kmerge["cache"] == "memory"
    assert len(h1.kmerge["boundary"]) == 1  # only the head's input is cached, not a and b
    np.testing.assert_allclose(h1.history["loss"], h2.history["loss"], rtol=1e-5, atol=1e-6)
    after_w, after_out = weights_of(cached), named(cached, x_te[:32])
    changed = [v.path for v, w0, w1 in zip(cached.weights, before_w, after_w)
               if not np.array_equal(w0, w1)]
    assert changed and all(p.startswith("head") for p in changed)
    for k in ("a", "b"):
        np.testing.assert_array_equal(after_out[k], before_out[k])
    assert not np.array_equal(after_out["head"], before_out["head"])
    # the whole model is left compiled with the head's loss alone
    assert np.isfinite(cached.evaluate(x_te[:32], {"head": y_te[:32]}, verbose=0))


def test_label_sets_one_model_learns_all_ten_classes(compared):
    """A knows 0-4 and B 5-9: alone each is right on at most half of the ten-digit test set; a
    head on their merged outputs or features learns all ten, and the kept outputs still do
    the old tasks (A on 0-4, B on 5-9), verified bit-exact against A and B."""
    sources = [r["accuracy"] for k, r in compared.items() if "alone" in k]
    merged = {k: r for k, r in compared.items() if "model" in r}
    assert len(sources) == 2 and len(merged) == 2
    for name, row in merged.items():
        assert max(sources) <= 0.5 < row["accuracy"], (name, sources, row)
        assert row["kept"] and row["a_on_0_4"] > 0.5 and row["b_on_5_9"] > 0.5, (name, row)


def test_save_load_with_plain_keras_and_verify(compared, label_sets, digits, tmp_path):
    a, b = label_sets
    m = compared["fuse: penultimate layers + head"]["model"]  # trained with fit_head
    path = kmerge.save(m, tmp_path / "multi.keras")
    want = named(m, digits[2][:16])
    plain = keras.models.load_model(path)  # kmerge is imported: its layers are registered
    got = named(plain, digits[2][:16])
    assert list(got) == ["a", "b", "head"]
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    loaded = kmerge.load(path)
    assert kmerge.verify(loaded, {"a": a, "b": b}).ok
    assert kmerge.info(loaded)["keep_outputs"]["new"] == "head"


def test_verify_catches_a_tampered_kept_output(label_sets):
    a, b = label_sets
    m = build("fuse", a, b)
    # a's output layer lies after the tap: only the kept output depends on it
    layer = m.get_layer(kmerge.info(m)["sources"]["a"]["layers"][-1])
    kernel = layer.kernel
    kernel.assign(keras.ops.convert_to_numpy(kernel) + 0.01)
    with pytest.raises(VerificationError, match=r"source 'a' at output 0 \(kept as 'a'\)"):
        kmerge.verify(m, {"a": a, "b": b})
    # outputs renamed behind kmerge's back: 'a' no longer names a's output
    m2 = build("parallel", a, b)
    kmerge.metadata.meta_of(m2)["keep_outputs"]["kept"] = {"a": ["b"], "b": ["a"]}
    with pytest.raises(VerificationError, match="output 'b' is not source 'a'"):
        kmerge.verify(m2, {"a": a, "b": b})


def test_typed_errors_and_names(label_sets, digits):
    a, b = label_sets
    with pytest.raises(InvalidArgumentError, match="keep_outputs must be True or False"):
        kmerge.parallel({"a": a, "b": b}, keep_outputs="yes")
    with pytest.raises(InvalidArgumentError, match=r"freeze leaves \['b'\] trainable"):
        kmerge.fuse({"a": (a, "hidden"), "b": (b, "flat")}, freeze={"a"}, keep_outputs=True)
    with pytest.raises(InvalidArgumentError, match=r"freeze leaves \['a', 'b'\]"):
        kmerge.parallel({"a": a, "b": b}, freeze=False, keep_outputs=True)
    m = build("parallel", a, b)
    with pytest.raises(InvalidArgumentError, match="fine_tune would unfreeze"):
        kmerge.fine_tune(m, digits[0][:10], digits[1][:10], epochs=1)
    # a source called "head" keeps its name; the new output moves aside. A source with two
    # outputs keeps both, numbered.
    inp = keras.Input((8, 8, 1))
    flat = keras.layers.Flatten()(inp)
    two = keras.Model(inp, [keras.layers.Dense(2)(flat), keras.layers.Dense(3)(flat)])
    m = kmerge.parallel({"head": a, "two": two}, output={"two": 0}, combine="concat",
                        keep_outputs=True, verify=False)
    assert list(m.output) == ["head", "two_0", "two_1", "head2"]
    assert kmerge.info(m)["keep_outputs"] == {"kept": {"head": ["head"],
                                                       "two": ["two_0", "two_1"]},
                                              "new": "head2"}
    plan = build("fuse", a, b, dry_run=True)
    assert "a (None, 5), b (None, 5), head (None, 10)" in str(plan)


@pytest.fixture(scope="module")
def files(label_sets, tmp_path_factory):
    d = tmp_path_factory.mktemp("label_sets")
    for m in label_sets:
        m.save(d / f"{m.name}.keras")
    return d


def test_cli_keep_outputs(files, tmp_path, capsys):
    from kmerge.cli import main

    a, b = str(files / "a.keras"), str(files / "b.keras")
    out = tmp_path / "multi.keras"
    assert main(["parallel", a, b, "-o", str(out), "--head", "classifier:10", "--keep-outputs",
                 "--untrained", "-q"]) == 0, capsys.readouterr().err
    assert list(kmerge.load(out).output) == ["a", "b", "head"]
    assert main(["fuse", f"{a}:hidden", f"{b}:flat", "--head", "classifier:10",
                 "--keep-outputs", "--dry-run"]) == 0
    assert "head (None, 10)" in capsys.readouterr().out
    assert main(["fuse", f"{a}:hidden", f"{b}:flat", "--keep-outputs", "--no-freeze",
                 "--dry-run"]) == 1
    assert "keep_outputs" in capsys.readouterr().err


RECIPE = """\
models:
  a: {{path: a.keras}}
  b: {{path: b.keras}}
data: {{source: "sklearn:digits"}}
steps:
  - name: multi
    kind: fuse
    taps: {{a: hidden, b: flat}}
    head: {{kind: classifier, units: 10}}
    keep_outputs: true
    freeze: {freeze}
  - {{kind: fit_head, model: multi, epochs: 1}}
  - {{kind: verify, model: multi}}
  - {{kind: evaluate, models: [multi]}}
"""


def test_recipe_keep_outputs_scores_and_reports_the_head(files):
    from kmerge.recipe import load_recipe
    from kmerge.report import _predict
    from kmerge.runner import run

    bad = files / "bad.yaml"
    bad.write_text(RECIPE.format(freeze="[a]"))
    with pytest.raises(RecipeError, match=r"steps\[0\]\.keep_outputs: .*\['b'\] trainable"):
        load_recipe(bad)
    path = files / "multi.yaml"
    path.write_text(RECIPE.format(freeze="true"))
    result = run(load_recipe(path), echo=lambda s: None)
    assert result.verify["multi"].ok
    m = result.models["multi"]
    out = named(m, result.data.x_test)
    head = float(np.mean(out["head"].argmax(1) == result.data.y_test))
    assert result.scores["multi"] == head
    # a report evaluates the same output (kmerge.report's evaluation, without its timings)
    np.testing.assert_array_equal(_predict(m, [result.data.x_test], 256), out["head"])


def test_distill_and_students_use_the_new_output(label_sets, digits):
    """A multi-task merge teaches through its new output: the student distilled from it is
    bit for bit the student distilled from a model made of that output alone, and
    ``students.like`` gives a one-output student of it."""
    from kmerge.distillation import teacher_logits
    from kmerge.graph.build import task_model

    a, b = label_sets
    x, y = digits[0][:64], digits[1][:64]
    m = build("parallel", a, b)
    view = task_model(m)
    assert view is not m and [t.shape for t in view.outputs] == [(None, 10)]
    assert task_model(a) is a  # a one-output model is its own task model
    head = named(m, x)["head"]
    np.testing.assert_allclose(teacher_logits([view], x), np.log(np.clip(head, 1e-12, 1)),
                               rtol=1e-6, atol=1e-6)
    students = []
    for teacher in (m, keras.Model(m.inputs[0], m.output["head"])):
        student = kmerge.students.like(m, width=0.5, seed=3)
        assert len(student.outputs) == 1 and student.outputs[0].shape == (None, 10)
        kmerge.distill(teacher, student, x, y=y, alpha=0.5, temperature=2.0, epochs=1,
                       batch_size=16, seed=0, verbose=0)
        students.append(weights_of(student))
        if teacher is m:
            assert kmerge.info(student)["distill"]["teachers"] == [m.name]
    assert all(np.array_equal(p, q) for p, q in zip(*students))


def test_cli_data_scores_the_sources_beside_the_new_output(trained, files, tmp_path, capsys):
    """``--data`` on a multi-task merge: sources with the new output's 10 classes are scored
    beside it; the label-set sources (5 classes each) are named as not comparable."""
    from kmerge.cli import main

    a, b = map(str, trained)
    out = tmp_path / "multi.keras"
    assert main(["parallel", a, b, "-o", str(out), "--head", "classifier:10", "--keep-outputs",
                 "--data", "digits", "--epochs", "1", "--seed", "0"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "not scored" not in printed
    table = printed[printed.index("test accuracy"):].splitlines()
    assert [ln.split()[0] for ln in table[2:5]] == ["model_a", "model_b", "merged"], printed
    assert main(["parallel", str(files / "a.keras"), str(files / "b.keras"), "-o", str(out),
                 "--head", "classifier:10", "--keep-outputs", "--data", "digits", "--epochs", "1",
                 "--overwrite", "-q"]) == 0, capsys.readouterr().err
    assert ("not scored: a (its output is not the merge's), b (its output is not the merge's)"
            in capsys.readouterr().out)

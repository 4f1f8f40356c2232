"""Reproducible runs (issue 10, item 3): the same recipe on the same machine and backend gives
bit-identical metrics and weights, in one process and across processes; seeded heads; the note
on a test split the sources may have trained on; the report's final model."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kmerge
from kmerge.errors import InvalidArgumentError, RecipeError
from kmerge.recipe import load_recipe
from kmerge.runner import run, split_note

# A head with dropout (seeded masks), trained with fit_head and fine-tuned: every random
# thing a recipe run does.
RECIPE = """\
models:
  a: {{path: {a}}}
  b: {{path: {b}}}
data: {{source: "sklearn:digits", test_size: 0.3, seed: {seed}}}
steps:
  - name: merged
    kind: parallel
    models: [a, b]
    combine: concat
    head: {{kind: classifier, units: 10, hidden: [16], dropout: 0.3}}
  - {{kind: fit_head, model: merged, epochs: 2}}
  - {{kind: fine_tune, model: merged, unfreeze: "top:1", epochs: 1, learning_rate: 0.001}}
  - {{kind: evaluate, models: [merged]}}
"""


def _recipe(tmp_path, trained, seed=0):
    a, b = trained
    path = tmp_path / f"r{seed}.yaml"
    path.write_text(RECIPE.format(a=a, b=b, seed=seed))
    return load_recipe(path)


def _fingerprint(result) -> dict:
    m = result.models["merged"]
    digest = hashlib.sha256()
    for w in m.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return {"scores": result.scores, "weights": digest.hexdigest()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, trained):
    """The recipe (seed 0) and what its first run in this process gave."""
    recipe = _recipe(tmp_path_factory.mktemp("recipe"), trained)
    return recipe, _fingerprint(run(recipe, echo=lambda s: None))


def test_a_recipe_run_twice_in_one_process_is_bit_identical(first_run):
    recipe, first = first_run
    random.random()
    np.random.rand()  # global RNGs moved on between the runs: nothing depends on them
    keras.utils.set_random_seed(12345)
    assert _fingerprint(run(recipe, echo=lambda s: None)) == first


SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import keras, numpy as np
    from kmerge.recipe import load_recipe
    from kmerge.runner import run
    result = run(load_recipe(sys.argv[1]), echo=lambda s: None)
    digest = hashlib.sha256()
    for w in result.models["merged"].weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    print(json.dumps({"scores": result.scores, "weights": digest.hexdigest()}))
""")


def test_a_recipe_run_in_two_processes_is_bit_identical(tmp_path, first_run):
    recipe, first = first_run
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend()}
    env.pop("PYTHONHASHSEED", None)
    outs = []
    for hashseed in ("1", "2"):  # also a different str hash order in each process
        proc = subprocess.run([sys.executable, str(script), str(recipe.file)],
                              env={**env, "PYTHONHASHSEED": hashseed}, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1] == first  # and the same as in this process


def _sources():
    from conftest import cnn

    return cnn("a", seed=0), cnn("b", seed=1)


def _head_weights(m) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(w)) for layer in m.layers
            if layer.name.startswith("head_") for w in layer.weights]


def test_api_parallel_then_fit_head_with_a_seed_is_reproducible():
    a, b = _sources()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, 40).astype("int32")
    runs = []
    for global_seed in (1, 2):  # whatever the global seed, the same result
        keras.utils.set_random_seed(global_seed)
        m = kmerge.parallel({"a": a, "b": b},
                            head=kmerge.heads.classifier(3, hidden=[8], dropout=0.5))
        start = _head_weights(m)
        h = kmerge.fit_head(m, x, y, epochs=2, batch_size=8, seed=0, verbose=0)
        runs.append((start, _head_weights(m), h.history["loss"]))
    (s1, w1, l1), (s2, w2, l2) = runs
    assert all(np.array_equal(p, q) for p, q in zip(s1, s2))  # same initial head
    assert all(np.array_equal(p, q) for p, q in zip(w1, w2))  # same trained head
    assert l1 == l2


def test_head_seed_chooses_the_draw_and_is_checked():
    a, b = _sources()

    def first_kernel(head):
        m = kmerge.parallel({"a": a, "b": b}, head=head)
        return np.array(keras.ops.convert_to_numpy(m.get_layer("head_output").kernel))

    same = first_kernel(kmerge.heads.classifier(3))
    assert np.array_equal(same, first_kernel(kmerge.heads.classifier(3, seed=0)))
    assert not np.array_equal(same, first_kernel(kmerge.heads.classifier(3, seed=1)))
    assert kmerge.heads.regressor(1, seed=5).seed == 5
    for bad in (-1, 1.5, "0", True):
        with pytest.raises(InvalidArgumentError, match="seed"):
            kmerge.heads.classifier(3, seed=bad)


def test_the_builtin_digits_split_is_the_demos_and_the_note_says_so(tmp_path):
    from kmerge.demo import digits
    from kmerge.recipe import DataSpec
    from kmerge.runner import load_data

    spec = DataSpec(source="sklearn:digits", test_size=0.3, seed=0)
    data = load_data(spec, None)
    x_tr, x_te, y_tr, y_te = digits(0)
    assert np.array_equal(data.x_test, x_te) and np.array_equal(data.y_test, y_te)
    assert np.array_equal(data.x_train, x_tr)
    assert "the split `kmerge demo` holds out" in split_note(spec)
    other = split_note(DataSpec(source="sklearn:digits", test_size=0.3, seed=3))
    assert "may overlap their training data" in other and "seed 3" in other
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.zeros((4, 2)), y=np.arange(4), xt=np.ones((2, 2)), yt=np.arange(2))
    assert split_note(DataSpec(source=str(npz), x_test="xt", y_test="yt")) is None
    assert "may overlap" in split_note(DataSpec(source=str(npz)))


def test_run_output_and_report_carry_the_note_and_the_chosen_final(tmp_path, trained,
                                                                   first_run):
    recipe = _recipe(tmp_path, trained, seed=2)
    lines: list[str] = []
    result = run(recipe, echo=lines.append, report=tmp_path / "rep", final="a")
    assert _fingerprint(result)["weights"] != first_run[1]["weights"]  # the seed matters
    assert any(line.startswith("note: test set: a random 30% split") for line in lines)
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["final"] == "a"
    assert any("may overlap their training data" in n for n in data["notes"])
    assert result.notes and result.seed == 2
    assert result.final == "merged"  # the last model built; the report is about "a"


def test_an_unknown_final_is_refused_before_any_work(tmp_path, trained):
    recipe = _recipe(tmp_path, trained)
    lines: list[str] = []
    with pytest.raises(RecipeError, match="final='nope'.*'a', 'b', 'merged'"):
        run(recipe, echo=lines.append, report=tmp_path / "rep", final="nope")
    assert lines == [] and not (tmp_path / "rep").exists()


def test_cli_final_chooses_the_report_model_and_is_checked_first(tmp_path, trained, capsys):
    """``kmerge run --report DIR --final NAME`` through ``main``: the report is about NAME;
    an unknown name, or --final without --report, is one error line and nothing written."""
    from kmerge.cli import main

    a, b = trained
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(a=a, b=b, seed=0).replace("epochs: 2", "epochs: 1"))
    rep = tmp_path / "rep"
    assert main(["run", str(path), "--report", str(rep), "--final", "nope", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: final='nope' names no model") and "'merged'" in err
    assert not rep.exists()
    assert main(["run", str(path), "--final", "a", "-q"]) == 1
    assert "pass --report DIR as well" in capsys.readouterr().err
    assert main(["run", str(path), "--report", str(rep), "--final", "a", "-q"]) == 0
    assert json.loads((rep / "report.json").read_text())["final"] == "a"

"""Recipes: everything checkable is checked before any model loads; errors name the key path."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kmerge.errors import RecipeError
from kmerge.recipe import COMBINE_OPS, load_recipe, schema

EXAMPLES = Path(__file__).parent.parent / "examples"

GOOD = """
models:
  a: {path: a.keras}
  b: {path: b.keras}
data: {source: "sklearn:digits"}
steps:
  - {name: merged, kind: parallel, models: [a, b], combine: concat,
     head: {kind: classifier, units: 10}}
  - {kind: verify, model: merged}
  - {kind: save, model: merged, path: out.keras}
"""


def _write(tmp_path, text, files=("a.keras", "b.keras")):
    for f in files:
        (tmp_path / f).write_bytes(b"")
    p = tmp_path / "recipe.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_good_recipe_loads(tmp_path):
    r = load_recipe(_write(tmp_path, GOOD))
    assert [s.kind for s in r.steps] == ["parallel", "verify", "save"]
    assert r.path_of("a.keras") == tmp_path / "a.keras"


@pytest.mark.parametrize(
    ("change", "where", "what"),
    [
        (("combine: concat", "combine: concatt"), "steps[0].combine", "Did you mean 'concat'"),
        (("kind: verify", "kind: verfy"), "steps[1].kind", "unknown step kind 'verfy'"),
        (("model: merged, path", "model: mergd, path"), "steps[2].model",
         "'mergd' is not a model or an earlier step. Did you mean 'merged'"),
        (("models: [a, b]", "models: [a, c]"), "steps[0].models[1]", "'c' is not a model"),
        (("units: 10}", "units: 10, size: 3}"), "steps[0].head.size", "unknown key 'size'"),
        (("path: out.keras", "path: a.keras"), "steps[2].path", "never overwrites a source"),
        (("sklearn:digits", "sklearn:digit"), "data.source", "Did you mean 'sklearn:digits'"),
        (("units: 10", "units: 0"), "steps[0].head.units", "greater than 0"),
    ],
)
def test_errors_name_file_and_key_path(tmp_path, change, where, what):
    p = _write(tmp_path, GOOD.replace(*change))
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    msg = str(err.value)
    assert str(p) in msg and where in msg and what in msg, msg


def test_step_referring_to_a_later_step(tmp_path):
    text = GOOD.replace("  - {kind: verify, model: merged}\n", "").replace(
        "steps:\n", "steps:\n  - {kind: verify, model: merged}\n")
    with pytest.raises(RecipeError, match=r"steps\[0\]\.model.*not a model or an earlier step"):
        load_recipe(_write(tmp_path, text))


def test_bad_yaml_reports_line(tmp_path):
    with pytest.raises(RecipeError, match="line 3, column"):
        load_recipe(_write(tmp_path, "models:\n  a: {path: a.keras\nsteps: [\n"))


def test_missing_model_file_and_missing_data(tmp_path):
    with pytest.raises(RecipeError, match=r"models\.b\.path: file 'b.keras' does not exist"):
        load_recipe(_write(tmp_path, GOOD, files=("a.keras",)))
    text = GOOD.replace('data: {source: "sklearn:digits"}\n', "") + "  - {kind: evaluate}\n"
    with pytest.raises(RecipeError, match=r"steps\[3\]\.kind: step 'evaluate' needs a data"):
        load_recipe(_write(tmp_path, text))


def test_duplicate_step_name(tmp_path):
    text = GOOD.replace("name: merged", "name: a")
    with pytest.raises(RecipeError, match=r"steps\[0\]\.name: name 'a' is already used"):
        load_recipe(_write(tmp_path, text))


def test_combine_names_match_the_registry():
    from kmerge.graph.combine import combine_ops

    assert tuple(combine_ops.names()) == COMBINE_OPS


def test_schema_describes_steps():
    s = schema()
    assert "steps" in s["properties"] and "base_dir" not in s["properties"]
    assert "ParallelStep" in json.dumps(s)


def test_validate_does_not_import_keras(tmp_path):
    p = _write(tmp_path, GOOD)
    code = (f"import sys\nfrom kmerge.cli import main\nrc = main(['validate', {str(p)!r}])\n"
            "print(rc, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 False"


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid_recipes(example):
    recipe = load_recipe(example, check_files=False)
    assert recipe.steps


def test_recipe_reference_is_current():
    from kmerge.recipe import reference_markdown

    doc = (Path(__file__).parent.parent / "docs" / "recipe-reference.md").read_text()
    assert doc == reference_markdown(), "regenerate: python -m kmerge.recipe > docs/recipe-reference.md"


WEIGHTS = """
models:
  a: {path: a.keras}
  b: {path: b.keras}
steps:
  - {name: soup, kind: weights, models: [a, b], method: ties, base: a, params: {density: 0.3}}
"""


@pytest.mark.parametrize(
    ("change", "where", "what"),
    [
        (("method: ties", "method: tie"), "steps[0].method", "Did you mean 'ties'"),
        (("density: 0.3", "denisty: 0.3"), "steps[0].params.denisty",
         "method 'ties' has no parameter 'denisty'; its parameters are density, scale"),
        (("base: a", "base: z"), "steps[0].base", "'z' is not a model"),
    ],
)
def test_weights_step_methods_and_parameters(tmp_path, change, where, what):
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, WEIGHTS.replace(*change)))
    assert where in str(err.value) and what in str(err.value), str(err.value)
    assert load_recipe(_write(tmp_path, WEIGHTS)).steps[0].method == "ties"


def test_npz_with_test_split_scale_shape_and_noise(tmp_path):
    import numpy as np

    from kmerge.runner import load_data

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 16, (20, 64)), y=np.arange(20) % 4,
             xt=rng.integers(0, 16, (6, 64)), yt=np.arange(6) % 4)
    text = ("models:\n  a: {path: a.keras}\n"
            "data: {source: d.npz, x_test: xt, y_test: yt, scale: 16, shape: [8, 8, 1]}\n"
            "steps:\n  - {kind: evaluate}\n")
    recipe = load_recipe(_write(tmp_path, text, files=("a.keras",)))
    data = load_data(recipe.data, recipe)
    assert data.x_train.shape == (20, 8, 8, 1) and data.x_test.shape == (6, 8, 8, 1)
    assert data.x_test.max() <= 15 / 16 and data.y_test.dtype == np.int32
    noisy = recipe.data.model_copy(update={"noise": 0.1})
    d2 = load_data(noisy, recipe)
    # noise is added after scaling, to train and test alike, clipped to the data's range
    assert 0 < np.abs(d2.x_test - data.x_test).max() <= 1.0
    assert d2.x_test.min() >= data.x_test.min() - 1e-6

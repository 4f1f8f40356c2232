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


# -- strict YAML: aliases, booleans, types ---------------------------------------------------
def _bomb() -> str:
    """The classic "billion laughs": 9 levels of 9 aliases, 9**9 strings once expanded."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for k in range(1, 9):
        refs = ",".join([f"*a{k - 1}"] * 9)
        lines.append(f"a{k}: &a{k} [{refs}]")
    return "\n".join(lines)


def _bomb_recipe() -> str:
    body = textwrap.indent(_bomb(), "      ")
    return ("models:\n  a: {path: a.keras}\n  b: {path: b.keras}\nsteps:\n"
            "  - name: soup\n    kind: weights\n    models: [a, b]\n    method: linear\n"
            f"    params:\n{body}\n")


def test_alias_bomb_is_refused_at_the_first_anchor(tmp_path):
    import time

    p = _write(tmp_path, _bomb_recipe())
    assert len(_bomb()) < 700
    t0 = time.perf_counter()
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    elapsed = time.perf_counter() - t0
    msg = str(err.value)
    assert elapsed < 0.5, elapsed
    assert str(p) in msg and "line 10, column" in msg and "anchor '&a0' refused" in msg, msg


@pytest.mark.parametrize("text", [
    "x: &anchor {path: a.keras}\nmodels:\n  a: *anchor\n",        # anchor + alias
    "models:\n  a: {path: a.keras}\n  b: {<<: {path: b.keras}}\n",  # merge key without alias: ok
])
def test_aliases_refused_merge_key_literal_ok(tmp_path, text):
    p = _write(tmp_path, text + "steps:\n  - {kind: verify, model: a}\n")
    if "&" in text:
        with pytest.raises(RecipeError, match=r"line 1, column 4: anchor '&anchor' refused"):
            load_recipe(p)
    else:  # a literal merge key needs no alias; validation then sees the merged mapping
        assert load_recipe(p).models["b"].path == "b.keras"


@pytest.mark.parametrize("value", ["'false'", "no", "off", "0", "'no'", "'off'", "n", "1"])
def test_safe_mode_accepts_only_a_yaml_boolean(tmp_path, value):
    text = GOOD.replace("b: {path: b.keras}", f"b: {{path: b.keras, safe_mode: {value}}}")
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, text))
    msg = str(err.value)
    assert "models.b.safe_mode: must be true or false (a YAML boolean" in msg, msg
    assert "Lambda" in msg


def test_safe_mode_false_loads_and_is_named_in_a_warning(tmp_path):
    from kmerge.recipe import unsafe_warnings

    text = GOOD.replace("b: {path: b.keras}", "b: {path: b.keras, safe_mode: false}")
    recipe = load_recipe(_write(tmp_path, text))
    assert recipe.models["b"].safe_mode is False
    (line,) = unsafe_warnings(recipe)
    assert "models.b: safe_mode is false" in line and "b.keras" in line


@pytest.mark.parametrize(
    ("change", "where", "what"),
    [
        (("units: 10}", "units: '10'}"), "steps[0].head.units", "must be a valid integer"),
        (("kind: verify, model: merged}", "kind: verify, model: merged, base_dir: x}"),
         "steps[1].base_dir", "unknown key"),
        (("path: out.keras}", "path: out.keras, overwrite: yes}"), "steps[2].overwrite",
         "true or false"),
        (("combine: concat,", "combine: concat, freeze: off,"), "steps[0].freeze",
         "true or false (a YAML boolean; yes, no, on, off, 0 and 1 are not) or a valid list"),
    ],
)
def test_values_must_have_the_key_type(tmp_path, change, where, what):
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, GOOD.replace(*change)))
    assert where in str(err.value) and what in str(err.value), str(err.value)


def test_internal_keys_are_unknown(tmp_path):
    with pytest.raises(RecipeError, match=r"base_dir: unknown key 'base_dir'"):
        load_recipe(_write(tmp_path, "base_dir: /\n" + GOOD))


def test_deep_nesting_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="nested too deeply"):
        load_recipe(_write(tmp_path, "models: " + "[" * 20000 + "]" * 20000 + "\n"))


@pytest.mark.parametrize(
    ("params", "what"),
    [
        ("{density: abc}", "parameter 'density' of method 'ties' must be a number; got 'abc'"),
        ("{density: .nan}", "must be a number; got nan"),
        ("{density: true}", "must be a number; got True"),
    ],
)
def test_method_parameter_types(tmp_path, params, what):
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, WEIGHTS.replace("{density: 0.3}", params)))
    assert "steps[0].params.density" in str(err.value) and what in str(err.value), str(err.value)


def test_dare_seed_must_be_an_integer(tmp_path):
    text = WEIGHTS.replace("method: ties", "method: dare").replace("{density: 0.3}",
                                                                   "{seed: 1.5}")
    with pytest.raises(RecipeError, match=r"params\.seed: parameter 'seed' of method 'dare' must "
                                          r"be an integer; got 1.5"):
        load_recipe(_write(tmp_path, text))


# -- output paths --------------------------------------------------------------------------
OUT = """
models:
  a: {path: models/a.keras}
  b: {path: models/b.keras}
data: {source: d.npz}
steps:
  - {name: m, kind: parallel, models: [a, b], combine: average}
  - {kind: save, model: m, path: out/a.keras}
"""


def _out_recipe(tmp_path, text=OUT):
    (tmp_path / "models").mkdir(exist_ok=True)
    for f in ("models/a.keras", "models/b.keras", "d.npz"):
        (tmp_path / f).write_bytes(b"input")
    p = tmp_path / "recipe.yaml"
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize(
    ("change", "what"),
    [
        (("path: out/a.keras", "path: models/a.keras"), "is models.a.path (model 'a')"),
        (("path: out/a.keras", "path: d.npz"), "cannot save 'd.npz'"),
        (("path: out/a.keras", "path: models/b"), "is models.b.path (model 'b')"),  # + .keras
        (("path: out/a.keras", "path: ./models/../models/a.keras"), "is models.a.path"),
    ],
)
def test_save_onto_an_input_is_refused(tmp_path, change, what):
    p = _out_recipe(tmp_path, OUT.replace(*change))
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    msg = str(err.value)
    assert "steps[1].path" in msg and what in msg, msg


def test_save_onto_the_recipe_itself_or_data_is_refused(tmp_path):
    p = _out_recipe(tmp_path, OUT.replace("source: d.npz", "source: r.csv")
                    .replace("path: out/a.keras", "path: r.csv"))
    (tmp_path / "r.csv").write_text("a,y\n1,0\n")
    with pytest.raises(RecipeError, match="cannot save 'r.csv'"):
        load_recipe(p)
    # the recipe itself, when it is named like a model file
    (tmp_path / "models" / "r.keras").write_text(
        OUT.replace("models/", "").replace("d.npz", "../d.npz")
        .replace("path: out/a.keras", "path: r.keras"))
    with pytest.raises(RecipeError, match=r"steps\[1\]\.path: .* is the recipe itself"):
        load_recipe(tmp_path / "models" / "r.keras")


def test_output_dir_onto_the_models_folder_is_refused(tmp_path):
    from kmerge.recipe import check_outputs

    recipe = load_recipe(_out_recipe(tmp_path))  # out/a.keras alone is fine
    with pytest.raises(RecipeError) as err:
        check_outputs(recipe, out_dir=tmp_path / "models")
    msg = str(err.value)
    assert "steps[1].path: 'out/a.keras' (with -o" in msg and "is models.a.path" in msg, msg


def test_two_saves_to_one_file_are_refused(tmp_path):
    from kmerge.recipe import check_outputs

    text = OUT + "  - {kind: save, model: a, path: out/b.keras}\n"
    recipe = load_recipe(_out_recipe(tmp_path, text))
    assert [t.path.name for t in check_outputs(recipe).saves] == ["a.keras", "b.keras"]
    text = OUT + "  - {kind: save, model: a, path: other/a.keras}\n"
    recipe = load_recipe(_out_recipe(tmp_path, text))  # two folders: fine on their own
    (tmp_path / "o").mkdir()
    with pytest.raises(RecipeError, match=r"steps\[2\]\.path: .* which steps\[1\]\.path writes "
                                          "too"):
        check_outputs(recipe, out_dir=tmp_path / "o")  # -o keeps only the file names
    with pytest.raises(RecipeError, match=r"steps\[2\]\.path: .* which steps\[1\]\.path"):
        load_recipe(_out_recipe(tmp_path, OUT + "  - {kind: save, model: a, "
                                               "path: ./out/a.keras}\n"))


def test_run_preconditions(tmp_path):
    from kmerge.recipe import check_outputs

    recipe = load_recipe(_out_recipe(tmp_path))
    with pytest.raises(RecipeError, match="--report: .* is models.a.path"):
        check_outputs(recipe, report=tmp_path / "models" / "a.keras")
    no_data = load_recipe(_out_recipe(tmp_path, OUT.replace("data: {source: d.npz}\n", "")))
    with pytest.raises(RecipeError, match="--report: .*no data: section"):
        check_outputs(no_data, report=tmp_path / "rep")
    with pytest.raises(RecipeError, match="-o: .* is not an existing directory"):
        check_outputs(recipe, out_dir=tmp_path / "nope")
    (tmp_path / "out").write_text("a file where a folder should be")
    with pytest.raises(RecipeError, match=r"steps\[1\]\.path: cannot write .*out is a file"):
        check_outputs(recipe)
    (tmp_path / "out").unlink()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.keras").write_bytes(b"old")
    with pytest.raises(RecipeError, match=r"exists; add 'overwrite: true'"):
        check_outputs(recipe)
    over = load_recipe(_out_recipe(tmp_path, OUT.replace("out/a.keras}", "out/a.keras, "
                                                                        "overwrite: true}")))
    assert check_outputs(over, report=tmp_path / "rep").report == tmp_path / "rep"
    (tmp_path / "rep").write_text("file")
    with pytest.raises(RecipeError, match="--report: .* is a file"):
        check_outputs(over, report=tmp_path / "rep")


# -- data sections -------------------------------------------------------------------------
DATA = """
models:
  a: {path: a.keras}
data: {source: DATA}
steps:
  - {kind: evaluate}
"""


def _data(tmp_path, source, extra=""):
    text = DATA.replace("source: DATA", f"source: {source}{extra}")
    return load_recipe(_write(tmp_path, text, files=("a.keras",)))


@pytest.mark.parametrize(("extra", "what"), [
    (", scale: 0", "data.scale: must be greater than 0; got 0"),
    (", scale: -2", "data.scale: must be greater than 0"),
    (", scale: .inf", "data.scale: must be a finite number"),
    (", noise: .nan", "data.noise: must be a finite number"),
    (", shape: [8, 0]", "data.shape[1]: must be greater than 0"),
])
def test_data_numbers_are_checked(tmp_path, extra, what):
    with pytest.raises(RecipeError) as err:
        _data(tmp_path, '"sklearn:digits"', extra)
    assert what in str(err.value), str(err.value)


def test_npz_object_array_is_refused(tmp_path):
    import numpy as np

    from kmerge.runner import load_data

    np.savez(tmp_path / "d.npz", x=np.array([[1.0, 2.0]] * 10, dtype=object), y=np.arange(10))
    recipe = _data(tmp_path, "d.npz")
    with pytest.raises(RecipeError, match=r"d.npz: array 'x' holds Python objects"):
        load_data(recipe.data, recipe)


def test_npz_nan_text_labels_and_shape(tmp_path):
    import numpy as np

    from kmerge.runner import load_data

    x = np.ones((10, 6), dtype="float32")
    x[2, 1] = np.nan
    x[5, 0] = np.inf
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 2)
    recipe = _data(tmp_path, "d.npz")
    with pytest.raises(RecipeError, match=r"d.npz: x holds 2 NaN or infinite value\(s\) "
                                          r"\(first in example 2\)"):
        load_data(recipe.data, recipe)
    np.savez(tmp_path / "d.npz", x=np.ones((10, 6)), y=np.array(["cat", "dog"] * 5))
    with pytest.raises(RecipeError, match=r"array 'y' \(data.y\) holds text labels \('cat', "
                                          r"'dog', \.\.\.\).*integer class ids"):
        load_data(recipe.data, recipe)
    np.savez(tmp_path / "d.npz", x=np.ones((10, 6)), y=np.arange(10) % 2)
    recipe = _data(tmp_path, "d.npz", ", shape: [2, 2]")
    with pytest.raises(RecipeError, match=r"data.shape \[2, 2\] holds 4 values per example, but "
                                          r"the x examples have shape \[6\] \(6 values\)"):
        load_data(recipe.data, recipe)
    assert load_data(_data(tmp_path, "d.npz", ", shape: [3, 2]").data,
                     recipe).x_train.shape[1:] == (3, 2)


@pytest.mark.parametrize(("text", "what"), [
    ("a,b,y\n1,2,0\n3,4,1\n5,6\n7,8,1\n", r"line 4 has 2 values but the header has 3 columns"),
    ("a,b,y\n1,2,0\n3,x,1\n", r"line 3, column 'b': 'x' is not a number"),
    ("a,b,label\n1,2,0\n", r"no column 'y' \(data.y\); columns are \['a', 'b', 'label'\]"),
    ("a,b,y\n1,2,cat\n3,4,dog\n", r"column 'y' \(data.y\) holds text labels \('cat', 'dog'"),
    ("a,b,y\n", "has a header but no data rows"),
    ("a,b,y\n1,nan,0\n2,3,1\n1,2,0\n2,3,1\n", r"x holds 1 NaN or infinite value\(s\)"),
])
def test_csv_problems_name_the_file_and_line(tmp_path, text, what):
    from kmerge.runner import load_data

    (tmp_path / "d.csv").write_text(text)
    recipe = _data(tmp_path, "d.csv")
    with pytest.raises(RecipeError, match=what) as err:
        load_data(recipe.data, recipe)
    assert str(tmp_path / "d.csv") in str(err.value)


def test_csv_loads_numbers(tmp_path):
    from kmerge.runner import load_data

    rows = "".join(f"{i},{i * 2},{i % 2}\n" for i in range(10))
    (tmp_path / "d.csv").write_text("a,b,y\n" + rows + "\n")
    recipe = _data(tmp_path, "d.csv", ", test_size: 0.2")
    data = load_data(recipe.data, recipe)
    assert data.x_train.shape == (8, 2) and data.y_test.dtype.kind == "i"


# -- JSON architecture + weights -----------------------------------------------------------
@pytest.mark.parametrize(("models", "where", "what"), [
    ("a: {path: a.json}", "models.a.weights", "is a JSON architecture (model.to_json()); add "
                                              "weights: PATH"),
    ("a: {path: a.keras, weights: w.h5}", "models.a.weights", "holds its own weights"),
    ("a: {path: a.json, weights: missing.h5}", "models.a.weights",
     "file 'missing.h5' does not exist"),
])
def test_json_models_need_a_weights_file(tmp_path, models, where, what):
    text = f"models:\n  {models}\nsteps:\n  - {{kind: verify, model: a}}\n"
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, text, files=("a.json", "a.keras", "w.h5")))
    assert f"{where}: " in str(err.value) and what in str(err.value), str(err.value)


def test_json_weights_are_an_input(tmp_path):
    text = ("models:\n  a: {path: a.json, weights: w.h5}\n"
            "steps:\n  - {kind: save, model: a, path: w.h5}\n")
    with pytest.raises(RecipeError, match=r"steps\[0\]\.path: .* is models.a.weights \(weights "
                                          r"of model 'a'\)"):
        load_recipe(_write(tmp_path, text, files=("a.json", "w.h5")))
    recipe = load_recipe(_write(tmp_path, text.replace("path: w.h5}", "path: out.keras}"),
                                files=("a.json", "w.h5")))
    assert recipe.load_args("a") == {"path": tmp_path / "a.json", "safe_mode": True,
                                     "weights": tmp_path / "w.h5"}


# -- every problem at once; missing demo models; the reference's types ------------------------
def test_all_problems_are_reported_numbered(tmp_path):
    text = (GOOD.replace("combine: concat", "combine: concatt")
            .replace("{kind: verify, model: merged}", "{kind: verify, model: mergd}")
            .replace("b: {path: b.keras}", "b: {path: missing.keras}"))
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, text))
    lines = str(info.value).splitlines()
    assert lines[0] == f"{tmp_path / 'recipe.yaml'}: 3 problems"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["1. models.b.path",
                                                                   "2. steps[0].combine",
                                                                   "3. steps[1].model"]
    assert "Did you mean 'concat'?" in lines[2] and "Did you mean 'merged'?" in lines[3]
    assert [where for where, _ in info.value.problems] == ["models.b.path", "steps[0].combine",
                                                           "steps[1].model"]


def test_all_schema_problems_are_reported(tmp_path):
    text = """
    models:
      a: {path: a.keras, safe_mode: off}
    data: {source: "sklearn:digits", test_size: 2}
    steps:
      - {kind: parallel, models: [a, a], combine: concat, colour: red}
      - {kind: fit_head, model: step_0}
    """
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, text))
    wheres = [where for where, _ in info.value.problems]
    assert wheres == ["models.a.safe_mode", "data.test_size", "steps[0].colour",
                      "steps[1].epochs"], wheres
    assert "1. models.a.safe_mode: must be true or false" in str(info.value)


def test_one_problem_keeps_the_one_line_form(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, GOOD.replace("combine: concat", "combine: concatt")))
    assert str(info.value).startswith(f"{tmp_path / 'recipe.yaml'}: steps[0].combine: unknown")
    assert "\n" not in str(info.value)


def test_output_problems_are_all_reported(tmp_path):
    from kmerge.recipe import check_outputs

    text = GOOD + "  - {kind: save, model: merged, path: out2.keras}\n"
    recipe = load_recipe(_write(tmp_path, text))
    (tmp_path / "out.keras").write_bytes(b"")
    (tmp_path / "out2.keras").mkdir()
    with pytest.raises(RecipeError) as info:
        check_outputs(recipe)
    assert [w for w, _ in info.value.problems] == ["steps[2].path", "steps[3].path"]
    assert "exists; add 'overwrite: true'" in str(info.value) and "is a directory" in str(info.value)


def test_missing_demo_model_says_how_to_make_it(tmp_path, monkeypatch):
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "parallel.yaml").write_text((EXAMPLES / "parallel.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as info:
        load_recipe("examples/parallel.yaml")
    msg = str(info.value)
    assert "2 problems" in msg
    assert ("models.a.path: file 'models/model_a.h5' does not exist (looked for "
            "examples/models/model_a.h5: relative paths start at the recipe's folder, examples)"
            ) in msg
    assert "`kmerge demo --out examples/models` writes it (from a kmerge clone, `make demo` does)" in msg


def test_missing_other_file_names_where_it_looked(tmp_path):
    text = GOOD.replace("b: {path: b.keras}", "b: {path: sub/b.keras}")
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, text))
    msg = str(info.value)
    assert f"looked for {tmp_path / 'sub' / 'b.keras'}" in msg or "looked for sub/b.keras" in msg
    assert "demo" not in msg


def test_demo_files_are_the_examples_models():
    """Every model an example reads is one the demo writes (so the hint above is right)."""
    from kmerge.demo import FILES

    for example in EXAMPLES.glob("*.yaml"):
        recipe = load_recipe(example, check_files=False)
        for spec in recipe.models.values():
            assert Path(spec.path).parent == Path("models") and Path(spec.path).name in FILES


def test_reference_types_read_as_written():
    from typing import Annotated, Literal

    from pydantic import Field, PositiveInt

    from kmerge.recipe import _type_text, reference_markdown

    # pydantic versions differ in how they hand constraints back: both forms read the same
    assert _type_text(list[PositiveInt]) == "list[int > 0]"
    assert _type_text(list[Annotated[int, Field(gt=0)]]) == "list[int > 0]"
    assert _type_text(Annotated[float, Field(ge=0.0, lt=1.0)]) == "float >= 0.0 and < 1.0"
    assert _type_text(Literal["a", "b"] | None) == "'a' | 'b' | None"
    assert _type_text(dict[str, str | int] | None) == "dict[str, str | int] | None"
    doc = reference_markdown()
    for junk in ("Annotated", "FieldInfo", "Optional", "typing", "Literal", "<class"):
        assert junk not in doc
    assert "| `hidden` | `list[int > 0]` | [] |" in doc

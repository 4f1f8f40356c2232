"""The command line: fast help, inspect, demo, errors without tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cnn

from kmerge.cli import main

LEGACY = Path(__file__).parent / "data" / "legacy"


def test_help_does_not_import_keras():
    code = ("import sys\nfrom kmerge.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().endswith("False")
    assert "inspect" in out.stdout


def test_usage_error_is_exit_2(capsys):
    assert main(["no-such-command"]) == 2
    assert main(["inspect"]) == 2


def test_inspect_legacy_file_reports_repairs(capsys):
    path = LEGACY / "rnn.h5"  # LSTM + Bidirectional GRU written by tf_keras
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "saved by Keras 2" in out and "time_major" in out


def test_inspect_json_and_tap_suggestions(tmp_path, capsys):
    path = tmp_path / "cnn.keras"
    cnn().save(path)
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "keras"
    assert data["suggested_taps"]  # the last feature map before Flatten
    types = {row["path"]: row["type"] for row in data["layers"]}
    assert types[data["suggested_taps"][0]] in ("MaxPooling2D", "BatchNormalization", "Conv2D")


def test_errors_are_one_line_exit_1(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.keras")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.keras" in err and "Traceback" not in err


@pytest.mark.xdist_group("demo")
def test_demo_runs_end_to_end(demo_run):
    folder, out = demo_run  # conftest: `kmerge demo --out DIR --epochs 2` through main()
    assert "parallel concat + head" in out and "identical predictions: True" in out
    assert (folder / "model_a.h5").exists() and (folder / "merged_parallel.keras").exists()


# -- merge subcommands through main() -----------------------------------------------------
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import mlp  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    mlp(seed=0).save(d / "a.keras")
    mlp(seed=1).save(d / "b.h5")
    mlp(inputs=3, outputs=2, seed=2).save(d / "c.keras")
    return d


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_parallel_writes_a_loadable_merge(files, tmp_path, capsys):
    out = tmp_path / "m.keras"
    rc = main(["parallel", str(files / "a.keras"), str(files / "b.h5"), "-o", str(out),
               "--head", "classifier:4:8", "--untrained"])
    assert rc == 0 and out.exists()
    m = keras.models.load_model(out)
    assert tuple(m.output.shape) == (None, 4)
    err = capsys.readouterr().err  # one line: saved, and untrained
    assert err.startswith("warning: saved ") and "untrained parts (head_dense_0, head_output)" in err


def test_sequential_fuse_and_dry_run(files, tmp_path, capsys):
    out = tmp_path / "s.keras"
    assert main(["sequential", str(files / "a.keras"), str(files / "c.keras"), "-o", str(out)]) == 0
    assert "adapter" not in capsys.readouterr().out  # a gives (None, 3), c takes (None, 3)
    assert main(["fuse", f"{files / 'a.keras'}:0", f"{files / 'b.h5'}:0,-1", "-o",
                 str(tmp_path / "f.keras"), "--head", "regressor:1", "--untrained"]) == 0
    before = _listing(tmp_path)
    assert main(["parallel", str(files / "a.keras"), str(files / "b.h5"), "-o",
                 str(tmp_path / "dry.keras"), "--dry-run"]) == 0
    assert "kmerge parallel plan" in capsys.readouterr().out
    assert _listing(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["parallel", "{a}", "{b}", "-o", "{a}"], "is one of the source files"),
        (["parallel", "{a}", "{b}", "-o", "{b}", "--overwrite"], "is one of the source files"),
        (["parallel", "{a}", "{b}", "-o", "{a2}"], "exists; pass --overwrite"),
        (["parallel", "{a}", "{b}", "-o", "{out}", "--head", "classifier:x"], "--head"),
        (["parallel", "{a}", "{b}", "-o", "{out}", "--combine", "avg"], "Did you mean"),
        (["sequential", "{c}", "{a}", "--adapter", "none", "-o", "{out}"], "gives (None, 2)"),
        (["parallel", "{a}", "{b}", "-o", "{nodir}"], "does not exist"),
        (["fuse", "{a}:nope", "{b}:0", "-o", "{out}"], "no layer 'nope'"),
    ],
)
def test_merge_errors_exit_1_and_write_nothing(files, tmp_path, capsys, args, match):
    (tmp_path / "a2.keras").write_bytes(b"x")
    paths = {"a": files / "a.keras", "b": files / "b.h5", "c": files / "c.keras",
             "a2": tmp_path / "a2.keras", "out": tmp_path / "out.keras",
             "nodir": tmp_path / "missing" / "out.keras"}
    src_before = {p: p.read_bytes() for p in files.iterdir()}
    before = _listing(tmp_path)
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err
    assert _listing(tmp_path) == before
    assert {p: p.read_bytes() for p in files.iterdir()} == src_before


def test_unknown_option_is_usage_error(files):
    assert main(["parallel", str(files / "a.keras"), "--frobnicate"]) == 2


def test_list_and_schema(capsys):
    assert main(["list", "combine-ops"]) == 0
    assert "learned_weights" in capsys.readouterr().out.split()
    assert main(["list", "heads"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["classifier", "regressor"]
    assert main(["schema"]) == 0
    assert "steps" in json.loads(capsys.readouterr().out)["properties"]


def test_verify_command(files, tmp_path, capsys):
    import kmerge

    out = tmp_path / "m.keras"
    a, b = kmerge.load(files / "a.keras"), kmerge.load(files / "b.h5")
    kmerge.save(kmerge.parallel({"a": a, "b": b}), out)
    assert main(["verify", str(out), str(files / "a.keras"), f"b={files / 'b.h5'}"]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["verify", str(out), str(files / "c.keras")]) == 1
    assert "not recorded as a source" in capsys.readouterr().err


def test_run_recipe_with_npz_data(files, tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(40, 8)).astype("float32"),
             y=(np.arange(40) % 3))
    for name in ("a.keras", "b.h5"):
        (tmp_path / name).write_bytes((files / name).read_bytes())
    (tmp_path / "r.yaml").write_text(
        "models:\n  a: {path: a.keras}\n  b: {path: b.h5}\n"
        "data: {source: data.npz, test_size: 0.25}\n"
        "steps:\n  - {name: avg, kind: parallel, models: [a, b], combine: average}\n"
        "  - {kind: verify, model: avg}\n  - {kind: evaluate}\n"
        "  - {kind: save, model: avg, path: out/avg.keras}\n")
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and (tmp_path / "out" / "avg.keras").exists()


def test_run_with_report(files, tmp_path, capsys):
    for name in ("a.keras", "b.h5"):
        (tmp_path / name).write_bytes((files / name).read_bytes())
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(30, 8)).astype("float32"),
             y=np.arange(30) % 3)
    (tmp_path / "r.yaml").write_text(
        "models:\n  a: {path: a.keras}\n  b: {path: b.h5}\ndata: {source: d.npz}\n"
        "steps:\n  - {name: m, kind: parallel, models: [a, b], combine: average}\n"
        "  - {kind: verify, model: m}\n")
    assert main(["run", str(tmp_path / "r.yaml"), "--report", str(tmp_path / "rep")]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert set(report["models"]) == {"a", "b", "m"} and report["final"] == "m"
    assert report["sources"] == ["a", "b"] and report["verify"]["m"]
    assert (tmp_path / "rep" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weights_command_and_method_list(files, tmp_path, capsys):
    out = tmp_path / "soup.keras"
    assert main(["weights", str(files / "a.keras"), str(files / "b.h5"), "--method", "slerp",
                 "--param", "t=0.25", "-o", str(out)]) == 0
    assert out.exists()
    assert main(["weights", str(files / "a.keras"), str(files / "c.keras"), "--method",
                 "linear", "-o", str(tmp_path / "bad.keras")]) == 1
    assert "differ at layer" in capsys.readouterr().err
    assert not (tmp_path / "bad.keras").exists()
    assert main(["list", "methods"]) == 0
    assert {"linear", "ties", "greedy_soup"} <= set(capsys.readouterr().out.split())


def _text_model(path, seed):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((7,), dtype="int32")
    h = keras.layers.Embedding(20, 5, mask_zero=True)(inp)
    seq, state, _ = keras.layers.LSTM(4, dropout=0.3, return_sequences=True,
                                      return_state=True, name="lstm")(h)
    h = state * 2.0 + keras.ops.relu(state)
    keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="out")(h)).save(path)


def test_cli_merges_masked_text_models_with_ops_and_multi_output_taps(tmp_path, capsys):
    a, b = tmp_path / "a.keras", tmp_path / "b.keras"
    _text_model(a, 0)
    _text_model(b, 1)
    out = tmp_path / "m.keras"
    assert main(["parallel", str(a), str(b), "-o", str(out), "--combine", "concat"]) == 0
    assert out.is_file()
    fused = tmp_path / "f.keras"
    assert main(["fuse", f"{a}:lstm[1],out", f"{b}:out", "-o", str(fused)]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad.keras"
    assert main(["fuse", f"{a}:lstm,out", f"{b}:out", "-o", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "error: layer 'lstm' of model 'a' has 3 outputs; pick one with 'lstm[0]'" in err
    assert "Traceback" not in err and not bad.exists()


# -- recipes through main(): nothing written on failure, outputs never over inputs ----------
def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _snapshot(d):
    return {p.relative_to(d): (p.read_bytes() if p.is_file() else None)
            for p in sorted(d.rglob("*"))}


@pytest.fixture
def project(files, tmp_path):
    """A recipe folder: models/a.keras, models/b.h5, models/c.keras, d.npz (8 features)."""
    (tmp_path / "models").mkdir()
    for name in ("a.keras", "b.h5", "c.keras"):
        (tmp_path / "models" / name).write_bytes((files / name).read_bytes())
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(40, 8)).astype("float32"),
             y=np.arange(40) % 3)
    return tmp_path


RECIPE = """models:
  a: {path: models/a.keras}
  b: {path: models/b.h5}
  c: {path: models/c.keras}
data: {source: d.npz}
steps:
  - {name: avg, kind: parallel, models: [a, b], combine: average}
  - {kind: save, model: avg, path: out/avg.keras}
"""


def _recipe(d, text):
    (d / "r.yaml").write_text(text)
    return str(d / "r.yaml")


def test_run_whose_later_step_fails_writes_nothing(project, capsys):
    # the save succeeds, then sequential c -> a fails: c gives (None, 2), a takes (None, 8)
    r = _recipe(project, RECIPE + "  - {name: bad, kind: sequential, models: [c, a], "
                                  "adapter: none}\n")
    before = _snapshot(project)
    assert main(["run", r]) == 1
    err = capsys.readouterr().err
    assert "gives (None, 2)" in _one_error_line(err)
    assert _snapshot(project) == before  # no out/, no staged file, inputs byte-identical


def test_run_interrupted_writes_nothing(project, capsys, monkeypatch):
    import kmerge

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kmerge, "verify", interrupt)
    r = _recipe(project, RECIPE + "  - {kind: verify, model: avg}\n")
    before = _snapshot(project)
    assert main(["run", r]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert _snapshot(project) == before


def test_failure_while_moving_outputs_into_place_removes_them(project, monkeypatch, capsys):
    import os

    from kmerge.recipe import load_recipe
    from kmerge.runner import run

    r = _recipe(project, RECIPE + "  - {kind: save, model: a, path: out/second.keras}\n")
    real = os.replace

    def flaky(src, dst):
        if str(dst).endswith("second.keras"):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    before = _snapshot(project)
    with pytest.raises(OSError, match="disk full"):
        run(load_recipe(r), echo=lambda s: None)
    assert _snapshot(project) == before  # out/avg.keras was moved in, then removed


def test_saves_keep_the_state_at_their_step_and_appear_at_the_end(project, capsys):
    r = _recipe(project, RECIPE.replace("combine: average}", "combine: concat, head: "
                                        "{kind: classifier, units: 3}}")
                + "  - {kind: fit_head, model: avg, epochs: 3, batch_size: 8}\n"
                  "  - {kind: save, model: avg, path: out/trained.keras}\n")
    assert main(["run", r]) == 0
    out = capsys.readouterr().out
    staged, saved = out.index("staged avg for"), out.index("saved avg ->")
    assert staged < out.index("step 2 (fit_head)") < saved  # written after the last step
    import kmerge

    before = kmerge.load(project / "out" / "avg.keras")
    after = kmerge.load(project / "out" / "trained.keras")
    head = [v for v in after.weights if "head" in v.path]
    assert head and any(not np.array_equal(np.asarray(v), np.asarray(w))
                        for v, w in zip(head, [v for v in before.weights if "head" in v.path]))
    assert not [p for p in (project / "out").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("command", ["validate", "run"])
def test_output_dir_onto_the_models_folder_is_refused(project, capsys, command):
    # out/c.keras with -o models/ would replace the recipe's own model c
    r = _recipe(project, RECIPE.replace("out/avg.keras", "out/c.keras"))
    assert main(["validate", r]) == 0
    capsys.readouterr()
    before = _snapshot(project)
    assert main([command, r, "-o", str(project / "models")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "steps[1].path: 'out/c.keras' (with -o" in line and "is models.c.path" in line, line
    assert _snapshot(project) == before


@pytest.mark.parametrize(("extra", "args", "what"), [
    ("  - {kind: save, model: a, path: d.npz}\n", [], "cannot save 'd.npz'"),
    ("  - {kind: save, model: a, path: r.h5}\n", [], None),  # fine: r.yaml is not r.h5
    ("  - {kind: save, model: a, path: out/avg.keras}\n", [], "which steps[1].path writes too"),
    ("", ["--report", "{models}/a.keras"], "--report: "),
    ("", ["--report", "{models}"], None),  # a folder holding models: report files beside them
])
def test_outputs_colliding_with_inputs_or_each_other(project, capsys, extra, args, what):
    r = _recipe(project, RECIPE + extra)
    argv = [a.format(models=project / "models") for a in args]
    before = _snapshot(project)
    if what is None:
        assert main(["validate", r, *argv]) == 0
        return
    for command in ("validate", "run"):
        assert main([command, r, *argv]) == 1
        assert what in _one_error_line(capsys.readouterr().err)
    assert _snapshot(project) == before


def test_report_without_data_writes_nothing(project, capsys):
    r = _recipe(project, RECIPE.replace("data: {source: d.npz}\n", ""))
    before = _snapshot(project)
    assert main(["run", r, "--report", str(project / "rep")]) == 1
    assert "--report: a report evaluates" in _one_error_line(capsys.readouterr().err)
    assert _snapshot(project) == before


def test_existing_output_needs_overwrite(project, capsys):
    r = _recipe(project, RECIPE)
    (project / "out").mkdir()
    (project / "out" / "avg.keras").write_bytes(b"keep me")
    before = _snapshot(project)
    assert main(["run", r]) == 1
    assert "exists; add 'overwrite: true'" in _one_error_line(capsys.readouterr().err)
    assert _snapshot(project) == before
    r = _recipe(project, RECIPE.replace("out/avg.keras}", "out/avg.keras, overwrite: true}"))
    before = _snapshot(project)
    # the report evaluates every model: c takes 3 features, the data has 8
    assert main(["run", r, "--report", str(project / "rep")]) == 1
    assert "expects (None, 3)" in _one_error_line(capsys.readouterr().err)
    assert _snapshot(project) == before  # the save was staged, then removed
    r = _recipe(project, RECIPE.replace("out/avg.keras}", "out/avg.keras, overwrite: true}")
                .replace("  c: {path: models/c.keras}\n", ""))
    assert main(["run", r, "--report", str(project / "rep")]) == 0
    assert (project / "out" / "avg.keras").read_bytes()[:2] == b"PK"
    assert (project / "rep" / "report.json").is_file()


def test_safe_mode_off_is_a_warning_naming_the_model(project, capsys):
    r = _recipe(project, RECIPE.replace("c: {path: models/c.keras}",
                                        "c: {path: models/c.keras, safe_mode: false}"))
    assert main(["--quiet", "validate", r]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "models.c: safe_mode is false" in err
    assert main(["run", r]) == 0
    assert err.splitlines()[0] in capsys.readouterr().err.splitlines()
    r = _recipe(project, RECIPE.replace("c: {path: models/c.keras}",
                                        "c: {path: models/c.keras, safe_mode: 'off'}"))
    assert main(["run", r]) == 1
    assert "models.c.safe_mode: must be true or false" in _one_error_line(
        capsys.readouterr().err)
    assert main(["inspect", str(project / "models" / "a.keras"), "--unsafe", "--json"]) == 0
    assert "--unsafe" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["validate", "plan", "run"])
def test_alias_bomb_fails_fast_everywhere(project, capsys, command):
    import time

    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{k}: &a{k} [{','.join([f'*a{k - 1}'] * 9)}]" for k in range(1, 9)]
    bomb = "\n".join("      " + ln for ln in lines)
    r = _recipe(project, RECIPE.replace("combine: average}\n", "combine: average}\n") +
                "  - name: soup\n    kind: weights\n    models: [a, b]\n    method: linear\n"
                f"    params:\n{bomb}\n")
    before = _snapshot(project)
    t0 = time.perf_counter()
    assert main([command, r]) == 1
    assert time.perf_counter() - t0 < 1.0
    assert "anchor '&a0' refused" in _one_error_line(capsys.readouterr().err)
    assert _snapshot(project) == before


@pytest.mark.parametrize(("setup", "what"), [
    (lambda d: (d / "d.csv").write_text("a,b,y\n1,2,0\n3,4\n"), "line 3 has 2 values"),
    (lambda d: np.savez(d / "d.npz", x=np.ones((9, 8), dtype=object), y=np.arange(9)),
     "array 'x' holds Python objects"),
])
def test_bad_data_files_are_one_line_errors(project, capsys, setup, what):
    setup(project)
    source = "d.csv" if (project / "d.csv").exists() else "d.npz"
    r = _recipe(project, RECIPE.replace("source: d.npz", f"source: {source}"))
    before = _snapshot(project)
    assert main(["run", r]) == 1
    assert what in _one_error_line(capsys.readouterr().err)
    assert _snapshot(project) == before


def test_evaluate_with_wrong_data_shape_keeps_the_model(project, capsys):
    import kmerge
    from kmerge.errors import InvalidArgumentError
    from kmerge.runner import Data, score

    a = kmerge.load(project / "models" / "a.keras")
    want = [np.array(w) for w in a.get_weights()]
    bad = Data(*(np.ones((4, 5), "float32"), np.zeros(4, "int32")) * 2)
    with pytest.raises(InvalidArgumentError, match=r"expects \(None, 8\) but the data has "
                                                   r"examples of shape \(5,\)"):
        score(a, bad)
    assert all(np.array_equal(w, v) for w, v in zip(want, a.get_weights()))

    def no_predict(*args, **kwargs):
        raise AssertionError("score must not call model.predict")

    a.predict = no_predict
    good = Data(*(np.ones((4, 8), "float32"), np.zeros(4, "int32")) * 2)
    assert 0.0 <= score(a, good) <= 1.0


# -- argument errors, interrupts, pipes ---------------------------------------------------
@pytest.mark.parametrize(("args", "what"), [
    (["parallel", "{a}", "{b}", "-o", "{out}", "--combine", "weighted", "--weights", "a,b"],
     "--weights 'a,b': use comma-separated numbers"),
    (["parallel", "{a}", "{b}", "-o", "{out}", "--combine", "weighted", "--weights", "1,nan"],
     "--weights '1,nan': weights must be finite"),
    (["weights", "{a}", "{b}", "--method", "dare", "--base", "{a}", "--param", "seed=abc",
      "-o", "{out}"], "--param 'seed=abc': parameter 'seed' of method 'dare' must be an integer"),
    (["weights", "{a}", "{b}", "--method", "ties", "--base", "{a}", "--param", "density=x",
      "-o", "{out}"], "parameter 'density' of method 'ties' must be a number; got 'x'"),
    (["parallel", "{a}", "{b}", "-o", "{out}", "--head", "classifier:10:64,,3"],
     "sizes must be integers"),
    (["parallel", "{a}", "{b}", "-o", "{out}", "--head", "softmax:10"], "--head 'softmax:10'"),
    (["parallel", "{a}", "{b}", "-o", "{out}", "--head", "classifier:0"],
     "--head 'classifier:0': classifier needs a positive integer size, got 0"),
    (["parallel", "{a}", "{b}", "-o", "{out}", "--head", "regressor:1:8,-2"],
     "--head 'regressor:1:8,-2': regressor: hidden sizes must be positive"),
])
def test_bad_arguments_are_one_line_errors(files, tmp_path, capsys, args, what):
    paths = {"a": files / "a.keras", "b": files / "b.h5", "out": tmp_path / "out.keras"}
    src_before = _snapshot(files)
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]
    assert main(argv) == 1
    assert what in _one_error_line(capsys.readouterr().err)
    assert not paths["out"].exists() and _snapshot(files) == src_before


def test_keyboard_interrupt_is_exit_130(monkeypatch, capsys):
    import kmerge.cli as cli

    def interrupted(args, echo):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli._COMMANDS, "list", interrupted)
    assert main(["list", "heads"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "interrupted\n" and captured.out == ""


def test_multi_line_errors_print_as_one_line_and_bugs_keep_tracebacks(monkeypatch, capsys):
    import kmerge.cli as cli
    from kmerge.errors import VerificationError

    def fails(args, echo):
        raise VerificationError("kmerge verify: FAILED\n  a: output differs by 0.5\n")

    monkeypatch.setitem(cli._COMMANDS, "list", fails)
    assert main(["list", "heads"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == "error: kmerge verify: FAILED; a: output differs by 0.5"

    def bug(args, echo):
        raise RuntimeError("a bug")

    monkeypatch.setitem(cli._COMMANDS, "list", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["list", "heads"])


def test_closed_pipe_is_quiet():
    # the reader is gone before kmerge writes: every write raises BrokenPipeError
    code = "import sys\nfrom kmerge.cli import main\nsys.exit(main(['schema']))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert err == "", err


def test_json_architecture_with_weights(project, capsys):
    import kmerge

    a = kmerge.load(project / "models" / "a.keras")
    (project / "models" / "arch.json").write_text(a.to_json())
    a.save_weights(project / "models" / "arch.weights.h5")
    arch = f"{project / 'models' / 'arch.json'}+{project / 'models' / 'arch.weights.h5'}"
    out = project / "m.keras"
    assert main(["parallel", arch, str(project / "models" / "b.h5"), "-o", str(out)]) == 0
    assert out.is_file()
    assert main(["inspect", arch]) == 0
    capsys.readouterr()
    before = _snapshot(project)
    assert main(["parallel", str(project / "models" / "arch.json"),
                 str(project / "models" / "b.h5"), "-o", str(project / "n.keras")]) == 1
    assert "pass " in _one_error_line(capsys.readouterr().err)
    assert main(["parallel", arch, str(project / "models" / "b.h5"), "-o",
                 str(project / "models" / "arch.weights.h5"), "--overwrite"]) == 1
    assert "is one of the source files" in _one_error_line(capsys.readouterr().err)
    assert _snapshot(project) == before
    r = _recipe(project, RECIPE.replace("a: {path: models/a.keras}",
                                        "a: {path: models/arch.json, weights: "
                                        "models/arch.weights.h5}")
                + "  - {kind: verify, model: avg}\n")
    assert main(["run", r]) == 0
    assert "kmerge verify: OK" in capsys.readouterr().out
    assert (project / "out" / "avg.keras").is_file()


def test_run_api_warns_for_safe_mode_off(project):
    from kmerge.recipe import load_recipe
    from kmerge.runner import run

    r = _recipe(project, RECIPE.replace("c: {path: models/c.keras}",
                                        "c: {path: models/c.keras, safe_mode: false}"))
    with pytest.warns(UserWarning, match=r"models\.c: safe_mode is false: Lambda layers in "
                                         r"models/c\.keras run their Python code"):
        result = run(load_recipe(r), echo=lambda s: None)
    assert result.saved["avg"] == project / "out" / "avg.keras"


@pytest.mark.parametrize("argv", [
    ["probe", "{a}", "{missing}", "--data", "digits"],
    ["parallel", "{a}", "{missing}", "-o", "{out}", "--data", "digits"],
    ["weights", "{a}", "{missing}", "-o", "{out}", "--method", "linear", "--data", "digits"],
])
def test_a_missing_model_file_is_reported_before_any_data_loads(files, tmp_path, capsys, argv):
    names = {"a": str(files / "a.keras"), "missing": str(tmp_path / "nope.keras"),
             "out": str(tmp_path / "m.keras")}
    assert main([a.format(**names) for a in argv]) == 1
    out, err = capsys.readouterr()
    assert "nope.keras: no such file or directory" in err
    assert "data:" not in out and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []

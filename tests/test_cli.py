"""The command line: fast help, inspect, demo, errors without tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

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


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "parallel concat + head" in out and "identical predictions: True" in out
    assert (tmp_path / "model_a.h5").exists() and (tmp_path / "merged_parallel.keras").exists()


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
               "--head", "classifier:4:8"])
    assert rc == 0 and out.exists()
    m = keras.models.load_model(out)
    assert tuple(m.output.shape) == (None, 4)
    assert "saved" in capsys.readouterr().out


def test_sequential_fuse_and_dry_run(files, tmp_path, capsys):
    out = tmp_path / "s.keras"
    assert main(["sequential", str(files / "a.keras"), str(files / "c.keras"), "-o", str(out)]) == 0
    assert "adapter" not in capsys.readouterr().out  # a gives (None, 3), c takes (None, 3)
    assert main(["fuse", f"{files / 'a.keras'}:0", f"{files / 'b.h5'}:0,-1", "-o",
                 str(tmp_path / "f.keras"), "--head", "regressor:1"]) == 0
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
    assert capsys.readouterr().out.split() == ["classifier", "regressor"]
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

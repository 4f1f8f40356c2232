"""The merge commands never save an untrained model silently: ``--data`` trains and scores the
new parts (``--untrained`` saves them as they are); ``weights --data/--repair``; ``-q`` before
and after the command; ``--dry-run`` without ``-o``; ``list`` descriptions; ``--help``
examples. Through ``kmerge.cli.main`` and through the real entry point (``python -m kmerge``).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import mlp

import kmerge
from kmerge.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """a, b: 8 -> 3 MLPs (one architecture); c: 5 -> 3; d.npz: 40 examples of 8 features."""
    d = tmp_path_factory.mktemp("cli_train")
    mlp(seed=0).save(d / "a.keras")
    mlp(seed=1).save(d / "b.keras")
    mlp(inputs=5, seed=2).save(d / "c.keras")
    rng = np.random.default_rng(0)
    np.savez(d / "d.npz", x=rng.normal(size=(40, 8)).astype("float32"), y=np.arange(40) % 3)
    return d


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


#: tensorflow's C++ logging, which Keras triggers on any backend when tensorflow is installed
#: (absl's "before InitializeLog" notice, oneDNN's banner): not kmerge's output
_TF_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} )")


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not _TF_LOG.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _scores(out: str) -> dict[str, float]:
    """The evaluation table: ``name  0.1234`` rows."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+)\s+(\d\.\d{4})$", out, re.M)}


def _kmerge(*args, cwd=None) -> subprocess.CompletedProcess:
    """The real entry point, in a fresh process on the test's backend."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "kmerge", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# -- untrained parts: refused without --data, saved with --untrained ------------------------
UNTRAINED = {
    "parallel-head": (["parallel", "{a}", "{b}", "--head", "classifier:3:4"],
                      "head_dense_0, head_output"),
    "parallel-learned-weights": (["parallel", "{a}", "{b}", "--combine", "learned_weights"],
                                 "combine_learned_weights"),
    "parallel-gate": (["parallel", "{a}", "{b}", "--combine", "gate"], "combine_gate"),
    "fuse-head": (["fuse", "{a}:0", "{b}:0", "--head", "regressor:1"], "head_output"),
    "sequential-dense-adapter": (["sequential", "{a}", "{c}"], "adapter_a_to_c_dense"),
}


@pytest.mark.parametrize("case", list(UNTRAINED))
def test_untrained_merge_is_refused_and_writes_nothing(files, tmp_path, capsys, case):
    args, parts = UNTRAINED[case]
    out = tmp_path / "m.keras"
    argv = [a.format(a=files / "a.keras", b=files / "b.keras", c=files / "c.keras")
            for a in args] + ["-o", str(out)]
    before = _snapshot(files)
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"untrained parts ({parts}" in line
    assert "--data" in line and "--untrained" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert _snapshot(files) == before


def test_merges_without_new_trainable_parts_save_as_before(files, tmp_path, capsys):
    out = tmp_path / "avg.keras"
    assert main(["parallel", str(files / "a.keras"), str(files / "b.keras"), "-o", str(out),
                 "--combine", "average", "--no-freeze"]) == 0  # sources: trained, not new
    captured = capsys.readouterr()
    assert out.is_file() and captured.err == "" and f"saved {out}" in captured.out


def test_untrained_flag_saves_with_one_warning_line(files, tmp_path, capsys):
    out = tmp_path / "m.keras"
    assert main(["sequential", str(files / "a.keras"), str(files / "c.keras"), "-o", str(out),
                 "--untrained", "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: saved {out} with untrained parts")
    assert kmerge.info(kmerge.load(out))["adapters"]
    # --untrained and --data contradict each other: a usage error
    assert main(["sequential", str(files / "a.keras"), str(files / "c.keras"), "-o",
                 str(tmp_path / "n.keras"), "--untrained", "--data", "digits"]) == 2
    assert not (tmp_path / "n.keras").exists()


@pytest.mark.parametrize(("extra", "what"), [
    (["--epochs", "2"], "--epochs needs --data"),
    (["--batch-size", "8", "--validation-split", "0.2"],
     "--batch-size, --validation-split need --data"),
    (["--data-option", "test_size=0.2"], "--data-option needs --data"),
    (["--data", "digit"], "--data digit: "),
    (["--data", "d.npz", "--data-option", "colour=red"], "--data-option 'colour=red': use KEY"),
    (["--data", "d.npz", "--data-option", "test_size=2"], "test_size"),
    (["--data", "d.npz", "--data-option", "shape=8,x"], "shape takes integers"),
    (["--data", "missing.npz"], "missing.npz"),
    (["--data", "d.npz", "--validation-split", "0.99"], "--validation-split 0.99 leaves"),
])
def test_bad_data_options_are_one_line_errors(files, tmp_path, capsys, monkeypatch, extra,
                                              what):
    monkeypatch.chdir(files)  # data files relative to the working directory
    out = tmp_path / "m.keras"
    before = _snapshot(files)
    assert main(["parallel", "a.keras", "b.keras", "-o", str(out), "--head", "classifier:3",
                 *extra]) == 1
    assert what in _one_error_line(capsys.readouterr().err)
    assert not out.exists() and _snapshot(files) == before


@pytest.mark.parametrize("extra", [["--epochs", "0"], ["--validation-split", "1"],
                                   ["--seed", "x"], ["--batch-size", "-1"]])
def test_bad_training_numbers_are_usage_errors(files, tmp_path, extra):
    assert main(["parallel", str(files / "a.keras"), str(files / "b.keras"), "-o",
                 str(tmp_path / "m.keras"), "--data", "digits", *extra]) == 2


# -- training with --data ------------------------------------------------------------------
def test_parallel_with_digits_trains_the_head_and_prints_scores(trained, tmp_path, capsys):
    a, b = trained
    out = tmp_path / "m.keras"
    assert main(["parallel", str(a), str(b), "-o", str(out), "--head", "classifier:10:32",
                 "--data", "digits", "--epochs", "2", "--batch-size", "8",
                 "--validation-split", "0.2"]) == 0
    stdout = capsys.readouterr().out
    assert "data: sklearn:digits: 1257 train / 540 test" in stdout
    assert "training head_dense_0, head_output: 2 epochs on 1006 examples (251 held out" in stdout
    assert "val_accuracy" in stdout and "test accuracy" in stdout
    scores = _scores(stdout)
    assert set(scores) == {"model_a", "model_b", "merged"}
    assert scores["merged"] > 0.5, stdout  # untrained: about 0.1
    m = keras.models.load_model(out)
    from kmerge.demo import digits

    _, x_te, _, y_te = digits(0)  # the same split as --data digits --seed 0
    acc = float(np.mean(np.argmax(m.predict(x_te, verbose=0), -1) == y_te))
    assert abs(acc - scores["merged"]) <= 5e-5  # printed with 4 decimals


def test_npz_data_options_and_quiet_training(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(files)
    out = tmp_path / "lw.keras"
    assert main(["-q", "parallel", "a.keras", "b.keras", "--combine", "learned_weights",
                 "-o", str(out), "--data", "d.npz", "--data-option", "test_size=0.25",
                 "--epochs", "1", "--batch-size", "8", "--seed", "3"]) == 0
    stdout = capsys.readouterr().out
    assert "training" not in stdout and "saved" not in stdout  # -q: results only
    assert set(_scores(stdout)) == {"a", "b", "merged"}
    assert out.is_file()
    # nothing trainable: the table, no training
    assert main(["parallel", "a.keras", "b.keras", "--combine", "average", "-o",
                 str(tmp_path / "avg.keras"), "--data", "d.npz"]) == 0
    stdout = capsys.readouterr().out
    assert "data: d.npz: 28 train / 12 test" in stdout and "nothing to train" in stdout
    assert "note: test set: a random 30% split of d.npz (seed 0)" in stdout
    # --no-freeze: the sources train with the head; the same --seed gives the same model
    for name in ("nf1.keras", "nf2.keras"):
        assert main(["parallel", "a.keras", "b.keras", "--head", "classifier:3:4", "--no-freeze",
                     "-o", str(tmp_path / name), "--data", "d.npz", "--epochs", "1",
                     "--seed", "5"]) == 0
        assert "training head_dense_0, head_output and the unfrozen sources" in \
            capsys.readouterr().out
    one, two = (kmerge.load(tmp_path / n) for n in ("nf1.keras", "nf2.keras"))
    assert all(np.array_equal(u, v) for u, v in zip(one.get_weights(), two.get_weights()))
    first_a = kmerge.info(one)["sources"]["a"]["layers"][0]  # Keras may suffix the name
    assert not np.array_equal(one.get_layer(first_a).get_weights()[0],
                              kmerge.load(files / "a.keras").layers[0].get_weights()[0])
    assert set(_scores(stdout)) == {"a", "b", "merged"}


def test_sequential_with_data_trains_the_adapter(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(files)
    out = tmp_path / "s.keras"
    before = kmerge.load(files / "a.keras")
    assert main(["sequential", "a.keras", "c.keras", "-o", str(out), "--data", "d.npz",
                 "--epochs", "1"]) == 0
    stdout = capsys.readouterr().out
    assert "training adapter_a_to_c_dense: 1 epochs" in stdout
    # c takes 5 features, not the data's 8: not scored, and said so
    assert "not scored: c (its input does not take the data)" in stdout
    assert set(_scores(stdout)) == {"a", "merged"}
    saved = kmerge.load(out)
    first_a = kmerge.info(saved)["sources"]["a"]["layers"][0]  # Keras may suffix the name
    np.testing.assert_array_equal(saved.get_layer(first_a).get_weights()[0],
                                  before.layers[0].get_weights()[0])  # frozen source kept


def test_weights_with_data_align_and_repair(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(files)
    out = tmp_path / "soup.keras"
    assert main(["weights", "a.keras", "b.keras", "--method", "linear", "--align",
                 "activations", "--repair", "repair", "--data", "d.npz", "--weights", "1,3",
                 "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert set(_scores(captured.out)) == {"a", "b", "merged"}
    info = kmerge.info(kmerge.load(out))
    assert set(info["accuracy"]) == {"sources", "merged"}  # recorded with labels
    assert info["weights"] == [0.25, 0.75] and info["repair"] == "repair"
    # merge_weights' own arguments are flags, not method parameters
    assert main(["weights", "a.keras", "b.keras", "--method", "linear", "--param", "data=x",
                 "-o", str(tmp_path / "no.keras")]) == 1
    assert "use --data" in _one_error_line(capsys.readouterr().err)
    # --repair without data: one line, nothing written
    assert main(["weights", "a.keras", "b.keras", "--method", "linear", "--repair", "bn",
                 "-o", str(tmp_path / "no.keras")]) == 1
    assert "data" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "no.keras").exists()


# -- -q on both sides, --dry-run without -o ------------------------------------------------
def test_quiet_before_and_after_the_command_mean_the_same(files, tmp_path, capsys):
    (tmp_path / "a.keras").write_bytes((files / "a.keras").read_bytes())
    (tmp_path / "b.keras").write_bytes((files / "b.keras").read_bytes())
    (tmp_path / "r.yaml").write_text(
        "models:\n  a: {path: a.keras}\n  b: {path: b.keras}\n"
        "steps:\n  - {name: avg, kind: parallel, models: [a, b], combine: average}\n"
        "  - {kind: verify, model: avg}\n")
    r = str(tmp_path / "r.yaml")
    outs = {}
    for argv in (["run", r], ["-q", "run", r], ["run", r, "--quiet"]):
        assert main(argv) == 0
        outs[tuple(argv)] = capsys.readouterr().out
    loud, *quiet = outs.values()
    assert "loaded a" in loud and len(set(quiet)) == 1 and "loaded a" not in quiet[0]
    assert "kmerge verify: OK" in quiet[0]  # --quiet keeps results
    # --debug, too, on either side
    assert main(["validate", r, "--debug"]) == 0 and main(["--debug", "validate", r]) == 0


def test_dry_run_needs_no_output(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["parallel", str(files / "a.keras"), str(files / "b.keras"), "--head",
                  "classifier:3:4"],
                 ["fuse", f"{files / 'a.keras'}:0", f"{files / 'b.keras'}:0"],
                 ["sequential", str(files / "a.keras"), str(files / "c.keras")]):
        assert main([*argv, "--dry-run"]) == 0
        assert "plan" in capsys.readouterr().out
        assert main(argv) == 2  # without --dry-run, -o is required: a usage error
        assert "-o/--output (or --dry-run" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# -- list, help ------------------------------------------------------------------------------
def test_list_prints_each_name_with_its_description(capsys):
    from kmerge.cli import COMBINE_DESCRIPTIONS, descriptions
    from kmerge.graph.combine import combine_ops
    from kmerge.recipe import COMBINE_OPS
    from kmerge.weights.methods import merge_methods

    assert sorted(COMBINE_DESCRIPTIONS) == sorted(COMBINE_OPS) == combine_ops.names()
    for what, names in (("methods", [*merge_methods.names(), "greedy_soup"]),
                        ("combine-ops", COMBINE_OPS), ("heads", ["classifier", "regressor"])):
        assert main(["list", what]) == 0
        rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
        assert sorted(rows) == sorted(names)
        assert all(len(text) > 10 for text in rows.values()), rows
        assert rows == {n: " ".join(t.split()) for n, t in descriptions(what).items()}
    # from the docstrings: the first paragraph of each method's
    assert descriptions("methods")["linear"].startswith("Weighted average")
    assert "[needs --base]" in descriptions("methods")["ties"]
    assert "[needs --data]" in descriptions("methods")["fisher"]
    assert descriptions("heads")["classifier"].startswith("A softmax classifier head")


def test_every_command_help_has_a_description_described_arguments_and_examples():
    import argparse

    from kmerge.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= {"parallel", "fuse", "sequential", "weights", "run", "list"}
    for name, sp in sub.choices.items():
        assert len(sp.description or "") > 60, name
        examples = sp.epilog.split("examples:\n", 1)[1].splitlines()
        assert 1 <= len(examples) <= 3 and all(
            e.startswith(f"  kmerge {name}") for e in examples), (name, examples)
        for action in sp._actions:
            assert action.help, (name, action.dest)


# -- the real entry point --------------------------------------------------------------------
def test_entry_point_refuses_to_save_an_untrained_merge(files, tmp_path):
    out = tmp_path / "m.keras"
    proc = _kmerge("sequential", files / "a.keras", files / "c.keras", "-o", out)
    assert proc.returncode == 1, proc.stderr
    assert "untrained parts (adapter_a_to_c_dense)" in _one_error_line(proc.stderr)
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


def test_entry_point_quiet_list_and_help(files, tmp_path):
    (tmp_path / "r.yaml").write_text(
        f"models:\n  a: {{path: {files / 'a.keras'}}}\n  b: {{path: {files / 'b.keras'}}}\n"
        "steps:\n  - {name: avg, kind: parallel, models: [a, b], combine: average}\n")
    loud = _kmerge("validate", tmp_path / "r.yaml")
    before, after = _kmerge("-q", "validate", tmp_path / "r.yaml"), \
        _kmerge("validate", tmp_path / "r.yaml", "-q")
    assert loud.returncode == before.returncode == after.returncode == 0
    assert "OK" in loud.stdout and before.stdout == after.stdout == ""
    listed = _kmerge("list", "combine-ops")
    assert listed.returncode == 0 and re.search(r"^gate\s+\S.*gate", listed.stdout, re.M)
    helped = _kmerge("parallel", "--help")
    assert helped.returncode == 0
    assert "examples:\n  kmerge parallel " in helped.stdout and "--untrained" in helped.stdout

"""kmerge.report: the report folder, its numbers against independent computation, its
figures, and its error paths (which write nothing)."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys

import keras
import numpy as np
import pytest

import kmerge
from kmerge.errors import InvalidArgumentError, KmergeError
from kmerge.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ridge(features: np.ndarray, targets: np.ndarray, lam: float = 1e-1):
    """Least-squares readout (with bias): a fitted Dense layer without running fit."""
    f = np.concatenate([features, np.ones((len(features), 1))], 1).astype("float64")
    w = np.linalg.solve(f.T @ f + lam * np.eye(f.shape[1]), f.T @ targets)
    return w[:-1].astype("float32"), w[-1].astype("float32")


def _fit_last(model: keras.Model, x: np.ndarray, targets: np.ndarray, scale: float = 1.0):
    feats = keras.Model(model.inputs[0], model.layers[-2].output).predict(x, verbose=0)
    w, b = _ridge(feats.reshape(len(x), -1), targets)
    model.layers[-1].set_weights([w * scale, b * scale])
    return model


@pytest.fixture(scope="module")
def setup(digits, tmp_path_factory):
    """Two different digit classifiers (readouts solved in closed form: fast on every
    backend), their parallel average, its verify report, and one written report."""
    x_tr, y_tr, x_te, y_te = digits
    onehot = np.eye(10, dtype="float32")[y_tr]
    keras.utils.set_random_seed(0)
    a = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                          keras.layers.Dense(10, activation="softmax")], name="mlp")
    w, b = _ridge(x_tr.reshape(len(x_tr), -1), onehot)
    a.layers[-1].set_weights([w * 8, b * 8])
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    cnn = keras.Model(inp, keras.layers.Dense(10, activation="softmax")(h), name="cnn")
    _fit_last(cnn, x_tr, onehot, scale=8)
    merged = kmerge.parallel({"a": a, "b": cnn}, combine="average")
    rep = kmerge.verify(merged, {"a": a, "b": cnn})
    models = {"a": a, "b": cnn, "average": merged}
    out = tmp_path_factory.mktemp("report") / "out"
    path = write_report(out, models=models, x=x_te, y=y_te, final="average",
                        verify={"average": rep}, notes=["a hand-written note"])
    return {"models": models, "x": x_te, "y": y_te, "out": out, "path": path, "verify": rep}


def _accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), -1) == y))


def _listing(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, dirs, files in os.walk(root) for f in [*dirs, *files])


def test_writes_every_file(setup):
    out = setup["out"]
    assert setup["path"] == out
    names = set(os.listdir(out))
    assert {"report.md", "report.json", "accuracy.png", "confusion.png",
            "per_class_delta.png"} <= names
    assert not [n for n in os.listdir(out.parent) if n.endswith(".tmp")]  # temp dir is gone
    data = json.loads((out / "report.json").read_text())
    assert ("architecture.png" in names) == (data["figures"]["architecture"] is not None)
    assert data["figures"]["accuracy"] == "accuracy.png"


def test_json_numbers_match_independent_computation(setup):
    models, x, y = setup["models"], setup["x"], setup["y"]
    data = json.loads((setup["out"] / "report.json").read_text())
    acc = {n: _accuracy(m, x, y) for n, m in models.items()}
    assert acc["a"] > 0.8 and acc["b"] > 0.6  # the fixture's models really classify
    assert data["task"] == "classification" and data["metric"] == "accuracy"
    assert data["n_examples"] == len(y)
    assert data["sources"] == ["a", "b"]  # inferred from the merge's metadata
    best = max(["a", "b"], key=acc.__getitem__)
    assert data["best_source"] == best
    for n, m in models.items():
        row = data["models"][n]
        assert row["metric"] == pytest.approx(acc[n], abs=1e-12)
        assert row["delta_vs_best_source"] == pytest.approx(acc[n] - acc[best], abs=1e-12)
        assert row["params_total"] == m.count_params()
        assert row["params_trainable"] == sum(int(np.prod(w.shape)) for w in m.trainable_weights)
        assert row["latency_ms_per_example"] > 0
        assert row["role"] == ("merged" if n == "average" else "source")
    assert data["models"]["average"]["params_trainable"] == 0  # frozen sources, no head

    pred = np.argmax(models["average"].predict(x, batch_size=256, verbose=0), -1)
    cm = np.asarray(data["confusion_matrix"]["counts"])
    assert cm.shape == (10, 10) and cm.sum() == len(y)
    assert cm[3].sum() == np.sum(y == 3) and cm[:, 3].sum() == np.sum(pred == 3)
    assert np.trace(cm) / len(y) == pytest.approx(acc["average"])
    pc = data["per_class_accuracy"]
    pred_best = np.argmax(models[best].predict(x, batch_size=256, verbose=0), -1)
    for c in range(10):
        want = np.mean(pred[y == c] == c) - np.mean(pred_best[y == c] == c)
        assert pc["delta"][c] == pytest.approx(want, abs=1e-12)
        assert pc["support"][c] == np.sum(y == c)
    checks = data["verify"]["average"]["checks"]
    assert data["verify"]["average"]["ok"] is True
    assert [(c["source"], c["what"], c["exact"]) for c in checks] == [
        (c.source, c.what, c.exact) for c in setup["verify"].checks]


def test_markdown_names_models_verify_and_architecture(setup):
    md = (setup["out"] / "report.md").read_text()
    data = json.loads((setup["out"] / "report.json").read_text())
    assert md.startswith("# kmerge merge report\n")
    for name in ("a", "b", "average"):
        assert f"| {name} |" in md
    acc = data["models"]["average"]["metric"]
    assert f"| average | merged, final | {acc:.3f} |" in md
    for c in setup["verify"].checks:
        assert f"- {c.source} {c.what} {c.shape}: exact" in md
    assert "a hand-written note" in md
    for fig in ("accuracy.png", "confusion.png", "per_class_delta.png"):
        assert f"({fig})" in md
    if data["architecture"]["kind"] == "text":  # no graphviz here: a layer-per-line diagram
        # one line per layer; the merge layer lists both branches it reads
        block = md.split("```\n")[1].splitlines()
        assert len(block) == 2 + len(setup["models"]["average"].layers)
        assert re.fullmatch(r"combine_average +Average +\(\?, 10\) +0 +a_dense\w*, b_dense\w*",
                            block[-1])


def test_pngs_are_valid_images(setup):
    for name in ("accuracy.png", "confusion.png", "per_class_delta.png"):
        raw = (setup["out"] / name).read_bytes()
        assert raw[:8] == PNG_MAGIC, name
        width, height = struct.unpack(">II", raw[16:24])  # IHDR
        assert width >= 400 and height >= 200, (name, width, height)
        assert len(raw) > 10_000, name


def test_regression(digits, tmp_path):
    """Float targets with non-integer values: MSE, lower is better, no confusion matrix."""
    x_tr, _, x_te, _ = digits
    target_tr = x_tr[:, 2:6, 2:6, 0].mean((1, 2))[:, None]  # mean ink in the centre
    target_te = x_te[:, 2:6, 2:6, 0].mean((1, 2))
    good = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(1)], name="good")
    w, b = _ridge(x_tr.reshape(len(x_tr), -1), target_tr)
    good.layers[-1].set_weights([w, b])
    bad = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                            keras.layers.Dense(1, kernel_initializer="zeros")], name="bad")
    merged = kmerge.parallel({"good": good, "bad": bad}, combine="average")
    models = {"good": good, "bad": bad, "avg": merged}
    out = write_report(tmp_path / "r", models=models, x=x_te, y=target_te, final="avg")
    data = json.loads((out / "report.json").read_text())
    assert data["task"] == "regression" and data["metric"] == "mse"
    for n, m in models.items():
        mse = np.mean((m.predict(x_te, batch_size=256, verbose=0)[:, 0].astype("float64")
                       - target_te) ** 2)
        assert data["models"][n]["metric"] == pytest.approx(mse, rel=1e-12)
    assert data["best_source"] == "good"  # the lower MSE
    assert data["models"]["avg"]["delta_vs_best_source"] > 0  # worse than "good"
    assert "confusion_matrix" not in data and not (out / "confusion.png").exists()
    assert data["figures"]["confusion"] is None
    assert (out / "accuracy.png").read_bytes()[:8] == PNG_MAGIC
    assert "test MSE (lower is better)" in (out / "report.md").read_text()


def _no_timing(monkeypatch):
    """Skip the latency measurement where a test is about something else (TF's predict
    costs a tenth of a second a call)."""
    import kmerge.report as report

    monkeypatch.setattr(report, "_latencies", lambda models, names, *a: {name: {
        "latency_ms_per_example": 1.0, "latency_ms_per_batch": 1.0, "latency_batch": 1,
        "latency_calls": 1, "latency_ms_per_batch_quartiles": [1.0, 1.0]} for name in names})


def test_per_model_inputs_one_hot_labels_and_adapter_notes(digits, tmp_path, monkeypatch):
    """Models with different inputs get ``{model_name: x}``; adapters become notes."""
    _no_timing(monkeypatch)
    _, _, x_te, y_te = digits
    x_te, y_te = x_te[:100], y_te[:100]
    keras.utils.set_random_seed(1)
    img = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                            keras.layers.Dense(10, activation="softmax")], name="img")
    flat = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="softmax")],
                            name="flat")
    par = kmerge.parallel({"img": img, "flat": flat}, combine="average")
    assert len(par.inputs) == 2
    seq = kmerge.sequential({"flat": flat, "img": img}, adapter="auto")
    x_flat = x_te.reshape(len(x_te), -1)
    models = {"img": img, "flat": flat, "par": par, "seq": seq}
    x = {"img": x_te, "flat": x_flat, "par": {"img": x_te, "flat": x_flat}, "seq": x_flat}
    out = write_report(tmp_path / "r", models=models, x=x, y=np.eye(10)[y_te], final="par",
                       sources=["img", "flat"])
    data = json.loads((out / "report.json").read_text())
    want = {"img": _accuracy(img, x_te, y_te), "flat": _accuracy(flat, x_flat, y_te),
            "par": _accuracy(par, x["par"], y_te), "seq": _accuracy(seq, x_flat, y_te)}
    assert {n: r["metric"] for n, r in data["models"].items()} == pytest.approx(want)
    adapter_notes = [n for n in data["notes"] if n.startswith("seq: adapter at ")]
    assert adapter_notes and adapter_notes[0] in (out / "report.md").read_text()

    with pytest.raises(InvalidArgumentError, match=r"none for \['par', 'seq'\]"):
        write_report(tmp_path / "bad", models=models, x={"img": x_te, "flat": x_flat},
                     y=y_te, final="par")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("case", ["final", "length", "file", "task", "source", "labels"])
def test_errors_write_nothing(setup, tmp_path, case):
    models, x, y = setup["models"], setup["x"], setup["y"]
    kwargs = {"models": models, "x": x, "y": y, "final": "average"}
    out = tmp_path / "missing" / "out"
    match = {"final": r"final='nope' is not in models; the models are \['a', 'b', 'average'\]",
             "length": r"gets 539 test examples but y has 540",
             "file": r"is an existing file",
             "task": r"unknown task 'ranking'; valid tasks are",
             "source": r"sources \['c'\] are not in models",
             "labels": r"non-negative integer labels"}[case]
    if case == "final":
        kwargs["final"] = "nope"
    elif case == "length":
        kwargs["x"] = x[:-1]
    elif case == "file":
        out = tmp_path / "a_file"
        out.write_text("keep me")
    elif case == "task":
        kwargs["task"] = "ranking"
    elif case == "source":
        kwargs["sources"] = ["a", "c"]
    else:
        kwargs.update(y=y - 1, task="classification")  # a label of -1
    before = _listing(tmp_path)
    with pytest.raises(InvalidArgumentError, match=match) as info:
        write_report(out, **kwargs)
    assert isinstance(info.value, KmergeError) and isinstance(info.value, ValueError)
    assert _listing(tmp_path) == before
    if case == "file":
        assert out.read_text() == "keep me"


def test_failure_while_writing_leaves_nothing(setup, tmp_path, monkeypatch):
    """A failure after evaluation (here: drawing) removes the temp folder and any parent
    it created, and leaves an earlier report in out_dir untouched."""
    import kmerge.report as report

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report, "_draw_confusion", broken)
    _no_timing(monkeypatch)
    models, x, y = setup["models"], setup["x"], setup["y"]  # shapes already compiled
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path / "new" / "out", models=models, x=x, y=y, final="average")
    assert _listing(tmp_path) == []

    old = tmp_path / "old"
    old.mkdir()
    (old / "report.md").write_text("the earlier report")
    with pytest.raises(OSError, match="disk full"):
        write_report(old, models=models, x=x, y=y, final="average")
    assert _listing(tmp_path) == ["old", "old/report.md"]
    assert (old / "report.md").read_text() == "the earlier report"


def test_existing_folder_is_updated_in_place(setup, tmp_path):
    """Report files are replaced, a stale figure removed, the caller's other files kept."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    (out / "report.md").write_text("old")
    (out / "architecture.png").write_bytes(b"stale")
    models, x, y = setup["models"], setup["x"], setup["y"]  # shapes already compiled
    write_report(out, models={"a": models["a"], "b": models["b"]}, x=x, y=y, final="b",
                 sources=["a", "b"], title="Two sources")
    assert (out / "mine.txt").read_text() == "keep"
    assert (out / "report.md").read_text().startswith("# Two sources\n")
    data = json.loads((out / "report.json").read_text())
    assert (out / "architecture.png").exists() == (data["figures"]["architecture"] is not None)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_import_is_cheap():
    code = ("import sys, kmerge.report; "
            "print(sorted(m for m in ('keras', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("works", [True, False])
def test_architecture_image_when_plot_model_works(setup, tmp_path, monkeypatch, works):
    """graphviz present: plot_model's PNG; plot_model failing: the text diagram."""
    import kmerge.report as report

    def fake_plot_model(model, to_file, **kwargs):
        if not works:
            raise ImportError("You must install pydot and graphviz")
        with open(to_file, "wb") as f:
            f.write((setup["out"] / "accuracy.png").read_bytes())

    monkeypatch.setattr(report.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(keras.utils, "plot_model", fake_plot_model)
    arch = report._architecture(tmp_path, setup["models"]["average"])
    assert arch["kind"] == ("image" if works else "text")
    assert (tmp_path / "architecture.png").exists() == works
    assert arch["text"][-1].startswith("combine_average")


def test_latency_rounds_are_interleaved_after_a_warm_up(monkeypatch):
    """Every model is compiled and warmed up before any timing; then each round times every
    model once, in a rotating order; the median of the rounds is reported."""
    import kmerge.report as report

    log: list[tuple[str, str]] = []
    phase = {"now": "build"}

    def fake(model, batch):
        log.append(("build", model))
        phase["now"] = "run"
        return lambda: log.append(("call", model))

    monkeypatch.setattr(report, "_timed_call", fake)
    names = ["a", "b", "c"]
    out = report._latencies({n: n for n in names}, names, {n: [np.zeros((9, 2))] for n in names},
                            batch_size=4, n=9)
    builds = [m for kind, m in log if kind == "build"]
    assert builds == names and all(kind == "build" for kind, _ in log[:3])  # built first
    calls = [m for kind, m in log if kind == "call"]
    warm = report._WARMUP_CALLS * len(names)
    assert sorted(calls[:warm]) == sorted(names * report._WARMUP_CALLS)
    rounds = out["a"]["latency_calls"]
    assert report._MIN_ROUNDS <= rounds <= report._MAX_ROUNDS
    timed = calls[warm:]
    assert len(timed) == rounds * len(names)
    for r in range(rounds):
        one = timed[r * 3:(r + 1) * 3]
        assert sorted(one) == names  # each model once per round
    assert timed[:3] != timed[3:6]  # the order rotates
    assert out["b"]["latency_batch"] == 4
    q1, q3 = out["b"]["latency_ms_per_batch_quartiles"]
    assert q1 <= out["b"]["latency_ms_per_batch"] <= q3


def test_identical_models_get_similar_latencies(setup):
    """The same architecture twice: the medians of interleaved rounds agree (before, each
    call compiled the model again and identical models differed up to 4x)."""
    import kmerge.report as report

    a = setup["models"]["a"]
    twin = keras.models.clone_model(a)
    twin.set_weights(a.get_weights())
    models = {"a": a, "twin": twin}
    x = setup["x"]
    out = report._latencies(models, ["a", "twin"], {"a": [x], "twin": [x]}, 256, len(x))
    ratio = out["a"]["latency_ms_per_batch"] / out["twin"]["latency_ms_per_batch"]
    assert 1 / 3 < ratio < 3, out

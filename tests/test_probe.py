"""kmerge.probe: which taps carry the label, computed in one pass per model; fuse(taps="auto"),
the recipe probe step and `kmerge probe`."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from conftest import weights_of

import kmerge
from kmerge.arguments import outputs
from kmerge.errors import InvalidArgumentError, LayerNotFoundError, TapError
from kmerge.probing import tap_features

N = 400  # digits examples the probes see (fit on 320, scored on 80)


@pytest.fixture(scope="module")
def data(digits):
    x, y, _, _ = digits
    return x[:N], y[:N]


@pytest.fixture(scope="module")
def signal_noise():
    """One model with a tap that carries the pixels (a random projection of them) and a tap
    that carries nothing (zero kernel: the same vector for every image)."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 1))
    flat = keras.layers.Flatten(name="flat")(inp)
    signal = keras.layers.Dense(24, name="signal")(flat)
    noise = keras.layers.Dense(24, kernel_initializer="zeros", bias_initializer="random_normal",
                               name="noise")(flat)
    both = keras.layers.Concatenate(name="both")([signal, noise])
    return keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="out")(both),
                       name="sn")


@pytest.fixture(scope="module")
def loaded(trained):
    path_a, path_b = trained
    return kmerge.load(path_a), kmerge.load(path_b)


@pytest.fixture(scope="module")
def probed(loaded, data):
    a, b = loaded
    x, y = data
    return kmerge.probe({"a": a, "b": b}, x, y)


def test_label_carrying_tap_ranks_above_noise(signal_noise, data):
    x, y = data
    before = weights_of(signal_noise)
    p = kmerge.probe([signal_noise], x, y, taps=["signal", "noise"], combine=False)
    scores = {r.tap: r.score for r in p.rows}
    assert [r.tap for r in p.rows] == ["signal", "noise"]
    assert scores["signal"] > 0.6 and scores["noise"] < 0.3  # 10 classes: chance is ~0.1
    assert p.metric == "accuracy" and p.n_train + p.n_val == N
    np.testing.assert_array_equal(np.concatenate([w.ravel() for w in before]),
                                  np.concatenate([w.ravel() for w in weights_of(signal_noise)]))


def test_regression_targets_score_r2(signal_noise, data):
    x, _ = data
    target = x.reshape(len(x), -1)[:, 20:23].astype("float32")  # three pixels
    p = kmerge.probe({"m": signal_noise}, x, target, taps=["signal", "noise"], combine=False)
    scores = {r.tap: r.score for r in p.rows}
    assert p.metric == "r2"
    assert scores["signal"] > 0.5 > 0.05 > scores["noise"]  # 24 random views of 64 pixels


def test_one_pass_equals_each_layer_separately(loaded, data, monkeypatch):
    _, b = loaded
    x, _ = data
    from kmerge.graph import compiled

    jobs = []
    real = compiled.stream

    def counting(js):
        for job in js:
            jobs.append(job)
            yield from real([job])

    monkeypatch.setattr(compiled, "stream", counting)
    feats = tap_features(b, x, "all", batch_size=128)
    monkeypatch.undo()
    assert len(jobs) == 4  # 400 examples in batches of 128: every tap from each batch's one run
    assert {len(j.flat[0]) for j in jobs} == {128}  # the last batch padded: one program
    # dropout (the identity in a frozen copy) is left out; everything else is a tap
    kinds = [type(layer).__name__ for layer in b.layers[1:]]
    assert len(feats) == len(kinds) - kinds.count("Dropout")
    # the source's own layers, every output at once (one compile; its own graph, not a copy)
    refs = list(feats)
    separate = outputs(keras.Model(b.inputs, [b.get_layer(r).output for r in refs]), x)
    for ref, alone in zip(refs, separate):
        z, row = feats[ref]
        if alone.ndim == 4:
            alone = alone.mean(axis=(1, 2))  # pooling="auto": global average
        assert z.shape == (N, alone.shape[1]) == (N, row.features), ref
        np.testing.assert_allclose(z, alone, rtol=1e-5, atol=1e-5, err_msg=ref)


def test_wide_taps_are_projected_and_say_so(loaded, data):
    _, b = loaded
    x, y = data
    p = kmerge.probe({"b": b}, x, y, max_features=32, combine=False)
    rows = {r.tap: r for r in p.rows}
    flat = next(r for r in p.rows if r.layer == "Flatten")
    assert flat.features == 128 and flat.used == 32 and flat.note == "projected 128 -> 32"
    assert "128->32" in str(p) and "projected 128 -> 32" in str(p)
    assert all(r.used == r.features for r in rows.values() if r.features <= 32)
    # a memory budget smaller than the features projects too (n * d * 4 bytes)
    q = kmerge.probe({"b": b}, x, y, taps=[flat.tap], memory_budget=N * 4 * 16, combine=False)
    assert q.rows[0].used == 16 and "projected 128 -> 16" in q.rows[0].note
    # seeded: the same projection, the same score
    again = kmerge.probe({"b": b}, x, y, taps=[flat.tap], memory_budget=N * 4 * 16,
                         combine=False)
    assert again.rows[0].score == q.rows[0].score


def test_result_table_json_best_and_plot(probed):
    p = probed
    assert [r.score for r in p.rows] == sorted((r.score for r in p.rows), reverse=True)
    assert {r.model for r in p.rows} == {"a", "b"}
    assert p.combinations and all({m for m, _ in c.taps} == {"a", "b"}
                                  for c in p.combinations)  # one tap of each model
    best = p.best
    assert set(best) == {"a", "b"} and best["a"][0] is p.models["a"]
    assert p.best_score == p.combinations[0].score == max(c.score for c in p.combinations)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["best"] == p.best_taps and len(d["taps"]) == len(p.rows)
    text = str(p)
    assert "probe accuracy" in text and text.count("\n") > len(p.rows)
    fig = p.plot()
    lines = fig.axes[0].get_lines()
    assert len(lines) == 3  # one per model and the best combination
    assert sorted(len(line.get_xdata()) for line in lines[:2]) == sorted(
        len(p.for_model(m)) for m in ("a", "b"))


def test_fuse_auto_builds_verifies_and_records(loaded, data, probed, tmp_path):
    a, b = loaded
    x, y = data
    m = kmerge.fuse({"a": a, "b": b}, taps="auto", data=(x, y),
                    head=kmerge.heads.classifier(10))
    meta = kmerge.info(m)
    assert meta["probe"]["chosen"] == probed.best_taps  # deterministic (seed 0)
    assert {tuple(t[0] for t in src["taps"]) for src in meta["sources"].values()} == \
        {(probed.best_taps["a"],), (probed.best_taps["b"],)}
    assert any("taps chosen by kmerge.probe" in n for n in meta["notes"])
    assert kmerge.verify(m, {"a": a, "b": b}).ok
    path = kmerge.save(m, tmp_path / "fused.keras")
    assert kmerge.info(kmerge.load(path))["probe"]["chosen"] == probed.best_taps
    from kmerge.report import _probe_markdown

    section = "\n".join(_probe_markdown(meta["probe"], "fused"))
    assert "## Probe" in section and probed.rows[0].tap in section
    # a probe result is taken as it is (no second probe), and a plan says what it chose
    plan = kmerge.fuse({"a": a, "b": b}, taps=probed, dry_run=True)
    assert any("taps chosen by kmerge.probe" in n for n in plan.notes)


def test_different_inputs_per_model():
    """Two text models with their own tokenizers: token ids of different lengths and
    vocabularies, given as {model name: x} (an Embedding and a Dense per token stand in for
    the LSTMs of bench/bench_probe.py: the same sequence taps, compiled in a fraction)."""
    rng = np.random.default_rng(0)
    n = 120
    words = rng.integers(1, 40, size=(n, 10))
    chars = rng.integers(1, 20, size=(n, 16))
    y = (words[:, 0] > 20).astype("int32")
    models = {}
    for name, (length, vocab) in {"w": (10, 40), "c": (16, 20)}.items():
        keras.utils.set_random_seed(1)
        inp = keras.Input((length,), dtype="int32")
        h = keras.layers.Embedding(vocab, 8, name="emb")(inp)
        h = keras.layers.Dense(6, activation="tanh", name="tok")(h)
        h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
        models[name] = keras.Model(inp, keras.layers.Dense(2, activation="softmax",
                                                           name="out")(h), name=name)
    x = {"w": words, "c": chars}
    p = kmerge.probe(models, x, y, top=2)
    assert {(r.model, r.tap) for r in p.rows} == {(m, t) for m in "wc"
                                                  for t in ("emb", "tok", "pool", "out")}
    emb_w = next(r for r in p.rows if (r.model, r.tap) == ("w", "emb"))
    assert emb_w.features == 8 and emb_w.shape == (10, 8)  # the sequence was pooled
    m = kmerge.fuse(models, taps=p, head=kmerge.heads.classifier(2))
    assert len(m.inputs) == 2


def test_typed_errors_and_nothing_changed(loaded, data):
    a, b = loaded
    x, y = data
    before = weights_of(b)
    with pytest.raises(LayerNotFoundError, match="no layer 'nope'"):
        kmerge.probe({"b": b}, x, y, taps=["nope"])
    with pytest.raises(InvalidArgumentError, match="shape"):
        kmerge.probe({"b": b}, x.reshape(len(x), -1), y)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InvalidArgumentError, match="NaN"):
        kmerge.probe({"b": b}, bad, y)
    with pytest.raises(InvalidArgumentError, match="target"):
        kmerge.probe({"b": b}, x, y[:-1])
    with pytest.raises(InvalidArgumentError, match="validation_split"):
        kmerge.probe({"b": b}, x, y, validation_split=1.5)
    with pytest.raises(InvalidArgumentError, match="taps"):
        kmerge.probe({"b": b}, x, y, taps={"zz": ["dense"]})
    with pytest.raises(InvalidArgumentError, match="data=\\(x, y\\)"):
        kmerge.fuse({"a": a, "b": b}, taps="auto")
    with pytest.raises(InvalidArgumentError, match="taps='auto'"):
        kmerge.fuse([a, b])
    with pytest.raises(InvalidArgumentError, match="only with taps='auto'"):
        kmerge.fuse({"a": (a, -1), "b": (b, -1)}, data=(x, y))

    class Opaque(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(3)

        def call(self, z):
            return self.d(keras.ops.reshape(z, (-1, 64)))

    opaque = Opaque()
    opaque(x[:2])
    with pytest.raises(TapError, match="subclassed"):
        kmerge.probe({"o": opaque}, x, y)
    assert all(np.array_equal(p, q) for p, q in zip(before, weights_of(b)))


def test_recipe_probe_step_and_fuse_taps_auto(trained, tmp_path):
    from kmerge.errors import RecipeError
    from kmerge.recipe import load_recipe
    from kmerge.runner import run

    path_a, path_b = trained
    recipe = tmp_path / "r.yaml"
    head = f"models:\n  a: {{path: {path_a}}}\n  b: {{path: {path_b}}}\n"
    recipe.write_text(head + "data: {source: sklearn:digits, test_size: 0.75}\nsteps:\n"
                      "  - {kind: probe, name: ranking, models: [a, b], top: 2}\n"
                      "  - {kind: fuse, name: fused, taps: auto, probe: ranking,\n"
                      "     head: {kind: classifier, units: 10}}\n"
                      "  - {kind: fit_head, model: fused, epochs: 1}\n")
    shown = []
    result = run(load_recipe(recipe), echo=lambda s: None, show=shown.append)
    ranking = result.probes["ranking"]
    assert "probe accuracy" in shown[0]
    assert kmerge.info(result.models["fused"])["probe"]["chosen"] == ranking.best_taps
    bad = tmp_path / "bad.yaml"
    bad.write_text(head + "steps:\n  - {kind: fuse, taps: auto, probe: nothing}\n"
                   "  - {kind: fuse, taps: auto}\n"
                   "  - {kind: fuse, taps: {a: -1, b: -1}, models: [a]}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    text = str(err.value)
    assert "steps[0].probe: 'nothing' is not an earlier probe step" in text
    assert "steps[1].models: taps: auto needs the models" in text
    assert "steps[2].models: models: is used only with taps: auto" in text


def test_cli_probe_table_json_and_report(trained, tmp_path, capsys):
    from kmerge.cli import main

    path_a, path_b = trained
    report = tmp_path / "rep"
    few = ["--data-option", "test_size=0.75"]  # probes on a quarter of digits: fast
    assert main(["probe", str(path_a), str(path_b), "--data", "digits", *few, "--json",
                 "--report", str(report), "--top", "2"]) == 0
    out = capsys.readouterr().out
    d = json.loads(out)  # stdout is the JSON document alone
    assert set(d["best"]) == {"model_a", "model_b"} and d["n_taps"] == len(d["taps"])
    assert sorted(p.name for p in report.iterdir()) == ["probe.json", "probe.md", "probe.png"]
    assert json.loads((report / "probe.json").read_text())["best"] == d["best"]
    assert main(["probe", str(path_a), "--data", "digits", *few, "-q"]) == 0
    out = capsys.readouterr().out
    assert "probe accuracy" in out and "model_a" in out and "best:" in out
    assert main(["probe", str(path_a)]) == 1
    assert "needs labelled data" in capsys.readouterr().err

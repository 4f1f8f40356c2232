"""Weight merges from files as users have them: saved by different processes, fine-tunes of
an original base, bfloat16 and float16, nested models, ``.weights.h5``, DARE's seeds, and the
CLI / recipe runner streaming them (``merge_weights_files``) instead of loading the models."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import mlp, nested, weights_of

import kmerge
from kmerge.cli import main
from kmerge.errors import IncompatibleModelsError, SaveError
from kmerge.weights import merge_weights_files
from kmerge.weights.validate import same_architecture, variable_paths

HERE = Path(__file__).resolve().parent

# Written by a second Python process: fine-tunes of the base (built with the same seed, so
# the same initial weights, then moved by seeded noise), and a model with another activation.
_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    import keras, numpy as np
    from conftest import mlp, nested
    d = Path(sys.argv[1])
    for i in (1, 2):
        m = nested(f"ft{i}", seed=0)
        rng = np.random.default_rng(i)
        m.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) if w.ndim else w
                       for w in m.get_weights()])
        m.save(d / f"ft{i}.keras")
        m.save_weights(d / f"ft{i}.weights.h5")
    keras.utils.set_random_seed(0)
    tanh = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dense(3, activation="softmax")], name="tanh")
    tanh.save(d / "tanh.keras")
    mlp("other", seed=5).save(d / "other.keras")
""")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """base.keras (this process) and ft1/ft2 (.keras and .weights.h5, another process)."""
    d = tmp_path_factory.mktemp("stream_files")
    nested("base", seed=0).save(d / "base.keras")
    nested("base", seed=0).save_weights(d / "base.weights.h5")
    mlp("a", seed=0).save(d / "a.keras")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(d), str(HERE)], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return d


@pytest.fixture(scope="module")
def loaded(files):
    return {n: kmerge.load(files / f"{n}.keras") for n in ("base", "ft1", "ft2")}


def _stored(path: Path) -> list[np.ndarray]:
    return weights_of(kmerge.load(path))


def _bitwise(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and np.array_equal(g, w), (g, w)


@pytest.mark.parametrize("method, kw", [
    ("linear", {"weights": [1, 3]}),
    ("ties", {"density": 0.5}),
    ("dare", {"p": 0.5, "seed": 3}),
])
def test_files_from_another_process_stream_like_the_merge_in_memory(files, loaded, method, kw,
                                                                    tmp_path):
    """Keras writes process-specific serialization ids into config.json; the one
    architecture comparison ignores them, and the stream equals the merge in memory bit for
    bit (DARE included: its masks are seeded by the canonical variable path)."""
    base = {"base": files / "base.keras"} if method != "linear" else {}
    out = merge_weights_files([files / "ft1.keras", files / "ft2.keras"], tmp_path / "m.keras",
                              method=method, **base, **kw)
    memory = kmerge.merge_weights([loaded["ft1"], loaded["ft2"]], method=method,
                                  base=loaded["base"] if base else None, **kw)
    _bitwise(_stored(out), weights_of(memory))
    assert sorted(kmerge.info(kmerge.load(out))["drift"]) == sorted(kmerge.info(memory)["drift"])


def test_variable_names_are_canonical_in_memory_and_from_files(files, loaded, tmp_path):
    """Nested layers keep their parent's name, a Sequential built in memory loses its own
    (Keras's Variable.path differs between the two): one name for params, exclude, drift."""
    want = ["stem/kernel", "stem/bias", "block_1/conv/kernel", "block_1/conv/bias",
            "block_1/bn/gamma", "block_1/bn/beta", "block_1/bn/moving_mean",
            "block_1/bn/moving_variance", "shared/kernel", "shared/bias", "out/kernel",
            "out/bias"]
    assert variable_paths(nested("n", seed=0)) == want
    assert variable_paths(loaded["ft1"]) == want
    seq = mlp("named", seed=0)
    assert seq.weights[0].path.startswith("named/")  # what Keras does in memory
    assert variable_paths(seq)[0] == f"{seq.layers[0].name}/kernel"
    out = merge_weights_files([files / "ft1.keras", files / "ft2.keras"], tmp_path / "n.keras",
                              method="linear")
    assert sorted(kmerge.info(kmerge.load(out))["drift"]) == sorted(want)


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_params_override_reaches_nested_kernels_in_both(files, loaded, suffix, tmp_path):
    params = {r".*kernel": {"scale": 0.0}}
    srcs = [files / f"ft1{suffix}", files / f"ft2{suffix}"]
    out = merge_weights_files(srcs, tmp_path / f"p{suffix}", method="task_arithmetic",
                              base=files / f"base{suffix}", params=params)
    memory = kmerge.merge_weights([loaded["ft1"], loaded["ft2"]], method="task_arithmetic",
                                  base=loaded["base"], params=params)
    if suffix == ".keras":
        got = _stored(out)
    else:
        holder = nested("holder", seed=9)
        holder.load_weights(out)
        got = weights_of(holder)
    _bitwise(got, weights_of(memory))
    paths = variable_paths(memory)
    base = weights_of(loaded["base"])
    kernels = [i for i, p in enumerate(paths) if p.endswith("kernel")]
    assert "block_1/conv/kernel" in [paths[i] for i in kernels]
    for i in kernels:  # scale 0 on every kernel, nested ones included: the base's
        np.testing.assert_array_equal(got[i], base[i])
    assert not np.array_equal(got[1], base[1])  # biases did merge


def test_dare_seed_does_not_depend_on_the_model_name(tmp_path):
    """The same weights and seed give the same DARE merge whatever the models are called
    (Keras puts a Sequential's name into its variable paths in memory, not from a file):
    the masks are seeded by the canonical path ('h/kernel')."""
    def pair(prefix):
        out = []
        for i in range(3):
            keras.utils.set_random_seed(i)
            out.append(keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="h"),
                                         keras.layers.Dense(3, name="o")], name=f"{prefix}{i}"))
        return out

    one, two = pair("x"), pair("renamed_")
    kw = {"method": "dare", "p": 0.5, "seed": 7}
    a = kmerge.merge_weights(one[1:], base=one[0], **kw)
    b = kmerge.merge_weights(two[1:], base=two[0], **kw)
    _bitwise(weights_of(a), weights_of(b))
    for m, n in zip(one, ("base", "f1", "f2")):
        m.save(tmp_path / f"{n}.keras")
    out = merge_weights_files([tmp_path / "f1.keras", tmp_path / "f2.keras"],
                              tmp_path / "dare.keras", base=tmp_path / "base.keras", **kw)
    _bitwise(_stored(out), weights_of(a))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_round_trip(dtype, tmp_path):
    def model(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, dtype=dtype),
                                 keras.layers.Dense(3, dtype=dtype)], name=f"lp{seed}")

    a, b = model(0), model(1)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    out = merge_weights_files([tmp_path / "a.keras", tmp_path / "b.keras"],
                              tmp_path / "m.keras", method="linear", weights=[1, 2])
    back = keras.models.load_model(out)  # plain Keras reads it
    memory = kmerge.merge_weights([a, b], method="linear", weights=[1, 2])
    got, want = weights_of(back), weights_of(memory)
    assert [str(w.dtype) for w in back.weights] == [dtype] * 4
    _bitwise(got, want)
    mid = np.float32(1 / 3) * weights_of(a)[0].astype(np.float32) + np.float32(2 / 3) * \
        weights_of(b)[0].astype(np.float32)
    np.testing.assert_allclose(got[0].astype(np.float32), mid, rtol=1e-2, atol=1e-2)
    assert not np.array_equal(got[0], weights_of(a)[0])  # merged, not copied


def test_one_architecture_comparison(files):
    cfg = {n: json.loads(keras.models.load_model(files / f"{n}.keras").to_json())
           for n in ("ft1", "base")}
    same_architecture(cfg["ft1"], cfg["base"])  # other process: other shared_object_ids
    with pytest.raises(IncompatibleModelsError, match="config 'activation' is 'relu'.*'tanh'"):
        merge_weights_files([files / "a.keras", files / "tanh.keras"], files / "never.keras",
                            method="linear")
    keras.utils.set_random_seed(0)
    regularized = keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(16, activation="relu",
                                              kernel_regularizer="l2",
                                              kernel_initializer="zeros"),
        keras.layers.Dense(3, activation="softmax")], name="reg")
    same_architecture(mlp("plain"), regularized)  # training-only settings: one architecture
    half = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu",
                                                                  dtype="float16"),
                             keras.layers.Dense(3, activation="softmax")])
    with pytest.raises(IncompatibleModelsError, match="config 'dtype'.*float16"):
        same_architecture(mlp("plain"), half)
    assert not (files / "never.keras").exists()


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_streams_files(files, loaded, tmp_path):
    out = tmp_path / "cli.keras"
    code, stdout, stderr = _cli(["weights", str(files / "ft1.keras"), str(files / "ft2.keras"),
                                 "--base", str(files / "base.keras"), "-o", str(out),
                                 "--method", "ties", "--param", "density=0.5"])
    assert code == 0, stderr
    lines = [line for line in stdout.splitlines() if line.startswith("streaming")]
    assert len(lines) == 1 and "without loading the models" in lines[0], stdout
    memory = kmerge.merge_weights([loaded["ft1"], loaded["ft2"]], method="ties",
                                  base=loaded["base"], density=0.5)
    _bitwise(_stored(out), weights_of(memory))
    assert kmerge.info(kmerge.load(out))["streamed"] is True


def test_cli_loads_the_models_when_the_merge_needs_them(files, tmp_path):
    out = tmp_path / "aligned.keras"
    code, stdout, stderr = _cli(["weights", str(files / "a.keras"), str(files / "other.keras"),
                                 "-o", str(out), "--method", "linear", "--align", "weights"])
    assert code == 0, stderr
    assert not [line for line in stdout.splitlines() if line.startswith("streaming")]
    assert "not streaming" in stdout and "--align" in stdout
    assert kmerge.info(kmerge.load(out)).get("streamed") is None
    code, stdout, stderr = _cli(["weights", str(files / "a.keras"), str(files / "other.keras"),
                                 "-o", str(tmp_path / "f.keras"), "--method", "fisher"])
    assert code == 1 and "needs data=x" in stderr  # merge_weights' own check: not streamed
    assert "not streaming" in stdout and "fisher" in stdout


def test_cli_stream_never_overwrites_a_source_copy(files, tmp_path):
    """A copy of a source (another path, the same weights) is protected like the source."""
    copy = tmp_path / "copy_of_ft1.keras"
    shutil.copy(files / "ft1.keras", copy)
    before = copy.read_bytes()
    code, stdout, stderr = _cli(["weights", str(files / "ft1.keras"), str(files / "ft2.keras"),
                                 "-o", str(copy), "--overwrite", "--method", "linear"])
    assert code == 1 and "never overwrites a source" in stderr, stderr
    assert copy.read_bytes() == before
    with pytest.raises(SaveError, match="source"):
        merge_weights_files([files / "ft1.keras", files / "ft2.keras"], files / "ft2.keras",
                            method="linear", overwrite=True)


def test_recipe_weights_step_streams_without_loading_its_sources(files, loaded, tmp_path):
    from kmerge.recipe import load_recipe
    from kmerge.runner import run

    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        models:
          ft1: {{path: {files / 'ft1.keras'}}}
          ft2: {{path: {files / 'ft2.keras'}}}
          base: {{path: {files / 'base.keras'}}}
        steps:
          - {{kind: weights, name: soup, models: [ft1, ft2], base: base, method: dare,
              params: {{p: 0.5, seed: 1}}, per_layer: {{'.*kernel': {{scale: 0.5}}}}}}
          - {{kind: save, model: soup, path: {tmp_path / 'soup.keras'}}}
    """))
    lines: list[str] = []
    run(load_recipe(recipe), echo=lines.append)
    assert len([line for line in lines if line.startswith("streaming:")]) == 1, lines
    assert not [line for line in lines if line.startswith(("loaded ft", "loaded base"))], lines
    memory = kmerge.merge_weights([loaded["ft1"], loaded["ft2"]], method="dare",
                                  base=loaded["base"], p=0.5, seed=1,
                                  params={".*kernel": {"scale": 0.5}})
    _bitwise(_stored(tmp_path / "soup.keras"), weights_of(memory))


@pytest.fixture(scope="module")
def digit_files(digits, tmp_path_factory):
    """a.keras (an MLP trained on digits), same.keras (a copy), permuted.keras (a with its
    hidden units shuffled and rescaled: the same function, weights that do not average),
    huge.keras (a with kernels x1e30: finite weights, non-finite outputs), and .weights.h5 of
    a and same."""
    x, y = digits[0], digits[1]
    keras.utils.set_random_seed(0)
    a = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                          keras.layers.Dense(32, activation="relu"),
                          keras.layers.Dense(10, activation="softmax")])
    a.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    a.fit(x, y, epochs=5, batch_size=32, verbose=0)
    d = tmp_path_factory.mktemp("digit_files")
    a.save(d / "a.keras")
    shutil.copy(d / "a.keras", d / "same.keras")
    a.save_weights(d / "a.weights.h5")
    a.save_weights(d / "same.weights.h5")
    k1, b1, k2, b2 = a.get_weights()
    order = np.random.default_rng(0).permutation(32)
    # ReLU units permuted, and scaled by 10 in and 1/10 out: the same function
    a.set_weights([10 * k1[:, order], 10 * b1[order], k2[order] / 10, b2])
    a.save(d / "permuted.keras")
    a.set_weights([k1 * 1e30, b1, k2 * 1e30, b2])
    a.save(d / "huge.keras")
    return d


def test_cli_stream_with_data_checks_scores_and_records_like_a_merge_in_memory(digit_files,
                                                                              tmp_path):
    """``--data`` on a streamed merge: the result is checked (forward pass, collapse) and
    scored before it is saved, and the file records the accuracies beside the stream's own
    records, as ``merge_weights(data=...)`` does in memory."""
    d = digit_files
    out = tmp_path / "soup.keras"
    code, stdout, stderr = _cli(["weights", str(d / "a.keras"), str(d / "same.keras"), "-o",
                                 str(out), "--method", "linear", "--data", "digits"])
    assert code == 0, stderr
    assert "streaming: linear merge" in stdout and "merged" in stdout and stderr == ""
    info = kmerge.info(kmerge.load(out))
    assert info["streamed"] is True and "drift" in info and info["probe"]["finite"]
    acc = info["accuracy"]
    assert acc["merged"] == acc["sources"][0] == acc["sources"][1] > 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup.keras"]  # no temporary left

    out = tmp_path / "collapsed.keras"
    code, stdout, stderr = _cli(["weights", str(d / "a.keras"), str(d / "permuted.keras"), "-o",
                                 str(out), "--method", "linear", "--data", "digits"])
    assert code == 0, stderr
    assert stderr.startswith("warning: the linear merge collapsed: accuracy"), stderr
    acc = kmerge.info(kmerge.load(out))["accuracy"]
    assert acc["sources"][0] == acc["sources"][1] and acc["merged"] < 0.75 * acc["sources"][0]


def test_cli_stream_with_data_writes_nothing_when_a_check_fails(digit_files, tmp_path):
    d = digit_files
    out = tmp_path / "nan.keras"
    code, stdout, stderr = _cli(["weights", str(d / "a.keras"), str(d / "huge.keras"), "-o",
                                 str(out), "--method", "linear", "--data", "digits"])
    assert code == 1 and "NaN/Inf outputs" in stderr, stderr
    code, stdout, stderr = _cli(["weights", str(d / "a.weights.h5"), str(d / "same.weights.h5"),
                                 "-o", str(tmp_path / "w.weights.h5"), "--method", "linear",
                                 "--data", "digits"])
    assert code == 1 and "holds weights only" in stderr, stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_run_says_a_collapsed_weights_step_in_one_warning_line(digit_files, tmp_path):
    """``kmerge run``: kmerge's warnings from a step are ``warning: steps[i] (kind): ...``
    lines, not Python's ``path:line: MergeCollapseWarning`` with a source line."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        models:
          a: {{path: {digit_files / 'a.keras'}}}
          p: {{path: {digit_files / 'permuted.keras'}}}
        data: {{source: "sklearn:digits"}}
        steps:
          - {{name: soup, kind: weights, models: [a, p], method: linear}}
          - {{kind: evaluate, models: [a, soup]}}
        """))
    code, stdout, stderr = _cli(["run", str(recipe), "-q"])
    assert code == 0, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("warning: steps[0] (weights): the linear merge collapsed"), stderr
    assert "soup" in stdout  # the evaluation table still prints

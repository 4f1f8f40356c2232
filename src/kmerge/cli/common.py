"""What the commands share: argument values (heads, parameters, weights, model
arguments), loading models and ``--data`` as a recipe does, output checks, the test-score
table, and warning lines. No Keras at import."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from kmerge.errors import InvalidArgumentError

HEADS = ("classifier", "regressor")
#: ``--data`` short names for the recipe data sources
DATA_NAMES = {"digits": "sklearn:digits", "wine": "sklearn:wine",
              "breast_cancer": "sklearn:breast_cancer", "mnist_sample": "mnist_sample"}


def parse_head(text: str | None, seed: int = 0):
    """``classifier:10:64,32`` -> ``kmerge.heads.classifier(10, hidden=[64, 32])``; ``seed``
    seeds its initializers."""
    if not text:
        return None
    parts = text.split(":")
    if parts[0] not in HEADS or len(parts) not in (2, 3):
        raise InvalidArgumentError(
            f"--head {text!r}: use classifier:N[:H1,H2,...] or regressor:N[:H1,...]")
    try:
        units = int(parts[1])
        hidden = [int(h) for h in parts[2].split(",")] if len(parts) == 3 and parts[2] else []
    except ValueError:
        raise InvalidArgumentError(f"--head {text!r}: sizes must be integers") from None
    import kmerge

    try:
        return getattr(kmerge.heads, parts[0])(units, hidden=hidden, seed=seed)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"--head {text!r}: {exc}") from None


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


def parse_params(items: Sequence[str], method: str | None = None) -> dict:
    """``["density=0.2", "seed=3"]`` -> ``{"density": 0.2, "seed": 3}``; with ``method``, each
    value is checked against the type in that method's signature."""
    from kmerge.recipe import param_problem

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"--param {item!r}: use KEY=VALUE, e.g. density=0.2")
        out[key] = _parse_value(value)
        problem = param_problem(method, key, out[key]) if method else None
        if problem:
            raise InvalidArgumentError(f"--param {item!r}: {problem}")
    return out


def parse_weights(text: str | None) -> list[float] | None:
    """``--weights 1,3`` -> ``[1.0, 3.0]``."""
    if not text:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise InvalidArgumentError(
            f"--weights {text!r}: use comma-separated numbers, one per model, e.g. 1,3") from None
    if not all(math.isfinite(w) for w in weights):
        raise InvalidArgumentError(f"--weights {text!r}: weights must be finite numbers")
    return weights


def source_names(paths: Sequence[str]) -> dict[str, str]:
    """Source names from file names (``model_a.h5`` -> ``model_a``), made unique."""
    out: dict[str, str] = {}
    for p in paths:
        base = "".join(c if c.isalnum() or c == "_" else "_" for c in Path(p).name.split(".")[0])
        base = base if base[:1].isalpha() else f"m_{base}"
        name, k = base, 2
        while name in out:
            name, k = f"{base}_{k}", k + 1
        out[name] = p
    return out


_JSON_ARG = re.compile(r"(?P<arch>.+\.json)\+(?P<weights>.+)", re.IGNORECASE)


def model_arg(text: str) -> tuple[str, str | None]:
    """A model argument: a path, or ``ARCH.json+WEIGHTS`` (a ``model.to_json()`` architecture
    and its ``save_weights`` file) -> ``(path, weights or None)``."""
    m = _JSON_ARG.fullmatch(text)
    if m and not Path(text).exists():
        return m["arch"], m["weights"]
    if text.lower().endswith(".json"):
        raise InvalidArgumentError(
            f"{text}: a JSON architecture needs its weights file; pass {text}+WEIGHTS.h5 "
            "(the file written by model.save_weights)")
    return text, None


def model_files(texts: Sequence[str]) -> list[str]:
    """Every file the model arguments name (architectures and weights)."""
    return [p for t in texts for p in model_arg(t) if p]


def check_sources(texts: Sequence[str]) -> None:
    """Every model file named exists (the load's own error otherwise), before data loads."""
    from kmerge.io import check_exists

    for path in model_files(texts):
        check_exists(path)


def load_one(text: str, *, safe_mode: bool = True):
    from kmerge.io import load

    path, weights = model_arg(text)
    return load(path, safe_mode=safe_mode, weights=weights)


def check_output(path: str, overwrite: bool, sources: Sequence[str]) -> None:
    """Fail before any work when the output cannot be written."""
    target = Path(path).expanduser().resolve()
    if any(target == Path(s).expanduser().resolve() for s in model_files(sources)):
        raise InvalidArgumentError(f"-o {path} is one of the source files; choose another path")
    if target.exists() and not overwrite:
        raise InvalidArgumentError(f"{path} exists; pass --overwrite to replace it")
    if not target.parent.is_dir():
        raise InvalidArgumentError(f"directory {target.parent} does not exist; create it first")


def load_all(paths: dict[str, str]) -> dict:
    return {n: load_one(p) for n, p in paths.items()}


def data_spec(args):
    """The recipe ``DataSpec`` for ``--data``/``--data-option``/``--seed`` (None without
    ``--data``)."""
    from pydantic import ValidationError

    from kmerge.recipe import DataSpec

    if not args.data:
        if args.data_option:
            raise InvalidArgumentError("--data-option needs --data")
        return None
    fields = {"source": DATA_NAMES.get(args.data, args.data), "seed": args.seed}
    allowed = [k for k in DataSpec.model_fields if k not in ("source", "seed")]
    for item in args.data_option:
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise InvalidArgumentError(
                f"--data-option {item!r}: use KEY=VALUE with KEY one of {', '.join(allowed)}")
        if key == "shape":
            try:
                fields[key] = [int(v) for v in value.split(",")]
            except ValueError:
                raise InvalidArgumentError(f"--data-option {item!r}: shape takes integers, "
                                           "e.g. shape=8,8,1") from None
        elif key in ("test_size", "scale", "noise"):
            try:
                fields[key] = float(value)
            except ValueError:
                raise InvalidArgumentError(f"--data-option {item!r}: {key} takes a number") \
                    from None
        else:
            fields[key] = value
    try:
        return DataSpec(**fields)
    except ValidationError as exc:
        problems = "; ".join(
            (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"]
            for e in exc.errors())
        names = ", ".join(DATA_NAMES)
        raise InvalidArgumentError(f"--data {args.data}: {problems} (built-in: {names})") \
            from None


class _Here:
    """What ``runner.load_data`` needs of a recipe: data files relative to the working
    directory."""

    @staticmethod
    def path_of(relative: str) -> Path:
        return Path(relative).expanduser()


def load_data(args, echo):
    """``--data`` loaded and split exactly as a recipe's ``data:`` (None without it)."""
    spec = data_spec(args)
    if spec is None:
        return None
    from kmerge.runner import load_data, split_note

    data = load_data(spec, _Here())
    echo(f"data: {spec.source}: {len(data.x_train)} train / {len(data.x_test)} test")
    note = split_note(spec)
    if note is not None:
        echo(f"note: {note}")
    return data


def evaluate(model, sources: dict, data, label: str) -> None:
    """The test scores of every source whose output is comparable and of ``model`` (a
    result: printed also with ``-q``)."""
    from kmerge.graph.build import task_model
    from kmerge.runner import format_scores, score

    task = task_model(model)  # a multi-task merge is compared on its new output
    want = tuple(task.outputs[0].shape[1:]) if len(task.outputs) == 1 else None
    scores, skipped = {}, []
    for name, src in sources.items():
        outs = getattr(src, "outputs", None) or []
        if len(outs) != 1 or tuple(outs[0].shape[1:]) != want:
            skipped.append(f"{name} (its output is not the merge's)")
            continue
        try:
            scores[name] = score(src, data)
        except InvalidArgumentError:  # its input does not take the data (a later chain link)
            skipped.append(f"{name} (its input does not take the data)")
    scores[label] = score(model, data)
    print(format_scores(scores, classification=data.classification))
    if skipped:
        print(f"not scored: {', '.join(skipped)}")


def warn(text: str) -> None:
    """A warning line on stderr (also under --quiet)."""
    print(f"warning: {text}", file=sys.stderr)

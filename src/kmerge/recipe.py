"""YAML recipes: models, data and an ordered list of steps, validated before anything loads.

A recipe names its models (paths), its data (a built-in dataset, ``.npz`` arrays or a CSV),
and steps that build merges, train them, verify, evaluate and save. Steps refer to models and
to earlier steps by name. :func:`load_recipe` checks everything that can be checked without
Keras — keys, names, references, methods and their parameters, file existence, output paths
that would overwrite an input or each other — and each error names the file and the key path
(``steps[2].method``). :func:`check_outputs` adds what depends on the run's arguments and the
file system (``-o``, ``--report``, existing outputs, directories). This module never imports
Keras.

YAML is read strictly: aliases and anchors are refused (a few hundred bytes of nested aliases
expand to gigabytes), only ``true``/``false`` are booleans (``yes``, ``off``, ``0`` are not),
and every value must have its key's type (no ``"3"`` for a number).

>>> recipe = load_recipe("examples/parallel.yaml")
>>> [s.kind for s in recipe.steps]
['parallel', 'fit_head', 'verify', 'evaluate', 'save']
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from kmerge.errors import RecipeError

# Names the builders accept, kept here so validation needs no Keras import; a test checks
# they equal the registries.
COMBINE_OPS = ("add", "average", "concat", "gate", "learned_weights", "maximum", "minimum",
               "multiply", "stack", "weighted")
BUILTIN_DATA = ("sklearn:digits", "sklearn:wine", "sklearn:breast_cancer", "mnist_sample")
WEIGHT_EXTRA_METHODS = ("greedy_soup",)


class _Strict(BaseModel):
    # strict: a YAML value must already have the key's type (no "3" -> 3, no 0 -> false)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSpec(_Strict):
    """A source model file (``weights``: the weights file of a ``.json`` architecture)."""

    path: str
    safe_mode: bool = True
    weights: str | None = None  # only for a model.to_json() architecture


class DataSpec(_Strict):
    """Where the data comes from and how it is split.

    ``source`` is a built-in dataset (``sklearn:digits``, ``sklearn:wine``,
    ``sklearn:breast_cancer``, ``mnist_sample``), a ``.npz`` file, or a ``.csv`` file.
    """

    source: str
    x: str = "x"  # npz: array name; csv: ignored (all columns but the label)
    y: str = "y"  # npz: array name; csv: label column name
    x_test: str | None = None  # npz: a ready test split instead of test_size
    y_test: str | None = None
    test_size: float = Field(0.3, gt=0.0, lt=1.0)
    seed: int = 0
    shape: list[PositiveInt] | None = None  # reshape each example, e.g. [8, 8, 1]
    scale: float | None = Field(None, gt=0.0, allow_inf_nan=False)  # divide x by this number
    # add N(0, noise) to x (train and test), seeded
    noise: float | None = Field(None, ge=0.0, allow_inf_nan=False)

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v in BUILTIN_DATA or v.endswith((".npz", ".csv")):
            return v
        close = difflib.get_close_matches(v, BUILTIN_DATA, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown data source {v!r}.{hint} Use one of {', '.join(BUILTIN_DATA)}, "
            "or a .npz / .csv file"
        )


class HeadSpec(_Strict):
    """``kmerge.heads.classifier`` or ``kmerge.heads.regressor``."""

    kind: Literal["classifier", "regressor"]
    units: int = Field(gt=0)
    hidden: list[PositiveInt] = []
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


Freeze = bool | list[str]
Ref = str | int


class _Step(_Strict):
    name: str | None = None


class SequentialStep(_Step):
    kind: Literal["sequential"]
    models: list[str] = Field(min_length=2)
    adapter: Literal["auto", "none"] = "auto"
    freeze: Freeze = True


class ParallelStep(_Step):
    kind: Literal["parallel"]
    models: list[str] = Field(min_length=2)
    combine: str = "concat"
    head: HeadSpec | None = None
    freeze: Freeze = True
    weights: list[float] | None = None
    output: dict[str, Ref] | None = None
    share_inputs: bool = True
    adapter: Literal["auto", "none"] = "none"
    keep_outputs: bool = False


class ProbeStep(_Step):
    """Rank every tap of the models by a linear probe on the training split
    (``kmerge.probe``) and print the table; a later fuse step with ``taps: auto`` and
    ``probe: NAME`` fuses its best combination."""

    kind: Literal["probe"]
    models: list[str] = Field(min_length=1)
    taps: Literal["all"] | list[Ref] | dict[str, Literal["all"] | list[Ref]] = "all"
    pooling: Literal["auto", "avg", "max", "none"] = "auto"
    validation_split: float = Field(0.2, gt=0.0, lt=1.0)
    top: int = Field(3, gt=0)


class FuseStep(_Step):
    kind: Literal["fuse"]
    # taps: auto lets kmerge.probe choose them on the training split (models: names them)
    taps: dict[str, Ref | list[Ref]] | Literal["auto"]
    models: list[str] | None = None  # with taps: auto
    probe: str | None = None  # with taps: auto: an earlier probe step's choice
    combine: str = "concat"
    head: HeadSpec | None = None
    pooling: Literal["auto", "avg", "max", "none"] = "auto"
    freeze: Freeze = True
    share_inputs: bool = True
    adapter: Literal["auto", "none"] = "none"
    keep_outputs: bool = False


class WeightsStep(_Step):
    kind: Literal["weights"]
    models: list[str] = Field(min_length=1)
    method: str
    base: str | None = None
    weights: list[float] | None = None
    align: Literal["weights", "activations"] | None = None
    repair: Literal["bn", "repair"] | None = None
    params: dict[str, Any] = {}  # method parameters, e.g. {density: 0.2}
    per_layer: dict[str, dict[str, Any]] | None = None  # regex over variable paths -> params
    exclude: list[str] | None = None


class FitHeadStep(_Strict):
    kind: Literal["fit_head"]
    model: str
    epochs: int = Field(gt=0)
    batch_size: int = Field(32, gt=0)
    cache: Literal["auto"] | None = "auto"


class FineTuneStep(_Strict):
    kind: Literal["fine_tune"]
    model: str
    unfreeze: str | list[str] = "top:2"
    learning_rate: float = Field(1e-5, gt=0)
    epochs: int = Field(gt=0)
    batch_size: int = Field(32, gt=0)


class StudentSpec(_Strict):
    """The student of a distill step: ``kmerge.students.like(model, width=...)``."""

    like: str
    width: float = Field(0.5, gt=0.0)


class DistillStep(_Step):
    kind: Literal["distill"]
    teacher: str | list[str]
    student: StudentSpec
    # alpha "auto": chosen on held-out data (kmerge.distill); temperature null: chosen, or 3
    temperature: Annotated[float, Field(gt=0)] | None = None
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] = "auto"
    epochs: int = Field(gt=0)
    batch_size: int = Field(32, gt=0)


class VerifyStep(_Strict):
    kind: Literal["verify"]
    model: str


class EvaluateStep(_Strict):
    kind: Literal["evaluate"]
    models: list[str] | None = None  # default: every model and step result


class SaveStep(_Strict):
    """Save a model (``kmerge.save``: atomic, never over a source)."""

    kind: Literal["save"]
    model: str
    path: str
    overwrite: bool = False


Step = Annotated[
    SequentialStep | ParallelStep | FuseStep | ProbeStep | WeightsStep | FitHeadStep
    | FineTuneStep | DistillStep | VerifyStep | EvaluateStep | SaveStep,
    Field(discriminator="kind"),
]
BUILDS = ("sequential", "parallel", "fuse", "weights", "distill")
STEP_KINDS = (*BUILDS, "probe", "fit_head", "fine_tune", "verify", "evaluate", "save")


class Recipe(_Strict):
    """A whole recipe file."""

    models: dict[str, ModelSpec] = Field(min_length=1)
    data: DataSpec | None = None
    steps: list[Step] = Field(min_length=1)
    # Set by load_recipe: where relative paths start, and the recipe file itself.
    base_dir: str = "."
    file: str | None = None

    def load_args(self, name: str) -> dict[str, Any]:
        """Keyword arguments for ``kmerge.load`` of model ``name``."""
        spec = self.models[name]
        weights = self.path_of(spec.weights) if spec.weights else None
        return {"path": self.path_of(spec.path), "safe_mode": spec.safe_mode, "weights": weights}

    def path_of(self, relative: str) -> Path:
        p = Path(relative).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p


def schema() -> dict:
    """The JSON Schema of a recipe (``kmerge schema``)."""
    s = Recipe.model_json_schema()
    for key in _INTERNAL:
        s.get("properties", {}).pop(key, None)
    return s


_INTERNAL = ("base_dir", "file")  # set by load_recipe, never by the file


_UNION_TAGS = ("bool", "str", "int", "float", "none")


def _loc(loc: tuple) -> str:
    out = ""
    for k, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in STEP_KINDS and k and isinstance(loc[k - 1], int):
            continue  # the discriminator's branch name adds nothing for the reader
        elif part in _UNION_TAGS or "[" in part or "-" in part:
            continue  # a union member's type tag (freeze.bool, taps.x.list[...])
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _fail(path: Path, where: str, msg: str) -> RecipeError:
    return RecipeError(f"{path}: {where}: {msg}")


class _Problems:
    """Every problem found in one recipe, reported together as one :class:`RecipeError`.

    One problem reads ``FILE: KEY: message``; several read ``FILE: N problems`` followed by one
    numbered line each (``1. KEY: message``). The error's ``problems`` attribute holds the
    ``(key, message)`` pairs.
    """

    def __init__(self, path: Path):
        self.path = path
        self.items: list[tuple[str, str]] = []

    def add(self, where: str, msg: str) -> None:
        if (where, msg) not in self.items:
            self.items.append((where, msg))

    def __bool__(self) -> bool:
        return bool(self.items)

    def error(self) -> RecipeError:
        if len(self.items) == 1:
            where, msg = self.items[0]
            err = _fail(self.path, where, msg)
        else:
            lines = [f"{self.path}: {len(self.items)} problems"]
            lines += [f"  {i}. {where}: {msg}" for i, (where, msg) in enumerate(self.items, 1)]
            err = RecipeError("\n".join(lines))
        err.problems = list(self.items)
        return err

    def raise_any(self) -> None:
        if self.items:
            raise self.error()


# -- reading YAML --------------------------------------------------------------------------------
class _Refused(yaml.MarkedYAMLError):
    """YAML that is valid but not accepted in a recipe (an alias or an anchor)."""


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without aliases and anchors, and with YAML 1.2 booleans.

    An alias (``*name``) repeats a node by reference: nine nested lists of nine aliases are a
    few hundred bytes that expand to 9**9 strings when the recipe is validated or printed.
    Recipes are small, so they are refused outright (at the first anchor, before any
    expansion). Only ``true``/``false`` are booleans: YAML 1.1 also reads ``yes``, ``no``,
    ``on`` and ``off`` as booleans, which turns a layer named ``off`` into ``False``.
    """

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(None, None, f"alias '*{event.anchor}' refused: recipes may not use "
                           "YAML aliases or anchors; write the value out in full",
                           event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise _Refused(None, None, f"anchor '&{event.anchor}' refused: recipes may not use "
                           "YAML aliases or anchors; write the value out in full",
                           event.start_mark)
        return super().compose_node(parent, index)


_BOOL = "tag:yaml.org,2002:bool"
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``, read with :class:`_RecipeLoader`.

    Raises:
        RecipeError: naming the file, the line and column, and the problem.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({type(exc).__name__}: {exc})") from None
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(exc, "problem", None) or str(exc)
        kind = "" if isinstance(exc, _Refused) else "invalid YAML: "
        raise _fail(path, where, f"{kind}{problem}") from None
    except RecursionError:
        raise _fail(path, "YAML", "nested too deeply to read; a recipe is a few levels of "
                    "mappings and lists") from None


def _validation_messages(exc: ValidationError) -> list[tuple[str, str]]:
    """(key path, message) for every problem pydantic found, one per key path."""
    errors = exc.errors()
    groups: dict[str, list[dict]] = {}
    for err in errors:
        key = (_loc((*err["loc"], "kind")) if err["type"] == "union_tag_invalid"
               else _loc(tuple(err["loc"])))
        groups.setdefault(key, []).append(err)
    return [(where, _group_message(where, same)) for where, same in groups.items()]


def _group_message(where: str, same: list[dict]) -> str:
    """The message for the errors pydantic reports at one key (a union reports one error per
    member at the same key: say what each member wants)."""
    err = same[0]
    given = err.get("input")
    if err["type"] == "extra_forbidden":
        return f"unknown key {err['loc'][-1]!r}"
    if err["type"] == "union_tag_invalid":
        kind = given.get("kind") if isinstance(given, dict) else given
        return (f"unknown step kind {kind!r}; kinds are {', '.join(STEP_KINDS)}")
    wants = []
    for e in same:
        if e["type"] == "bool_type":
            text = "true or false (a YAML boolean; yes, no, on, off, 0 and 1 are not)"
        elif e["type"] == "missing":
            return "required key is missing"
        else:
            text = e["msg"].removeprefix("Input should be ")
        if text not in wants:
            wants.append(text)
    if all(e["msg"].startswith("Input should be ") or e["type"] == "bool_type" for e in same):
        msg = f"must be {' or '.join(wants)}; got {given!r}"
    else:
        msg = f"{err['msg']}; got {given!r}"
    if where.endswith("safe_mode") and err["type"] == "bool_type":
        msg += " (safe_mode: false lets Lambda layers run their code: only for trusted files)"
    return msg


def load_recipe(path: str | Path, *, check_files: bool = True) -> Recipe:
    """Read and fully validate a recipe, without importing Keras.

    Raises:
        RecipeError: naming the file, and the key path of every problem found (one numbered
            line each when there are several; ``.problems`` holds ``(key, message)`` pairs).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise _fail(path, "(top level)", "a recipe is a mapping with models, data and steps")
    problems = _Problems(path)
    for key in _INTERNAL:
        if key in raw:
            problems.add(key, f"unknown key {key!r}")
    try:
        recipe = Recipe.model_validate({**{k: v for k, v in raw.items() if k not in _INTERNAL},
                                        "base_dir": str(path.parent), "file": str(path)})
    except ValidationError as exc:
        for where, msg in _validation_messages(exc):
            problems.add(where, msg)
        raise problems.error() from None
    _check_semantics(recipe, problems, check_files=check_files)
    problems.raise_any()
    return recipe


def unsafe_warnings(recipe: Recipe) -> list[str]:
    """One line per model the recipe loads with ``safe_mode: false``."""
    return [f"{recipe.file or 'recipe'}: models.{name}: safe_mode is false: Lambda layers in "
            f"{spec.path} run their Python code when loaded; keep it only for files you trust"
            for name, spec in recipe.models.items() if spec.safe_mode is False]


def _missing_file(recipe: Recipe, relative: str) -> str:
    """Why a file the recipe names is missing, and how to make it when kmerge can."""
    looked = _shown(recipe.path_of(relative))
    msg = (f"file {relative!r} does not exist (looked for {looked}: relative paths start at "
           f"the recipe's folder, {_shown(Path(recipe.base_dir))})")
    from kmerge.demo import FILES

    name = Path(relative).name
    if name in FILES:
        folder = _shown(recipe.path_of(relative).parent)
        msg += (f". It is one of the demo's models: `kmerge demo --out {folder}` writes it"
                + (" (from a kmerge clone, `make demo` does)"
                   if Path(folder).as_posix().endswith("examples/models") else ""))
    return msg


def _shown(p: Path) -> str:
    """``p`` relative to the working directory when it is below it, else absolute."""
    full = os.path.abspath(p)
    rel = os.path.relpath(full)
    return rel if not rel.startswith("..") else full


def _check_semantics(recipe: Recipe, problems: _Problems, *, check_files: bool) -> None:
    """Names, references, files, methods and outputs; every problem goes to ``problems``."""
    known: list[str] = []
    for name, spec in recipe.models.items():
        if check_files and not recipe.path_of(spec.path).exists():
            problems.add(f"models.{name}.path", _missing_file(recipe, spec.path))
        is_json = spec.path.lower().endswith(".json")
        if is_json and spec.weights is None:
            problems.add(f"models.{name}.weights", f"{spec.path!r} is a JSON architecture "
                         "(model.to_json()); add weights: PATH, the file written by "
                         "model.save_weights()")
        if spec.weights is not None and not is_json:
            problems.add(f"models.{name}.weights", f"{spec.path!r} holds its own weights; "
                         "weights: is only for a .json architecture: drop it")
        if check_files and spec.weights is not None \
                and not recipe.path_of(spec.weights).exists():
            problems.add(f"models.{name}.weights", _missing_file(recipe, spec.weights))
        known.append(name)
    if recipe.data and recipe.data.source.endswith((".npz", ".csv")) and check_files:
        if not recipe.path_of(recipe.data.source).exists():
            problems.add("data.source", _missing_file(recipe, recipe.data.source))

    def ref(value: str, where: str) -> None:
        if value not in known:
            close = difflib.get_close_matches(value, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            problems.add(where, f"{value!r} is not a model or an earlier step.{hint} "
                         f"Known so far: {', '.join(known)}")

    needs_data = ("fit_head", "fine_tune", "distill", "evaluate", "probe")
    probes: dict[str, list[str]] = {}  # probe step name -> its models
    for i, step in enumerate(recipe.steps):
        at = f"steps[{i}]"
        kind = step.kind
        if kind in needs_data and recipe.data is None:
            problems.add(f"{at}.kind", f"step {kind!r} needs a data: section")
        for field in ("models",):
            for j, m in enumerate(getattr(step, field, None) or []):
                ref(m, f"{at}.{field}[{j}]")
        for field in ("model", "base"):
            value = getattr(step, field, None)
            if isinstance(value, str):
                ref(value, f"{at}.{field}")
        if kind == "fuse":
            _check_fuse_taps(step, at, probes, recipe.data is not None, problems, ref)
        if kind == "probe":
            if isinstance(step.taps, dict):
                for m in step.taps:
                    if m not in step.models:
                        problems.add(f"{at}.taps.{m}", f"{m!r} is not among the step's models "
                                     f"{step.models}")
        if kind == "distill":
            teachers = [step.teacher] if isinstance(step.teacher, str) else step.teacher
            for j, t in enumerate(teachers):
                ref(t, f"{at}.teacher" + ("" if isinstance(step.teacher, str) else f"[{j}]"))
            ref(step.student.like, f"{at}.student.like")
        if kind in ("parallel", "fuse") and step.combine not in COMBINE_OPS:
            close = difflib.get_close_matches(step.combine, COMBINE_OPS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            problems.add(f"{at}.combine", f"unknown combine op {step.combine!r}.{hint} "
                         f"Valid: {', '.join(COMBINE_OPS)}")
        if kind in ("parallel", "fuse") and step.keep_outputs and step.freeze is not True:
            names = step.models if kind == "parallel" else (
                list(step.taps) if step.taps != "auto" else step.models or [])
            loose = [n for n in names if step.freeze is False or n not in step.freeze]
            if loose:
                problems.add(f"{at}.keep_outputs", "keep_outputs: true keeps each source's own "
                             f"outputs unchanged, but freeze leaves {loose} trainable; use "
                             "freeze: true")
        if kind == "weights":
            _check_method(step, problems, at)
        if kind in BUILDS:
            name = step.name or f"step_{i}"
            if name in known or name in probes:
                problems.add(f"{at}.name", f"name {name!r} is already used")
            else:
                known.append(name)
        if kind == "probe":
            name = step.name or f"step_{i}"
            if name in known or name in probes:
                problems.add(f"{at}.name", f"name {name!r} is already used")
            else:
                probes[name] = list(step.models)
    # output paths against inputs and each other, as far as the recipe alone decides them
    _resolve_outputs(recipe, problems, out_dir=None, report=None)


def _check_fuse_taps(step: FuseStep, at: str, probes: dict[str, list[str]], has_data: bool,
                     problems: _Problems, ref: Any) -> None:
    """``taps``: a mapping by model, or ``auto`` with ``models`` and/or ``probe``."""
    if step.taps != "auto":
        for m in step.taps:
            ref(m, f"{at}.taps.{m}")
        for key in ("models", "probe"):
            if getattr(step, key) is not None:
                problems.add(f"{at}.{key}", f"{key}: is used only with taps: auto (the taps "
                             "here are given by hand): drop it")
        return
    if step.probe is not None:
        if step.probe not in probes:
            known = ", ".join(probes) or "none so far"
            problems.add(f"{at}.probe", f"{step.probe!r} is not an earlier probe step (probe "
                         f"steps: {known})")
        elif step.models is not None and set(step.models) != set(probes[step.probe]):
            problems.add(f"{at}.models", f"the probe step {step.probe!r} probed "
                         f"{probes[step.probe]}, not {step.models}; drop models: to fuse "
                         "what it probed")
    elif step.models is None:
        problems.add(f"{at}.models", "taps: auto needs the models to probe (models: [a, b]) "
                     "or an earlier probe step (probe: NAME)")
    elif not has_data:
        problems.add(f"{at}.taps", "taps: auto probes the models on the training data: add "
                     "a data: section")


def _check_method(step: WeightsStep, problems: _Problems, at: str) -> None:
    """Method name and parameters, bound against the method's own signature."""
    from kmerge.weights.methods import merge_methods, user_params

    names = [*merge_methods.names(), *WEIGHT_EXTRA_METHODS]
    if step.method not in names:
        close = difflib.get_close_matches(step.method, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        problems.add(f"{at}.method", f"unknown method {step.method!r}.{hint} "
                     f"Valid: {', '.join(sorted(names))}")
        return
    if step.method in WEIGHT_EXTRA_METHODS:
        return
    allowed = list(user_params(merge_methods.get(step.method)))
    overrides = [("params", step.params)] + [
        (f"per_layer.{k}", v) for k, v in (step.per_layer or {}).items()
    ]
    for where, params in overrides:
        for key, value in params.items():
            if key not in allowed:
                problems.add(f"{at}.{where}.{key}",
                             f"method {step.method!r} has no parameter {key!r}; its parameters "
                             f"are {', '.join(allowed) or 'none'}")
                continue
            problem = param_problem(step.method, key, value)
            if problem:
                problems.add(f"{at}.{where}.{key}", problem)


_PARAM_KINDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def param_problem(method: str, key: str, value: Any) -> str | None:
    """Why ``value`` cannot be parameter ``key`` of weight-merge ``method`` (by the type in the
    method's signature), or None. Unknown methods and parameters are left to other checks."""
    import inspect

    from kmerge.weights.methods import merge_methods

    if method not in merge_methods:
        return None
    param = inspect.signature(merge_methods.get(method)).parameters.get(key)
    if param is None:
        return None
    ann = param.annotation
    ann = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    if ann not in _PARAM_KINDS:
        return None
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, int | float) and not isinstance(value, bool)
          and math.isfinite(value),
          "str": isinstance(value, str),
          "bool": isinstance(value, bool)}[ann]
    if ok:
        return None
    return f"parameter {key!r} of method {method!r} must be {_PARAM_KINDS[ann]}; got {value!r}"


# -- outputs -------------------------------------------------------------------------------------
def _report_files() -> tuple[str, ...]:
    from kmerge.report import FIGURES

    return ("report.md", "report.json", *FIGURES)


@dataclass(frozen=True)
class SaveTarget:
    """Where one save step writes, after ``-o`` and the default suffix are applied."""

    step: int
    model: str
    path: Path  # absolute
    overwrite: bool


@dataclass(frozen=True)
class Outputs:
    """Every file a run writes: one target per save step, and the report folder."""

    saves: tuple[SaveTarget, ...]
    report: Path | None
    inputs: tuple[tuple[str, Path], ...]  # (what, absolute path) of every file the run reads


def _absolute(p: Path) -> Path:
    return Path(os.path.abspath(p.expanduser())).resolve()


def _inputs(recipe: Recipe) -> list[tuple[str, Path]]:
    out = [(f"models.{n}.path (model {n!r})", _absolute(recipe.path_of(s.path)))
           for n, s in recipe.models.items()]
    out += [(f"models.{n}.weights (weights of model {n!r})", _absolute(recipe.path_of(w)))
            for n, s in recipe.models.items() if (w := s.weights)]
    if recipe.data and recipe.data.source.endswith((".npz", ".csv")):
        out.append(("data.source (the data)", _absolute(recipe.path_of(recipe.data.source))))
    if recipe.file:
        out.append(("the recipe itself", _absolute(Path(recipe.file))))
    return out


def _save_target(recipe: Recipe, step: SaveStep, out_dir: Path | None) -> Path:
    """The file ``kmerge.save`` writes for ``step``: ``-o DIR`` keeps only the file name, and a
    path without a suffix gets ``.keras``."""
    p = Path(step.path).expanduser()
    p = recipe.path_of(step.path) if out_dir is None else Path(out_dir) / p.name
    if p.suffix == "":
        p = p.with_name(p.name + ".keras")
    return _absolute(p.parent) / p.name


def _resolve_outputs(recipe: Recipe, problems: _Problems, *, out_dir: Path | None,
                     report: Path | None) -> Outputs:
    """Every output path; one that is an input or another output goes to ``problems``."""
    from kmerge.io import SAVE_SUFFIXES

    inputs = _inputs(recipe)

    def clash(target: Path) -> str | None:
        for what, p in inputs:
            if target == p:
                return f"is {what}"
            if p in target.parents:
                return f"is inside {what}, a directory"
        return None

    by_path: dict[Path, str] = {}
    saves = []
    for i, step in enumerate(recipe.steps):
        if step.kind != "save":
            continue
        where = f"steps[{i}].path"
        if Path(step.path).suffix.lower() not in ("", *SAVE_SUFFIXES):
            problems.add(where, f"cannot save {step.path!r}: use a path ending in "
                         f"{', '.join(SAVE_SUFFIXES)} (.keras is recommended)")
            continue
        target = _save_target(recipe, step, out_dir)
        via = f" (with -o {out_dir})" if out_dir is not None else ""
        problem = clash(target)
        if problem:
            problems.add(where, f"{step.path!r}{via} writes {target}, which {problem}; a "
                         "run never overwrites a source or any other input: choose another path")
            continue
        if target in by_path:
            problems.add(where, f"{step.path!r}{via} writes {target}, which "
                         f"{by_path[target]} writes too; give each save its own path")
            continue
        by_path[target] = where
        saves.append(SaveTarget(i, step.model, target, step.overwrite))
    folder = None
    if report is not None:
        folder = _absolute(Path(report))
        problem = clash(folder)
        if problem:
            problems.add("--report", f"{report} {problem}; choose another folder")
        for name in _report_files():
            f = folder / name
            problem = clash(f)
            if problem:
                problems.add("--report", f"the report would write {f}, which {problem}; "
                             "choose another folder")
            if f in by_path:
                problems.add("--report", f"the report would write {f}, which "
                             f"{by_path[f]} writes too; choose another folder")
        for target, where in by_path.items():
            if target == folder:
                problems.add(where, f"writes {target}, the --report folder; choose "
                             "another path")
    return Outputs(tuple(saves), folder, tuple(inputs))


def _creatable(directory: Path) -> str | None:
    """Why ``directory`` cannot be created (or written into), or None."""
    p = directory
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a directory"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    return None


def check_outputs(recipe: Recipe, *, out_dir: str | Path | None = None,
                  report: str | Path | None = None) -> Outputs:
    """Every file a run of ``recipe`` would write, checked before any work starts.

    ``out_dir`` is ``kmerge run -o``: saves go there under their file names (it must exist);
    ``report`` is ``--report``: a folder (created; report files in an existing one replaced).
    Refused: an output that is an input (a model file, the data, the recipe) or another
    output; ``report`` without a ``data:`` section; an existing save target without
    ``overwrite: true``; a directory that cannot be created or written.

    Raises:
        RecipeError: naming the recipe, and for every problem the step or argument, the path
            and what to do.
    """
    problems = _Problems(Path(recipe.file or "recipe"))
    if out_dir is not None:
        d = Path(out_dir)
        if not d.is_dir():
            problems.add("-o", f"{d} is not an existing directory; create it first")
        elif not os.access(d, os.W_OK | os.X_OK):
            problems.add("-o", f"{d} is not writable")
    bad_out_dir = bool(problems)  # then every save target's folder is that one problem
    if report is not None and recipe.data is None:
        problems.add("--report", "a report evaluates the models on test data, and this "
                     "recipe has no data: section; add one, or drop --report")
    outs = _resolve_outputs(recipe, problems,
                            out_dir=Path(out_dir) if out_dir is not None else None,
                            report=Path(report) if report is not None else None)
    for t in outs.saves:
        where = f"steps[{t.step}].path"
        if t.path.is_dir():
            problems.add(where, f"{t.path} is a directory; give a file path ending in .keras")
        elif t.path.exists() and not t.overwrite:
            problems.add(where, f"{t.path} exists; add 'overwrite: true' to the step to "
                         "replace it, or choose another path")
        problem = None if bad_out_dir else _creatable(t.path.parent)
        if problem:
            problems.add(where, f"cannot write {t.path}: {problem}")
    if outs.report is not None:
        if outs.report.exists() and not outs.report.is_dir():
            problems.add("--report", f"{outs.report} is a file; give a folder")
        else:
            problem = _creatable(outs.report)
            if problem:
                problems.add("--report", f"cannot write {outs.report}: {problem}")
            blocked = [n for n in _report_files() if (outs.report / n).is_dir()]
            if blocked:
                problems.add("--report", f"{outs.report} holds folders named {blocked}; the "
                             "report writes files there: choose another folder")
    problems.raise_any()
    return outs


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _type_text(t: Any) -> str:
    """A type as a reader of the reference writes it: ``list[int > 0]``, ``str | None``,
    ``'auto' | 'none'`` (from the typing objects, whatever pydantic wraps them in)."""
    import types
    import typing

    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is type(None):
        return "None"
    if t is Any:
        return "Any"
    if origin is Annotated:
        base = _type_text(args[0])
        metadata = []
        for m in args[1:]:  # annotated_types.Gt(0), or a FieldInfo holding them
            metadata += list(getattr(m, "metadata", None) or [m])
        bounds = [f"{sign} {getattr(m, key)}" for m in metadata for key, sign in _BOUNDS
                  if getattr(m, key, None) is not None]
        return f"{base} {' and '.join(bounds)}" if bounds else base
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_text(a) for a in args)}]"
    if isinstance(t, type):
        return t.__name__
    return str(t).removeprefix("typing.")


def _type_name(annotation: Any) -> str:
    """:func:`_type_text`, escaped for a Markdown table cell."""
    return _type_text(annotation).replace("|", "\\|")


def reference_markdown() -> str:
    """The recipe reference (docs/recipe-reference.md), generated from the pydantic models."""
    sections = [("Recipe (top level)", Recipe), ("models.NAME", ModelSpec), ("data", DataSpec),
                ("head (in parallel and fuse steps)", HeadSpec),
                ("student (in distill steps)", StudentSpec)]
    steps = [SequentialStep, ParallelStep, FuseStep, ProbeStep, WeightsStep, FitHeadStep,
             FineTuneStep, DistillStep, VerifyStep, EvaluateStep, SaveStep]
    lines = ["# Recipe reference", "",
             "Generated from `kmerge/recipe.py` by `python -m kmerge.recipe`; a test checks it "
             "is current. Unknown keys are errors. Relative paths start at the recipe's folder.",
             "",
             "Values must have the listed type: only `true` and `false` are booleans (`yes`, "
             "`off`, `0` are refused), `\"3\"` is not a number, and YAML aliases and anchors "
             "(`&name`, `*name`, `<<:`) are refused.",
             ""]

    def table(model) -> list[str]:
        rows = ["| key | type | default |", "|---|---|---|"]
        for name, f in model.model_fields.items():
            if name in (*_INTERNAL, "kind"):
                continue
            ann = _type_name(f.annotation) if name != "steps" else "list of steps (below)"
            default = "required" if f.is_required() else repr(f.default)
            rows.append(f"| `{name}` | `{ann}` | {default} |")
        return rows

    for title, model in sections:
        lines += [f"## {title}", "", (model.__doc__ or "").strip().splitlines()[0], "",
                  *table(model), ""]
    lines += ["## steps", "", "Each step is a mapping with a `kind`. Merge steps (`sequential`, "
              "`parallel`, `fuse`, `weights`, `distill`) take an optional `name` (default "
              "`step_N`) that later steps use to refer to their result.", ""]
    for model in steps:
        kind = model.model_fields["kind"].annotation.__args__[0]
        lines += [f"### kind: {kind}", "", *table(model), ""]
    lines += ["Combine ops: " + ", ".join(f"`{c}`" for c in COMBINE_OPS) + ".",
              "Built-in data: " + ", ".join(f"`{d}`" for d in BUILTIN_DATA) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(reference_markdown(), end="")

"""YAML recipes: models, data and an ordered list of steps, validated before anything loads.

A recipe names its models (paths), its data (a built-in dataset, ``.npz`` arrays or a CSV),
and steps that build merges, train them, verify, evaluate and save. Steps refer to models and
to earlier steps by name. :func:`load_recipe` checks everything that can be checked without
Keras — keys, names, references, methods and their parameters, file existence — and each error
names the file and the key path (``steps[2].method``). This module never imports Keras.

>>> recipe = load_recipe("examples/parallel.yaml")
>>> [s.kind for s in recipe.steps]
['parallel', 'fit_head', 'verify', 'evaluate', 'save']
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kmerge.errors import RecipeError

# Names the builders accept, kept here so validation needs no Keras import; a test checks
# they equal the registries.
COMBINE_OPS = ("add", "average", "concat", "gate", "learned_weights", "maximum", "minimum",
               "multiply", "stack", "weighted")
BUILTIN_DATA = ("sklearn:digits", "sklearn:wine", "sklearn:breast_cancer", "mnist_sample")
WEIGHT_EXTRA_METHODS = ("greedy_soup",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """A source model file."""

    path: str
    safe_mode: bool = True


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
    shape: list[int] | None = None  # reshape each example, e.g. [8, 8, 1]
    scale: float | None = None  # divide x by this number
    noise: float | None = Field(None, ge=0.0)  # add N(0, noise) to x (train and test), seeded

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
    hidden: list[Annotated[int, Field(gt=0)]] = []
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


class FuseStep(_Step):
    kind: Literal["fuse"]
    taps: dict[str, Ref | list[Ref]]
    combine: str = "concat"
    head: HeadSpec | None = None
    pooling: Literal["auto", "avg", "max", "none"] = "auto"
    freeze: Freeze = True
    share_inputs: bool = True
    adapter: Literal["auto", "none"] = "none"


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
    temperature: float = Field(3.0, gt=0)
    alpha: float = Field(0.9, ge=0.0, le=1.0)
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
    SequentialStep | ParallelStep | FuseStep | WeightsStep | FitHeadStep | FineTuneStep
    | DistillStep | VerifyStep | EvaluateStep | SaveStep,
    Field(discriminator="kind"),
]
BUILDS = ("sequential", "parallel", "fuse", "weights", "distill")


class Recipe(_Strict):
    """A whole recipe file."""

    models: dict[str, ModelSpec] = Field(min_length=1)
    data: DataSpec | None = None
    steps: list[Step] = Field(min_length=1)
    # Set by load_recipe: where relative paths start.
    base_dir: str = "."

    def path_of(self, relative: str) -> Path:
        p = Path(relative).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p


def schema() -> dict:
    """The JSON Schema of a recipe (``kmerge schema``)."""
    s = Recipe.model_json_schema()
    s.get("properties", {}).pop("base_dir", None)
    return s


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in BUILDS + ("fit_head", "fine_tune", "verify", "evaluate", "save"):
            continue  # the discriminator's branch name adds nothing for the reader
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _fail(path: Path, where: str, msg: str) -> RecipeError:
    return RecipeError(f"{path}: {where}: {msg}")


def load_recipe(path: str | Path, *, check_files: bool = True) -> Recipe:
    """Read and fully validate a recipe, without importing Keras.

    Raises:
        RecipeError: naming the file and the key path of the first problem.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(exc, "problem", None) or str(exc)
        raise _fail(path, where, f"invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise _fail(path, "(top level)", "a recipe is a mapping with models, data and steps")
    raw.pop("base_dir", None)
    try:
        recipe = Recipe.model_validate({**raw, "base_dir": str(path.parent)})
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown key {err['loc'][-1]!r}"
        elif err["type"] == "union_tag_invalid":
            given = err.get("input")
            given = given.get("kind") if isinstance(given, dict) else given
            err = {**err, "loc": (*err["loc"], "kind")}
            msg = (f"unknown step kind {given!r}; kinds are "
                   "sequential, parallel, fuse, weights, fit_head, fine_tune, distill, verify, "
                   "evaluate, save")
        raise _fail(path, _loc(tuple(err["loc"])), msg) from None
    _check_semantics(recipe, path, check_files=check_files)
    return recipe


def _check_semantics(recipe: Recipe, path: Path, *, check_files: bool) -> None:
    known: list[str] = []
    for name, spec in recipe.models.items():
        if check_files and not recipe.path_of(spec.path).exists():
            raise _fail(path, f"models.{name}.path", f"file {spec.path!r} does not exist "
                        f"(relative paths start at {recipe.base_dir})")
        known.append(name)
    if recipe.data and recipe.data.source.endswith((".npz", ".csv")) and check_files:
        if not recipe.path_of(recipe.data.source).exists():
            raise _fail(path, "data.source", f"file {recipe.data.source!r} does not exist")

    def ref(value: str, where: str) -> None:
        if value not in known:
            close = difflib.get_close_matches(value, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise _fail(path, where, f"{value!r} is not a model or an earlier step.{hint} "
                        f"Known so far: {', '.join(known)}")

    needs_data = ("fit_head", "fine_tune", "distill", "evaluate")
    for i, step in enumerate(recipe.steps):
        at = f"steps[{i}]"
        kind = step.kind
        if kind in needs_data and recipe.data is None:
            raise _fail(path, f"{at}.kind", f"step {kind!r} needs a data: section")
        for field in ("models",):
            for j, m in enumerate(getattr(step, field, None) or []):
                ref(m, f"{at}.{field}[{j}]")
        for field in ("model", "base"):
            value = getattr(step, field, None)
            if isinstance(value, str):
                ref(value, f"{at}.{field}")
        if kind == "fuse":
            for m in step.taps:
                ref(m, f"{at}.taps.{m}")
        if kind == "distill":
            teachers = [step.teacher] if isinstance(step.teacher, str) else step.teacher
            for j, t in enumerate(teachers):
                ref(t, f"{at}.teacher" + ("" if isinstance(step.teacher, str) else f"[{j}]"))
            ref(step.student.like, f"{at}.student.like")
        if kind in ("parallel", "fuse") and step.combine not in COMBINE_OPS:
            close = difflib.get_close_matches(step.combine, COMBINE_OPS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise _fail(path, f"{at}.combine", f"unknown combine op {step.combine!r}.{hint} "
                        f"Valid: {', '.join(COMBINE_OPS)}")
        if kind == "weights":
            _check_method(step, path, at)
        if kind == "save":
            target = recipe.path_of(step.path).resolve()
            for m, spec in recipe.models.items():
                if recipe.path_of(spec.path).resolve() == target:
                    raise _fail(path, f"{at}.path", f"{step.path!r} is the file of model {m!r}; "
                                "a save never overwrites a source: choose another path")
        if kind in BUILDS:
            name = step.name or f"step_{i}"
            if name in known:
                raise _fail(path, f"{at}.name", f"name {name!r} is already used")
            known.append(name)


def _check_method(step: WeightsStep, path: Path, at: str) -> None:
    """Method name and parameters, bound against the method's own signature."""
    from kmerge.weights.methods import merge_methods, user_params

    names = [*merge_methods.names(), *WEIGHT_EXTRA_METHODS]
    if step.method not in names:
        close = difflib.get_close_matches(step.method, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise _fail(path, f"{at}.method", f"unknown method {step.method!r}.{hint} "
                    f"Valid: {', '.join(sorted(names))}")
    if step.method in WEIGHT_EXTRA_METHODS:
        return
    allowed = list(user_params(merge_methods.get(step.method)))
    overrides = [("params", step.params)] + [
        (f"per_layer.{k}", v) for k, v in (step.per_layer or {}).items()
    ]
    for where, params in overrides:
        for key in params:
            if key not in allowed:
                raise _fail(path, f"{at}.{where}.{key}",
                            f"method {step.method!r} has no parameter {key!r}; its parameters "
                            f"are {', '.join(allowed) or 'none'}")


def _type_name(annotation: Any) -> str:
    text = re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], str(annotation))
    text = re.sub(r"\b(typing|__main__|kmerge\.recipe)\.", "", text)
    return text.replace("NoneType", "None").replace("|", "\\|")


def reference_markdown() -> str:
    """The recipe reference (docs/recipe-reference.md), generated from the pydantic models."""
    sections = [("Recipe (top level)", Recipe), ("models.NAME", ModelSpec), ("data", DataSpec),
                ("head (in parallel and fuse steps)", HeadSpec),
                ("student (in distill steps)", StudentSpec)]
    steps = [SequentialStep, ParallelStep, FuseStep, WeightsStep, FitHeadStep, FineTuneStep,
             DistillStep, VerifyStep, EvaluateStep, SaveStep]
    lines = ["# Recipe reference", "",
             "Generated from `kmerge/recipe.py` by `python -m kmerge.recipe`; a test checks it "
             "is current. Unknown keys are errors. Relative paths start at the recipe's folder.",
             ""]

    def table(model) -> list[str]:
        rows = ["| key | type | default |", "|---|---|---|"]
        for name, f in model.model_fields.items():
            if name in ("base_dir", "kind"):
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

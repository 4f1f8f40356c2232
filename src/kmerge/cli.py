"""The ``kmerge`` command line. Holds no merge logic; Keras is imported only by the
subcommands that need it, so ``kmerge --help``, ``list``, ``schema`` and ``validate`` stay fast.

Exit codes: 0 success, 1 a kmerge error (one line ``error: ...`` on stderr, no traceback
unless ``--debug``) or a closed output pipe (``kmerge schema | head``: quiet), 2 usage,
130 interrupted (Ctrl-C: ``interrupted`` on stderr). Nothing is written when a command fails.
An unexpected exception (a bug) keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from kmerge.errors import InvalidArgumentError, KmergeError
from kmerge.metadata import meta_of

HEADS = ("classifier", "regressor")


_DATA_NAMES = {"digits": "sklearn:digits", "wine": "sklearn:wine",
               "breast_cancer": "sklearn:breast_cancer", "mnist_sample": "mnist_sample"}
_MODEL_HELP = ("a .keras or .h5 file, a SavedModel directory, or ARCH.json+WEIGHTS (a "
               "model.to_json() architecture and its save_weights file)")


def _paragraphs(text: str) -> str:
    """Wrap each blank-line separated paragraph of ``text`` (descriptions are shown raw)."""
    import shutil

    width = min(88, shutil.get_terminal_size().columns - 2)  # argparse's own width
    paras = [" ".join(p.split()) for p in textwrap.dedent(text).strip().split("\n\n")]
    return "\n\n".join(textwrap.fill(p, width=width) for p in paras)


def _global_options(subcommand: bool) -> argparse.ArgumentParser:
    """``--debug`` and ``-q``, accepted before and after the subcommand with one meaning (a
    subcommand's copy has no default, so it never resets what was given before it)."""
    g = argparse.ArgumentParser(add_help=False)
    extra = {"default": argparse.SUPPRESS} if subcommand else {}
    g.add_argument("--debug", action="store_true", help="show tracebacks for errors", **extra)
    g.add_argument("-q", "--quiet", action="store_true",
                   help="print only results, warnings and errors (no progress lines)", **extra)
    return g


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1)")
    return value


def _data_args(sp: argparse.ArgumentParser, *, train: bool) -> None:
    """``--data`` and its options: the data sources and options of a recipe's ``data:``."""
    g = sp.add_argument_group("data", _paragraphs(
        "A recipe's data: a built-in data set or a file, split into a training and a test set."
        if not train else
        "Train the merge's new parts (head, trainable adapters, learned combine) with fit_head "
        "on the training split, print the test scores of the sources and the merge, then "
        "save."))
    data = g.add_mutually_exclusive_group() if train else g
    data.add_argument(
        "--data", metavar="DATA",
        help="digits, wine, breast_cancer, mnist_sample (also sklearn:digits, ...), or a .npz "
             "(arrays x, y [, x_test, y_test]) or .csv (header row, label column y) file")
    if train:
        data.add_argument("--untrained", action="store_true",
                          help="without --data: save a merge with untrained parts as it is "
                               "(refused otherwise)")
    g.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe data: key (repeatable): test_size=0.3, shape=8,8,1, "
                        "scale=255, noise=0.1, x=NAME, y=NAME, x_test=NAME, y_test=NAME")
    g.add_argument("--seed", type=_seed, default=0,
                   help="seeds the split" + (", the new layers' initial weights and the batch "
                                             "order" if train else "") + " (default 0)")
    if train:
        g.add_argument("--epochs", type=_positive_int,
                       help="training epochs (default 10; needs --data)")
        g.add_argument("--batch-size", type=_positive_int,
                       help="training batch size (default 32; needs --data)")
        g.add_argument("--validation-split", type=_fraction, metavar="FRACTION",
                       help="hold out this last fraction of the training split to report "
                            "validation scores (default 0; needs --data)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kmerge", parents=[_global_options(False)],
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
            prog, max_help_position=30),
        description=_paragraphs("""
            Merge trained Keras models: side by side (parallel), by tapping intermediate
            layers (fuse), one after another (sequential), or in weight space (weights); check
            the result bit-exactly (verify); or do all of it from a YAML recipe (run).
            `kmerge COMMAND --help` describes each command, with examples."""),
        epilog=_paragraphs(f"""
            A MODEL is {_MODEL_HELP}. Exit codes: 0 ok, 1 error (one 'error: ...' line), 2
            usage, 130 interrupted. -q and --debug go before or after the command.""")
        + "\n\nexamples:\n  kmerge demo --out models\n"
          "  kmerge parallel models/model_a.h5 models/model_b.keras -o merged.keras "
          "--head classifier:10:64 --data digits\n  kmerge run examples/parallel.yaml -q")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    glob = _global_options(True)

    def command(name: str, summary: str, description: str, examples: str):
        sp = sub.add_parser(name, help=summary, description=_paragraphs(description),
                            epilog="examples:\n" + "\n".join(
                                "  " + line
                                for line in textwrap.dedent(examples).strip().splitlines()),
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            parents=[glob])
        sp.set_defaults(_parser=sp)
        return sp

    demo = command("demo", "train two models on digits, merge them three ways", """
        Train two different small models on scikit-learn's digits and save them (model_a.h5,
        model_b.keras, model_c.h5, denoiser.keras), merge them in parallel, by fusion and in
        sequence, train the heads, verify the frozen sources bit-exactly, and print a table of
        test accuracy. The saved models are the inputs of the examples and of the other
        commands' examples.""", """
        kmerge demo --out models
        kmerge demo --out models --epochs 5""")
    demo.add_argument("--out", metavar="DIR",
                      help="directory for the demo's files (default: a temporary directory)")
    demo.add_argument("--epochs", type=_positive_int, default=20,
                      help="training epochs of the demo models (default 20)")

    ins = command("inspect", "layers, shapes, parameters, repairs, tap points", """
        Load a model as kmerge does and print its format, the Keras version that saved it, the
        repairs applied while loading, a table of its layers (names, nested paths, output
        shapes, parameters) and suggested tap points for `kmerge fuse`.""", """
        kmerge inspect models/model_b.keras
        kmerge inspect models/model_a.h5 --json""")
    ins.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    ins.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ins.add_argument("--unsafe", action="store_true",
                     help="load with safe_mode=False: Lambda layers run their Python code "
                          "(only for files you trust)")

    def merge_common(sp):
        g = sp.add_argument_group("output")
        g.add_argument("-o", "--output", metavar="OUT",
                       help="where to save the merge (.keras); required unless --dry-run")
        g.add_argument("--overwrite", action="store_true", help="replace an existing OUT "
                       "(never a source file)")
        g.add_argument("--dry-run", action="store_true",
                       help="print the plan (branches, shapes, parameters), load no weights "
                            "into a new model, write nothing")
        sp.add_argument("--no-freeze", action="store_true",
                        help="leave the sources trainable (by default they are frozen and "
                             "reproduce their outputs bit-exactly)")
        _data_args(sp, train=True)

    seq = command("sequential", "chain models: each output feeds the next", """
        Chain models: the first model's output feeds the second, and so on (a feature
        extractor and a classifier, a denoiser and a classifier). Where shapes differ an
        adapter is inserted and reported (--adapter auto): Flatten/Reshape, pooling, Resizing,
        or a trainable Dense projection.

        A trainable adapter is untrained: give --data to train it (fit_head on the training
        split, then a table of test scores) or --untrained to save it as it is.""", """
        kmerge sequential models/denoiser.keras models/model_b.keras -o chain.keras
        kmerge sequential models/model_a.h5 models/model_b.keras -o chain.keras --data digits --epochs 5""")
    seq.add_argument("models", nargs="+", metavar="MODEL",
                     help="two or more models, in order (" + _MODEL_HELP + ")")
    seq.add_argument("--adapter", choices=("auto", "none"), default="auto",
                     help="auto: insert adapters where shapes differ (default); none: refuse")
    merge_common(seq)

    par = command("parallel", "models side by side, outputs combined", """
        Run models side by side on the same input and combine their outputs (--combine), with
        an optional trainable head on top (--head). The sources are frozen: only the head, a
        learned combine (learned_weights, gate) and adapters train.

        A merge with untrained parts is saved only after training (--data) or with
        --untrained. With --data the command trains those parts with fit_head on the training
        split and prints the test accuracy of every source and of the merge before saving.""",
        """
        kmerge parallel models/model_a.h5 models/model_b.keras -o merged.keras --head classifier:10:64 --data digits
        kmerge parallel models/model_a.h5 models/model_b.keras -o avg.keras --combine average""")
    par.add_argument("models", nargs="+", metavar="MODEL",
                     help="two or more models (" + _MODEL_HELP + ")")
    par.add_argument("--combine", default="concat", metavar="OP",
                     help="how outputs are combined (default concat; kmerge list combine-ops)")
    par.add_argument("--head", metavar="SPEC",
                     help="a trainable head: classifier:N[:H1,H2,...] (N classes, hidden "
                          "sizes) or regressor:N[:H1,...]")
    par.add_argument("--weights", metavar="W1,W2",
                     help="comma-separated weights, one per model, for --combine weighted")
    par.add_argument("--adapter", choices=("auto", "none"), default="none",
                     help="auto: project unequal outputs to the first one's shape for "
                          "element-wise ops; none: refuse (default)")
    keep_help = ("a multi-task merge: the model outputs each source's own output(s), unchanged, "
                 "beside the new head ({a: ..., b: ..., head: ...}); --data trains and scores "
                 "the head")
    par.add_argument("--keep-outputs", action="store_true", help=keep_help)
    merge_common(par)

    fus = command("fuse", "tap intermediate layers, fuse them, add a head", """
        Feature fusion: tap intermediate layers of each model (MODEL:LAYER, several as
        MODEL:L1,L2), pool spatial maps to vectors (--pooling), combine them and add a head.
        Layers are names, indices (-2) or nested paths (block_1/conv); `kmerge inspect MODEL`
        lists them.

        A head is untrained: give --data to train it (fit_head on the training split, then a
        table of test scores) or --untrained to save it as it is.""", """
        kmerge fuse models/model_a.h5:-2 models/model_b.keras:conv2d_1 -o fused.keras --head classifier:10 --data digits
        kmerge fuse models/model_a.h5:-2 models/model_b.keras:1,-3 --head classifier:10 --dry-run""")
    fus.add_argument("taps", nargs="+", metavar="MODEL:LAYER[,LAYER]",
                     help="a model and the layers to tap: names, indices or nested paths")
    fus.add_argument("--combine", default="concat", metavar="OP",
                     help="how tapped features are combined (default concat)")
    fus.add_argument("--head", metavar="SPEC",
                     help="classifier:N[:H1,H2,...] or regressor:N[:H1,...]")
    fus.add_argument("--pooling", choices=("auto", "avg", "max", "none"), default="auto",
                     help="reduce spatial/sequence taps to vectors (default auto: average)")
    fus.add_argument("--keep-outputs", action="store_true", help=keep_help)
    merge_common(fus)

    prb = command("probe", "rank every layer of the models for fusion (linear probes)", """
        Which layers should `kmerge fuse` tap? Run each model once over the training split of
        --data with every layer as an output, pool each layer's output as fuse would, fit a
        linear (ridge) probe per layer and print the layers ranked by held-out accuracy (R^2
        for regression targets), then the best combinations of layers of different models.
        The test split is not used. `kmerge fuse MODEL:LAYER ...` builds the best one, or
        fuse(..., taps="auto") in Python and `taps: auto` in a recipe.""", """
        kmerge probe models/model_a.h5 models/model_b.keras --data digits
        kmerge probe models/model_a.h5 models/model_b.keras --data digits --json
        kmerge probe models/model_b.keras --data digits --report probe-report""")
    prb.add_argument("models", nargs="+", metavar="MODEL",
                     help="one or more models (" + _MODEL_HELP + ")")
    prb.add_argument("--json", action="store_true", help="print JSON instead of tables")
    prb.add_argument("--report", metavar="DIR",
                     help="also write probe.md, probe.json and probe.png (score against "
                          "depth) into DIR")
    prb.add_argument("--pooling", choices=("auto", "avg", "max", "none"), default="auto",
                     help="how maps and sequences become vectors, as in fuse (default auto: "
                          "average; none: flatten)")
    prb.add_argument("--top", type=_positive_int, default=3,
                     help="layers per model that enter the combination search (default 3)")
    prb.add_argument("--validation-split", type=_fraction, default=0.2, metavar="FRACTION",
                     help="part of the training split that scores the probes (default 0.2)")
    _data_args(prb, train=False)

    wts = command("weights", "weight-space merge of same-architecture models", """
        Merge models of one architecture into one model of that architecture: averaging
        (linear), slerp, task arithmetic, TIES, DARE, Fisher, RegMean, greedy soup. --align
        permutes hidden units to match the first model before merging; --repair recomputes
        normalisation statistics afterwards.

        --data gives the data that fisher, regmean, greedy_soup, --align activations and
        --repair need (its training split); with labels the accuracy of every source and of
        the result is recorded in the model and printed on the test split.""", """
        kmerge weights models/model_a.h5 models/model_c.h5 -o soup.keras --method linear
        kmerge weights models/model_a.h5 models/model_c.h5 -o soup.keras --method linear --align weights --repair repair --data digits""")
    wts.add_argument("models", nargs="+", metavar="MODEL",
                     help="two or more models of one architecture (" + _MODEL_HELP + ")")
    wts.add_argument("--method", required=True,
                     help="merge method (kmerge list methods)")
    wts.add_argument("--base", metavar="MODEL",
                     help="the pretrained base model (task_arithmetic, ties, dare)")
    wts.add_argument("--align", choices=("weights", "activations", "zip", "auto"),
                     help="permute hidden units to match the first model first "
                          "(activations needs --data)")
    wts.add_argument("--repair", choices=("bn", "repair"),
                     help="after merging, recompute BatchNorm statistics (bn) or REPAIR "
                          "statistics (repair) on --data")
    wts.add_argument("--weights", metavar="W1,W2",
                     help="comma-separated weights, one per model (normalised to sum 1; "
                          "default uniform)")
    wts.add_argument("--param", action="append", default=[], metavar="K=V",
                     help="method parameter, e.g. --param density=0.2 (repeatable)")
    g = wts.add_argument_group("output")
    g.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="where to save the result (.keras)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT (never a source file)")
    _data_args(wts, train=False)

    recipes = {
        "run": ("run a YAML recipe", """
            Run a YAML recipe: load its models and data, execute its steps in order (merge,
            train, verify, evaluate, save). Everything is checked before any work, and outputs
            appear only when every step succeeded: a failed run writes nothing.""", """
            kmerge run examples/parallel.yaml
            kmerge run examples/parallel.yaml -o out --report out/report -q"""),
        "validate": ("check a recipe, load nothing", """
            Check a whole recipe without loading a model or importing Keras: keys, names,
            references, combine ops, methods and their parameters, files, and every output the
            run would write.""", """
            kmerge validate examples/parallel.yaml
            kmerge validate examples/parallel.yaml -o out --report out/report"""),
        "plan": ("validate a recipe and print each merge's plan", """
            Validate a recipe, load its models and print the plan of each merge step
            (branches, shapes, parameters, adapters) and the other steps' settings; trains and
            writes nothing.""", """
            kmerge plan examples/fuse.yaml"""),
    }
    for name, (summary, description, examples) in recipes.items():
        r = command(name, summary, description, examples)
        r.add_argument("recipe", metavar="RECIPE", help="a YAML recipe file (kmerge schema)")
        if name in ("run", "validate"):  # validate checks the outputs run would write
            r.add_argument("-o", "--output-dir", metavar="DIR",
                           help="save outputs here (an existing folder) instead of the "
                                "recipe's paths")
            r.add_argument("--report", metavar="DIR",
                           help="write report.md, figures and report.json here (needs data:)")

    ver = command("verify", "check a saved merge against its source files", """
        Check that a saved merge reproduces its frozen sources bit-exactly on probe inputs.
        Name each source as it is named in the merge (NAME=PATH), or give the path the merge
        recorded. Prints a table of checks; exit 1 when a check fails.""", """
        kmerge verify merged.keras models/model_a.h5 models/model_b.keras
        kmerge verify merged.keras model_a=copy_of_a.h5 model_b=models/model_b.keras --json""")
    ver.add_argument("merged", metavar="MERGED", help="a merge saved by kmerge")
    ver.add_argument("sources", nargs="+", metavar="[NAME=]PATH",
                     help="its sources, by the merge's name for them or by recorded path")
    ver.add_argument("--json", action="store_true", help="print JSON instead of a table")

    lst = command("list", "list methods, combine ops or heads, with descriptions", """
        List the weight-merge methods, the combine ops or the heads, each with a one-line
        description.""", """
        kmerge list methods
        kmerge list combine-ops""")
    lst.add_argument("what", choices=("methods", "combine-ops", "heads"),
                     help="what to list")

    command("schema", "print the recipe JSON Schema", """
        Print the JSON Schema of a recipe (for editors and validators).""", """
        kmerge schema > recipe.schema.json""")
    return p


# -- helpers -----------------------------------------------------------------------------------
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


def _names(paths: Sequence[str]) -> dict[str, str]:
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


def _files(texts: Sequence[str]) -> list[str]:
    """Every file the model arguments name (architectures and weights)."""
    return [p for t in texts for p in model_arg(t) if p]


def _check_sources(texts: Sequence[str]) -> None:
    """Every model file named exists (the load's own error otherwise), before data loads."""
    from kmerge.io import check_exists

    for path in _files(texts):
        check_exists(path)


def _load_one(text: str, *, safe_mode: bool = True):
    from kmerge.io import load

    path, weights = model_arg(text)
    return load(path, safe_mode=safe_mode, weights=weights)


def _check_output(path: str, overwrite: bool, sources: Sequence[str]) -> None:
    """Fail before any work when the output cannot be written."""
    target = Path(path).expanduser().resolve()
    if any(target == Path(s).expanduser().resolve() for s in _files(sources)):
        raise InvalidArgumentError(f"-o {path} is one of the source files; choose another path")
    if target.exists() and not overwrite:
        raise InvalidArgumentError(f"{path} exists; pass --overwrite to replace it")
    if not target.parent.is_dir():
        raise InvalidArgumentError(f"directory {target.parent} does not exist; create it first")


def _load_all(paths: dict[str, str]) -> dict:
    return {n: _load_one(p) for n, p in paths.items()}


def _data_spec(args):
    """The recipe ``DataSpec`` for ``--data``/``--data-option``/``--seed`` (None without
    ``--data``)."""
    from pydantic import ValidationError

    from kmerge.recipe import DataSpec

    if not args.data:
        if args.data_option:
            raise InvalidArgumentError("--data-option needs --data")
        return None
    fields = {"source": _DATA_NAMES.get(args.data, args.data), "seed": args.seed}
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
        names = ", ".join(_DATA_NAMES)
        raise InvalidArgumentError(f"--data {args.data}: {problems} (built-in: {names})") \
            from None


class _Here:
    """What ``runner.load_data`` needs of a recipe: data files relative to the working
    directory."""

    @staticmethod
    def path_of(relative: str) -> Path:
        return Path(relative).expanduser()


def _load_data(args, echo):
    """``--data`` loaded and split exactly as a recipe's ``data:`` (None without it)."""
    spec = _data_spec(args)
    if spec is None:
        return None
    from kmerge.runner import load_data, split_note

    data = load_data(spec, _Here())
    echo(f"data: {spec.source}: {len(data.x_train)} train / {len(data.x_test)} test")
    note = split_note(spec)
    if note is not None:
        echo(f"note: {note}")
    return data


def _check_training_args(args) -> None:
    """Training options without ``--data`` would be ignored: refuse them."""
    given = [flag for flag, value in (("--epochs", args.epochs),
                                      ("--batch-size", args.batch_size),
                                      ("--validation-split", args.validation_split))
             if value is not None]
    if given and not args.data:
        raise InvalidArgumentError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} "
                                   "--data (the data to train on), e.g. --data digits")


def untrained_parts(model) -> list[str]:
    """Names of the layers kmerge added to ``model`` (head, trainable adapters, learned
    combine weights or gate) that have trainable weights: they start from random or uniform
    values and need training. Source layers (trained, also when not frozen) are not listed."""
    meta = meta_of(model) or {}
    source_layers = {name for src in meta.get("sources", {}).values()
                     for name in src.get("layers", [])}
    return [layer.name for layer in model.layers
            if layer.trainable_weights and layer.name not in source_layers]


def _short_list(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _train(model, data, args, echo) -> None:
    """``kmerge.fit_head`` on the training split (last ``--validation-split`` held out)."""
    import time

    import kmerge
    from kmerge.runner import inputs_for

    parts = untrained_parts(model)
    if not model.trainable_weights:
        echo("nothing to train (no head, trainable adapter or learned combine): "
             "evaluating only")
        return
    x, y = data.x_train, data.y_train
    validation = None
    if args.validation_split:
        n_val = int(round(len(x) * args.validation_split))
        if n_val < 1 or n_val >= len(x):
            raise InvalidArgumentError(
                f"--validation-split {args.validation_split} leaves {len(x) - n_val} training "
                f"and {n_val} validation examples of {len(x)}; choose another fraction")
        x, y, xv, yv = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]
        validation = (inputs_for(model, xv), yv)
    epochs = args.epochs or 10
    unfrozen = any(layer.trainable_weights and layer.name not in parts
                   for layer in model.layers)  # --no-freeze: the sources train too
    what = " and ".join(filter(None, [_short_list(parts) if parts else "",
                                      "the unfrozen sources" if unfrozen else ""]))
    echo(f"training {what}: {epochs} epochs on {len(x)} examples"
         + (f" ({len(validation[1])} held out for validation)" if validation else ""))
    t0 = time.perf_counter()
    history = kmerge.fit_head(model, inputs_for(model, x), y, epochs=epochs,
                              batch_size=args.batch_size or 32, validation_data=validation,
                              seed=args.seed, verbose=0)
    last = ", ".join(f"{k} {v[-1]:.4f}" for k, v in history.history.items() if v)
    echo(f"trained in {time.perf_counter() - t0:.1f} s: {last}")


def _evaluate(model, sources: dict, data, label: str) -> None:
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


def _finish(model, args, echo, sources: dict, data) -> int:
    """Print the plan (``--dry-run``), or train and evaluate (``--data``), refuse untrained
    parts (neither ``--data`` nor ``--untrained``), and save."""
    import kmerge

    if args.dry_run:
        print(model)
        return 0
    for step in meta_of(model).get("adapters", []):
        echo(f"adapter {step['where']}: {step['step']}")
    parts = untrained_parts(model)
    if data is not None:
        _train(model, data, args, echo)
        _evaluate(model, sources, data, "merged")
    elif parts and not args.untrained:
        raise InvalidArgumentError(
            f"not saving {args.output}: the merge has untrained parts ({_short_list(parts)}); "
            "pass --data DATA to train them first (a built-in name such as digits, or a .npz "
            "or .csv file), or --untrained to save it as it is")
    saved = kmerge.save(model, args.output, overwrite=args.overwrite)
    if parts and data is None:
        _warn(f"saved {saved} with untrained parts ({_short_list(parts)}): train them "
              "before use (this command with --data, or kmerge.fit_head)")
    else:
        echo(f"saved {saved}")
    return 0


def _prepare(args, echo, sources: Sequence[str]):
    """Checks before any work (output, training options), ``--seed``, and the data."""
    _check_training_args(args)
    if args.dry_run:
        if args.data:
            echo("--dry-run: the plan only; --data is not loaded, nothing trains or is written")
        return None
    _check_output(args.output, args.overwrite, sources)
    _check_sources(sources)
    data = _load_data(args, echo)
    if data is not None or args.untrained:  # a merge that is saved: seed its new layers
        import keras

        keras.utils.set_random_seed(args.seed)
    return data


# -- commands ----------------------------------------------------------------------------------
def _demo(args, echo) -> int:
    from kmerge.demo import run

    run(args.out, epochs=args.epochs, echo=print)
    return 0


def _inspect(args, echo) -> int:
    from kmerge.inspect import summarize

    if args.unsafe:
        _warn(f"{args.model}: loading with safe_mode off (--unsafe): Lambda layers in it run "
              "their Python code; only for files you trust")
    summary = summarize(_load_one(args.model, safe_mode=not args.unsafe))
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary)
    return 0


def _sequential(args, echo) -> int:
    import kmerge

    data = _prepare(args, echo, args.models)
    models = _load_all(_names(args.models))
    m = kmerge.sequential(models, adapter=args.adapter, freeze=not args.no_freeze,
                          dry_run=args.dry_run)
    return _finish(m, args, echo, models, data)


def _parallel(args, echo) -> int:
    import kmerge

    weights = parse_weights(args.weights)
    head = parse_head(args.head, args.seed)
    data = _prepare(args, echo, args.models)
    models = _load_all(_names(args.models))
    m = kmerge.parallel(models, combine=args.combine, head=head, freeze=not args.no_freeze,
                        weights=weights, adapter=args.adapter, keep_outputs=args.keep_outputs,
                        dry_run=args.dry_run)
    return _finish(m, args, echo, models, data)


def _fuse(args, echo) -> int:
    import kmerge

    pairs = []
    for tap in args.taps:
        path, sep, layers = tap.rpartition(":")
        if not sep or not path or not layers:
            raise InvalidArgumentError(f"tap {tap!r}: use MODEL:LAYER or MODEL:LAYER1,LAYER2")
        refs = [int(r) if r.lstrip("-").isdigit() else r for r in layers.split(",")]
        pairs.append((path, refs))
    head = parse_head(args.head, args.seed)
    data = _prepare(args, echo, [p for p, _ in pairs])
    names = _names([p for p, _ in pairs])
    models = _load_all(names)
    taps = {n: (models[n], refs if len(refs) > 1 else refs[0])
            for n, (_, refs) in zip(names, pairs)}
    m = kmerge.fuse(taps, combine=args.combine, head=head, pooling=args.pooling,
                    freeze=not args.no_freeze, keep_outputs=args.keep_outputs,
                    dry_run=args.dry_run)
    return _finish(m, args, echo, models, data)


def _stream_plan(args) -> tuple[bool, str | None]:
    """Whether ``kmerge weights`` streams (``merge_weights_files``: tensor by tensor from
    the files, the models never loaded), and why not when the files could stream but the
    options need the live models (None: the inputs are not streamable files at all)."""
    from kmerge.weights.stream import NOT_STREAMABLE, STREAMABLE_SUFFIXES

    files = [*args.models, *([args.base] if args.base else [])]
    kinds = set()
    for text in files:
        path, weights = model_arg(text)
        kind = next((k for k in STREAMABLE_SUFFIXES if path.lower().endswith(k)), None)
        if weights is not None or kind is None:
            return False, None
        kinds.add(kind)
    if len(kinds) != 1 or not args.output.lower().endswith(next(iter(kinds))):
        return False, None
    needs = [why for cond, why in [
        (args.method in NOT_STREAMABLE, f"method {args.method} runs the models on data"),
        (args.align is not None, "--align permutes the loaded models"),
        (args.repair is not None, "--repair runs the merged model on data")] if cond]
    return (not needs), ("; ".join(needs) or None)


def _probe(args, echo) -> int:
    import kmerge
    from kmerge.runner import inputs_for

    if not args.data:
        raise InvalidArgumentError("kmerge probe needs labelled data: --data digits (or wine, "
                                   "breast_cancer, mnist_sample, a .npz or a .csv file)")
    if not args.validation_split:
        raise InvalidArgumentError("--validation-split must be above 0: the probes are scored "
                                   "on that part")
    if args.report:
        target = Path(args.report).expanduser().resolve()
        if any(target == Path(f).expanduser().resolve() for f in _files(args.models)):
            raise InvalidArgumentError(f"--report {args.report} is a source file; choose a "
                                       "folder")
        if target.exists() and not target.is_dir():
            raise InvalidArgumentError(f"--report {args.report} is an existing file; give a "
                                       "folder")
    if args.json:  # stdout is the JSON document alone
        def echo(text: str) -> None:
            pass
    _check_sources(args.models)
    data = _load_data(args, echo)
    models = _load_all(_names(args.models))
    x = {n: inputs_for(m, data.x_train) for n, m in models.items()}
    echo(f"probing {len(models)} model(s) on the training split ({len(data.x_train)} "
         "examples)")
    if args.quiet or args.json:
        result = kmerge.probe(models, x, data.y_train, pooling=args.pooling, seed=args.seed,
                              top=args.top, validation_split=args.validation_split)
    else:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("probing", total=None)

            def progress(what: str, done: int, total: int) -> None:
                bar.update(task, description=what, completed=done, total=total)

            result = kmerge.probe(models, x, data.y_train, pooling=args.pooling,
                                  seed=args.seed, top=args.top,
                                  validation_split=args.validation_split, progress=progress)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    if args.report:
        from kmerge.report import write_probe_report

        echo(f"report: {write_probe_report(args.report, result)}")
    return 0


def _weights(args, echo) -> int:
    import warnings

    import kmerge

    params = parse_params(args.param, args.method)
    flags = {"data": "--data", "repair": "--repair", "align": "--align", "base": "--base",
             "weights": "--weights", "method": "--method"}
    for key in params.keys() & flags.keys():  # merge_weights' own arguments, not the method's
        raise InvalidArgumentError(f"--param {key}=...: {key!r} is not a parameter of method "
                                   f"{args.method!r}; use {flags[key]}")
    weights = parse_weights(args.weights)
    _check_output(args.output, args.overwrite, [*args.models, *([args.base] if args.base else [])])
    _check_sources([*args.models, *([args.base] if args.base else [])])
    stream, why_not = _stream_plan(args)
    data = _load_data(args, echo)
    sources = _names(args.models)
    if stream:
        from kmerge.weights import merge_weights_files

        echo(f"streaming: {args.method} merge tensor by tensor from the files, without "
             "loading the models")
        out = merge_weights_files(args.models, args.output, method=args.method,
                                  base=args.base, weights=weights, overwrite=args.overwrite,
                                  **params)
        if data is not None:  # the evaluation loads the result and the sources
            _evaluate(_load_one(str(out)), {n: _load_one(p) for n, p in sources.items()}, data,
                      "merged")
        echo(f"saved {out}")
        return 0
    if why_not:
        echo(f"not streaming (the models are loaded): {why_not}")
    models = {n: _load_one(p) for n, p in sources.items()}
    base = _load_one(args.base) if args.base else None
    train = (data.x_train, data.y_train) if data is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = kmerge.merge_weights(list(models.values()), method=args.method, base=base,
                                 weights=weights, align=args.align, repair=args.repair,
                                 data=train, **params)
    for w in caught:  # kmerge's own warnings (a collapsed merge) as warning lines
        if type(w.message).__module__.startswith("kmerge"):
            _warn(_one_line(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if data is not None:
        _evaluate(m, models, data, "merged")
    echo(f"saved {kmerge.save(m, args.output, overwrite=args.overwrite)}")
    return 0


def _validate(args, echo) -> int:
    from kmerge.recipe import check_outputs, load_recipe, unsafe_warnings

    recipe = load_recipe(args.recipe)
    outputs = check_outputs(recipe, out_dir=args.output_dir, report=args.report)
    for line in unsafe_warnings(recipe):
        _warn(line)
    echo(f"{args.recipe}: OK ({len(recipe.models)} models, {len(recipe.steps)} steps: "
         f"{', '.join(s.kind for s in recipe.steps)})")
    for t in outputs.saves:
        echo(f"  steps[{t.step}] writes {t.path}" + (" (overwrite)" if t.overwrite else ""))
    if outputs.report is not None:
        echo(f"  --report writes {outputs.report}")
    return 0


def _plan(args, echo) -> int:
    import kmerge
    from kmerge.recipe import load_recipe, unsafe_warnings
    from kmerge.runner import build_head, freeze_arg

    recipe = load_recipe(args.recipe)
    for line in unsafe_warnings(recipe):
        _warn(line)
    models = {n: kmerge.load(**recipe.load_args(n)) for n in recipe.models}
    for i, step in enumerate(recipe.steps):
        if step.kind == "fuse" and step.taps == "auto":  # chosen on the data at run time
            print(f"steps[{i}]: fuse with taps chosen by kmerge.probe when the recipe runs "
                  + json.dumps(step.model_dump(exclude={"kind"}, exclude_none=True),
                               default=str))
        elif step.kind in ("sequential", "parallel", "fuse"):
            common = {"freeze": freeze_arg(step.freeze), "dry_run": True, "verify": False,
                      "name": step.name or f"step_{i}"}
            if step.kind == "sequential":
                plan = kmerge.sequential({m: models[m] for m in step.models},
                                         adapter=step.adapter, **common)
            elif step.kind == "parallel":
                plan = kmerge.parallel({m: models[m] for m in step.models},
                                       combine=step.combine, head=build_head(step.head),
                                       weights=step.weights, output=step.output,
                                       share_inputs=step.share_inputs, adapter=step.adapter,
                                       keep_outputs=step.keep_outputs, **common)
            else:
                plan = kmerge.fuse({m: (models[m], r) for m, r in step.taps.items()},
                                   combine=step.combine, head=build_head(step.head),
                                   pooling=step.pooling, share_inputs=step.share_inputs,
                                   adapter=step.adapter, keep_outputs=step.keep_outputs, **common)
            print(f"steps[{i}]: {plan}")
        else:
            print(f"steps[{i}]: {step.kind} " + json.dumps(
                step.model_dump(exclude={"kind"}, exclude_none=True), default=str))
    return 0


def _run(args, echo) -> int:
    from kmerge.recipe import load_recipe
    from kmerge.runner import run

    recipe = load_recipe(args.recipe)
    # run() checks every output (and --report's need for data) before any work
    run(recipe, echo=echo, out=args.output_dir, report=args.report, warn=_warn, show=print)
    return 0


def _verify(args, echo) -> int:
    from kmerge.verification import verify

    merged = _load_one(args.merged)
    meta = meta_of(merged) or {}
    by_path = {str(Path(v.get("path") or "").resolve()): n
               for n, v in meta.get("sources", {}).items() if v.get("path")}
    sources = {}
    for item in args.sources:
        name, sep, path = item.partition("=")
        if not sep:
            path = item
            name = by_path.get(str(Path(model_arg(item)[0]).resolve()))
            if name is None:
                raise InvalidArgumentError(
                    f"{item} is not recorded as a source of {args.merged}; name it as NAME=PATH "
                    f"(sources: {', '.join(meta.get('sources', {})) or 'none recorded'})")
        sources[name] = _load_one(path)
    from kmerge.errors import VerificationError

    try:
        report = verify(merged, sources)
    except VerificationError as exc:  # the table on stdout, the one-line error on stderr
        report = getattr(exc, "report", None)
        if report is None:
            raise
        _print_report(report, args.json)
        raise
    _print_report(report, args.json)
    return 0


def _print_report(report, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": report.ok, "checks": [
            {"source": c.source, "what": c.what, "shape": list(c.shape),
             "max_abs_diff": c.max_abs_diff} for c in report.checks]}, indent=2))
    else:
        print(report)


#: One line per combine op (kmerge.graph.combine registers them as lambdas and Keras layers,
#: which carry no description of their own); a test keeps it equal to the registry.
COMBINE_DESCRIPTIONS = {
    "add": "element-wise sum (equal shapes)",
    "average": "element-wise mean (equal shapes)",
    "concat": "concatenate along the last axis (shapes may differ there)",
    "gate": "trainable input-dependent softmax gate over the branches (a small mixture of "
            "experts; starts uniform)",
    "learned_weights": "one trainable softmax weight per branch (starts at the plain average)",
    "maximum": "element-wise maximum (equal shapes)",
    "minimum": "element-wise minimum (equal shapes)",
    "multiply": "element-wise product (equal shapes)",
    "stack": "stack the branches on a new axis (equal shapes)",
    "weighted": "fixed weighted sum, --weights W1,W2,... (normalised to sum 1)",
}


def _summary(doc: str | None) -> str:
    """The first paragraph of a docstring on one line, without reST markup."""
    first = (doc or "").strip().split("\n\n")[0].replace("``", "")
    return " ".join(re.sub(r":\w+:`~?([^`]*)`", r"\1", first).split())


def _docstring(module: str, function: str) -> str:
    """The docstring of ``module.function``, read from its source without importing it
    (``kmerge list`` never imports Keras)."""
    import ast
    import importlib.util

    origin = importlib.util.find_spec(module).origin
    tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return ast.get_docstring(node) or ""
    return ""


def descriptions(what: str) -> dict[str, str]:
    """``kmerge list``: each name with its one-line description, from the registries'
    docstrings (methods, heads) or :data:`COMBINE_DESCRIPTIONS`."""
    if what == "combine-ops":
        from kmerge.recipe import COMBINE_OPS

        return {n: COMBINE_DESCRIPTIONS.get(n, "") for n in COMBINE_OPS}
    if what == "heads":
        return {n: _summary(_docstring("kmerge.graph.heads", n))
                + f" [--head {n}:N[:H1,H2,...]]" for n in HEADS}
    import inspect

    from kmerge.recipe import WEIGHT_EXTRA_METHODS
    from kmerge.weights.methods import merge_methods, supplied_params

    out = {}
    for name in merge_methods.names():
        fn = merge_methods.get(name)
        supplied = supplied_params(fn)
        needs = [flag for flag, wanted in (("--base", "base" in supplied and supplied["base"]),
                                           ("--data", {"fishers", "grams"} & set(supplied)))
                 if wanted]
        out[name] = _summary(inspect.getdoc(fn)) + (f" [needs {', '.join(needs)}]"
                                                    if needs else "")
    for name in WEIGHT_EXTRA_METHODS:  # methods of merge_weights itself (_greedy_soup, ...)
        out[name] = _summary(_docstring("kmerge.weights.apply", f"_{name}")) + \
            " [needs --data with labels]"
    return dict(sorted(out.items()))


def _list(args, echo) -> int:
    items = descriptions(args.what)
    width = max(map(len, items))
    print("\n".join(f"{name.ljust(width)}  {text}".rstrip() for name, text in items.items()))
    return 0


def _schema(args, echo) -> int:
    from kmerge.recipe import schema

    print(json.dumps(schema(), indent=2))
    return 0


_COMMANDS = {
    "demo": _demo, "inspect": _inspect, "sequential": _sequential, "parallel": _parallel,
    "fuse": _fuse, "probe": _probe, "weights": _weights, "run": _run, "validate": _validate, "plan": _plan,
    "verify": _verify, "list": _list, "schema": _schema,
}


def _warn(text: str) -> None:
    """A warning line on stderr (also under --quiet)."""
    print(f"warning: {text}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 kmerge error, 2 usage,
    130 interrupted)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``kmerge schema | head``). Point stdout at devnull so the
        # interpreter's final flush does not fail again, and exit quietly (Python docs,
        # "Note on SIGPIPE").
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout replaced (tests): nothing to do
            pass
        return 1


_KERAS_FREE = {"list", "schema", "validate"}  # commands that never import Keras


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "dry_run", True) is False and not args.output:  # a merge command
            args._parser.error("the following arguments are required: -o/--output (or "
                               "--dry-run to print the plan only)")
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)

    def echo(text: str) -> None:
        if not args.quiet:
            print(text)

    try:
        if args.command not in _KERAS_FREE:
            from kmerge._backend import choose_backend

            choose_backend()  # an installed backend, whatever keras.json says (one-line note)
        code = _COMMANDS[args.command](args, echo)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except KmergeError as exc:
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

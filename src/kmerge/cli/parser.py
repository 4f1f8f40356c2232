"""The ``kmerge`` argument parser: every command, its options, help and examples."""

from __future__ import annotations

import argparse
import textwrap

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


def _checked(cast, ok, kind: str, need: str):
    """An argparse ``type``: ``cast(text)``, which must satisfy ``ok`` (messages name the
    text, ``kind`` when it does not parse and ``need`` when it is out of range)."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be {need}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "an integer", "at least 1")
_seed = _checked(int, lambda v: v >= 0, "an integer", "0 or more")
_fraction = _checked(float, lambda v: 0.0 <= v < 1.0, "a number", "in [0, 1)")


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


def build_parser() -> argparse.ArgumentParser:
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
            kmerge run examples/parallel.yaml -o out --report out/report -q
            kmerge run examples/parallel.yaml --report out/report --final a"""),
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
        if name == "run":
            r.add_argument("--final", metavar="NAME",
                           help="the model the report is about: a source or a step's name "
                                "(default: the model of the last step that builds one; needs "
                                "--report)")

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

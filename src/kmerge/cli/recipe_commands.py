"""``kmerge validate``, ``plan`` and ``run``: a YAML recipe checked (no Keras), planned, or
run."""

from __future__ import annotations

import json

from kmerge.cli.common import warn
from kmerge.errors import InvalidArgumentError


def _validate(args, echo) -> int:
    from kmerge.recipe import check_outputs, load_recipe, unsafe_warnings

    recipe = load_recipe(args.recipe)
    outputs = check_outputs(recipe, out_dir=args.output_dir, report=args.report)
    for line in unsafe_warnings(recipe):
        warn(line)
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
        warn(line)
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

    if args.final and not args.report:
        raise InvalidArgumentError(f"--final {args.final} chooses the model a report is about; "
                                   "pass --report DIR as well")
    recipe = load_recipe(args.recipe)
    # run() checks every output, --report's need for data and --final before any work
    run(recipe, echo=echo, out=args.output_dir, report=args.report, warn=warn, show=print,
        final=args.final)
    return 0


COMMANDS = {"validate": _validate, "plan": _plan, "run": _run}

"""Every example recipe in examples/ runs end to end on the models `kmerge demo` writes."""

import shutil
from pathlib import Path

import pytest

from kmerge.cli import main

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, demo_run):
    """A copy of examples/ with models/ made by `kmerge demo` (2 epochs: fast, still real;
    conftest's one demo run, copied)."""
    d = tmp_path_factory.mktemp("examples")
    for recipe in EXAMPLES.glob("*.yaml"):
        shutil.copy(recipe, d / recipe.name)
    shutil.copytree(demo_run[0], d / "models")
    return d


@pytest.mark.xdist_group("demo")
@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_runs(workdir, name, capsys):
    capsys.readouterr()
    assert main(["run", str(workdir / name)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "recipe done" in out
    saved = [line.split(" -> ")[-1] for line in out.splitlines() if line.startswith("saved ")]
    assert saved and all(Path(p).exists() for p in saved)

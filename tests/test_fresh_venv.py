"""README.md's Quickstart and "Using kmerge", followed literally: every command of their bash
blocks, in order, in one shell, in a copy of this working tree (tracked and unignored files only,
as a clone has them) with no venv yet and a fresh home folder (so no ~/.keras/keras.json). The
``merge.py`` block is saved where the README runs it. Each command must exit 0.

It installs kmerge twice from the package index (minutes), so it runs only when asked:
``make test-fresh`` (``KMERGE_FRESH_VENV=1``). The Quickstart's ``make test`` then runs the suite
on tests/test_recipe.py (through ``PYTEST_ARGS``, which the Makefile reads);
``make test-fresh FRESH=full`` runs the whole suite there. The structure checks below run
always, so the README cannot drop what the fresh run relies on.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from test_docs import blocks, sections  # noqa: E402

MODE = os.environ.get("KMERGE_FRESH_VENV", "")
SECTIONS = ("Quickstart", "Using kmerge")


def readme_steps() -> list[tuple[str, str]]:
    """("run", command line) and ("file", name, text) steps, in README order."""
    steps = []
    readme = sections(ROOT / "README.md")
    for name in SECTIONS:
        for language, body in re.findall(r"^```(bash|python)\n(.*?)^```", readme[name],
                                         flags=re.S | re.M):
            if language == "python":
                first = body.splitlines()[0]
                assert re.fullmatch(r"# [\w-]+\.py", first), (
                    f"README {name}: a python block starts with '# FILE.py', the file to save")
                steps.append(("file", first[2:], body))
                continue
            for line in body.splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    assert not line.rstrip().endswith("\\"), "one command per line, please"
                    steps.append(("run", line))
    return steps


def test_readme_steps_are_what_a_new_user_needs():
    """Runs always: the Quickstart and Using kmerge say what the fresh run checks."""
    runs = [s[1].split("#")[0].strip() for s in readme_steps() if s[0] == "run"]
    assert runs[:2] == ["make demo", "make test"]
    assert any(r.startswith(".venv/bin/kmerge ") for r in runs)
    assert "source .venv/bin/activate" in runs
    assert any(r.startswith("kmerge ") for r in runs[runs.index("source .venv/bin/activate"):])
    installs = [r for r in runs if "pip install" in r]
    assert installs and all(re.search(r"kmerge\[(jax|tensorflow|torch)", r) for r in installs)
    extras = re.findall(r"kmerge\[([\w,]+)\]", (ROOT / "README.md").read_text())
    declared = set(re.findall(r"^(\w+) = \[", (ROOT / "pyproject.toml").read_text(), re.M))
    assert extras and {e for x in extras for e in x.split(",")} <= declared
    files = [s for s in readme_steps() if s[0] == "file"]
    assert [f[1] for f in files] == ["merge.py"]
    assert any("merge.py" in r for r in runs[runs.index(next(r for r in runs if "pip install"
                                                              in r)):])
    assert blocks(sections(ROOT / "README.md")["Using kmerge"], "python")


def _copy_tree(dest: Path) -> None:
    """The working tree as a clone has it: tracked and unignored files (no .venv, no
    examples/models)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _script(clone: Path) -> str:
    lines = ["set -u", f"cd {clone}"]
    for step in readme_steps():
        if step[0] == "file":
            _, name, text = step
            assert "KMERGE_README_EOF" not in text
            lines += [f"echo '+ (save README block as {name})'",
                      f"cat > {name} <<'KMERGE_README_EOF'", text.rstrip("\n"), "KMERGE_README_EOF"]
            continue
        command = step[1]
        quoted = command.replace("'", "'\\''")
        lines += [f"echo '+ {quoted}'", command,
                  f"rc=$?; if [ $rc -ne 0 ]; then echo 'README command failed (exit '$rc'): "
                  f"{quoted}'; exit 1; fi"]
    lines.append("echo 'README: every command exited 0'")
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(not MODE, reason="minutes and the package index: `make test-fresh` "
                                     "(KMERGE_FRESH_VENV=1) runs it")
def test_readme_followed_literally_in_a_fresh_venv(tmp_path):
    clone = tmp_path / "kmerge"  # the folder `git clone` makes; "Using kmerge" refers to it
    clone.mkdir()
    _copy_tree(clone)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("KERAS_BACKEND", "KERAS_HOME", "VIRTUAL_ENV", "PYTHONPATH",
                        "KMERGE_FRESH_VENV", "PYTEST_ADDOPTS", "MAKEFLAGS", "MAKELEVEL")}
    # no venv's bin/ on PATH (this test runs inside one): the README must say how to reach it
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not (Path(p).parent / "pyvenv.cfg").exists())
    env["HOME"] = str(home)  # no ~/.keras/keras.json: as on a new machine
    cache = Path(os.environ.get("PIP_CACHE_DIR") or Path.home() / ".cache" / "pip")
    env["PIP_CACHE_DIR"] = str(cache)  # the machine's pip cache, not part of what is tested
    if MODE != "full":
        env["PYTEST_ARGS"] = "tests/test_recipe.py"
    script = tmp_path / "readme.sh"
    script.write_text(_script(clone))
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=3600, cwd=tmp_path)
    took = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    (tmp_path / "readme.log").write_text(out)  # all of it, for a failure
    print(out[-6000:])
    print(f"README followed in {took:.0f} s")
    assert proc.returncode == 0, out[-6000:]
    assert "README: every command exited 0" in proc.stdout
    assert "Traceback" not in out
    # the demo prints every file it writes and its accuracies
    for name in ("model_a.h5", "model_b.keras", "model_c.h5", "denoiser.keras",
                 "merged_parallel.keras"):
        assert re.search(rf"^wrote \S*examples/models/{re.escape(name)}: ", out, re.M), name
    assert re.search(r"B: CNN \(model_b\.keras\)\s+0\.\d{3}", out)
    assert re.search(r"parallel concat \+ head\s+0\.\d{3}", out)
    assert re.search(r"\d+ passed", out)  # make test
    assert "recipe done" in out  # kmerge run, make examples
    accuracy = re.search(r"test accuracy (0\.\d{3}); sources verified: True", out)  # merge.py
    assert accuracy and float(accuracy.group(1)) > 0.9, out[-3000:]
    # a fresh home's keras.json names tensorflow, which is not installed: the CLI says so
    assert "which is not installed; using 'jax' (set KERAS_BACKEND to choose)" in out
    assert (tmp_path / "my-project" / "merged.keras").exists()

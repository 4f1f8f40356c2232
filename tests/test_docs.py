"""The README runs as written, and every measured number in README.md and docs/ names the command
that produced it."""

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def sections(path: Path) -> dict[str, str]:
    """``{"## heading": text}`` for each second-level section of a Markdown file (fences kept)."""
    out: dict[str, list[str]] = {}
    current, fenced = "", False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            current = line[3:].strip()
        out.setdefault(current, []).append(line)
    return {k: "\n".join(v) + "\n" for k, v in out.items()}


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of ``language`` in ``text``."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def _demo_files(tmp_path, trained, digits):
    """model_a.h5, model_b.keras and model_c.h5 in ``tmp_path``, as `kmerge demo` writes them
    (model_c: A's architecture trained from another seed)."""
    import keras

    path_a, path_b = trained
    for p in (path_a, path_b):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    x, y, _, _ = digits
    keras.utils.set_random_seed(1)
    c = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                          keras.layers.Dense(32, activation="relu"),
                          keras.layers.Dense(10, activation="softmax")])
    c.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    c.fit(x, y, epochs=3, verbose=0)
    c.save(tmp_path / "model_c.h5")


def test_readme_tour_runs(trained, digits, tmp_path, capsys):
    _demo_files(tmp_path, trained, digits)
    x, y, _, _ = digits
    tour = blocks(sections(ROOT / "README.md")["A five-minute tour"], "python")
    assert len(tour) == 2
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace = {"x": x, "y": y}
        for i, block in enumerate(tour):
            exec(compile(block, f"README.md tour block {i}", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert namespace["soup"].count_params() == namespace["a"].count_params()
    assert len(namespace["history"].history["loss"]) == 3
    out = capsys.readouterr().out
    assert "kmerge verify: OK" in out and "kmerge parallel plan" in out
    assert "kmerge probe:" in out and "best:" in out  # the probe's table
    assert (tmp_path / "merged.keras").exists()
    # The comment under print(kmerge.info(s)["adapters"]) is what it prints.
    lines = tour[0].splitlines()
    at = next(i for i, line in enumerate(lines) if 'kmerge.info(s)["adapters"]' in line)
    comment = []
    for line in lines[at + 1:]:
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    assert comment, "the adapters comment is missing"
    assert ast.literal_eval(" ".join(comment)) == namespace["kmerge"].info(namespace["s"])["adapters"]
    assert str(ast.literal_eval(" ".join(comment))) in out


def test_readme_own_project_script_runs(trained, digits, tmp_path, capsys):
    """"Using kmerge"'s merge.py, run where the README runs it: a project beside the clone."""
    models = tmp_path / "kmerge" / "examples" / "models"
    models.mkdir(parents=True)
    _demo_files(models, trained, digits)
    project = tmp_path / "my-project"
    project.mkdir()
    using = sections(ROOT / "README.md")["Using kmerge"]
    (script,) = blocks(using, "python")
    assert script.startswith("# merge.py\n")
    cwd = os.getcwd()
    os.chdir(project)
    try:
        exec(compile(script, "README.md merge.py", "exec"), {"__name__": "__main__"})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    accuracy = re.search(r"test accuracy (0\.\d{3}); sources verified: True", out)
    # the test's models are conftest's (not the demo's): 0.889 on torch, 0.98 on jax after the
    # README's 5 epochs; an untrained head scores about 0.1
    assert accuracy and float(accuracy.group(1)) > 0.8, out
    assert (project / "merged.keras").exists()


# -- numbers and the commands that produce them -----------------------------------------------
# A backticked command: make, kmerge, a venv's program, python, a benchmark or test script.
COMMAND = re.compile(r"`(?:[A-Z_]+=\S+ )*(?:make |kmerge |\.venv/bin/|python3? |bench/bench_\w+\.py"
                     r"|tests/test_\w+\.py)")
# A measured-looking number: a decimal, a percentage, a ratio (3.2x), a time, 1e-6.
NUMBER = re.compile(r"(?<![\w.\-/=])(\d+(?:\.\d+)?e-\d+|\d+\.\d+(?:\s?%|x\b)?|\d+\s?%|\d+x\b"
                    r"|\d+(?:\.\d+)?\s?(?:s|ms|min|minutes?|seconds?)\b)")
# Versions of software are not measurements.
VERSION = re.compile(r"(?i)\b(?:keras(?: 2 / tf\.keras / tf_keras \()?|python|tf_keras|tf-keras|tf"
                     r"|sentinews|shakkala|pydantic|torch|jax|tensorflow|numpy)[ =<>≤]*"
                     r"\d+(?:\.\d+)*(?:\s?[-–/]\s?\d+(?:\.\d+)*)*|\b\d+\.\d+\.\d+")
WINDOW = (8, 3)  # a command this many lines before / after (an output block: around the block)
# Numbers that are specifications (defaults, limits, thresholds, arithmetic), not measurements:
# (file, text of the line).
SPECIFIED = [
    ("recipe-reference.md", "| "),  # generated from the code's defaults
    ("weights.md", "| `"),  # the method table's defaults
    ("weights.md", "below 0.75 times the worst source's accuracy"),  # the sanity threshold
    ("loading.md", "more than 100x"),  # archive limits
    ("report.md", "thresholded at 0.5"),
    ("training.md", "width 0.5 makes Dense and conv layers about 4x cheaper"),  # 0.5 ** 2
    ("alignment.md", "with weight 1e-3"),  # a constant of the activation-matching cost
    ("loading.md", "(2.0–2.15)"), ("loading.md", "(Keras 2 before 2.13"),  # versions in tables
    ("recipes.md", "YAML 1.1"),  # a version
]


def unsourced_numbers(path: Path) -> list[tuple[int, str, str]]:
    """(line, number, line text) for each measured-looking number in ``path`` with no command
    within WINDOW lines (output blocks count from their fences), nor in its section's heading
    or the WINDOW[1] lines after it; python/yaml/bash blocks are code, inline code spans are
    code, versions are not measurements."""
    lines = path.read_text().splitlines()
    fences, start = {}, None
    for i, line in enumerate(lines):
        if line.startswith("```"):
            if start is None:
                start = i
            else:
                fences.update({j: (start, i, lines[start][3:].strip()) for j in range(start, i + 1)})
                start = None
    found, heading = [], 0
    for i, line in enumerate(lines):
        lo, hi, language = fences.get(i, (i, i, None))
        if language is None and line.startswith("#"):
            heading = i
        if language in ("python", "yaml", "bash", "sh") or line.startswith("```"):
            continue
        if any(path.name == f and snippet in line for f, snippet in SPECIFIED):
            continue
        text = VERSION.sub("", line if language is not None else re.sub(r"`[^`]*`", "", line))
        window = "\n".join(lines[max(0, lo - WINDOW[0]):hi + 1 + WINDOW[1]])
        opening = "\n".join(lines[heading:heading + 1 + WINDOW[1]])  # a section's heading
        if COMMAND.search(window) or COMMAND.search(opening):
            continue
        found += [(i + 1, m.group(0), line.strip()) for m in NUMBER.finditer(text)]
    return found


def test_number_check_is_not_vacuous(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("# T\n\nMerging gives 0.983 against 0.985, in 79 s, 3.2x faster, 95%.\n")
    assert [n for _, n, _ in unsourced_numbers(doc)] == ["0.983", "0.985", "79 s", "3.2x", "95%"]
    doc.write_text("# T\n\n`kmerge demo` prints 0.983 against 0.985.\n\nKeras 3.12-3.14, `x=0.5`.\n")
    assert unsourced_numbers(doc) == []
    doc.write_text("# T\n\n" + "x\n" * 5 + "`make demo`:\n" + "\n" * 10 + "```\nA  0.959\n```\n")
    assert [n for _, n, _ in unsourced_numbers(doc)] == ["0.959"]
    doc.write_text("# T\n\n## `make demo`\n\n" + "x\n" * 20 + "It gives 0.959.\n")
    assert unsourced_numbers(doc) == []  # a section whose heading names the command
    # the real documents quote many numbers, all checked
    total = sum(len(NUMBER.findall(p.read_text())) for p in DOCS)
    assert total > 150


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_number_names_its_command(path):
    missing = unsourced_numbers(path)
    assert not missing, (f"{path.name}: numbers without the command that produced them within "
                         f"{WINDOW[0]} lines before or {WINDOW[1]} after (name it, or drop the "
                         "number):\n" + "\n".join(f"  line {i}: {n}: {t}" for i, n, t in missing))

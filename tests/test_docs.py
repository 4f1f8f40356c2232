"""The README's tour runs as written."""

import os
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_tour_runs(trained, digits, tmp_path, capsys):
    path_a, path_b = trained
    for p in (path_a, path_b):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    x, y, _, _ = digits
    block = _python_blocks(ROOT / "README.md")[0]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(block, "README.md", "exec"), {"x": x, "y": y})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "kmerge verify: OK" in out and "kmerge parallel plan" in out
    assert (tmp_path / "merged.keras").exists()

"""The README's tour runs as written."""

import os
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_tour_runs(trained, digits, tmp_path, capsys):
    import keras

    path_a, path_b = trained
    for p in (path_a, path_b):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    x, y, _, _ = digits
    # model_c.h5: A's architecture, trained from another seed (as `kmerge demo` writes it)
    keras.utils.set_random_seed(1)
    c = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                          keras.layers.Dense(32, activation="relu"),
                          keras.layers.Dense(10, activation="softmax")])
    c.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    c.fit(x, y, epochs=3, verbose=0)
    c.save(tmp_path / "model_c.h5")
    blocks = _python_blocks(ROOT / "README.md")
    assert len(blocks) == 2
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace = {"x": x, "y": y}
        for i, block in enumerate(blocks):
            exec(compile(block, f"README.md block {i}", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert namespace["soup"].count_params() == namespace["a"].count_params()
    assert len(namespace["history"].history["loss"]) == 3
    out = capsys.readouterr().out
    assert "kmerge verify: OK" in out and "kmerge parallel plan" in out
    assert (tmp_path / "merged.keras").exists()

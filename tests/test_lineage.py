"""Every model kmerge returns knows every file it was derived from, through every operation,
and ``kmerge.save`` refuses to overwrite any of them (the file's bytes stay as they were)."""

from __future__ import annotations

import hashlib

import keras
import numpy as np
import pytest
from conftest import mlp

import kmerge
from kmerge.errors import SaveError
from kmerge.weights import merge_weights_files


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def files(tmp_path):
    """Three same-architecture MLPs saved to disk (a base and two 'fine-tunes')."""
    paths = {}
    for i, name in enumerate(["base", "ft1", "ft2"]):
        paths[name] = kmerge.save(mlp(seed=i), tmp_path / f"{name}.keras")
    return paths


def _refuses(model, path):
    before = _digest(path)
    with pytest.raises(SaveError, match="never overwrites a source"):
        kmerge.save(model, path, overwrite=True)
    assert _digest(path) == before


def test_align_second_source_and_base_are_protected(files):
    a, b = kmerge.load(files["ft1"]), kmerge.load(files["ft2"])
    merged = kmerge.merge_weights([a, b], method="linear", align="weights")
    _refuses(merged, files["ft2"])  # the aligned copy of b has no file of its own
    _refuses(merged, files["ft1"])
    tv = kmerge.merge_weights([a, b], method="task_arithmetic",
                              base=kmerge.load(files["base"]))
    _refuses(tv, files["base"])


def test_grandparents_are_protected_in_memory_and_through_disk(files, tmp_path):
    a, b, c = (kmerge.load(files[n]) for n in ("ft1", "ft2", "base"))
    child = kmerge.merge_weights([a, b], method="linear")
    grandchild = kmerge.merge_weights([child, c], method="linear")
    _refuses(grandchild, files["ft1"])
    saved = kmerge.save(child, tmp_path / "child.keras")
    from_disk = kmerge.merge_weights([kmerge.load(saved), c], method="linear")
    for name in ("ft1", "ft2", "base"):
        _refuses(from_disk, files[name])
    _refuses(from_disk, saved)
    assert set(kmerge.info(from_disk)["source_paths"]) == {
        str(p.resolve()) for p in (files["ft1"], files["ft2"], files["base"], saved)}


def test_streamed_merge_refuses_a_grandparent(files, tmp_path):
    child = kmerge.save(kmerge.merge_weights([kmerge.load(files["ft1"]),
                                              kmerge.load(files["ft2"])], method="linear"),
                        tmp_path / "child.keras")
    before = _digest(files["ft1"])
    with pytest.raises(SaveError, match="never overwrites a source"):
        merge_weights_files([child, files["base"]], files["ft1"], method="linear",
                                   overwrite=True)
    assert _digest(files["ft1"]) == before


def test_graph_merges_stitch_and_distill_are_protected(files):
    a, b = kmerge.load(files["ft1"]), kmerge.load(files["ft2"])
    par = kmerge.parallel({"a": a, "b": b}, combine="average")
    _refuses(par, files["ft2"])
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, 64)
    st = kmerge.stitch(a, b, at=(1, 1), x=x, y=y, epochs=0, seed=0)
    _refuses(st, files["ft1"])
    _refuses(st, files["ft2"])
    student = kmerge.distill([a, b], mlp(seed=5, hidden=4), x, epochs=1, seed=0, verbose=0)
    _refuses(student, files["ft1"])
    _refuses(student, files["ft2"])


def test_lineage_survives_save_and_plain_results_without_files(tmp_path):
    a, b = mlp(seed=0), mlp(seed=1)  # never saved: nothing to protect, nothing recorded
    merged = kmerge.merge_weights([a, b], method="linear")
    assert kmerge.info(merged)["source_paths"] == []
    out = kmerge.save(merged, tmp_path / "m.keras")
    assert kmerge.save(merged, out, overwrite=True) == out  # its own output may be replaced
    assert isinstance(kmerge.load(out), keras.Model)


def test_the_weights_file_of_a_json_architecture_is_protected(tmp_path):
    import shutil
    from pathlib import Path

    data = Path(__file__).parent / "data" / "legacy"
    arch = shutil.copy(data / "keras2_arch.json", tmp_path / "arch.json")
    weights = shutil.copy(data / "keras2_arch_weights.h5", tmp_path / "weights.h5")
    model = kmerge.load(arch, weights=weights)
    merged = kmerge.merge_weights([model, kmerge.load(arch, weights=weights)], method="linear")
    _refuses(merged, Path(weights))


@pytest.mark.parametrize("fmt", [".keras", ".h5"])
def test_sources_loaded_with_plain_keras_are_recognised_by_their_weights(tmp_path, fmt):
    paths = [tmp_path / f"a{fmt}", tmp_path / f"b{fmt}", tmp_path / f"base{fmt}"]
    for i, p in enumerate(paths):
        mlp(seed=i).save(p)
    a, b, base = (keras.models.load_model(p, compile=False) for p in paths)  # no path recorded
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    made = {
        "parallel": kmerge.parallel({"a": a, "b": b}, combine="average"),
        "merge": kmerge.merge_weights([a, b], method="task_arithmetic", base=base),
        "merge of merge": kmerge.merge_weights(
            [kmerge.merge_weights([a, b], method="linear"), a], method="linear"),
        "student": kmerge.distill([a, b], mlp(seed=7, hidden=4), x, epochs=1, seed=0,
                                  verbose=0),
    }
    for what, model in made.items():
        for p in (paths[:2] if what != "merge" else paths):
            _refuses(model, p)
        out = tmp_path / f"{what.replace(' ', '_')}{fmt}"
        kmerge.save(model, out)
        kmerge.save(model, out, overwrite=True)  # its own earlier save may be replaced

"""kmerge inspect: the # column is the index taps accept; merged files show what kmerge knows."""

from __future__ import annotations

import json

from conftest import cnn, mlp

import kmerge
from kmerge.cli import main
from kmerge.graph.replay import resolve_ref
from kmerge.inspect import summarize


def test_index_column_is_what_a_tap_by_index_resolves_to():
    for model in (cnn(), mlp()):
        rows = [r for r in summarize(model).layers if r.index is not None]
        assert [r.index for r in rows] == list(range(len(model.layers)))
        for r in rows:
            assert resolve_ref(model, r.index, source="m")[0].name == r.path
    assert summarize(cnn()).layers[0].type == "InputLayer"  # index 0 of a Functional model


def test_inspect_shows_kmerge_metadata_of_a_saved_merge(tmp_path, capsys):
    a = kmerge.save(mlp(seed=0), tmp_path / "a.keras")
    b = kmerge.save(mlp(seed=1), tmp_path / "b.keras")
    merged = kmerge.parallel([kmerge.load(a), kmerge.load(b)], combine="average")
    path = kmerge.save(merged, tmp_path / "m.keras")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "made by kmerge: parallel, combine average" in out
    assert f"from {a}" in out and "kmerge.save never overwrites these" in out
    assert out.splitlines()[4].split()[0] == "#"  # the header of the layer table
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kmerge"]["kind"] == "parallel" and data["layers"][0]["index"] == 0

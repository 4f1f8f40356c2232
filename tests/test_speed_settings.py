"""tests/_speed.py, the suite's own speed settings: the cache folder stays bounded, and the
fast-codegen flags are added only where the installed jaxlib defines them."""

from __future__ import annotations

import os

import _speed


def test_prune_deletes_the_oldest_entries_down_to_half(tmp_path):
    sizes = {}
    for i in range(10):
        f = tmp_path / f"jit_f{i}-cache"
        f.write_bytes(b"x" * 100)
        os.utime(f, (1000 + i, 1000 + i))  # f0 written first
        sizes[f.name] = 100
    assert _speed.prune(tmp_path, max_bytes=2000) == 0  # under the bound: nothing deleted
    assert len(list(tmp_path.iterdir())) == 10
    assert _speed.prune(tmp_path, max_bytes=800) == 600  # down to 400 = half of 800
    assert sorted(f.name for f in tmp_path.iterdir()) == [f"jit_f{i}-cache" for i in range(6, 10)]
    assert _speed.prune(tmp_path / "missing", max_bytes=1) == 0


def test_fast_codegen_flags_only_where_jaxlib_knows_them(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.delenv("KMERGE_TEST_XLA_FAST", raising=False)
    monkeypatch.setattr(_speed, "_jaxlib_knows", lambda flag: False)
    assert _speed.fast_codegen()
    assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=1 "
                                       "--xla_backend_optimization_level=0")
    assert not _speed.fast_codegen()  # already chosen: flags are not added twice
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(_speed, "_jaxlib_knows", lambda flag: True)
    assert _speed.fast_codegen()
    assert os.environ["XLA_FLAGS"].split() == ["--xla_backend_optimization_level=0",
                                               "--xla_cpu_use_fusion_emitters=false"]
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("KMERGE_TEST_XLA_FAST", "0")
    assert not _speed.fast_codegen() and os.environ["XLA_FLAGS"] == ""


def test_jaxlib_knows_reads_the_installed_library():
    import importlib.util

    if importlib.util.find_spec("jaxlib") is None:
        assert not _speed._jaxlib_knows("xla_backend_optimization_level")
        return
    # a flag every jaxlib since 0.4 defines, and one that no jaxlib defines
    assert _speed._jaxlib_knows("xla_backend_optimization_level")
    assert not _speed._jaxlib_knows("xla_kmerge_no_such_flag_" + "x" * 8)

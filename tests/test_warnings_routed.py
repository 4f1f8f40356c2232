"""kmerge._warnings.routed: kmerge's own warnings as lines for the CLI and recipe runs."""

from __future__ import annotations

import warnings

import pytest

from kmerge._warnings import routed
from kmerge.weights.apply import MergeCollapseWarning


def test_kmerge_warnings_become_lines_and_others_stay_warnings():
    lines: list[str] = []
    with pytest.warns(RuntimeWarning, match="not kmerge's"):
        with routed(lines.append, "steps[2] (weights): "):
            warnings.warn("the merge collapsed:\n  accuracy 0.1", MergeCollapseWarning, stacklevel=1)
            warnings.warn("not kmerge's", RuntimeWarning, stacklevel=1)
    assert lines == ["steps[2] (weights): the merge collapsed:; accuracy 0.1"]


def test_what_was_warned_before_an_error_is_still_said():
    lines: list[str] = []
    with pytest.raises(ValueError, match="later"):
        with routed(lines.append):
            warnings.warn("collapsed", MergeCollapseWarning, stacklevel=1)
            raise ValueError("later")
    assert lines == ["collapsed"]


def test_a_warning_repeated_in_a_loop_is_said_once():
    lines: list[str] = []
    with pytest.warns(RuntimeWarning) as record:
        with routed(lines.append):
            for _ in range(5):
                warnings.warn("per batch", RuntimeWarning, stacklevel=1)
                warnings.warn("collapsed", MergeCollapseWarning, stacklevel=1)
    assert lines == ["collapsed"]
    assert [str(w.message) for w in record] == ["per batch"]

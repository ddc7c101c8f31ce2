"""Pause punctuation for Mandarin: the thresholds at their boundaries, and properties over random timings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.zh_punct import COMMA, PERIOD, is_punct, pause_mark, punctuate_by_pauses, strip_marks

MARKS = (COMMA, PERIOD)


@pytest.fixture(autouse=True)
def _lazy_modules_answer_scans():
    """Let hypothesis scan ``sys.modules`` after speechbrain was imported by another test.

    Hypothesis reads every loaded module's ``__file__``; speechbrain leaves lazy placeholder
    modules there whose attribute lookups import optional integrations (flair, k2) and raise
    ImportError when those are not installed. For dunder lookups, a failed lazy import is
    reported as the missing attribute it amounts to.
    """
    import sys

    mod = sys.modules.get("speechbrain.utils.importutils")
    if mod is None:
        yield
        return
    lazy = mod.LazyModule
    original = lazy.__getattr__

    def lookup(self, attr: str):
        try:
            return original(self, attr)
        except ImportError:
            if attr.startswith("__"):
                raise AttributeError(attr) from None
            raise

    lazy.__getattr__ = lookup
    try:
        yield
    finally:
        lazy.__getattr__ = original


def _two_chars(gap_s: float, first_end: float = 0.3) -> list[tuple[str, float, float]]:
    return [("好", 0.1, first_end), ("的", first_end + gap_s, first_end + gap_s + 0.2)]


@pytest.mark.parametrize(
    ("gap_s", "expected"),
    [(0.49, "好的"), (0.5, "好的"), (0.51, "好，的"), (0.99, "好，的"), (1.0, "好，的"), (1.01, "好。的")],
)
def test_boundaries(gap_s: float, expected: str) -> None:
    # Exactly 0.5 s is not "over 0.5 s": no mark. Exactly 1.0 s is not "over 1.0 s": a comma.
    assert punctuate_by_pauses(_two_chars(gap_s)) == expected


@pytest.mark.parametrize("first_end", [0.1, 0.3, 0.7, 1.3, 12.9, 3599.7])
def test_boundaries_survive_float_error(first_end: float) -> None:
    # start = end + gap computed in floats is off by an ulp or so; milliseconds absorb it.
    for gap_s, mark in [(0.5, ""), (1.0, COMMA), (0.501, COMMA), (1.001, PERIOD)]:
        assert punctuate_by_pauses(_two_chars(gap_s, first_end)) == f"好{mark}的", (first_end, gap_s)
    assert pause_mark(0.1 + 0.4) == "" and pause_mark(0.7 + 0.3) == COMMA


def test_custom_thresholds_and_marks() -> None:
    chars = _two_chars(0.35)
    assert punctuate_by_pauses(chars, comma_gap_s=0.3, period_gap_s=0.4) == "好，的"
    assert punctuate_by_pauses(chars, comma_gap_s=0.2, period_gap_s=0.3, period=".") == "好.的"
    with pytest.raises(ValueError):
        punctuate_by_pauses(chars, comma_gap_s=1.0, period_gap_s=0.5)
    with pytest.raises(ValueError):
        punctuate_by_pauses([("好", 1.0, 0.5)])


def test_recognizer_punctuation_removed_by_default() -> None:
    units = [("，", 0.0, 0.0), ("今天", 0.0, 0.4), ("，", 0.4, 0.4), ("天气", 0.6, 1.0), ("好？", 1.0, 1.2),
             ("我们", 2.5, 2.9), ("。", 2.9, 2.9)]
    assert punctuate_by_pauses(units) == "今天天气好。我们"


def test_recognizer_punctuation_replaced_at_pauses_when_kept() -> None:
    units = [("，", 0.0, 0.0), ("今天", 0.0, 0.4), ("，", 0.4, 0.4), ("天气", 0.6, 1.0), ("好？", 1.0, 1.2),
             ("我们", 2.5, 2.9), ("。", 2.9, 2.9)]
    # 0.2 s after 今天: no pause mark, the recogniser's comma stays; 1.3 s after 好: its ? becomes 。
    assert punctuate_by_pauses(units, keep_recognizer_punct=True) == "今天，天气好。我们。"
    # A run of recogniser marks collapses to one.
    assert punctuate_by_pauses([("对", 0, 0.2), ("！", 0.2, 0.2), ("？", 0.2, 0.2), ("吗", 0.3, 0.5)],
                               keep_recognizer_punct=True) == "对？吗"


def test_mixed_scripts_and_empty() -> None:
    units = [("我", 0.0, 0.2), ("用", 0.2, 0.4), ("python", 0.4, 0.9), ("and", 1.0, 1.2), ("ray", 1.2, 1.5),
             ("写", 2.1, 2.3)]
    assert punctuate_by_pauses(units) == "我用python and ray，写"
    assert punctuate_by_pauses([]) == ""
    assert punctuate_by_pauses([("。", 0, 0.1), ("  ", 0.1, 0.2)]) == ""


# -- properties -------------------------------------------------------------------------------

_HAN = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FA5)
_RECOGNIZER_MARKS = st.sampled_from(["，", "。", "？", "！", "、", ",", ".", "?"])


@st.composite
def _timed(draw: st.DrawFn, with_punct: bool) -> list[tuple[str, float, float]]:
    """Characters in time order with random gaps (overlaps, boundaries and long pauses included)."""
    n = draw(st.integers(0, 25))
    t = draw(st.floats(0, 100, allow_nan=False, allow_subnormal=False))
    units: list[tuple[str, float, float]] = []
    for _ in range(n):
        if with_punct and draw(st.booleans()):
            units.append((draw(_RECOGNIZER_MARKS), t, t))
            continue
        gap = draw(st.one_of(st.sampled_from([0.0, 0.49, 0.5, 0.51, 0.99, 1.0, 1.01]),
                             st.floats(-0.1, 3.0, allow_nan=False, allow_subnormal=False)))
        start = max(t + gap, 0.0)
        end = start + draw(st.floats(0.0, 0.5, allow_nan=False, allow_subnormal=False))
        units.append((draw(_HAN), start, end))
        t = end
    return units


def _marks_ok(text: str) -> None:
    assert not text or not is_punct(text[0]), text
    assert all(not (is_punct(a) and is_punct(b)) for a, b in zip(text, text[1:])), text


@settings(max_examples=300, deadline=None)
@given(_timed(with_punct=True), st.booleans())
def test_never_two_marks_in_a_row_none_at_start(units: list[tuple[str, float, float]], keep: bool) -> None:
    text = punctuate_by_pauses(units, keep_recognizer_punct=keep)
    _marks_ok(text)
    # The characters heard are all there, in order, and nothing else.
    assert "".join(ch for ch in text if not is_punct(ch)) == "".join(u[0] for u in units if not is_punct(u[0]))


@settings(max_examples=300, deadline=None)
@given(_timed(with_punct=False))
def test_marks_are_exactly_the_pauses(units: list[tuple[str, float, float]]) -> None:
    text = punctuate_by_pauses(units)
    # Gaps in whole milliseconds, as the module documents: timestamps rounded first.
    gaps_ms = [round(b[1] * 1000) - round(a[2] * 1000) for a, b in zip(units, units[1:])]
    expected = [PERIOD if g > 1000 else COMMA if g > 500 else "" for g in gaps_ms]
    assert [ch for ch in text if ch in MARKS] == [m for m in expected if m]
    assert strip_marks(text) == "".join(u[0] for u in units)


@settings(max_examples=200, deadline=None)
@given(st.floats(-1.0, 5.0, allow_nan=False, allow_subnormal=False), st.floats(0.0, 2.0, allow_nan=False, allow_subnormal=False))
def test_a_longer_pause_never_gets_a_weaker_mark(gap: float, extra: float) -> None:
    rank = {"": 0, COMMA: 1, PERIOD: 2}
    assert rank[pause_mark(gap)] <= rank[pause_mark(gap + extra)]

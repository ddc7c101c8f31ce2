"""Mandarin punctuation from the pauses between characters, the way Kimi-Audio labels Mandarin.

Kimi-Audio transcribes Mandarin with a recogniser that gives character-level timestamps and
then punctuates by the silence between consecutive characters: a gap over 0.5 s and under
1.0 s becomes a comma (，), a gap over 1.0 s a period (。). :func:`punctuate_by_pauses` is
that rule as one pure function, used by the transcribe stage on timed characters.

Boundary semantics (decided here, because the rule leaves them open):

* Gaps are compared in **integer milliseconds**: each timestamp is rounded to the nearest
  millisecond first, so float error (``0.1 + 0.4``) cannot move a gap across a threshold.
  Recognisers with character timestamps report whole milliseconds (or coarser frames), so
  nothing real is lost.
* A gap of **exactly 0.5 s gets no mark**: the rule says *over* 0.5 s.
* A gap of **exactly 1.0 s gets a comma**. The rule says "under 1.0 s" for a comma and "over
  1.0 s" for a period, so 1.0 s itself is in neither; a comma keeps the mapping monotone
  (a longer pause never gets a weaker mark than a shorter one) and still never gives a period
  to a pause that is not *over* 1.0 s.
* A gap of 0 or less (touching or overlapping characters) gets no mark.

So, with the defaults: ``gap <= 500 ms`` nothing, ``500 < gap <= 1000 ms`` ``，``, ``gap > 1000
ms`` ``。``.

The recogniser's own punctuation (documented choice): by default it is **removed**, so every
mark in the output comes from a pause, as in the recipe (whose recogniser emits none, and
whose marks carry no timing of their own). With ``keep_recognizer_punct=True`` a recogniser
mark survives where the pauses put none, and is **replaced** by the pause mark where they put
one; several marks at one point collapse to one. Either way the output never starts with a
mark and never has two marks in a row. A mark the recogniser put after the last character is
kept only with ``keep_recognizer_punct=True``; the pause rule adds none there (there is no
next character to measure a gap to).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence

COMMA = "\uff0c"  # ，
PERIOD = "\u3002"  # 。
#: A gap over this many seconds (and not over :data:`PERIOD_GAP_S`) becomes a comma.
COMMA_GAP_S = 0.5
#: A gap over this many seconds becomes a period.
PERIOD_GAP_S = 1.0

TimedUnit = tuple[str, float, float]
"""``(text, start_s, end_s)``: one recognised character (or token) and when it was spoken."""


def _ms(seconds: float) -> int:
    return int(round(float(seconds) * 1000.0))


def is_punct(ch: str) -> bool:
    """Whether one character is punctuation (Unicode category ``P*``).

    >>> is_punct("，"), is_punct("?"), is_punct("好"), is_punct("a")
    (True, True, False, False)
    """
    return unicodedata.category(ch).startswith("P")


def _is_cjk(ch: str) -> bool:
    # Scripts written without spaces: CJK ideographs, kana, hangul, CJK punctuation, full-width forms.
    name = unicodedata.name(ch, "")
    return name.startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "FULLWIDTH", "IDEOGRAPHIC", "BOPOMOFO"))


def pause_mark(gap_s: float, *, comma_gap_s: float = COMMA_GAP_S, period_gap_s: float = PERIOD_GAP_S,
               comma: str = COMMA, period: str = PERIOD) -> str:
    """The mark a pause of ``gap_s`` seconds gets: ``""``, ``comma`` or ``period``.

    The gap is compared in whole milliseconds (see the module docstring for the boundaries).

    >>> [pause_mark(g) for g in (0.49, 0.5, 0.51, 0.99, 1.0, 1.01)]
    ['', '', '，', '，', '，', '。']
    >>> pause_mark(0.1 + 0.4)  # 0.5000000000000001 s is 500 ms: no mark
    ''
    """
    return _mark_ms(_ms(gap_s), _ms(comma_gap_s), _ms(period_gap_s), comma, period)


def _mark_ms(gap_ms: int, comma_ms: int, period_ms: int, comma: str, period: str) -> str:
    if gap_ms > period_ms:
        return period
    if gap_ms > comma_ms:
        return comma
    return ""


def punctuate_by_pauses(
    units: Iterable[TimedUnit],
    *,
    comma_gap_s: float = COMMA_GAP_S,
    period_gap_s: float = PERIOD_GAP_S,
    comma: str = COMMA,
    period: str = PERIOD,
    keep_recognizer_punct: bool = False,
) -> str:
    """Join timed characters into text, with a mark at every long enough pause between them.

    Args:
        units: ``(text, start_s, end_s)`` in the order spoken: usually one character each;
            a multi-character token (an English word, a Whisper word) is one unit, timed as a
            whole. A unit made only of punctuation is the recogniser's own mark; punctuation
            at the edges of a unit is split off and treated the same way.
        comma_gap_s: a gap over this (and not over ``period_gap_s``) becomes ``comma``.
        period_gap_s: a gap over this becomes ``period``.
        comma: the comma mark (default full-width ``，``).
        period: the period mark (default ``。``).
        keep_recognizer_punct: keep the recogniser's marks where no pause mark goes (see the
            module docstring); by default every recogniser mark is removed.

    Returns:
        The text. Units are joined without spaces, except between two units that meet on
        non-CJK letters or digits (``"hello" "world"`` stays two words).

    Raises:
        ValueError: if ``period_gap_s`` is below ``comma_gap_s`` or a unit ends before it starts.

    >>> chars = [("今", 0.0, 0.2), ("天", 0.2, 0.4), ("好", 1.0, 1.2), ("我", 2.5, 2.7), ("们", 2.7, 2.9)]
    >>> punctuate_by_pauses(chars)
    '今天，好。我们'
    >>> punctuate_by_pauses([("你好", 0.0, 0.4), ("！", 0.4, 0.4), ("hello", 0.5, 0.9), ("world", 1.0, 1.4)])
    '你好hello world'
    >>> punctuate_by_pauses([("你好！", 0.0, 0.4), ("再见?", 1.0, 1.4)], keep_recognizer_punct=True)
    '你好，再见?'
    """
    comma_ms, period_ms = _ms(comma_gap_s), _ms(period_gap_s)
    if period_ms < comma_ms:
        raise ValueError(f"period_gap_s ({period_gap_s}) must not be below comma_gap_s ({comma_gap_s})")

    # Split every unit into (recogniser marks before, word, recogniser marks after).
    words: list[tuple[str, int, int]] = []
    marks_after: list[str] = []  # recogniser marks after words[i]
    for text, start, end in units:
        s_ms, e_ms = _ms(start), _ms(end)
        if e_ms < s_ms:
            raise ValueError(f"unit {text!r} ends ({end}) before it starts ({start})")
        text = text.strip()
        i, j = 0, len(text)
        while i < j and is_punct(text[i]):
            i += 1
        while j > i and is_punct(text[j - 1]):
            j -= 1
        lead, word, trail = text[:i], text[i:j], text[j:]
        if words:
            marks_after[-1] += lead
        if word:
            words.append((word, s_ms, e_ms))
            marks_after.append(trail)
        elif words:
            marks_after[-1] += trail
        # Marks before the first word are dropped: text never starts with a mark.

    out: list[str] = []
    for k, (word, s_ms, _) in enumerate(words):
        if k:
            prev_word, _, prev_end = words[k - 1]
            mark = _mark_ms(s_ms - prev_end, comma_ms, period_ms, comma, period)
            if not mark and keep_recognizer_punct:
                mark = _one_mark(marks_after[k - 1])
            if mark:
                out.append(mark)
            elif not _is_cjk(prev_word[-1]) and not _is_cjk(word[0]):
                out.append(" ")
        out.append(word)
    if words and keep_recognizer_punct:
        out.append(_one_mark(marks_after[-1]))
    return "".join(out)


def _one_mark(marks: str) -> str:
    """One mark for a run of recogniser marks: the last one that is not a space."""
    marks = "".join(marks.split())
    return marks[-1] if marks else ""


def strip_marks(text: str, marks: Sequence[str] = (COMMA, PERIOD)) -> str:
    """``text`` without the given marks (what the recogniser heard, without pause punctuation).

    >>> strip_marks("今天，好。我们")
    '今天好我们'
    """
    return "".join(ch for ch in text if ch not in marks)

"""Text normalisation and error rates (WER, CER), shared by tests, the round-trip check, eval and benchmarks.

Whisper's EnglishTextNormalizer is the usual choice, but it joins spoken digit sequences
into one number ("one two three" becomes "123") while leaving "1-2-3" as "one 2 3", so a
correct transcript of counting scores a WER of 1000 %. Labelling data is full of counting,
dates and phone numbers, so we normalise more simply and symmetrically: lower-case, unify
apostrophes, treat hyphens and punctuation as word breaks, and write each spoken number as
its digits (:func:`spoken_numbers`): "twenty seven" is "27" and "three thousand" is "3000",
as a recognizer writes them, while "one two three" stays three numbers.
"""

from __future__ import annotations

import functools
import re
import unicodedata
import zlib
from collections.abc import Callable, Iterable
from typing import Literal

#: Languages written without spaces between words: WER is meaningless there, CER decides.
UNSPACED_LANGUAGES = ("zh", "ja", "ko", "yue", "th", "lo", "my", "km")

_SMALL = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
_PUNCT = re.compile(r"[^\w\s']|_", re.UNICODE)
#: A comma between digits that groups thousands ("3,000"): dropped, not a word break.
_GROUPING = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def spoken_numbers(words: list[str]) -> list[str]:
    """Each spoken number among ``words`` as one digit token, by English number grammar.

    A number is read the way it is said: a ten may take a unit after it ("twenty seven"), a
    unit or teen may take "hundred" (then "and" and a smaller number), and any of those, or a
    written number, may take "thousand" / "million" / "billion". Two units in a row are two
    numbers, so counting and digit strings keep their words, as do "twenty twenty" (two
    tens) and a bare "hundred".

    >>> spoken_numbers("twenty seven seconds".split()), spoken_numbers("one two three".split())
    (['27', 'seconds'], ['1', '2', '3'])
    >>> spoken_numbers("two hundred and five thousand three hundred".split())
    ['205300']
    >>> spoken_numbers("3 thousand hours and a hundred".split()), spoken_numbers("twenty twenty".split())
    (['3000', 'hours', 'and', 'a', 'hundred'], ['20', '20'])
    """
    out: list[str] = []
    i, n = 0, len(words)
    while i < n:
        total, current, last, j = 0, None, "", i
        while j < n:
            w = words[j]
            if w in _TENS and last in ("", "hundred", "scale"):
                current, last = (current or 0) + _TENS[w], "tens"
            elif w in _SMALL and (last in ("", "hundred", "scale") or (last == "tens" and 0 < _SMALL[w] < 10)):
                current, last = (current or 0) + _SMALL[w], "small"
            elif w.isdigit() and last == "":
                current, last = int(w), "digits"
            elif w == "hundred" and last == "small" and current is not None and current < 100:
                current, last = current * 100, "hundred"
            elif w in _SCALES and last in ("small", "tens", "hundred", "digits"):
                total, current, last = total + (current or 0) * _SCALES[w], None, "scale"
            elif w == "and" and last == "hundred" and j + 1 < n and (words[j + 1] in _SMALL or words[j + 1] in _TENS):
                pass  # "two hundred and five"
            else:
                break
            j += 1
        if j == i or last == "digits":  # not a number word, or a written number left as it is
            out.append(words[i])
            i += 1
            continue
        out.append(str(total + (current or 0)))
        i = j
    return out


def normalize_text(text: str) -> str:
    """Normalise a transcript for word/character error rates.

    >>> normalize_text("One, two-three! It's 4.")
    "1 2 3 it's 4"
    >>> normalize_text("Twenty-seven seconds, three thousand hours") == normalize_text("27 seconds, 3,000 hours")
    True
    """
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    text = _PUNCT.sub(" ", _GROUPING.sub("", text))
    words = [w.strip("'") for w in text.split()]
    return " ".join(spoken_numbers([w for w in words if w]))


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate after :func:`normalize_text`; an empty reference scores 0 only against empty."""
    import jiwer

    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return float(jiwer.wer(ref, hyp))


@functools.lru_cache(maxsize=1)
def _to_simplified() -> Callable[[str], str]:
    from opencc import OpenCC

    try:
        return OpenCC("t2s").convert
    except Exception:  # the C++ OpenCC binding names its tables by file
        return OpenCC("t2s.json").convert


def normalize_chars(text: str, *, simplified: bool = True) -> str:
    """The characters CER compares: see the module docstring for what is normalised and why.

    >>> normalize_chars("今天，天氣很好！ ＯＫ, One two.")
    '今天天气很好ok12'
    >>> normalize_chars("語言", simplified=False)
    '語言'
    """
    text = normalize_text(text)
    if simplified and text:
        text = _to_simplified()(text)
    return "".join(text.replace("'", "").split())


def char_edits(reference: str, hypothesis: str, *, simplified: bool = True) -> tuple[int, int]:
    """``(edits, reference characters)`` after :func:`normalize_chars`: the two sums of a corpus CER.

    >>> char_edits("今天天气很好", "今天天汽很好。")
    (1, 6)
    """
    from rapidfuzz.distance import Levenshtein

    ref = normalize_chars(reference, simplified=simplified)
    hyp = normalize_chars(hypothesis, simplified=simplified)
    return int(Levenshtein.distance(ref, hyp)), len(ref)


def cer(reference: str, hypothesis: str, *, simplified: bool = True) -> float:
    """Character error rate: edits over reference characters, after :func:`normalize_chars`.

    An empty reference scores 0 only against an empty hypothesis, else 1 (as :func:`wer`).

    >>> cer("今天天气很好", "今天天汽很好")  # one substitution in six characters
    0.16666666666666666
    >>> cer("你好，世界。", "你好,世界.")  # full-width and half-width punctuation agree
    0.0
    """
    edits, n = char_edits(reference, hypothesis, simplified=simplified)
    if not n:
        return 0.0 if not edits else 1.0
    return edits / n


def corpus_cer(references: Iterable[str], hypotheses: Iterable[str]) -> float:
    """Total character edits over total reference characters (long items weigh more).

    >>> corpus_cer(["今天天气很好", "好"], ["今天天汽很好", "好"])
    0.14285714285714285
    """
    edits = chars = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        e, n = char_edits(ref, hyp)
        edits, chars = edits + e, chars + n
    return edits / chars if chars else 0.0


def corpus_wer(references: Iterable[str], hypotheses: Iterable[str]) -> float:
    """Total word errors over total reference words, from per-item :func:`wer`.

    >>> corpus_wer(["one two three four", "five"], ["one two three four", "six"])
    0.2
    """
    errors = words = 0.0
    for ref, hyp in zip(references, hypotheses, strict=True):
        n = len(normalize_text(ref).split())
        errors, words = errors + wer(ref, hyp) * n, words + n
    return errors / words if words else 0.0


def is_unspaced(language: str | None = None, text: str = "") -> bool:
    """Whether CER rather than WER is the primary measure: by language, else by script.

    Without a language, text counts as unspaced when it has more CJK, kana and hangul
    characters than words in other scripts (each such character standing for about a word).

    >>> is_unspaced("zh"), is_unspaced("en"), is_unspaced(None, "我用 Python 写代码"), is_unspaced(None, "hello")
    (True, False, True, False)
    """
    if language:
        return language.split("-")[0].lower() in UNSPACED_LANGUAGES
    cjk = other_words = 0
    in_word = False
    for ch in unicodedata.normalize("NFKC", text):
        if ch.isalnum() and unicodedata.name(ch, "").startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL")):
            cjk, in_word = cjk + 1, False
        elif ch.isalnum():
            other_words, in_word = other_words + (not in_word), True
        else:
            in_word = False
    return cjk > other_words


def primary_metric(language: str | None = None, text: str = "") -> Literal["wer", "cer"]:
    """``"cer"`` for languages written without spaces (see :func:`is_unspaced`), else ``"wer"``."""
    return "cer" if is_unspaced(language, text) else "wer"


def score_labels(references: dict[str, str], hypotheses: dict[str, str],
                 languages: dict[str, str] | None = None) -> dict[str, object]:
    """Corpus WER and CER of labels against references, overall and per language.

    Items are matched by key; a reference without a hypothesis counts as an empty hypothesis
    (every reference word and character missed) and is listed under ``missing``. Each
    language's ``primary`` names the measure that decides there (:func:`primary_metric`;
    without a language, by script).

    >>> r = score_labels({"a": "今天天气很好", "b": "the cat sat"}, {"a": "今天天汽很好", "b": "the cat sat"},
    ...                  {"b": "en"})
    >>> r["by_language"]["zh"]["primary"], round(r["by_language"]["zh"]["cer"], 4), r["by_language"]["en"]["wer"]
    ('cer', 0.1667, 0.0)
    """
    languages = languages or {}
    groups: dict[str, list[str]] = {}
    for key, ref in references.items():
        lang = languages.get(key) or ("zh" if is_unspaced(None, ref) else "und")
        groups.setdefault(lang, []).append(key)

    def rates(keys: list[str]) -> dict[str, object]:
        refs = [references[k] for k in keys]
        hyps = [hypotheses.get(k, "") for k in keys]
        return {"items": len(keys), "wer": corpus_wer(refs, hyps), "cer": corpus_cer(refs, hyps)}

    by_language = {lang: {**rates(keys), "primary": primary_metric(None if lang == "und" else lang,
                                                                    " ".join(references[k] for k in keys))}
                   for lang, keys in sorted(groups.items())}
    return {"total": rates(list(references)), "by_language": by_language,
            "missing": sorted(k for k in references if k not in hypotheses)}


def spoken_chars(text: str) -> int:
    """Letters and digits only: punctuation and spaces are not spoken. A length that means
    the same in spaced and unspaced scripts (a Mandarin sentence is one whitespace "word").

    >>> spoken_chars("One, two!"), spoken_chars("你好，世界。")
    (6, 4)
    """
    return sum(1 for c in unicodedata.normalize("NFKC", text) if c.isalnum())


def compression_ratio(text: str) -> float:
    """zlib compression ratio of the text, as Whisper computes it (> 2.4 suggests looping)."""
    data = text.encode("utf-8")
    if not data:
        return 0.0
    return len(data) / len(zlib.compress(data))

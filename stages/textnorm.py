"""Text normalisation for WER/CER, shared by tests, the round-trip check and the audit.

Whisper's EnglishTextNormalizer is the usual choice, but it joins spoken digit sequences
into one number ("one two three" becomes "123") while leaving "1-2-3" as "one 2 3", so a
correct transcript of counting scores a WER of 1000 %. Labelling data is full of counting,
dates and phone numbers, so we normalise more simply and symmetrically: lower-case, unify
apostrophes, treat hyphens and punctuation as word breaks, and spell each number word
from zero to twenty as one digit token.
"""

from __future__ import annotations

import re
import unicodedata

_NUMBERS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_PUNCT = re.compile(r"[^\w\s']|_", re.UNICODE)


def normalize_text(text: str) -> str:
    """Normalise a transcript for word/character error rates.

    >>> normalize_text("One, two-three! It's 4.")
    "1 2 3 it's 4"
    """
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    text = _PUNCT.sub(" ", text)
    words = [_NUMBERS.get(w.strip("'"), w.strip("'")) for w in text.split()]
    return " ".join(w for w in words if w)


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate after :func:`normalize_text`; an empty reference scores 0 only against empty."""
    import jiwer

    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return float(jiwer.wer(ref, hyp))


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate after :func:`normalize_text` (spaces removed: scripts without them count alike)."""
    import jiwer

    ref, hyp = normalize_text(reference).replace(" ", ""), normalize_text(hypothesis).replace(" ", "")
    if not ref:
        return 0.0 if not hyp else 1.0
    return float(jiwer.cer(ref, hyp))

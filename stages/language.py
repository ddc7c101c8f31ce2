"""Spoken-language decisions made where the evidence is: per speaker, within a recording.

A language-ID model heard on one short turn is unsure: Whisper base gives an espeak-ng English
turn of 1-3 s ``en`` with probability 0.4-0.8 and spreads the rest over Welsh, Dutch or Latin.
Deciding (and filtering) per segment on that evidence drops most of an English conversation as
"wrong language". The same model heard on a minute of one speaker is not unsure. So the
evidence is pooled:

1. every segment gets a probability distribution over languages from an acoustic language-ID
   model (Whisper's language head: a softmax over its language tokens, a real probability);
2. per recording, the segments' log-probabilities are averaged weighted by duration (a rate
   of evidence per second);
3. per speaker, the segments' evidence plus ``prior_s`` seconds of the rest of the
   recording's rate (a speaker heard for 2 s follows the recording, one heard for 60 s decides
   for itself) are combined as a log-linear pool, one independent observation per
   ``evidence_s`` seconds, never fewer than one (a lone segment keeps its own probability);
4. a segment takes its speaker's language, unless its own evidence is strong and disagrees
   (its own top language has probability >= ``override_prob`` over at least ``override_min_s``
   seconds): a code-switched turn keeps its own language, and the allow-list then decides.

``language_prob`` on a segment is the pooled probability of the language it was given, so the
filter's ``min_language_prob`` means the same thing for every ASR backend: the language-ID
model's, never a labeller's own heuristic.

Example: two speakers, one of them unsure on a short turn, one Spanish turn said with conviction:

    >>> segs = [
    ...     Evidence("r", "A", 6.0, {"en": 0.9, "cy": 0.1}),
    ...     Evidence("r", "A", 1.5, {"cy": 0.55, "en": 0.45}),
    ...     Evidence("r", "B", 4.0, {"en": 0.7, "nl": 0.3}),
    ...     Evidence("r", "B", 5.0, {"es": 0.97, "en": 0.03}),
    ... ]
    >>> [(d.language, round(d.probability, 3), d.source) for d in pool_languages(segs)]
    [('en', 1.0, 'speaker'), ('en', 1.0, 'speaker'), ('en', 1.0, 'speaker'), ('es', 0.97, 'segment')]

    A lone short segment keeps exactly its own evidence:

    >>> pool_languages([Evidence("r", None, 3.0, {"es": 0.62, "pt": 0.2})])[0].probability
    0.62
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


#: Probability given to a language outside a segment's reported top languages.
FLOOR = 1e-3
#: The languages a model did not report, pooled as one outcome so that a lone segment keeps
#: exactly its own probability; it is never decided.
REST = "<rest>"


@dataclass(frozen=True)
class PoolingParams:
    """The language-pooling hyper-parameters, with the defaults measured on espeak-ng speech.

    Attributes:
        prior_s: seconds of the rest of the recording's evidence (its other speakers') that a
            speaker's own is shrunk towards. 10 s: a speaker needs several turns before overruling the recording.
        evidence_s: seconds of speech that count as one independent observation when the
            evidence is combined (a log-linear pool: probabilities multiply, one factor per
            ``evidence_s``, and never fewer than one, so a lone segment keeps its own
            probability). 5 s: turns of one voice in one room are far from independent, so
            a minute of 0.7-sure English becomes near-certain English, not infinitely so.
        override_prob: a segment keeps its own top language only when that language has at
            least this probability on the segment alone. 0.9: Whisper base gives wrong
            languages to English espeak-ng turns with at most ~0.8 (measured on 60 turns),
            and real foreign speech (pytest-audioeval's Spanish) above 0.95.
        override_min_s: and only when the segment lasts at least this long: below 2 s the
            language head is unreliable at any confidence.
    """

    prior_s: float = 10.0
    evidence_s: float = 5.0
    override_prob: float = 0.9
    override_min_s: float = 2.0


@dataclass(frozen=True)
class Evidence:
    """One segment's language evidence: where it belongs, how long it is, what the model heard."""

    recording: str
    speaker: str | None
    duration_s: float
    probs: Mapping[str, float]


@dataclass(frozen=True)
class Decision:
    """The language given to one segment.

    Attributes:
        language: the decided language code.
        probability: the pooled probability of ``language`` (the segment's own when
            ``source`` is "segment").
        source: "speaker" (pooled over the speaker and recording) or "segment" (its own strong
            evidence overruled the pool).
        segment_language: the segment's own top language, kept for audits.
        segment_probability: its probability on the segment alone.
    """

    language: str
    probability: float
    source: str
    segment_language: str | None
    segment_probability: float | None


def _with_rest(probs: Mapping[str, float]) -> Mapping[str, float]:
    """The reported top languages plus ``REST``: the mass of all the languages not reported."""
    if REST in probs:
        return probs
    return {**probs, REST: max(1.0 - sum(float(p) for p in probs.values()), FLOOR)}


def _log_pool(
    items: Sequence[tuple[float, Mapping[str, float]]],
    prior: Mapping[str, float],
    prior_s: float,
    evidence_s: float,
    langs: Sequence[str],
) -> tuple[dict[str, float], dict[str, float]]:
    """Log-linear pool of weighted distributions, plus ``prior_s`` seconds of a prior (log-rates).

    Returns the pooled distribution and the per-second mean log-probabilities of ``items``
    (the prior of a finer pool).
    """
    total = sum(w for w, _ in items)
    rate = {lang: 0.0 for lang in langs}
    for w, probs in items:
        full = _with_rest(probs)
        for lang in langs:
            rate[lang] += w * math.log(max(float(full.get(lang, 0.0)), FLOOR))
    if total > 0:
        rate = {lang: v / total for lang, v in rate.items()}
    weight = total + (prior_s if prior else 0.0)
    # One independent observation per evidence_s seconds, and never less than one.
    n_obs = max(weight / evidence_s, 1.0) if weight > 0 else 0.0
    score = {
        lang: n_obs * ((total * rate[lang] + (prior_s * prior[lang] if prior else 0.0)) / weight if weight else 0.0)
        for lang in langs
    }
    top = max(score.values()) if score else 0.0
    z = sum(math.exp(v - top) for v in score.values())
    return {lang: math.exp(v - top) / z for lang, v in score.items()}, rate


def mean_distribution(items: Sequence[tuple[float, Mapping[str, float]]]) -> dict[str, float]:
    """One clip's language evidence from several windows of it: their geometric mean, weighted by
    each window's seconds and renormalised over the languages any window reported and ``REST``
    (a language a window did not report counts as ``FLOOR`` there, as in pooling). Like a model's
    own top languages, the result leaves ``REST`` out, sorted by probability: the rest's mass is
    what the listed ones leave.

    Pooling this distribution with the clip's heard seconds as its weight is the same as pooling
    the windows one by one (a log-linear pool only sees the duration-weighted mean
    log-probability), so a long clip heard in pieces counts every piece once, and its top language
    and probability stay those of a typical window: the scale ``override_prob`` was measured on.

    >>> mean_distribution([(8.0, {"la": 0.54, "en": 0.33})]) == {"la": 0.54, "en": 0.33}  # one window: as is
    True
    >>> d = mean_distribution([(8.0, {"la": 0.54, "en": 0.33}), (8.0, {"en": 0.74, "la": 0.05}), (7.0, {"en": 0.97})])
    >>> next(iter(d)), round(d["en"], 2), round(1 - sum(d.values()), 2)  # top first; the rest's mass
    ('en', 0.82, 0.13)
    """
    if len(items) == 1:
        return dict(items[0][1])
    weighted = [(max(float(w), 1e-3), probs) for w, probs in items]
    langs = sorted({lang for _, probs in weighted for lang in _with_rest(probs)})
    # The windows pooled as one observation (evidence_s = their total seconds): the softmax of
    # their duration-weighted mean log-probabilities.
    pooled, _ = _log_pool(weighted, {}, 0.0, sum(w for w, _ in weighted), langs)
    return dict(sorted(((lang, p) for lang, p in pooled.items() if lang != REST), key=lambda kv: (-kv[1], kv[0])))


def _top(probs: Mapping[str, float]) -> tuple[str | None, float | None]:
    probs = {k: v for k, v in probs.items() if k != REST}
    if not probs:
        return None, None
    # Ties broken by code, so the decision never depends on dict order.
    lang = min(probs, key=lambda k: (-probs[k], k))
    return lang, float(probs[lang])


def pool_languages(segments: Sequence[Evidence], params: PoolingParams | None = None) -> list[Decision]:
    """Decide every segment's language from the pooled evidence of its speaker and recording.

    Args:
        segments: per segment, in any order and from any number of recordings.
        params: pooling hyper-parameters (defaults: :class:`PoolingParams`).

    Returns:
        One :class:`Decision` per input segment, in input order. Segments of a recording are
        decided only from that recording, so a recording's languages never depend on which
        other recordings share its batch.
    """
    params = params or PoolingParams()
    # Durations are floored so that a zero-length segment still counts (a little).
    weight = [max(float(s.duration_s), 1e-3) for s in segments]
    by_rec: dict[str, list[int]] = defaultdict(list)
    by_spk: dict[tuple[str, str | None], list[int]] = defaultdict(list)
    for i, s in enumerate(segments):
        by_rec[s.recording].append(i)
        by_spk[(s.recording, s.speaker)].append(i)

    def pools(skip: set[int]) -> dict[tuple[str, str | None], dict[str, float]]:
        pooled = {}
        for rec, idx in by_rec.items():
            langs = sorted({lang for i in idx for lang in segments[i].probs} | {REST})
            for key in [k for k in by_spk if k[0] == rec]:
                mine = set(by_spk[key])
                # The prior is the rest of the recording: the speaker's own turns never count twice.
                others = [(weight[i], segments[i].probs) for i in idx if i not in skip and i not in mine]
                _, prior = _log_pool(others, {}, 0.0, params.evidence_s, langs) if others else ({}, {})
                items = [(weight[i], segments[i].probs) for i in by_spk[key] if i not in skip]
                pooled[key], _ = _log_pool(items, prior, params.prior_s, params.evidence_s, langs)
        return pooled

    def overrides(pooled: dict[tuple[str, str | None], dict[str, float]]) -> set[int]:
        found = set()
        for i, s in enumerate(segments):
            own_lang, own_p = _top(s.probs)
            if (
                own_lang is not None
                and own_p is not None
                and own_p >= params.override_prob
                and s.duration_s >= params.override_min_s
                and own_lang != _top(pooled[(s.recording, s.speaker)])[0]
            ):
                found.add(i)
        return found

    # Two passes: a turn that overrules its speaker (a code switch) is taken out of the pool
    # it overruled, so it does not drag its speaker's other turns towards its language.
    first = pools(set())
    skip = overrides(first)
    spk_pool = pools(skip) if skip else first
    out = []
    for i, s in enumerate(segments):
        pooled_lang, pooled_p = _top(spk_pool[(s.recording, s.speaker)])
        own_lang, own_p = _top(s.probs)
        if i in skip:
            out.append(Decision(own_lang, float(own_p or 0.0), "segment", own_lang, own_p))
        elif pooled_lang is not None:
            out.append(Decision(pooled_lang, float(pooled_p or 0.0), "speaker", own_lang, own_p))
        else:  # no evidence at all (e.g. a model without a language head)
            out.append(Decision("", 0.0, "none", None, None))
    return out

"""Filters: turn measured signals into a verdict with every reason stated.

The filter never measures anything; it reads the fields that ``transcribe``, ``quality`` and
``roundtrip`` wrote and compares them with thresholds, so a run can be re-thresholded from
its index without recomputing a single model. A signal that is absent
(its stage was disabled) or ``None`` (not measurable, e.g. SNR of digital silence) is not
checked: a disabled stage must never drop data by accident. (With ``transcribe.kept_only``, the
default, segments dropped for their audio are not transcribed: re-thresholding those checks
downward later finds no transcript for them; :class:`AudioFilterStage`.)

Every failed check adds one reason to ``drop_reasons``, and to ``drop_details`` the value that
failed it beside the bound (``"low_snr: snr_db=3.1 < 10"``); ``verdict`` is ``"drop"`` when there
is at least one, including reasons an earlier stage put there (``roundtrip`` appends
``"roundtrip_wer>0.3"``): the filter is the one place a verdict is set. The writer sends
dropped rows to ``OUT/dropped/`` when ``keep_dropped`` is set, otherwise only counts them;
either way the reasons reach the run summary and the audit.

Where the default numbers come from (``[U]`` = from a secondary source, not verified in the
primary one; "measured here" = numbers printed by this repository's tests/benchmarks):

==============================  ==============  ===================================================
threshold                       default         source
==============================  ==============  ===================================================
languages                       en, zh          Kimi-Audio report: LID with Whisper-large-v3, keeps
                                                only English and Mandarin (pre-training data)
min_language_prob               0.5             measured here: ``language_prob`` is the pooled
                                                probability (transcribe.language_pooling), so 0.5
                                                = the decided language is more likely than not. A
                                                lone 1 s clip's own Whisper probability swings with
                                                40 ms of leading silence (0.93 / 0.79 on "Hello
                                                world"); Emilia-Pipe's per-segment 0.8 (Granary 0.7)
                                                assumes no pooling
min_duration_s                  1.0             Emilia-Pipe ``cut_by_speaker_label``: segments
                                                < 1 s are dropped
max_duration_s                  30.0            Emilia-Pipe MAX_SEGMENT_LENGTH = 30 s; also
                                                Whisper's 30 s window, beyond which transcripts of
                                                one segment are stitched
min_snr_db                      10.0            no peer publishes a WADA-SNR cut-off (DataSpeech's
                                                25 dB is a brouhaha SNR for TTS data [U]); project
                                                choice: at 10 dB broadband noise is plainly audible
                                                between words. WADA's mean error there is 0.4 dB
                                                (benchmarks/bench_snr.py); raise for TTS-grade data
min_dnsmos_ovrl                 2.5             measured here: clean speech (pytest-audioeval TTS
                                                clips, espeak-ng) scores 2.6-3.5 OVRL, the same
                                                speech in white noise at 5 dB SNR 1.45-2.05. The
                                                Emilia paper's 3.0 [U] suits TTS-grade data; raise
                                                it in such a profile
min_dnsmos_sig / _bak           None            not checked by default (OVRL already combines them)
max_clipping_ratio              0.001           measured here: clean clips 0-0.006 %, 6 dB of
                                                overdrive 0.13-5.9 % of samples on flat tops
max_silence_ratio               0.5             a VAD/diarization segment that is mostly silence
                                                is a segmentation error; project choice
min/max_words_per_s             0.5 / 5.0       NeMo Curator's speaking-rate example is 1.5-5 words
                                                per s; the lower end is relaxed to 0.5
                                                because short segments carry leading/trailing pauses
                                                ("hello world" in 1.1 s of audio is 1.75 words/s)
max_chars_per_s                 25.0            NeMo Curator audio tutorial: 8-25 chars/s for
                                                natural speech; more text than that cannot have
                                                been spoken in the time (hallucinated text)
min_chars_per_s                 1.0             text far too short for the audio (Whisper dropped
                                                most of the speech); the tutorial's 8 is for read
                                                speech, Mandarin runs at 3-6 chars/s
max_repeat_ngram_ratio          0.3             project choice: prose scores < 0.1 on trigrams,
                                                looping hallucinations > 0.5 (tests/test_quality)
max_compression_ratio           2.4             openai-whisper transcribe(): compression_ratio
                                                _threshold = 2.4 (a failed, repetitive decode)
max_no_speech_prob (with text)  0.6             openai-whisper transcribe(): no_speech_threshold
min_avg_logprob                 -1.0            openai-whisper transcribe(): logprob_threshold
max_rt_wer                      None            round-trip WER has no published cut-off for
                                                Kimi-Audio; Curator's second-pass WER filter is
                                                0.10; set it when round-trip runs
==============================  ==============  ===================================================

Duplicates: :func:`mark_duplicates` / :class:`DuplicateTracker` flag exact-duplicate audio
over a stream of ``(key, audio_fp)``; the filter applies it within a batch and the driver-side
writer applies it over the whole run (a stateless stage on many workers cannot see across
batches).

Example:
    >>> rows = [{"recording_id": "r", "status": "ok", "duration_s": 0.4, "language": "fr"}]
    >>> out = FilterStage(FilterConfig())(rows)[0]
    >>> out["verdict"], out["drop_reasons"]
    ('drop', ['duration_too_short', 'language_not_allowed'])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, Literal

from pydantic import Field

from stages.base import Row, Stage, StageConfig
from stages.quality import QUALITY_FIELDS
from stages.rows import finite_or_none, sample_key
from stages.transcribe import TRANSCRIPT_FIELDS

KEEP = "keep"
DROP = "drop"
DUPLICATE_REASON = "duplicate_audio"

#: Every reason the filter can give, in the order checks run (the audit lists them so).
REASONS = (
    "duration_too_short",
    "duration_too_long",
    "language_not_allowed",
    "low_language_prob",
    "low_snr",
    "low_dnsmos_ovrl",
    "low_dnsmos_sig",
    "low_dnsmos_bak",
    "clipping",
    "mostly_silence",
    "mixed_speakers",
    "speaking_rate_too_slow",
    "speaking_rate_too_fast",
    "text_too_long_for_duration",
    "text_too_short_for_duration",
    "empty_transcript",
    "repeated_ngrams",
    "high_compression_ratio",
    "no_speech_with_text",
    "low_asr_confidence",
    "high_roundtrip_wer",
    DUPLICATE_REASON,
)
_OWN_REASONS = frozenset(REASONS)
#: The reasons that need no transcript: all that :class:`AudioFilterStage` can give.
AUDIO_REASONS = frozenset({
    "duration_too_short", "duration_too_long", "low_snr", "low_dnsmos_ovrl", "low_dnsmos_sig", "low_dnsmos_bak",
    "clipping", "mostly_silence", "mixed_speakers",
})


def _opt(default: float | None, description: str, **bounds: float) -> Any:
    return Field(default, description=description + " None = not checked.", **bounds)


class FilterConfig(StageConfig):
    """The ``filter`` section: thresholds per signal (sources in the module docstring)."""

    stream: Literal["enhanced", "original"] = Field(
        "enhanced",
        description="Which waveform the quality signals (SNR, DNSMOS, clipping, silence) are measured "
        "on, and so judged: 'enhanced' = the enhanced stream where enhancement ran (what a trainer "
        "reading enhanced.flac gets), the original where it did not; 'original' = always audio.flac. "
        "quality.audio_field, when set, overrides it.",
    )
    languages: list[str] | None = Field(
        ["en", "zh"],
        description="Allowed Whisper language codes (Kimi-Audio keeps en and zh). None = any language.",
    )
    min_language_prob: float | None = _opt(
        0.5, "Minimum pooled language-ID probability (transcribe.language_pooling): the decided language is "
        "more likely than not. A segment is otherwise dropped for language only when its own strong evidence "
        "names a language outside `languages`.", ge=0.0, le=1.0,
    )
    min_duration_s: float | None = _opt(1.0, "Shortest segment kept, seconds.", ge=0.0)
    max_duration_s: float | None = _opt(30.0, "Longest segment kept, seconds.", gt=0.0)
    min_snr_db: float | None = _opt(10.0, "Minimum WADA-SNR, dB.", ge=-20.0, le=100.0)
    min_dnsmos_ovrl: float | None = _opt(2.5, "Minimum DNSMOS P.835 overall score (1-5).", ge=1.0, le=5.0)
    min_dnsmos_sig: float | None = _opt(None, "Minimum DNSMOS speech-signal score (1-5).", ge=1.0, le=5.0)
    min_dnsmos_bak: float | None = _opt(None, "Minimum DNSMOS background score (1-5).", ge=1.0, le=5.0)
    max_clipping_ratio: float | None = _opt(0.001, "Maximum share of samples on clipped flat tops.", ge=0.0, le=1.0)
    max_silence_ratio: float | None = _opt(0.5, "Maximum share of silent 20 ms frames.", ge=0.0, le=1.0)
    min_words_per_s: float | None = _opt(0.5, "Slowest speaking rate kept, words/s.", ge=0.0)
    max_words_per_s: float | None = _opt(5.0, "Fastest speaking rate kept, words/s.", gt=0.0)
    min_chars_per_s: float | None = _opt(1.0, "Least transcript per second of audio, letters/s.", ge=0.0)
    max_chars_per_s: float | None = _opt(25.0, "Most transcript per second of audio, letters/s.", gt=0.0)
    require_single_speaker: bool = Field(
        True,
        description="Drop a segment the diarize stage judged to hold more than one voice "
        "(single_speaker=false). Rows without the field (no diarization) are never checked.",
    )
    require_text: bool = Field(
        True,
        description="Drop a segment whose transcript is empty when transcription ran (the row has a "
        "`text` field). Rows without a `text` field are never checked.",
    )
    max_repeat_ngram_ratio: float | None = _opt(0.3, "Maximum share of repeated word n-grams.", ge=0.0, le=1.0)
    max_compression_ratio: float | None = _opt(
        2.4, "Maximum gzip compression ratio of the transcript (Whisper's and ours).", gt=0.0
    )
    max_no_speech_prob: float | None = _opt(
        0.6, "Maximum Whisper no-speech probability for a segment that has text.", ge=0.0, le=1.0
    )
    min_avg_logprob: float | None = _opt(-1.0, "Minimum Whisper average token log-probability.", le=0.0)
    max_rt_wer: float | None = _opt(None, "Maximum round-trip WER (0-1 scale).", ge=0.0)
    dedupe_within_batch: bool = Field(
        True,
        description="Flag exact-duplicate audio (same audio_fp) inside each batch. Across batches the "
        "writer applies the same rule with DuplicateTracker over the whole run.",
    )
    keep_dropped: bool = Field(
        False,
        description="Write dropped segments to OUT/dropped/ (same layout) for review instead of only counting them.",
    )


def _num(row: Row, key: str) -> float | None:
    """A finite float from the row, or None when absent / None / NaN (= not checked)."""
    return finite_or_none(row.get(key))


def _below(value: float | None, bound: float | None) -> bool:
    return value is not None and bound is not None and value < bound


def _above(value: float | None, bound: float | None) -> bool:
    return value is not None and bound is not None and value > bound


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def judge(row: Row, cfg: FilterConfig) -> list[tuple[str, str]]:
    """Every reason ``row`` fails ``cfg`` with the value that failed it, in :data:`REASONS` order.

    The detail names the field, its value and the bound, so a reviewer sees why without
    looking the threshold up. A pure function, so the audit or a notebook can re-threshold an
    index with it.

    >>> judge({"duration_s": 5.0, "snr_db": 3.0, "clipping_ratio": 0.2}, FilterConfig())
    [('low_snr', 'snr_db=3 < 10'), ('clipping', 'clipping_ratio=0.2 > 0.001')]
    """
    found: list[tuple[str, str]] = []

    def below(reason: str, key: str, bound: float | None, value: float | None = None) -> None:
        value = _num(row, key) if value is None else value
        if _below(value, bound):
            found.append((reason, f"{key}={_fmt(value)} < {_fmt(bound)}"))  # type: ignore[arg-type]

    def above(reason: str, key: str, bound: float | None, value: float | None = None) -> None:
        value = _num(row, key) if value is None else value
        if _above(value, bound):
            found.append((reason, f"{key}={_fmt(value)} > {_fmt(bound)}"))  # type: ignore[arg-type]

    below("duration_too_short", "duration_s", cfg.min_duration_s)
    above("duration_too_long", "duration_s", cfg.max_duration_s)

    lang = row.get("language")
    if cfg.languages is not None and isinstance(lang, str) and lang:
        if lang.lower() not in {x.lower() for x in cfg.languages}:
            found.append(("language_not_allowed", f"language={lang} not in {','.join(cfg.languages)}"))
    below("low_language_prob", "language_prob", cfg.min_language_prob)

    below("low_snr", "snr_db", cfg.min_snr_db)
    for dim in ("ovrl", "sig", "bak"):
        below(f"low_dnsmos_{dim}", f"dnsmos_{dim}", getattr(cfg, f"min_dnsmos_{dim}"))
    above("clipping", "clipping_ratio", cfg.max_clipping_ratio)
    above("mostly_silence", "silence_ratio", cfg.max_silence_ratio)
    if cfg.require_single_speaker and row.get("single_speaker") is False:
        purity = _num(row, "speaker_purity")
        detail = "single_speaker=false" + (f", speaker_purity={_fmt(purity)}" if purity is not None else "")
        found.append(("mixed_speakers", detail))

    text = row.get("text")
    has_text = isinstance(text, str) and bool(text.strip())
    if has_text:
        below("speaking_rate_too_slow", "words_per_s", cfg.min_words_per_s)
        above("speaking_rate_too_fast", "words_per_s", cfg.max_words_per_s)
        above("text_too_long_for_duration", "chars_per_s", cfg.max_chars_per_s)
        below("text_too_short_for_duration", "chars_per_s", cfg.min_chars_per_s)
    elif "text" in row and cfg.require_text:
        found.append(("empty_transcript", "text=''"))

    if has_text:
        above("repeated_ngrams", "repeat_ngram_ratio", cfg.max_repeat_ngram_ratio)
        ratios = {k: v for k in ("compression_ratio", "text_compression_ratio") if (v := _num(row, k)) is not None}
        if ratios:
            worst = max(ratios, key=lambda k: ratios[k])
            above("high_compression_ratio", worst, cfg.max_compression_ratio, ratios[worst])
        above("no_speech_with_text", "no_speech_prob", cfg.max_no_speech_prob)
    below("low_asr_confidence", "avg_logprob", cfg.min_avg_logprob)
    above("high_roundtrip_wer", "rt_wer", cfg.max_rt_wer)
    return found


def drop_reasons(row: Row, cfg: FilterConfig) -> list[str]:
    """Every reason ``row`` fails ``cfg``, in :data:`REASONS` order; empty when it passes.

    >>> drop_reasons({"duration_s": 5.0, "snr_db": 3.0, "clipping_ratio": 0.2}, FilterConfig())
    ['low_snr', 'clipping']
    """
    return [reason for reason, _ in judge(row, cfg)]


# -- duplicates ------------------------------------------------------------------------------


def mark_duplicates(
    fingerprints: Iterable[tuple[str, str | None]],
    seen: dict[str, str] | None = None,
) -> Iterator[tuple[str, str | None]]:
    """For each ``(key, audio_fp)`` yield ``(key, first_key)``: the earlier key with the same
    fingerprint, or ``None`` when this is the first occurrence (or the fingerprint is absent).

    Streaming and order-defined: the first sample seen with a fingerprint is the original,
    every later one a duplicate, whichever recording it came from. Memory is one dict entry
    per distinct fingerprint. Pass the same ``seen`` dict across calls to continue a run
    (it is the only state; the function touches nothing else).

    >>> list(mark_duplicates([("a", "f1"), ("b", "f2"), ("c", "f1"), ("d", None)]))
    [('a', None), ('b', None), ('c', 'a'), ('d', None)]
    """
    first = {} if seen is None else seen
    for key, fp in fingerprints:
        if not fp:
            yield key, None
            continue
        orig = first.setdefault(fp, key)
        yield key, (None if orig == key else orig)


class DuplicateTracker:
    """Run-wide exact-duplicate detection for the driver-side writer.

    Example:
        >>> t = DuplicateTracker()
        >>> rows = [{"recording_id": "a", "segment_index": 0, "audio_fp": "x", "verdict": "keep"},
        ...         {"recording_id": "b", "segment_index": 3, "audio_fp": "x", "verdict": "keep"}]
        >>> [t.apply(r)["verdict"] for r in rows], rows[1]["duplicate_of"]
        (['keep', 'drop'], 'a_00000')
    """

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, key: str, fp: str | None) -> str | None:
        """The key this sample duplicates, or None; records the fingerprint."""
        return next(mark_duplicates([(key, fp)], self._seen))[1]

    def apply(self, row: Row) -> Row:
        """Check a segment row and, when it duplicates an earlier one, drop it (in place).

        Only a row still to be kept takes part, as in the writer's run-wide check: a row
        already dropped for another reason neither registers (a dropped copy must not condemn a
        later good one) nor gets a duplicate reason that would depend on what shared its batch.
        """
        if row.get("segment_index") is None or row.get("recording_id") is None or row.get("verdict") == DROP:
            return row
        key = sample_key(str(row["recording_id"]), int(row["segment_index"]))
        orig = self.check(key, row.get("audio_fp"))
        if orig is not None:
            apply_duplicate(row, orig)
        return row


def apply_duplicate(row: Row, original_key: str) -> Row:
    """Mark ``row`` a duplicate of ``original_key`` (idempotent: the reason appears once)."""
    reasons = list(row.get("drop_reasons") or [])
    if DUPLICATE_REASON not in reasons:
        reasons.append(DUPLICATE_REASON)
    row["drop_reasons"] = reasons
    details = list(row.get("drop_details") or [])
    if not any(d.startswith(f"{DUPLICATE_REASON}:") for d in details):
        details.append(f"{DUPLICATE_REASON}: duplicate_of={original_key}")
    row["drop_details"] = details
    row["verdict"] = DROP
    row.setdefault("duplicate_of", original_key)
    return row


# -- the stage -------------------------------------------------------------------------------


class FilterStage(Stage):
    """Set ``verdict`` and ``drop_reasons`` on every segment row (see the module docstring)."""

    name: ClassVar[str] = "filter"
    # Everything the thresholds look at: the transcript signals, the quality stage's
    # measurements (same names, imported so they cannot drift), and round-trip WER.
    reads: ClassVar[tuple[str, ...]] = ("duration_s", *TRANSCRIPT_FIELDS, *QUALITY_FIELDS, "rt_wer")
    writes: ClassVar[tuple[str, ...]] = ("verdict", "drop_reasons", "drop_details", "duplicate_of")
    uses_model: ClassVar[bool] = False

    config: FilterConfig

    def process_batch(self, rows: list[Row]) -> list[Row]:
        out = self._judge_rows(rows)
        if self.config.dedupe_within_batch:
            tracker = DuplicateTracker()
            for row in out:
                tracker.apply(row)
        return out

    def _judge_rows(self, rows: list[Row]) -> list[Row]:
        out = []
        for row in rows:
            # Stages upstream may already have judged the row (roundtrip appends
            # "roundtrip_wer>0.3"): keep their reasons. The filter's own reasons are recomputed,
            # so running the filter again with new thresholds re-judges instead of accumulating.
            upstream = [r for r in row.get("drop_reasons") or [] if r not in _OWN_REASONS]
            own = judge(row, self.config)
            reasons = list(dict.fromkeys(upstream)) + [r for r, _ in own]
            details = [d for d in row.get("drop_details") or [] if d.split(":", 1)[0] not in _OWN_REASONS]
            details += [f"{r}: {d}" for r, d in own]
            out.append({**row, "verdict": DROP if reasons else KEEP, "drop_reasons": reasons, "drop_details": details})
        return out


class AudioFilterStage(FilterStage):
    """The filter's checks on what is measured before transcription, so that transcribe can
    leave alone what they drop (``transcribe.kept_only``).

    The same settings and the same :func:`judge`: a signal not yet measured (language,
    transcript, round trip) is not checked, so this stage drops a segment only for a reason the
    full filter after transcription gives again; that filter recomputes its own reasons, so
    none is counted twice. No duplicates here: which copy of a duplicate is dropped would then
    depend on what shared a batch, and with it which copy gets a transcript.

    >>> rows = [{"recording_id": "r", "status": "ok", "duration_s": 5.0, "dnsmos_ovrl": 2.1, "audio_fp": "x"},
    ...         {"recording_id": "r", "status": "ok", "duration_s": 5.0, "dnsmos_ovrl": 3.1, "audio_fp": "x"}]
    >>> [(r["verdict"], r["drop_reasons"]) for r in AudioFilterStage(FilterConfig())(rows)]
    [('drop', ['low_dnsmos_ovrl']), ('keep', [])]
    """

    name: ClassVar[str] = "filter_audio"
    section: ClassVar[str | None] = "filter"

    def process_batch(self, rows: list[Row]) -> list[Row]:
        return self._judge_rows(rows)


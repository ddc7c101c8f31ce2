"""The rows that flow between stages, in one place: a recording, and its segments by offset.

The **recording** is the unit that flows through the graph. It carries its audio once
(``audio``, and ``audio_enhanced`` once enhanced) and, after segmentation, a list of
``segments`` that refer to that audio by offset. A segment never holds audio of its own:
stages that work per segment are handed *views* (:func:`segment_views`), each a dict that
shows one segment's fields beside its recording's and a numpy slice (no copy) of the audio;
what the stage writes back is folded into the recording's segment list
(:func:`fold_segments`). The writer is the first and only place that copies a segment's
audio, when it encodes the sample.

Rows are plain dicts (typed below as :class:`RecordingRow` and :class:`SegmentRow`) so that a
stage can be tested on a list of them without Ray, and so that nested metadata never has to
fit an Arrow schema between stages (the pipeline ships each row as one pickled payload).

Example:
    >>> import numpy as np
    >>> rec = {"recording_id": "r1", "source": "/a.wav", "status": "ok", "sample_rate": 4,
    ...        "duration_s": 2.0, "audio": np.arange(8, dtype=np.float32),
    ...        "segments": [{"segment_index": 0, "start_s": 0.5, "end_s": 1.5, "speaker": "S0",
    ...                      "status": "ok"}]}
    >>> (view,) = segment_views(rec)
    >>> view["audio"].tolist(), view["duration_s"], view["recording_duration_s"]
    ([2.0, 3.0, 4.0, 5.0], 1.0, 2.0)
    >>> np.shares_memory(view["audio"], rec["audio"])
    True
    >>> out = fold_segments(rec, [{**view, "text": "hi"}])
    >>> out["segments"][0]["text"], "audio" in out["segments"][0]
    ('hi', False)
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, TypedDict

import numpy as np

#: Fields that are bulk data, never copied into the JSON metadata or the Parquet index.
ARRAY_FIELDS = ("audio", "audio_enhanced", "semantic_tokens", "whisper_features")
#: The recording's waveforms: held once by the recording, sliced (not copied) for a view.
AUDIO_FIELDS = ("audio", "audio_enhanced")
#: Recording fields a view shows but a segment never stores (its own values win).
_VIEW_ONLY = ("recording_duration_s",)
#: Recording fields that stay with the recording: each segment has its own.
_PER_SEGMENT = ("segments", "duration_s", "status", "provenance", "timings", "spans", "cpu", *AUDIO_FIELDS)


class SegmentRow(TypedDict, total=False):
    """One segment of a recording: offsets into its audio and everything measured on it.

    Attributes:
        segment_index: 0-based, in time order within the recording.
        start_s, end_s: position in the recording (seconds, clamped to the audio).
        speaker: speaker label, stable within the recording ("S0", "S1", ...), or None.
        status: "ok", or "quarantined" with ``failed_stage``, ``error_kind`` and ``error``.
        text, language, language_prob, avg_logprob, no_speech_prob, compression_ratio:
            transcript fields (transcribe).
        semantic_tokens: np.int32 [T] at 12.5 Hz; whisper_features: np.float16 [T, D] (tokenize).
        snr_db, dnsmos_ovrl, audio_fp, rt_wer, ...: measurements (quality, roundtrip).
        verdict, drop_reasons: "keep" | "drop" and why (filter; upstream stages may add reasons).
        provenance, timings: per stage that touched the segment, model/config hash and seconds.
        spans: per stage, [first start, last end] of its calls on this node's clock (epoch
            seconds); read by the run summary, never written to OUT.
        cpu: per model stage and worker process, its CPU seconds so far
            (:func:`stages.base.merge_cpu`); read by the run summary, never written to OUT.
    """

    segment_index: int
    start_s: float
    end_s: float
    speaker: str | None
    status: str
    text: str
    language: str | None
    semantic_tokens: Any
    verdict: str
    drop_reasons: list[str]
    provenance: dict[str, dict[str, str]]
    timings: dict[str, float]
    spans: dict[str, list[float]]
    cpu: dict[str, dict[str, float]]


class RecordingRow(TypedDict, total=False):
    """One input file: its audio, held once, and its segments by offset.

    Attributes:
        recording_id: stable id: blake2b of the source URI + sha256 prefix of the bytes.
        source: the input's URI (absolute path for local files).
        status: "ok" | "quarantined" | "empty" (see ``stages.base``).
        sample_rate: rate of ``audio`` after decode.
        duration_s: duration of the decoded audio.
        audio: np.ndarray float32 mono, the decoded, loudness-normalised waveform.
        audio_enhanced: same length and rate, once enhanced.
        source_meta: extra fields of the input's manifest line, carried to the index.
        loudness_lufs: integrated loudness before normalisation.
        segments: after segmentation (``segment`` or ``diarize``); absent before.
        provenance, timings, spans, cpu: per recording-level stage (decode, enhance, diarize, ...).
    """

    recording_id: str
    source: str
    status: str
    sample_rate: int
    duration_s: float
    audio: Any
    audio_enhanced: Any
    source_meta: dict[str, Any]
    segments: list[SegmentRow]
    provenance: dict[str, dict[str, str]]
    timings: dict[str, float]
    spans: dict[str, list[float]]
    cpu: dict[str, dict[str, float]]


def span_samples(segment: dict[str, Any], sample_rate: int, length: int) -> tuple[int, int]:
    """A segment's ``[a, b)`` sample range in audio of ``length`` samples (clamped)."""
    a = max(0, int(round(float(segment["start_s"]) * sample_rate)))
    b = min(length, int(round(float(segment["end_s"]) * sample_rate)))
    return a, max(a, b)


def segment_views(rec: dict[str, Any], *, only_ok: bool = True) -> list[dict[str, Any]]:
    """What a per-segment stage sees: each segment beside its recording's fields.

    A view is a new dict (stages may replace its keys freely) holding the recording's
    metadata (shared, not copied: stages return new dicts rather than mutate nested values),
    the segment's fields, ``duration_s`` of the segment, ``recording_duration_s``, and
    ``audio`` / ``audio_enhanced`` as slices that share the recording's memory.

    Args:
        rec: a recording row with ``segments``.
        only_ok: leave out segments that are already quarantined.
    """
    sr = int(rec["sample_rate"])
    base = {k: v for k, v in rec.items() if k not in _PER_SEGMENT}
    base["recording_duration_s"] = float(rec.get("duration_s") or 0.0)
    views = []
    for seg in rec.get("segments") or []:
        if only_ok and seg.get("status", "ok") != "ok":
            continue
        view = {**base, **seg}
        view["status"] = seg.get("status", "ok")
        view["duration_s"] = float(seg["end_s"]) - float(seg["start_s"])
        for field in AUDIO_FIELDS:
            wave = rec.get(field)
            if wave is not None:
                a, b = span_samples(seg, sr, wave.shape[0])
                view[field] = wave[a:b]
        views.append(view)
    return views


def fold_segments(rec: dict[str, Any], views: list[dict[str, Any]]) -> dict[str, Any]:
    """The recording with what a stage wrote on its segment ``views`` folded back in.

    Views are matched by ``segment_index``; the recording's own fields and the audio slices
    are left out, so a segment stores only its offsets and what was measured on it.
    """
    inherited = set(rec) - set(_PER_SEGMENT) | set(_VIEW_ONLY) | set(AUDIO_FIELDS)
    by_index = {int(v["segment_index"]): v for v in views if v.get("segment_index") is not None}
    segments = []
    for seg in rec.get("segments") or []:
        view = by_index.get(int(seg["segment_index"]))
        if view is None:
            segments.append(seg)
            continue
        new = {**seg, **{k: v for k, v in view.items() if k not in inherited}}
        new.pop("duration_s", None)
        segments.append(new)
    return {**rec, "segments": segments}


def segment_duration(segment: dict[str, Any]) -> float:
    """Seconds between a segment's offsets."""
    return float(segment["end_s"]) - float(segment["start_s"])


def recording_id(source_uri: str, content_sha256: str) -> str:
    """Stable recording id: same URI and same bytes give the same id.

    Only hex digits, so it is safe in WebDataset keys (which split at the first dot).

    >>> recording_id("file:///a.wav", "ab" * 32)
    '1c5f977413ca05cdabababab'
    """
    uri_hash = hashlib.blake2b(source_uri.encode(), digest_size=8).hexdigest()
    return uri_hash + content_sha256[:8]


def sample_key(rec_id: str, segment_index: int) -> str:
    """WebDataset key of a segment: ``<recording_id>_<segment_index:05d>``."""
    return f"{rec_id}_{segment_index:05d}"


def finite_or_none(value: Any) -> float | None:
    """A finite float, or None for absent, boolean, non-numeric, NaN or infinite values.

    Measurements travel through JSON and Parquet, where "not measured" shows up as None,
    NaN or a missing key; every reader treats all of them as "not measured".

    >>> [finite_or_none(v) for v in (1, "2.5", None, True, float("nan"), "x")]
    [1.0, 2.5, None, None, None, None]
    """
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None

"""The fields rows carry between stages (the stage order is in the README), in one place.

Rows are plain dicts so that a stage can be tested on a list of them without Ray, and so
that heterogeneous, nested metadata never has to fit an Arrow schema between stages (the
pipeline ships each row as one pickled payload).

Recording rows (after ``decode``):
    recording_id (str): stable id: blake2b of the source URI + sha256 prefix of the bytes.
    source (str): the input's URI (absolute path for local files).
    status (str): "ok" | "quarantined" | "empty" (see ``stages.base``).
    sample_rate (int): rate of ``audio`` after decode.
    duration_s (float): duration of the decoded audio.
    audio (np.ndarray float32, mono): the decoded, loudness-normalised waveform.
    audio_enhanced (np.ndarray float32, mono): same length and rate, once enhanced.
    source_meta (dict): extra fields of the input's manifest line, carried to the index.
    loudness_lufs (float): integrated loudness before normalisation.

Segment rows (after segmentation: ``vad`` or ``diarize``) add:
    segment_index (int): 0-based, in time order within the recording.
    segment_count (int): how many segments the recording produced (the writer uses it to
        know a recording is complete).
    start_s, end_s (float): position in the recording; ``duration_s`` becomes the segment's
        duration and ``recording_duration_s`` keeps the recording's.
    speaker (str): speaker label, stable within the recording ("S0", "S1", ...).
    audio / audio_enhanced: the segment's slice.
Transcribe adds: text, language, language_prob, avg_logprob, no_speech_prob,
    compression_ratio.
Tokenize adds: semantic_tokens (np.int32 [T], 12.5 Hz), whisper_features (np.float16 [T, 4*D]).
Quality / round-trip add their measurements (snr_db, dnsmos_ovrl, rt_wer, ...).
Filters set: verdict ("keep" | "drop") and drop_reasons (list[str]).
Every stage sets: provenance[stage] = {"model", "config_hash"}, timings[stage] = seconds.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

#: Fields that are bulk data, never copied into the JSON metadata or the Parquet index.
ARRAY_FIELDS = ("audio", "audio_enhanced", "semantic_tokens", "whisper_features")


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

"""The filter: each threshold names its reason, absent signals are not checked, every failure
is listed, and duplicate detection works over a stream."""

from __future__ import annotations

import pytest

from stages.filter import (
    DUPLICATE_REASON,
    REASONS,
    DuplicateTracker,
    FilterConfig,
    FilterStage,
    apply_duplicate,
    drop_reasons,
    mark_duplicates,
)

#: A segment that passes every default threshold.
GOOD = {
    "recording_id": "rec",
    "segment_index": 0,
    "status": "ok",
    "duration_s": 6.0,
    "text": "a perfectly ordinary sentence that somebody said out loud",
    "language": "en",
    "language_prob": 0.97,
    "avg_logprob": -0.3,
    "no_speech_prob": 0.05,
    "compression_ratio": 1.4,
    "snr_db": 25.0,
    "dnsmos_ovrl": 3.2,
    "dnsmos_sig": 3.5,
    "dnsmos_bak": 3.9,
    "clipping_ratio": 0.0,
    "silence_ratio": 0.1,
    "words_per_s": 2.5,
    "chars_per_s": 12.0,
    "repeat_ngram_ratio": 0.0,
    "text_compression_ratio": 1.1,
    "rt_wer": 0.05,
    "audio_fp": "fp-good",
}

#: (fields changed from GOOD, the one reason they must produce)
DEFECTS = [
    ({"duration_s": 0.6}, "duration_too_short"),
    ({"duration_s": 45.0}, "duration_too_long"),
    ({"language": "de"}, "language_not_allowed"),
    ({"language_prob": 0.4}, "low_language_prob"),
    ({"snr_db": 4.0}, "low_snr"),
    ({"dnsmos_ovrl": 1.9}, "low_dnsmos_ovrl"),
    ({"clipping_ratio": 0.02}, "clipping"),
    ({"silence_ratio": 0.8}, "mostly_silence"),
    ({"words_per_s": 0.2}, "speaking_rate_too_slow"),
    ({"words_per_s": 7.5}, "speaking_rate_too_fast"),
    ({"chars_per_s": 40.0}, "text_too_long_for_duration"),
    ({"chars_per_s": 0.4}, "text_too_short_for_duration"),
    ({"text": "   "}, "empty_transcript"),
    ({"repeat_ngram_ratio": 0.7}, "repeated_ngrams"),
    ({"compression_ratio": 3.1}, "high_compression_ratio"),
    ({"text_compression_ratio": 2.9}, "high_compression_ratio"),
    ({"no_speech_prob": 0.9}, "no_speech_with_text"),
    ({"avg_logprob": -1.6}, "low_asr_confidence"),
]


def test_good_segment_is_kept() -> None:
    out = FilterStage(FilterConfig())([dict(GOOD)])[0]
    assert out["verdict"] == "keep" and out["drop_reasons"] == []
    assert out["provenance"]["filter"]["config_hash"] == FilterConfig().config_hash()


@pytest.mark.parametrize(("change", "reason"), DEFECTS, ids=[f"{r}-{next(iter(c))}" for c, r in DEFECTS])
def test_each_threshold_names_its_reason(change: dict, reason: str) -> None:
    assert drop_reasons({**GOOD, **change}, FilterConfig()) == [reason]


def test_optional_thresholds_only_when_set() -> None:
    row = {**GOOD, "dnsmos_sig": 2.0, "dnsmos_bak": 1.5, "rt_wer": 0.4}
    assert drop_reasons(row, FilterConfig()) == []  # off by default
    cfg = FilterConfig(min_dnsmos_sig=3.0, min_dnsmos_bak=2.0, max_rt_wer=0.1)
    assert drop_reasons(row, cfg) == ["low_dnsmos_sig", "low_dnsmos_bak", "high_roundtrip_wer"]


def test_every_failed_reason_is_listed_in_order() -> None:
    row = {**GOOD, "duration_s": 0.5, "snr_db": 2.0, "language": "fr", "avg_logprob": -2.0}
    reasons = drop_reasons(row, FilterConfig())
    assert reasons == ["duration_too_short", "language_not_allowed", "low_snr", "low_asr_confidence"]
    assert [REASONS.index(r) for r in reasons] == sorted(REASONS.index(r) for r in reasons)


def test_absent_or_unmeasurable_signals_are_not_checked() -> None:
    # Quality and transcription disabled: only what exists is judged.
    bare = {"recording_id": "r", "segment_index": 0, "status": "ok", "duration_s": 5.0}
    assert FilterStage(FilterConfig())([bare])[0]["verdict"] == "keep"
    # None / NaN (e.g. SNR of digital silence, DNSMOS skipped) is not a failure either.
    row = {**GOOD, "snr_db": None, "dnsmos_ovrl": float("nan"), "language": None}
    assert drop_reasons(row, FilterConfig()) == []


def test_thresholds_can_be_switched_off() -> None:
    row = {**GOOD, "snr_db": -5.0, "language": "ja", "duration_s": 120.0}
    cfg = FilterConfig(min_snr_db=None, languages=None, max_duration_s=None)
    assert drop_reasons(row, cfg) == []


def test_boundaries_are_inclusive() -> None:
    cfg = FilterConfig()
    row = {**GOOD, "snr_db": cfg.min_snr_db, "duration_s": cfg.max_duration_s, "dnsmos_ovrl": cfg.min_dnsmos_ovrl}
    assert drop_reasons(row, cfg) == []


def test_text_checks_need_text() -> None:
    # No transcript at all (transcribe off): no text checks and no empty_transcript.
    row = {k: v for k, v in GOOD.items() if k != "text"} | {"repeat_ngram_ratio": 0.9, "no_speech_prob": 0.95}
    assert drop_reasons(row, FilterConfig()) == []
    assert drop_reasons({**GOOD, "text": ""}, FilterConfig(require_text=False)) == []


def test_config_is_strict() -> None:
    with pytest.raises(ValueError):
        FilterConfig(min_snr=3)  # type: ignore[call-arg]  # typo'd key: an error, not a silent no-op
    with pytest.raises(ValueError):
        FilterConfig(min_language_prob=1.5)
    assert FilterConfig().languages == ["en", "zh"]
    assert FilterConfig().keep_dropped is False


def test_mark_duplicates_streams_and_continues() -> None:
    seen: dict[str, str] = {}
    first = list(mark_duplicates([("a", "x"), ("b", "y"), ("c", "x")], seen))
    assert first == [("a", None), ("b", None), ("c", "a")]
    # A later call with the same state still sees the earlier fingerprints (the whole run).
    assert list(mark_duplicates([("d", "y"), ("e", None), ("f", "z")], seen)) == [("d", "b"), ("e", None), ("f", None)]
    # The same key seen again is not its own duplicate (a retried row).
    assert list(mark_duplicates([("a", "x")], seen)) == [("a", None)]


def test_duplicate_tracker_across_batches_and_idempotent() -> None:
    stage = FilterStage(FilterConfig())
    tracker = DuplicateTracker()
    batch1 = stage([{**GOOD, "recording_id": "r1", "segment_index": i, "audio_fp": f"f{i}"} for i in range(3)])
    batch2 = stage([{**GOOD, "recording_id": "r2", "segment_index": 0, "audio_fp": "f1"}])
    verdicts = [tracker.apply(r)["verdict"] for r in batch1 + batch2]
    assert verdicts == ["keep", "keep", "keep", "drop"]
    assert batch2[0]["drop_reasons"] == [DUPLICATE_REASON] and batch2[0]["duplicate_of"] == "r1_00001"
    apply_duplicate(batch2[0], "r1_00001")
    assert batch2[0]["drop_reasons"] == [DUPLICATE_REASON]  # not listed twice
    assert len(tracker) == 3


def test_within_batch_dedupe_can_be_disabled() -> None:
    rows = [{**GOOD, "segment_index": i} for i in range(2)]  # same audio_fp
    assert [r["verdict"] for r in FilterStage(FilterConfig())(rows)] == ["keep", "drop"]
    rows = [{**GOOD, "segment_index": i} for i in range(2)]
    assert [r["verdict"] for r in FilterStage(FilterConfig(dedupe_within_batch=False))(rows)] == ["keep", "keep"]


def test_quarantined_rows_pass_through() -> None:
    q = {"recording_id": "bad", "status": "quarantined", "error": "x", "failed_stage": "decode"}
    out = FilterStage(FilterConfig())([q, dict(GOOD)])
    assert out[0] is q and "verdict" not in q


def test_upstream_reasons_are_kept_and_own_reasons_recomputed() -> None:
    # roundtrip judged the row before the filter: its reason stands and makes the verdict.
    row = {**GOOD, "drop_reasons": ["roundtrip_wer>0.3"]}
    out = FilterStage(FilterConfig())([row])[0]
    assert out["verdict"] == "drop" and out["drop_reasons"] == ["roundtrip_wer>0.3"]
    # Re-filtering with a looser threshold clears the filter's own earlier reason.
    noisy = FilterStage(FilterConfig())([{**GOOD, "snr_db": 5.0}])[0]
    assert noisy["drop_reasons"] == ["low_snr"]
    again = FilterStage(FilterConfig(min_snr_db=0.0))([noisy])[0]
    assert again["verdict"] == "keep" and again["drop_reasons"] == []


def test_each_drop_names_the_value_and_the_bound() -> None:
    from stages.filter import FilterStage

    stage = FilterStage(FilterConfig())
    stage._ready = True
    (row,) = stage([{"status": "ok", "segment_index": 0, "duration_s": 0.4, "snr_db": 3.25, "language": "fr",
                     "text": "bonjour", "drop_reasons": ["roundtrip_wer>0.3"]}])  # fmt: skip
    assert row["verdict"] == "drop"
    assert row["drop_reasons"][0] == "roundtrip_wer>0.3"  # upstream reasons kept
    details = dict(d.split(": ", 1) for d in row["drop_details"])
    assert details["duration_too_short"] == "duration_s=0.4 < 1"
    assert details["low_snr"] == "snr_db=3.25 < 10"
    assert details["language_not_allowed"] == "language=fr not in en,zh"
    assert set(details) == set(row["drop_reasons"]) - {"roundtrip_wer>0.3"}
    # Judging again re-judges: details do not accumulate.
    assert stage([row])[0]["drop_details"] == row["drop_details"]


def test_the_filter_judges_the_stream_that_goes_into_the_shard(tmp_path) -> None:
    """Noisy original, clean enhanced: by default the enhanced stream is measured and kept."""
    import numpy as np
    import soundfile as sf

    from pipeline.config import RunConfig
    from stages.filter import FilterStage
    from stages.quality import QualityStage
    from tests.conftest import espeak

    clean, sr = sf.read(espeak("The results were checked twice before the data was released.", tmp_path / "s.wav"),
                        dtype="float32")  # fmt: skip
    clean = 0.5 * clean / np.max(np.abs(clean))
    noisy = clean + 0.05 * np.random.default_rng(0).standard_normal(clean.size).astype(np.float32)
    row = {"status": "ok", "segment_index": 0, "sample_rate": sr, "duration_s": clean.size / sr,
           "audio": noisy, "audio_enhanced": clean}  # fmt: skip
    verdicts = {}
    for stream in ("enhanced", "original"):
        cfg = RunConfig.model_validate({"quality": {"dnsmos": False}, "filter": {"stream": stream}})
        assert cfg.quality.audio_field == {"enhanced": "audio_enhanced", "original": "audio"}[stream]
        quality, filt = QualityStage(cfg.quality), FilterStage(cfg.filter)
        quality._ready = filt._ready = True
        (out,) = filt(quality([dict(row)]))
        assert out["quality_stream"] == stream
        verdicts[stream] = out
    assert "low_snr" not in verdicts["enhanced"]["drop_reasons"]
    assert "low_snr" in verdicts["original"]["drop_reasons"]
    # Without an enhanced stream, "enhanced" measures the original (what is written).
    quality = QualityStage(RunConfig.model_validate({"quality": {"dnsmos": False}}).quality)
    quality._ready = True
    (plain,) = quality([{k: v for k, v in row.items() if k != "audio_enhanced"}])
    assert plain["quality_stream"] == "original" and plain["snr_db"] == verdicts["original"]["snr_db"]

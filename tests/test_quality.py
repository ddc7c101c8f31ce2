"""Quality signals on generated defects: each defect is flagged with the right reason, clean
speech passes. Audio is real speech (pytest-audioeval clips with exact transcripts, and
espeak-ng), defects are made from it with known parameters."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kimia_model.audio import decode_bytes, encode_flac, resample
from kimia_model.refs import ModelNotFoundError
from stages.filter import FilterConfig, FilterStage
from stages.quality import (
    QualityConfig,
    QualityStage,
    audio_fingerprint,
    clipping_ratio,
    repeat_ngram_ratio,
    text_units,
    wada_snr,
)

SR = 16000


def _audioeval(lang: str, name: str) -> tuple[np.ndarray, str]:
    spec = importlib.util.find_spec("pytest_audioeval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pytest-audioeval is not installed")
    base = Path(next(iter(spec.submodule_search_locations))) / "samples" / "audio" / lang
    audio, sr = sf.read(base / f"{name}.wav", dtype="float32", always_2d=True)
    return resample(audio.mean(axis=1), sr, SR), (base / f"{name}.txt").read_text().strip()


def _normalise(audio: np.ndarray) -> np.ndarray:
    """Peak at -6 dBFS, roughly what decode's loudness normalisation leaves."""
    return (0.5 * audio / np.max(np.abs(audio))).astype(np.float32)


def _with_noise(speech: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """White noise scaled to ``snr_db`` below the speech's mean power (the usual definition)."""
    noise = np.random.default_rng(seed).standard_normal(speech.size)
    noise *= np.sqrt(np.mean(speech.astype(np.float64) ** 2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return (speech + noise).astype(np.float32)


@pytest.fixture(scope="module")
def fox() -> tuple[np.ndarray, str]:
    audio, text = _audioeval("en", "quick_brown_fox")
    return _normalise(audio), text


@pytest.fixture(scope="module")
def espeak_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, str]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    text = "Speech data curation needs careful quality measurements before a model is trained."
    wav = tmp_path_factory.mktemp("espeak") / "clip.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), text], check=True, capture_output=True)
    audio, sr = sf.read(wav, dtype="float32")
    return _normalise(resample(audio, sr, SR)), text


@pytest.fixture(scope="module")
def dnsmos_stage() -> QualityStage:
    stage = QualityStage(QualityConfig(dnsmos=True))
    stage.setup()
    stage._ready = True
    return stage


@pytest.fixture(scope="module")
def fast_stage() -> QualityStage:
    return QualityStage(QualityConfig(dnsmos=False))


def _row(audio: np.ndarray, text: str | None, rec: str = "r1", idx: int = 0, **fields: object) -> dict:
    row = {
        "recording_id": rec,
        "segment_index": idx,
        "status": "ok",
        "sample_rate": SR,
        "duration_s": audio.size / SR,
        "audio": audio,
        "language": "en",
        "language_prob": 0.98,
        "avg_logprob": -0.25,
        "no_speech_prob": 0.02,
        "compression_ratio": 1.3,
    }
    if text is not None:
        row["text"] = text
    row.update(fields)
    return row


def _verdict(rows: list[dict], stage: QualityStage) -> list[dict]:
    return FilterStage(FilterConfig())(stage(rows))


# -- clean speech ----------------------------------------------------------------------------


def test_clean_speech_passes_every_check(dnsmos_stage, fox, espeak_clip) -> None:
    rows = [_row(fox[0], fox[1], "fox"), _row(espeak_clip[0], espeak_clip[1], "espeak")]
    out = _verdict(rows, dnsmos_stage)
    for r in out:
        assert r["status"] == "ok"
        assert r["verdict"] == "keep", (r["recording_id"], r["drop_reasons"])
        assert r["snr_db"] > 30  # no noise added: WADA sees a clean signal
        assert 2.5 <= r["dnsmos_ovrl"] <= 5.0
        assert r["clipping_ratio"] < 0.001
        assert 1.5 < r["words_per_s"] < 5.0
        assert r["repeat_ngram_ratio"] == 0.0
        assert r["no_speech_with_text"] is False
        assert len(r["audio_fp"]) == 32
    assert out[0]["provenance"]["quality"]["model"] == "pkg:dnsmos"


# -- known defects ---------------------------------------------------------------------------


def test_noisy_speech_low_snr_and_dnsmos(dnsmos_stage, fox) -> None:
    noisy = _with_noise(fox[0], 0.0)
    out = _verdict([_row(noisy, fox[1])], dnsmos_stage)[0]
    assert abs(out["snr_db"] - 0.0) <= 3.0
    assert "low_snr" in out["drop_reasons"]
    assert "low_dnsmos_ovrl" in out["drop_reasons"]
    assert out["verdict"] == "drop"


@pytest.mark.parametrize("snr", [0.0, 10.0, 20.0])
def test_wada_snr_within_3_db(espeak_clip, snr) -> None:
    est = [wada_snr(_with_noise(espeak_clip[0], snr, seed)) for seed in range(3)]
    assert abs(np.mean(est) - snr) <= 3.0, est


def test_clipped_speech_flagged(fast_stage, fox) -> None:
    # 12 dB of overdrive into a hard clip, then decode's gain change: flat tops below full scale.
    clipped = (0.6 * np.clip(4.0 * fox[0] / np.abs(fox[0]).max(), -1.0, 1.0)).astype(np.float32)
    out = _verdict([_row(clipped, fox[1])], fast_stage)[0]
    assert out["clipping_ratio"] > 0.01
    assert out["drop_reasons"] == ["clipping"]


def test_silent_segment_flagged(fast_stage) -> None:
    quiet = (1e-4 * np.random.default_rng(0).standard_normal(3 * SR)).astype(np.float32)  # -80 dBFS
    out = _verdict([_row(quiet, "")], fast_stage)[0]
    assert out["silence_ratio"] == 1.0
    # Low-level noise alone is also (rightly) low SNR; silence and the empty text must be named.
    assert {"mostly_silence", "empty_transcript"} <= set(out["drop_reasons"])
    zero = _verdict([_row(np.zeros(2 * SR, np.float32), None)], fast_stage)[0]
    assert zero["snr_db"] is None  # undefined, so not checked ...
    assert zero["drop_reasons"] == ["mostly_silence"]  # ... and silence still drops it


def test_hallucinated_repetition_flagged(fast_stage, fox) -> None:
    loop = " ".join(["Thank you for watching."] * 12)
    out = _verdict([_row(fox[0], loop, compression_ratio=None)], fast_stage)[0]
    assert out["repeat_ngram_ratio"] > 0.8
    assert out["text_compression_ratio"] > 2.4
    for reason in ("repeated_ngrams", "high_compression_ratio", "text_too_long_for_duration", "speaking_rate_too_fast"):
        assert reason in out["drop_reasons"], out["drop_reasons"]


def test_text_on_no_speech_flagged(fast_stage, fox) -> None:
    out = _verdict([_row(fox[0], fox[1], no_speech_prob=0.93)], fast_stage)[0]
    assert out["no_speech_with_text"] is True
    assert out["drop_reasons"] == ["no_speech_with_text"]


def test_wrong_language_flagged(fast_stage) -> None:
    audio, text = _audioeval("es", "pangrama")
    out = _verdict([_row(_normalise(audio), text, language="es", language_prob=0.97)], fast_stage)[0]
    assert out["drop_reasons"] == ["language_not_allowed"]


def test_mandarin_speaking_rate_uses_characters(fast_stage) -> None:
    audio, text = _audioeval("zh", "pangrama")
    out = _verdict([_row(_normalise(audio), text, language="zh")], fast_stage)[0]
    assert out["words_per_s"] is None  # no spaces in Mandarin: words are not counted ...
    assert 1.0 < out["chars_per_s"] < 25.0  # ... characters are
    assert out["verdict"] == "keep", out["drop_reasons"]


def test_exact_duplicates_within_and_across_recordings(fast_stage, fox) -> None:
    a = fox[0]
    rows = [
        _row(a, fox[1], "recA", 0),
        _row(a.copy(), fox[1], "recB", 3),  # same audio in another recording
        _row(a[: a.size // 2].copy(), "the quick brown fox", "recA", 1),  # different audio
        _row(a.copy(), fox[1], "recA", 2),  # and within the first recording
    ]
    out = _verdict(rows, fast_stage)
    assert [r["verdict"] for r in out] == ["keep", "drop", "keep", "drop"]
    assert out[1]["drop_reasons"] == ["duplicate_audio"] and out[1]["duplicate_of"] == "recA_00000"
    assert out[3]["duplicate_of"] == "recA_00000"
    # The fingerprint is that of the 16-bit audio the shard stores: recomputable after a round trip.
    decoded, sr = decode_bytes(encode_flac(a, SR))
    assert audio_fingerprint(decoded, sr) == audio_fingerprint(a, SR)
    assert audio_fingerprint(a, SR) != audio_fingerprint(a, 22050)


def test_short_segment_flagged(fast_stage, fox) -> None:
    out = _verdict([_row(fox[0][: SR // 2], "the")], fast_stage)[0]
    assert "duration_too_short" in out["drop_reasons"]


# -- measures and contract ---------------------------------------------------------------------


def test_text_helpers() -> None:
    assert text_units("Don't stop, 你好!") == ["don't", "stop", "你", "好"]
    assert repeat_ngram_ratio("a b") == 0.0
    assert repeat_ngram_ratio("no no no no no no", n=3) > 0.7


def test_clipping_ratio_is_relative_to_the_peak(fox) -> None:
    x = fox[0] / np.abs(fox[0]).max()
    assert clipping_ratio(0.3 * x) < 0.001
    # 6 dB of overdrive, then scaled down: flat tops at 0.3, nowhere near full scale.
    assert clipping_ratio(0.3 * np.clip(2 * x, -1, 1)) > 0.001


def test_bad_rows_are_quarantined_not_crashing(fast_stage, fox) -> None:
    bad = fox[0].copy()
    bad[10] = np.nan
    rows = [_row(bad, "x", "nan"), _row(fox[0], fox[1], "fine"), {**_row(fox[0], "y", "rate"), "sample_rate": 0}]
    out = {r["recording_id"]: r for r in fast_stage(rows)}
    assert out["nan"]["status"] == "quarantined" and "NaN" in out["nan"]["error"]
    assert out["rate"]["status"] == "quarantined" and "sample_rate" in out["rate"]["error"]
    assert out["fine"]["status"] == "ok"


def test_check_names_missing_dnsmos_files(tmp_path) -> None:
    stage = QualityStage(QualityConfig(model=str(tmp_path / "nowhere")))
    with pytest.raises(ModelNotFoundError, match="quality.model"):
        stage.check()
    QualityStage(QualityConfig(model=str(tmp_path / "nowhere"), dnsmos=False)).check()  # not needed: no error


def test_config_rejects_unknown_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        QualityConfig(snr_threshold=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        QualityConfig(clip_rel_level=1.5)


def test_dnsmos_matches_the_speechmos_reference(fox) -> None:
    """Our windowing with hop 1 s reproduces speechmos' scorer on a 12 s clip (4 windows)."""
    from speechmos import dnsmos as ref

    from kimia_model.refs import resolve_packaged
    from stages.quality import _Dnsmos

    audio = np.tile(fox[0], 5)[: 12 * SR]
    want = ref.run(audio, SR)
    got = _Dnsmos(resolve_packaged("dnsmos", "quality.model"), False, 1, hop_s=1.0)(audio)
    assert got["ovrl"] == pytest.approx(want["ovrl_mos"], abs=1e-4)
    assert got["sig"] == pytest.approx(want["sig_mos"], abs=1e-4)
    assert got["bak"] == pytest.approx(want["bak_mos"], abs=1e-4)
    fast = _Dnsmos(resolve_packaged("dnsmos", "quality.model"), False, 1)(audio)  # non-overlapping
    assert abs(fast["ovrl"] - want["ovrl_mos"]) < 0.2


def test_dnsmos_native_length_scores_a_short_segment_near_the_tiled_reference(fox) -> None:
    """dnsmos_short=native runs a rewritten graph on the clip's own frames; its score stays in
    the neighbourhood of the tiled reference (a different number, not a different scale)."""
    from kimia_model.refs import resolve_packaged
    from stages.quality import _Dnsmos

    model_dir = resolve_packaged("dnsmos", "quality.model")
    tiled = _Dnsmos(model_dir, False, 1, short="tile")
    native = _Dnsmos(model_dir, False, 1, short="native")
    assert tiled._native is None and native._native is not None
    audio = fox[0][: int(4.3 * SR)]
    a, b = tiled(audio), native(audio)
    for k in ("ovrl", "sig", "bak"):
        assert 1.0 <= b[k] <= 5.0 and abs(a[k] - b[k]) < 0.6, (k, a[k], b[k])
    long = np.tile(fox[0], 5)[: 12 * SR]  # past one window both modes run the same windows
    assert native(long) == tiled(long)

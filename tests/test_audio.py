from __future__ import annotations

import numpy as np
import pytest

from kimia_model.audio import decode_bytes, downmix, encode_flac, measure_lufs, normalize_loudness, resample


def _tone(freq: float, sr: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_resample_keeps_exact_length() -> None:
    for n in (0, 1, 2, 441, 44100, 44101):
        out = resample(np.zeros(n, np.float32), 44100, 16000)
        assert out.shape[0] == round(n * 16000 / 44100)


def test_resample_removes_content_above_new_nyquist() -> None:
    # A 12 kHz tone cannot exist at 16 kHz; a naive decimator folds it to 4 kHz.
    out = resample(_tone(12000, 48000), 48000, 16000)
    assert np.sqrt(np.mean(out[1000:-1000] ** 2)) < 1e-3


def test_resample_passes_band() -> None:
    out = resample(_tone(1000, 48000), 48000, 16000)
    rms = np.sqrt(np.mean(out[1000:-1000] ** 2))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_downmix_averages_channels() -> None:
    stereo = np.stack([np.ones(10), -np.ones(10) * 0.5], axis=1).astype(np.float32)
    assert np.allclose(downmix(stereo), 0.25)


def test_loudness_target_and_peak_limit() -> None:
    x = _tone(440, 16000, 3.0) * 0.05
    y, before = normalize_loudness(x, 16000, -23.0)
    assert before < -30
    assert measure_lufs(y, 16000) == pytest.approx(-23.0, abs=0.1)
    # A target that would clip is capped at the peak limit instead.
    z, _ = normalize_loudness(x, 16000, 0.0, peak_limit=0.9)
    assert np.max(np.abs(z)) == pytest.approx(0.9, rel=1e-4)


def test_loudness_of_silence_is_left_alone() -> None:
    y, lufs = normalize_loudness(np.zeros(16000, np.float32), 16000, -23.0)
    assert not np.isfinite(lufs) and not y.any()


def test_flac_round_trip_is_lossless_at_16_bit() -> None:
    x = _tone(440, 16000)
    y, sr = decode_bytes(encode_flac(x, 16000))
    assert sr == 16000 and y.shape == x.shape
    assert np.max(np.abs(y - x)) < 1.0 / 32768 + 1e-6


@pytest.mark.parametrize("sr,seconds", [(16000, 3.0), (48000, 2.3), (22050, 0.45), (16000, 40.0)])
def test_measure_lufs_matches_pyloudnorm(sr: int, seconds: float) -> None:
    """The numpy BS.1770 meter gives pyloudnorm's integrated loudness (same filters, blocks, gates)."""
    import pyloudnorm

    rng = np.random.default_rng(sr)
    n = int(sr * seconds)
    envelope = np.where(np.arange(n) % sr < sr // 2, 1.0, 0.01)  # loud and near-silent halves: both gates act
    x = (rng.standard_normal(n) * 0.1 * envelope).astype(np.float32)
    ref = pyloudnorm.Meter(sr).integrated_loudness(x.astype(np.float64))
    assert measure_lufs(x, sr) == pytest.approx(ref, abs=1e-6)

"""Audio helpers shared by the model code and every stage: resampling, downmixing, loudness, FLAC bytes.

One resampler for the whole project (soxr, "VHQ": a linear-phase anti-aliasing filter with
stop-band attenuation far below what 16-bit audio can show), so that a tone above the new
Nyquist frequency is removed rather than folded back into the speech band, and so every stage
that needs another rate (16 kHz for Whisper, 48 kHz for BSRNN/DeepFilterNet) gets the same
quality with no drift in length.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling of a mono float signal.

    The output has exactly ``round(len(audio) * target_sr / orig_sr)`` samples, so segment
    boundaries computed in seconds stay valid at either rate.

    >>> resample(np.zeros(48000, np.float32), 48000, 16000).shape
    (16000,)
    """
    audio = np.asarray(audio, dtype=np.float32)
    if orig_sr == target_sr or audio.size == 0:
        return audio.copy() if orig_sr == target_sr else np.zeros(0, np.float32)
    out = soxr.resample(audio, orig_sr, target_sr, quality="VHQ").astype(np.float32, copy=False)
    want = int(round(audio.shape[0] * target_sr / orig_sr))
    if out.shape[0] > want:
        out = out[:want]
    elif out.shape[0] < want:
        out = np.pad(out, (0, want - out.shape[0]))
    return out


def downmix(audio: np.ndarray) -> np.ndarray:
    """Average channels (``[frames, channels]`` as soundfile reads them) to mono float32."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        return audio
    return audio.mean(axis=1, dtype=np.float32)


def measure_lufs(audio: np.ndarray, sr: int) -> float:
    """Integrated loudness (ITU-R BS.1770-4) in LUFS; -inf for silence or too-short audio."""
    import pyloudnorm

    if audio.size < int(0.4 * sr) + 1:  # BS.1770 gates need at least one 400 ms block
        return float("-inf")
    with np.errstate(divide="ignore"):
        return float(pyloudnorm.Meter(sr).integrated_loudness(audio.astype(np.float64)))


def normalize_loudness(
    audio: np.ndarray, sr: int, target_lufs: float, peak_limit: float = 0.99
) -> tuple[np.ndarray, float]:
    """Scale to ``target_lufs`` integrated loudness, never letting the peak exceed ``peak_limit``.

    Returns the new audio and the loudness measured before scaling. Audio too short or too
    quiet to measure is peak-normalised to -20 dBFS instead of being amplified without bound.
    """
    lufs = measure_lufs(audio, sr)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak == 0.0:
        return audio.astype(np.float32, copy=True), lufs
    if np.isfinite(lufs):
        gain = 10.0 ** ((target_lufs - lufs) / 20.0)
    else:
        gain = 0.1 / peak
    # A gain that would clip is reduced: loudness target is a goal, clipping is damage.
    gain = min(gain, peak_limit / peak)
    return (audio * gain).astype(np.float32), lufs


def encode_flac(audio: np.ndarray, sr: int) -> bytes:
    """Lossless 16-bit FLAC bytes of a float signal in [-1, 1] (values beyond are clipped)."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """Decode audio bytes (any format libsndfile reads) to mono float32 and its rate."""
    audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return downmix(audio), int(sr)


def quiet_runs(audio: np.ndarray, sr: int, *, hop_s: float = 0.01, below_db: float = 35.0,
                 min_s: float = 0.1) -> list[tuple[float, float]]:
    """(start_s, end_s) of stretches at least ``min_s`` long that are quiet: below the loud
    level (95th percentile of 10 ms frame levels) by ``below_db``, or within 6 dB of the noise
    floor (5th percentile) when the floor is higher than that.

    Levels are relative to the recording itself, so the same rule finds the pauses of a quiet
    studio take and of a noisy street interview; used wherever a cut must fall between words.

    >>> sr = 1000
    >>> x = np.concatenate([np.ones(500), np.zeros(300), np.ones(500)]).astype(np.float32)
    >>> quiet_runs(x, sr)
    [(0.5, 0.8)]
    """
    hop = max(1, int(hop_s * sr))
    n = len(audio) // hop
    if n == 0:
        return []
    rms = np.sqrt(np.mean(np.asarray(audio[: n * hop], np.float64).reshape(n, hop) ** 2, axis=1))
    db = 20 * np.log10(rms + 1e-10)
    threshold = max(np.percentile(db, 95) - below_db, np.percentile(db, 5) + 6.0)
    quiet = np.concatenate([[False], db < threshold, [False]])
    edges = np.flatnonzero(np.diff(quiet.astype(np.int8)))
    runs = [(float(a * hop_s), float(b * hop_s)) for a, b in zip(edges[::2], edges[1::2])]
    return [(a, b) for a, b in runs if b - a >= min_s]

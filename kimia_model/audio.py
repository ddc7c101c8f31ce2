"""Audio helpers shared by the model code and every stage: resampling, downmixing, loudness, FLAC bytes.

One resampler for the whole project (soxr, "VHQ": a linear-phase anti-aliasing filter with
stop-band attenuation far below what 16-bit audio can show), so that a tone above the new
Nyquist frequency is removed rather than folded back into the speech band, and so every stage
that needs another rate (16 kHz for Whisper, 48 kHz for BSRNN/DeepFilterNet) gets the same
quality with no drift in length.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=8)
def _k_weighting_response(sr: int) -> np.ndarray:
    """Impulse response of BS.1770's K-weighting (shelf then high-pass), cut where it is < 1e-18.

    The two biquads are pyloudnorm's (RBJ cookbook designs: +4 dB shelf at 1500 Hz, Q 0.707;
    high-pass at 38 Hz, Q 0.5). Their poles lie well inside the unit circle (the slowest decays
    with a time constant of about 4 ms), so a response of one second holds the filter exactly
    to float64 precision, and filtering becomes a convolution that numpy's FFT does: no scipy
    import (about 2 s of every decode worker's start-up) and no per-sample Python loop.
    """
    biquads = []
    for gain_db, q, fc, kind in ((4.0, 1 / np.sqrt(2), 1500.0, "shelf"), (0.0, 0.5, 38.0, "high_pass")):
        a_lin = 10 ** (gain_db / 40.0)
        w0 = 2.0 * np.pi * fc / sr
        alpha = np.sin(w0) / (2.0 * q)
        cos, sq = np.cos(w0), 2 * np.sqrt(a_lin) * alpha
        if kind == "shelf":
            b = [a_lin * ((a_lin + 1) + (a_lin - 1) * cos + sq), -2 * a_lin * ((a_lin - 1) + (a_lin + 1) * cos),
                 a_lin * ((a_lin + 1) + (a_lin - 1) * cos - sq)]
            a = [(a_lin + 1) - (a_lin - 1) * cos + sq, 2 * ((a_lin - 1) - (a_lin + 1) * cos),
                 (a_lin + 1) - (a_lin - 1) * cos - sq]
        else:
            b = [(1 + cos) / 2, -(1 + cos), (1 + cos) / 2]
            a = [1 + alpha, -2 * cos, 1 - alpha]
        biquads.append(([x / a[0] for x in b], [x / a[0] for x in a]))
    n = max(64, int(sr))
    h = [0.0] * n
    h[0] = 1.0
    for (b0, b1, b2), (_, a1, a2) in biquads:  # direct form I, as lfilter
        x1 = x2 = y1 = y2 = 0.0
        out = [0.0] * n
        for i, x in enumerate(h):
            y = b0 * x + b1 * x1 + b2 * x2 - a1 * y1 - a2 * y2
            out[i] = y
            x2, x1, y2, y1 = x1, x, y1, y
        h = out
    response = np.asarray(h)
    keep = np.flatnonzero(np.abs(response) > 1e-18)
    return response[: int(keep[-1]) + 1] if keep.size else response[:1]


def _block_energies(audio: np.ndarray, sr: int, bounds: np.ndarray) -> np.ndarray:
    """Sum of squares of the K-weighted signal between consecutive ``bounds`` (sample indices).

    Filtered chunk by chunk (overlap-add), so memory stays bounded for hours of audio.
    """
    h = _k_weighting_response(sr)
    nfft = 1 << int(np.ceil(np.log2(8 * len(h))))
    chunk = nfft - len(h) + 1
    kernel = np.fft.rfft(h, nfft)
    total = np.zeros(len(bounds) - 1)
    tail = np.zeros(len(h) - 1)
    n = audio.shape[0]
    for c0 in range(0, n, chunk):
        piece = np.asarray(audio[c0 : c0 + chunk], dtype=np.float64)
        m = len(piece)
        y = np.fft.irfft(np.fft.rfft(piece, nfft) * kernel, nfft)
        y[: len(h) - 1] += tail
        tail = y[m : m + len(h) - 1].copy()
        if len(tail) < len(h) - 1:
            tail = np.pad(tail, (0, len(h) - 1 - len(tail)))
        cum = np.concatenate([[0.0], np.cumsum(y[:m] ** 2)])
        # Sub-intervals of [c0, c0 + m) cut at the block bounds: interval k is [bounds[k], bounds[k+1]).
        first = max(int(np.searchsorted(bounds, c0, side="right")) - 1, 0)
        last = min(int(np.searchsorted(bounds, c0 + m, side="left")), len(bounds) - 1)
        if last <= first:
            continue
        cuts = np.clip(bounds[first : last + 1] - c0, 0, m)
        total[first:last] += cum[cuts[1:]] - cum[cuts[:-1]]
    return total


def measure_lufs(audio: np.ndarray, sr: int) -> float:
    """Integrated loudness (ITU-R BS.1770-4) in LUFS; -inf for silence or too-short audio.

    The same measurement as pyloudnorm's ``Meter(sr).integrated_loudness`` (K-weighting,
    400 ms blocks every 100 ms, absolute gate -70 LUFS, relative gate -10 LU, the same block
    boundaries), computed with numpy alone (see :func:`_k_weighting_response`).
    """
    if audio.size < int(0.4 * sr) + 1:  # BS.1770 gates need at least one 400 ms block
        return float("-inf")
    t_g, step = 0.4, 0.25
    n_blocks = int(np.round((audio.shape[0] / sr - t_g) / (t_g * step))) + 1
    j = np.arange(n_blocks)
    lower = (t_g * (j * step) * sr).astype(np.int64)
    upper = (t_g * (j * step + 1) * sr).astype(np.int64)
    bounds = np.unique(np.concatenate([lower, upper]))
    cum = np.concatenate([[0.0], np.cumsum(_block_energies(audio, sr, bounds))])
    pos = {int(b): k for k, b in enumerate(bounds)}
    z = (cum[[pos[int(u)] for u in upper]] - cum[[pos[int(lo)] for lo in lower]]) / (t_g * sr)
    with np.errstate(divide="ignore"):
        loud = -0.691 + 10.0 * np.log10(z)
        gated = z[loud >= -70.0]
        if gated.size == 0:
            return float("-inf")
        relative = -0.691 + 10.0 * np.log10(gated.mean()) - 10.0
        kept = z[(loud > relative) & (loud > -70.0)]
        return float(-0.691 + 10.0 * np.log10(kept.mean() if kept.size else 0.0))


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


def frame_levels(audio: np.ndarray, sr: int, hop_s: float = 0.01) -> np.ndarray:
    """RMS of consecutive ``hop_s`` frames (a trailing partial frame is dropped).

    >>> frame_levels(np.ones(25, np.float32), 1000).tolist()
    [1.0, 1.0]
    """
    hop = max(1, int(hop_s * sr))
    n = len(audio) // hop
    if n == 0:
        return np.zeros(0)
    return np.sqrt(np.mean(np.asarray(audio[: n * hop], np.float64).reshape(n, hop) ** 2, axis=1))


def quiet_runs(audio: np.ndarray, sr: int, *, hop_s: float = 0.01, below_db: float = 35.0,
               min_s: float = 0.1, levels: np.ndarray | None = None) -> list[tuple[float, float]]:
    """(start_s, end_s) of stretches at least ``min_s`` long that are quiet: below the loud
    level (95th percentile of 10 ms frame levels) by ``below_db``, or within 6 dB of the noise
    floor (5th percentile) when the floor is higher than that.

    Levels are relative to the recording itself, so the same rule finds the pauses of a quiet
    studio take and of a noisy street interview; used wherever a cut must fall between words.
    A caller that needs the frame levels too passes ``levels`` (:func:`frame_levels` of the
    same audio and ``hop_s``) so they are computed once.

    >>> sr = 1000
    >>> x = np.concatenate([np.ones(500), np.zeros(300), np.ones(500)]).astype(np.float32)
    >>> quiet_runs(x, sr)
    [(0.5, 0.8)]
    """
    rms = frame_levels(audio, sr, hop_s) if levels is None else levels
    if rms.size == 0:
        return []
    db = 20 * np.log10(rms + 1e-10)
    threshold = max(np.percentile(db, 95) - below_db, np.percentile(db, 5) + 6.0)
    quiet = np.concatenate([[False], db < threshold, [False]])
    edges = np.flatnonzero(np.diff(quiet.astype(np.int8)))
    runs = [(float(a * hop_s), float(b * hop_s)) for a, b in zip(edges[::2], edges[1::2])]
    return [(a, b) for a, b in runs if b - a >= min_s]

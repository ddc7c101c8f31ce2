"""Speech regions with Silero VAD (its pip package ships the model), shared by segmentation
and diarization.

Silero runs on 16 kHz audio in 32 ms frames (512 samples, each seen with the 64 samples
before it) with a recurrent state. Its streaming form is called once per frame from Python
(31 calls per second of audio): about RTF 0.035 on one core, more than the budget of a whole
decode-and-segment front end. The package also ships the same network exported as a
*sequence* model (``silero_vad_16k_sequence.onnx``), which takes a block of up to 512 frames
per ONNX Runtime call and yields the streaming model's per-frame probabilities: on
espeak-ng conversations, identical regions in a tenth of the time.

This module runs that ONNX file itself, with ONNX Runtime and numpy only. The package's own
entry points import torch on their way (its ``__init__`` loads the JIT helpers): 1.1 s on an
idle core and a peak of 650 MB resident per VAD worker instead of 66 MB, paid before a
label-only run's first segment could reach transcription. The frame probabilities become regions by Silero's rule, written out in
:func:`regions_from_probabilities`; the tests hold both to the package's results.

Memory stays flat however long the recording is (one block at a time); the ONNX session is
not shared between workers, each owns one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from kimia_model.audio import resample
from kimia_model.ort_session import onnx_session
from kimia_model.refs import require_path, resolve_packaged

VAD_SAMPLE_RATE = 16000
FRAME_SAMPLES = 512  # 32 ms at 16 kHz: one probability per frame
CONTEXT_SAMPLES = 64  # the tail of the previous frame each frame is seen with
BLOCK_FRAMES = 512  # frames per ONNX call (16.4 s): few Python round trips, small buffers
STATE_SIZE = 128  # the recurrent state the model hands from one block to the next
SEQUENCE_MODEL = "data/silero_vad_16k_sequence.onnx"


def frame_blocks(audio: np.ndarray, block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """The model's input: frames of ``CONTEXT_SAMPLES + FRAME_SAMPLES``, a block at a time.

    Each frame carries the last 64 samples of the frame before it (zeros before the first),
    as the streaming model keeps them between calls; the last frame is zero-padded.

    >>> [b.shape for b in frame_blocks(np.arange(1100, dtype=np.float32), block_frames=2)]
    [(2, 576), (1, 576)]
    >>> b = next(frame_blocks(np.arange(1100, dtype=np.float32)))
    >>> float(b[1, 0]), float(b[1, 63]), float(b[1, 64]), float(b[2, -1])
    (448.0, 511.0, 512.0, 0.0)
    """
    n_frames = -(-audio.size // FRAME_SAMPLES)
    context = np.zeros(CONTEXT_SAMPLES, np.float32)
    for first in range(0, n_frames, block_frames):
        count = min(block_frames, n_frames - first)
        frames = np.zeros((count, FRAME_SAMPLES), np.float32)
        chunk = audio[first * FRAME_SAMPLES:(first + count) * FRAME_SAMPLES]
        frames.reshape(-1)[: chunk.size] = chunk
        block = np.empty((count, CONTEXT_SAMPLES + FRAME_SAMPLES), np.float32)
        block[:, CONTEXT_SAMPLES:] = frames
        block[0, :CONTEXT_SAMPLES] = context
        block[1:, :CONTEXT_SAMPLES] = frames[:-1, -CONTEXT_SAMPLES:]
        context = frames[-1, -CONTEXT_SAMPLES:].copy()
        yield block


def regions_from_probabilities(
    probs: Sequence[float] | np.ndarray,
    n_samples: int,
    *,
    threshold: float = 0.5,
    min_speech: int = 4000,
    min_silence: int = 4800,
    pad: int = 800,
) -> list[tuple[int, int]]:
    """Silero's rule from frame probabilities to speech regions, in samples at 16 kHz.

    Hysteresis: a region opens at the first frame at or above ``threshold`` and closes
    where the probability falls below ``threshold - 0.15`` (at least 0.01) and stays out of
    speech for ``min_silence`` samples; frames in between neither open nor close one. A
    region must last more than ``min_speech`` samples. Regions then grow by ``pad`` on each
    side, except that two closer than ``2 * pad`` meet halfway across their gap.

    Args:
        probs: one speech probability per 512-sample frame.
        n_samples: the recording's length (a region still open at the end closes there).
        threshold, min_speech, min_silence, pad: as above; lengths in samples.

    >>> p = [0.0] * 10 + [0.9] * 20 + [0.0] * 20 + [0.9] * 5 + [0.4] * 2 + [0.9] * 5
    >>> regions_from_probabilities(p, len(p) * 512, min_speech=2000, min_silence=3000, pad=0)
    [(5120, 15360), (25600, 31744)]
    >>> regions_from_probabilities(p, len(p) * 512, min_speech=2000, min_silence=3000, pad=6000)
    [(0, 20480), (20480, 31744)]
    """
    low = max(threshold - 0.15, 0.01)
    regions: list[list[int]] = []
    start: int | None = None  # the open region's first sample
    quiet_from: int | None = None  # where the open region last fell below ``low``
    for i, p in enumerate(probs):
        at = i * FRAME_SAMPLES
        if p >= threshold:
            quiet_from = None
            if start is None:
                start = at
        elif p < low and start is not None:
            quiet_from = at if quiet_from is None else quiet_from
            if at - quiet_from >= min_silence:
                if quiet_from - start > min_speech:
                    regions.append([start, quiet_from])
                start = quiet_from = None
    if start is not None and n_samples - start > min_speech:
        regions.append([start, n_samples])

    for n, region in enumerate(regions):
        if n == 0:
            region[0] = max(0, region[0] - pad)
        if n + 1 < len(regions):
            following = regions[n + 1]
            gap = following[0] - region[1]
            grow = gap // 2 if gap < 2 * pad else pad
            region[1] = min(n_samples, region[1] + grow)
            following[0] = max(0, following[0] - grow)
        else:
            region[1] = min(n_samples, region[1] + pad)
    return [(a, b) for a, b in regions]


class SileroVAD:
    """A loaded Silero VAD sequence model (ONNX Runtime, one intra-op thread).

    Args:
        config_key: the config key named when the ``silero-vad`` package is missing.

    Example:
        >>> vad = SileroVAD()
        >>> vad.speech_regions(np.zeros(16000, np.float32), 16000)
        []
    """

    model_id = "pkg:silero-vad"

    def __init__(self, config_key: str = "segment.vad") -> None:
        path = require_path(
            resolve_packaged("silero-vad", config_key) / SEQUENCE_MODEL,
            config_key,
            "Reinstall it: pip install --force-reinstall silero-vad==6.2.3",
        )
        self._session = onnx_session(path, threads=1)

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """One speech probability per 32 ms frame of 16 kHz mono ``audio``."""
        audio = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
        h = np.zeros((1, 1, STATE_SIZE), np.float32)
        c = np.zeros((1, 1, STATE_SIZE), np.float32)
        out: list[np.ndarray] = []
        for block in frame_blocks(audio):
            probs, h, c = self._session.run(["speech_probs", "hn", "cn"], {"input": block, "h": h, "c": c})
            out.append(probs)
        return np.concatenate(out).reshape(-1) if out else np.zeros(0, np.float32)

    def speech_regions(
        self,
        audio: np.ndarray,
        sample_rate: int,
        *,
        threshold: float = 0.5,
        min_speech_s: float = 0.25,
        min_silence_s: float = 0.3,
        speech_pad_s: float = 0.05,
    ) -> list[tuple[float, float]]:
        """Speech regions in seconds, sorted and non-overlapping.

        Args:
            audio: mono float32 at ``sample_rate`` (resampled to 16 kHz here when needed).
            threshold: speech probability above which a window counts as speech.
            min_speech_s: regions shorter than this are discarded (clicks, breaths).
            min_silence_s: pauses shorter than this do not split a region.
            speech_pad_s: padding added on each side so word edges are not cut.
        """
        if sample_rate != VAD_SAMPLE_RATE:
            audio = resample(audio, sample_rate, VAD_SAMPLE_RATE)
        if audio.size < FRAME_SAMPLES:
            return []
        regions = regions_from_probabilities(
            self.probabilities(audio),
            int(audio.size),
            threshold=threshold,
            min_speech=round(min_speech_s * VAD_SAMPLE_RATE),
            min_silence=round(min_silence_s * VAD_SAMPLE_RATE),
            pad=round(speech_pad_s * VAD_SAMPLE_RATE),
        )
        return [(a / VAD_SAMPLE_RATE, b / VAD_SAMPLE_RATE) for a, b in regions]


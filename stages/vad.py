"""Speech regions with Silero VAD (its pip package ships the model), shared by segmentation
and diarization.

Silero runs on 16 kHz audio in 32 ms windows with a recurrent state, so memory stays flat
however long the recording is; the model object is not thread-safe, so each worker owns one.
"""

from __future__ import annotations

import numpy as np

from kimia_model.audio import resample

VAD_SAMPLE_RATE = 16000


class SileroVAD:
    """A loaded Silero VAD model (the JIT build that the ``silero-vad`` wheel ships).

    Example:
        >>> vad = SileroVAD()
        >>> vad.speech_regions(np.zeros(16000, np.float32), 16000)
        []
    """

    model_id = "pkg:silero-vad"

    def __init__(self) -> None:
        import torch
        from silero_vad import load_silero_vad

        torch.set_num_threads(max(1, torch.get_num_threads()))
        self._model = load_silero_vad(onnx=False)

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
        import torch
        from silero_vad import get_speech_timestamps

        if sample_rate != VAD_SAMPLE_RATE:
            audio = resample(audio, sample_rate, VAD_SAMPLE_RATE)
        if audio.size < 512:
            return []
        stamps = get_speech_timestamps(
            torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)),
            self._model,
            threshold=threshold,
            sampling_rate=VAD_SAMPLE_RATE,
            min_speech_duration_ms=int(min_speech_s * 1000),
            min_silence_duration_ms=int(min_silence_s * 1000),
            speech_pad_ms=int(speech_pad_s * 1000),
        )
        self._model.reset_states()
        return [(s["start"] / VAD_SAMPLE_RATE, s["end"] / VAD_SAMPLE_RATE) for s in stamps]

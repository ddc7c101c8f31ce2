"""Segmentation by voice activity: a recording becomes speech segments of bounded length.

This is the segmentation used when diarization is off. Silero VAD finds speech regions;
regions closer than ``max_gap_s`` are joined while the result stays within
``max_segment_s`` (long-form context for the LM, Whisper's 30 s window for the labeller),
and a region longer than that is cut at its quietest point, never mid-word if a pause exists.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from stages.base import STATUS_EMPTY, STATUS_OK, Row, Stage, StageConfig, runtime_label
from stages.rows import AUDIO_FIELDS, span_samples


class SegmentConfig(StageConfig):
    """VAD segmentation settings (used while ``diarize`` is disabled)."""

    batch_size: int = Field(1, ge=1, le=64, description="Recordings per call.")
    input_stream: Literal["original", "enhanced"] = Field(
        "original", description="Which audio the VAD listens to; segments cut both streams alike."
    )
    threshold: float = Field(0.5, gt=0, lt=1, description="Silero speech probability threshold.")
    min_speech_s: float = Field(0.25, ge=0, description="VAD regions shorter than this are ignored.")
    min_silence_s: float = Field(0.3, ge=0, description="Pauses shorter than this do not end a region.")
    speech_pad_s: float = Field(0.1, ge=0, le=1, description="Padding kept around each region.")
    min_segment_s: float = Field(1.0, ge=0, description="Segments shorter than this are not emitted.")
    max_segment_s: float = Field(27.0, gt=1, le=30, description="Longest segment (s); 27 s as in Kimi-Audio, <= Whisper's 30 s.")
    max_gap_s: float = Field(2.0, ge=0, description="Regions separated by at most this much silence are joined.")

    @model_validator(mode="after")
    def _bounds(self) -> "SegmentConfig":
        if self.min_segment_s >= self.max_segment_s:
            raise ValueError(f"min_segment_s ({self.min_segment_s}) must be < max_segment_s ({self.max_segment_s})")
        return self


def join_regions(regions: list[tuple[float, float]], max_gap_s: float, max_len_s: float) -> list[tuple[float, float]]:
    """Greedily join consecutive regions whose gap is <= ``max_gap_s`` while the span fits.

    >>> join_regions([(0, 1), (1.5, 2), (5, 6)], max_gap_s=1.0, max_len_s=10)
    [(0, 2), (5, 6)]
    """
    out: list[tuple[float, float]] = []
    for start, end in regions:
        if out and start - out[-1][1] <= max_gap_s and end - out[-1][0] <= max_len_s:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def split_long(
    audio: np.ndarray, sr: int, start: float, end: float, max_len_s: float, frame_s: float = 0.05
) -> list[tuple[float, float]]:
    """Cut ``[start, end)`` into pieces of at most ``max_len_s`` at the quietest frames.

    Each cut is placed at the lowest-energy frame in the back half of the allowed window, so
    pieces are neither tiny nor cut mid-word when a pause exists.
    """
    pieces: list[tuple[float, float]] = []
    frame = max(1, int(frame_s * sr))
    while end - start > max_len_s:
        lo = start + max_len_s / 2
        hi = start + max_len_s
        a, b = int(lo * sr), int(hi * sr)
        window = audio[a:b]
        n = window.shape[0] // frame
        if n == 0:
            cut = hi
        else:
            energy = (window[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
            cut = lo + (int(np.argmin(energy)) + 0.5) * frame / sr
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def cut_segments(
    rec: Row,
    spans: list[tuple[float, float, str | None]],
    extras: list[dict[str, Any]] | None = None,
    *,
    empty_reason: str = "no speech found",
) -> Row:
    """The recording with its ``segments`` (shared by VAD segmentation and diarization).

    Segments are offsets into the recording's audio, never copies of it. Spans are clamped
    to the audio, empty ones skipped, and the survivors numbered in order.

    Args:
        rec: the recording row (``audio`` at ``sample_rate``).
        spans: ``(start_s, end_s, speaker)`` in time order.
        extras: per-span fields to add (e.g. diarization's overlap flags), parallel to ``spans``.
        empty_reason: the recording's ``reason`` when no span survives.

    Returns:
        The recording row with ``segments`` per ``stages/rows.py``, or with
        ``status="empty"``, no segments and no audio when nothing is left.

    >>> rec = {"status": "ok", "sample_rate": 10, "duration_s": 2.0, "audio": np.zeros(20, np.float32)}
    >>> [(s["start_s"], s["end_s"]) for s in cut_segments(rec, [(0.0, 0.5, None), (1.5, 9.0, None)])["segments"]]
    [(0.0, 0.5), (1.5, 2.0)]
    >>> cut_segments(rec, [])["status"]
    'empty'
    """
    sr = int(rec["sample_rate"])
    n_samples = int(rec["audio"].shape[0])
    segments: list[Row] = []
    for n, (start, end, speaker) in enumerate(spans):
        a, b = span_samples({"start_s": start, "end_s": end}, sr, n_samples)
        if b <= a:
            continue
        segments.append({
            **copy.deepcopy(extras[n] if extras else {}),
            "status": STATUS_OK,
            "segment_index": len(segments),
            "start_s": a / sr,
            "end_s": b / sr,
            "speaker": speaker,
        })
    if not segments:  # nothing will be written: the audio need not travel any further
        kept = {k: v for k, v in rec.items() if k not in AUDIO_FIELDS}
        return {**kept, "segments": [], "status": STATUS_EMPTY, "reason": empty_reason}
    return {**rec, "segments": segments}


class SegmentStage(Stage):
    """Recording rows get their ``segments`` from Silero VAD (offsets, no audio copied)."""

    name = "segment"
    level = "recording"
    reads = ("audio", "audio_enhanced", "sample_rate", "duration_s")
    writes = ("segments",)
    uses_model = True
    cpu_share = 0.05

    config: SegmentConfig

    def setup(self) -> None:
        from stages.vad import SileroVAD

        self._vad = SileroVAD()

    def model_id(self) -> str:
        return "pkg:silero-vad"

    def runtime(self) -> str | None:
        return runtime_label("cpu", "float32", "none")  # Silero's ONNX export on onnxruntime's CPU provider

    def spans(self, audio: np.ndarray, sr: int) -> list[tuple[float, float]]:
        """Speech spans of a recording after joining and splitting (seconds)."""
        cfg = self.config
        regions = self._vad.speech_regions(
            audio,
            sr,
            threshold=cfg.threshold,
            min_speech_s=cfg.min_speech_s,
            min_silence_s=cfg.min_silence_s,
            speech_pad_s=cfg.speech_pad_s,
        )
        spans: list[tuple[float, float]] = []
        for start, end in join_regions(regions, cfg.max_gap_s, cfg.max_segment_s):
            spans.extend(split_long(audio, sr, start, end, cfg.max_segment_s))
        return [(s, e) for s, e in spans if e - s >= cfg.min_segment_s]

    def process_batch(self, rows: list[Row]) -> list[Row]:
        out: list[Row] = []
        for rec in rows:
            stream = rec["audio"]
            if self.config.input_stream == "enhanced" and rec.get("audio_enhanced") is not None:
                stream = rec["audio_enhanced"]
            spans = self.spans(stream, int(rec["sample_rate"]))
            out.append(cut_segments(rec, [(s, e, None) for s, e in spans]))
        return out

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from stages.base import STATUS_EMPTY, STATUS_OK
from stages.rows import segment_views
from stages.segment import SegmentConfig, SegmentStage, cut_segments, join_regions, split_long
from stages.decode import DecodeConfig, DecodeStage


def test_join_respects_gap_and_length() -> None:
    regions = [(0.0, 5.0), (6.0, 10.0), (13.0, 14.0), (14.5, 30.0)]
    assert join_regions(regions, max_gap_s=2.0, max_len_s=27.0) == [(0.0, 10.0), (13.0, 30.0)]
    assert join_regions(regions, max_gap_s=2.0, max_len_s=8.0) == [(0.0, 5.0), (6.0, 10.0), (13.0, 14.0), (14.5, 30.0)]
    assert join_regions([], 2.0, 27.0) == []


def test_split_long_cuts_at_the_quiet_point() -> None:
    sr = 1000
    audio = np.ones(40 * sr, np.float32)
    audio[int(17.0 * sr) : int(17.2 * sr)] = 0.0  # the only pause
    pieces = split_long(audio, sr, 0.0, 40.0, max_len_s=27.0)
    assert len(pieces) == 2
    assert 17.0 <= pieces[0][1] <= 17.2
    assert pieces[-1][1] == 40.0
    assert all(e - s <= 27.0 for s, e in pieces)


def test_split_long_without_pauses_still_bounds_length() -> None:
    audio = np.ones(100 * 100, np.float32)
    pieces = split_long(audio, 100, 0.0, 100.0, max_len_s=27.0)
    assert all(e - s <= 27.0 + 1e-9 for s, e in pieces)
    assert pieces[0][0] == 0.0 and pieces[-1][1] == 100.0
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))


def test_segments_are_offsets_and_views_slice_both_streams() -> None:
    rec = {
        "recording_id": "r", "source": "s", "sample_rate": 10, "duration_s": 10.0, "status": STATUS_OK,
        "timings": {"decode": 2.0, "enhance": 7.0},
        "audio": np.arange(100, dtype=np.float32), "audio_enhanced": -np.arange(100, dtype=np.float32),
    }
    out = cut_segments(rec, [(1.0, 2.0, "S0"), (5.0, 7.5, "S1"), (9.5, 12.0, "S0"), (3.0, 3.0, "S1")])
    segs = out["segments"]
    assert [s["segment_index"] for s in segs] == [0, 1, 2]  # the empty span is skipped
    assert [(s["start_s"], s["end_s"]) for s in segs] == [(1.0, 2.0), (5.0, 7.5), (9.5, 10.0)]  # clamped
    assert all(not any(isinstance(v, np.ndarray) for v in s.values()) for s in segs)  # no audio copied
    assert out["audio"] is rec["audio"] and out["timings"] == rec["timings"]
    views = segment_views(out)
    assert views[1]["audio"].tolist() == list(range(50, 75))
    assert views[1]["audio_enhanced"].tolist() == [-x for x in range(50, 75)]
    assert views[1]["duration_s"] == 2.5 and views[1]["recording_duration_s"] == 10.0
    assert np.shares_memory(views[1]["audio"], rec["audio"])
    empty = cut_segments(rec, [])
    assert empty["status"] == STATUS_EMPTY and empty["segments"] == []


def test_vad_segments_real_speech(espeak_conversation: Path) -> None:
    (rec,) = DecodeStage(DecodeConfig())([{"source": str(espeak_conversation), "status": "ok"}])
    stage = SegmentStage(SegmentConfig(max_gap_s=0.5, max_segment_s=6.0))
    (out,) = stage([rec])
    assert out["provenance"]["segment"]["model"] == "pkg:silero-vad"
    rows = segment_views(out)
    assert len(rows) >= 3
    assert all(r["status"] == STATUS_OK for r in rows)
    assert all(1.0 <= r["duration_s"] <= 6.0 + 1e-6 for r in rows)
    starts = [r["start_s"] for r in rows]
    assert starts == sorted(starts)
    speech = sum(r["duration_s"] for r in rows)
    assert speech > 0.6 * rec["duration_s"]


def test_noise_only_recording_becomes_one_empty_row(tmp_path: Path) -> None:
    p = tmp_path / "hum.wav"
    t = np.arange(16000 * 3) / 16000
    sf.write(p, (0.1 * np.sin(2 * np.pi * 50 * t)).astype(np.float32), 16000)
    (rec,) = DecodeStage(DecodeConfig())([{"source": str(p), "status": "ok"}])
    (row,) = SegmentStage(SegmentConfig())([rec])
    assert row["status"] == STATUS_EMPTY and row["reason"] == "no speech found"


def test_sequence_vad_gives_the_streaming_models_regions(pyannote_sample: Path) -> None:
    """stages.vad runs Silero's sequence ONNX model; its regions are the streaming JIT model's."""
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    from stages.vad import SileroVAD

    audio, sr = sf.read(pyannote_sample, dtype="float32")
    kw = {"threshold": 0.5, "min_speech_s": 0.25, "min_silence_s": 0.3, "speech_pad_s": 0.1}
    ours = SileroVAD().speech_regions(audio, sr, **kw)
    stamps = get_speech_timestamps(torch.from_numpy(audio), load_silero_vad(onnx=False), threshold=0.5,
                                   sampling_rate=16000, min_speech_duration_ms=250, min_silence_duration_ms=300,
                                   speech_pad_ms=100)
    theirs = [(s["start"] / 16000, s["end"] / 16000) for s in stamps]
    assert len(ours) >= 2 and len(ours) == len(theirs)
    # Within one 32 ms Silero window: two runtimes may round a boundary frame differently.
    assert all(abs(a - c) <= 0.032 and abs(b - d) <= 0.032 for (a, b), (c, d) in zip(ours, theirs, strict=True))


def _wandering_probabilities(rng: np.random.Generator, n: int) -> np.ndarray:
    """Frame probabilities that drift in and out of speech and linger between the two
    thresholds, so every branch of the hysteresis is taken."""
    steps = rng.normal(0.0, 0.12, n) + rng.choice([0.0, 0.5, -0.5], n, p=[0.94, 0.03, 0.03])
    return np.clip(0.5 + np.cumsum(steps) * 0.3, 0.0, 1.0)


def test_region_rule_matches_silero_on_wandering_probabilities() -> None:
    """Our region rule is Silero's: same regions, to the sample, as the package's own."""
    from silero_vad import get_speech_timestamps_from_probs

    from stages.vad import regions_from_probabilities

    rng = np.random.default_rng(7)
    compared = 0
    for trial in range(300):
        probs = _wandering_probabilities(rng, int(rng.integers(1, 900)))
        n_samples = probs.size * 512 - int(rng.integers(0, 512))
        threshold = float(rng.choice([0.3, 0.5, 0.7]))
        speech_ms, silence_ms, pad_ms = (int(rng.integers(0, 600)) for _ in range(3))
        theirs = get_speech_timestamps_from_probs(
            probs.tolist(), sampling_rate=16000, threshold=threshold, min_speech_duration_ms=speech_ms,
            min_silence_duration_ms=silence_ms, speech_pad_ms=pad_ms, audio_length_samples=n_samples,
        )
        ours = regions_from_probabilities(probs, n_samples, threshold=threshold, min_speech=16 * speech_ms,
                                          min_silence=16 * silence_ms, pad=16 * pad_ms)
        assert ours == [(s["start"], s["end"]) for s in theirs], f"trial {trial}"
        compared += len(ours)
    assert compared > 300  # the trials were not all silence


def test_vad_probabilities_and_regions_are_the_packages(pyannote_sample: Path) -> None:
    """The sequence model run here gives the package's frame probabilities and regions."""
    from silero_vad import get_speech_timestamps_sequence, load_silero_vad

    from stages.vad import SileroVAD

    audio, sr = sf.read(pyannote_sample, dtype="float32")
    assert sr == 16000
    ours = SileroVAD()
    package = load_silero_vad(sequence=True)
    np.testing.assert_allclose(ours.probabilities(audio), package.audio_forward(audio), atol=1e-5)
    for speech_ms, silence_ms, pad_ms in ((250, 300, 100), (250, 100, 30), (500, 1000, 0)):
        regions = ours.speech_regions(audio, sr, threshold=0.5, min_speech_s=speech_ms / 1000,
                                      min_silence_s=silence_ms / 1000, speech_pad_s=pad_ms / 1000)
        stamps = get_speech_timestamps_sequence(audio, package, threshold=0.5, min_speech_duration_ms=speech_ms,
                                                min_silence_duration_ms=silence_ms, speech_pad_ms=pad_ms)
        assert regions
        assert regions == [(s["start"] / 16000, s["end"] / 16000) for s in stamps]


def test_vad_worker_does_not_import_torch(pyannote_sample: Path) -> None:
    """A segmenting worker loads ONNX Runtime only: torch would cost it a second and 0.6 GB."""
    import subprocess
    import sys

    code = (
        "import sys, soundfile as sf\n"
        "from stages.segment import SegmentConfig, SegmentStage\n"
        "stage = SegmentStage(SegmentConfig()); stage.setup()\n"
        f"audio, sr = sf.read({str(pyannote_sample)!r}, dtype='float32')\n"
        "assert stage.spans(audio, sr)\n"
        "print(sorted(m for m in ('torch', 'torchaudio') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"

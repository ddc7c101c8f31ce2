"""Speaker count of the offline diarizer with real packaged models on espeak-ng speech.

Issue 12: single-voice recordings of 20-30 s used to split into 2-4 "speakers" (spectral
clustering on recording-centred embeddings cuts one voice's noise into pieces); the one-voice
test on the uncentred window graph (``looks_single_speaker``) fixes that without losing
multi-voice recordings or pyannote's two real speakers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kimia_model.audio import resample
from kimia_model.refs import ModelNotFoundError
from stages.diarize import DiarizeConfig, DiarizeStage
from stages.diarize.backends import looks_single_speaker
from stages.diarize.evaluate import score, turns_as_triples
from conftest import espeak

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
SR = 16000
SENTENCES = [
    "I think we should look at the numbers again before the meeting tomorrow.",
    "Well, the last time we tried that it took almost three weeks.",
    "Could you send me the report when it is ready?",
    "The weather has been strange this spring, warm one day and cold the next.",
    "Let me explain how the new system works, step by step.",
    "My brother moved to a small town by the sea last year.",
    "Seven hundred and twenty people signed up for the course.",
    "Please keep the door closed, the cat keeps escaping.",
]
VOICES = ["en-us+m3", "en-gb+f2", "en-gb-scotland+m7"]


def _speak(text: str, voice: str, d: Path, i: int) -> np.ndarray:
    audio, sr = sf.read(espeak(text, d / f"{i}.wav", voice), dtype="float32")
    audio = resample(audio, sr, SR)
    on = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
    return audio[on[0] : on[-1] + 1]


def _generate(turns: list[tuple[str, str]], d: Path, seed: int) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """Turns ``(voice, text)`` separated by 0.4-1.0 s pauses; reference = each turn's extent."""
    rng = np.random.default_rng(seed)
    pieces, ref, t = [], [], 0.5
    for i, (voice, text) in enumerate(turns):
        a = _speak(text, voice, d, i) * rng.uniform(0.6, 1.0)
        pieces.append((t, a))
        ref.append((t, t + a.size / SR, voice))
        t += a.size / SR + rng.uniform(0.4, 1.0)
    audio = np.zeros(int((t + 0.5) * SR), np.float32)
    for start, a in pieces:
        audio[int(start * SR) : int(start * SR) + a.size] += a
    return audio + 0.002 * rng.standard_normal(audio.size).astype(np.float32), ref


@pytest.fixture(scope="module")
def diarizer() -> DiarizeStage:
    import torch

    torch.set_num_threads(1)
    stage = DiarizeStage(DiarizeConfig())  # the defaults: silero VAD + resemblyzer, post-processing on
    stage.setup()
    return stage


def _speakers(stage: DiarizeStage, audio: np.ndarray) -> tuple[int, list[tuple[float, float, str]]]:
    _, _, info = stage.diarize_audio(audio)
    hyp = turns_as_triples(info["speech_turns"])
    return len({s for *_, s in hyp}), hyp


def test_solo_espeak_clip_is_one_speaker(diarizer, tmp_path):
    """~20 s of one voice: one speaker (such clips came out as 3-4 before the one-voice test)."""
    audio, _ = _generate([("en-gb+f2", s) for s in SENTENCES[:6]], tmp_path, seed=1)
    assert 16 * SR < audio.size < 30 * SR
    n, _ = _speakers(diarizer, audio)
    assert n == 1


def test_three_voice_conversation_count_and_der(diarizer, tmp_path):
    order = [0, 1, 2, 0, 2, 1, 0, 2]
    turns = [(VOICES[v], SENTENCES[i % len(SENTENCES)]) for i, v in enumerate(order)]
    audio, ref = _generate(turns, tmp_path, seed=2)
    n, hyp = _speakers(diarizer, audio)
    s = score(ref, hyp, 0.25)
    assert n == 3, s
    assert s["der"] <= 0.15, s


def test_pyannote_sample_has_two_speakers(diarizer, pyannote_sample):
    from stages.diarize.evaluate import load_audio, read_rttm

    audio, sr = load_audio(pyannote_sample)
    ref = next(iter(read_rttm(pyannote_sample.with_suffix(".rttm")).values()))
    n, hyp = _speakers(diarizer, resample(audio, sr, SR))
    assert n == 2
    assert score(ref, hyp, 0.25)["der"] <= 0.15


def test_one_voice_test_on_window_graphs():
    """One blob of windows has no two-way split; two separated groups do."""
    rng = np.random.default_rng(0)
    centre = rng.standard_normal(64)
    one = centre + 0.8 * rng.standard_normal((60, 64))
    other = rng.standard_normal(64)
    two = np.concatenate([centre + 0.5 * rng.standard_normal((30, 64)), other + 0.5 * rng.standard_normal((30, 64))])
    assert looks_single_speaker(one, 0.2, 0.10, 0.33)
    assert not looks_single_speaker(two, 0.2, 0.10, 0.33)


def test_missing_voicefilter_weights_name_the_file_and_config_key(tmp_path, monkeypatch):
    from stages.diarize import embedders

    monkeypatch.setattr(embedders, "resolve_packaged", lambda name, key, cache_dir=None: tmp_path)
    with pytest.raises(ModelNotFoundError) as err:
        embedders.build_embedder("voicefilter")
    msg = str(err.value)
    assert str(tmp_path / "embedder.int8.onnx") in msg and "`diarize.embedding`" in msg
    assert "\n" not in msg

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from kimia_model.refs import ModelNotFoundError
from stages.base import StageContext
from stages.transcribe import (
    TranscribeConfig,
    TranscribeStage,
    build_asr,
    compression_ratio,
    load_openai_whisper,
)


from stages.textnorm import wer as _wer


@pytest.fixture(scope="module")
def base_asr():
    return build_asr(TranscribeConfig(model="pkg:whisper-base"), StageContext())


def test_whisper_base_transcribes_reference_clips(base_asr, english_clips) -> None:
    audios = [sf.read(p, dtype="float32")[0] for p, _ in english_clips]
    results = base_asr.transcribe(audios, 16000)
    assert len(results) == len(english_clips)
    for (path, ref), res in zip(english_clips, results):
        assert _wer(ref, res["text"]) <= 0.1, (path.name, ref, res["text"])
        assert res["language"] == "en" and res["language_prob"] > 0.5
        assert -1.0 < res["avg_logprob"] <= 0.0
        assert 0.0 <= res["no_speech_prob"] < 0.5
        assert 0.0 < res["compression_ratio"] < 2.4


def test_batched_equals_one_by_one(base_asr, english_clips) -> None:
    audios = [sf.read(p, dtype="float32")[0] for p, _ in english_clips]
    together = [r["text"] for r in base_asr.transcribe(audios, 16000)]
    alone = [base_asr.transcribe([a], 16000)[0]["text"] for a in audios]
    assert together == alone


def test_other_sample_rates_are_resampled(base_asr, english_clips) -> None:
    import soxr

    path, ref = english_clips[-1]
    audio = sf.read(path, dtype="float32")[0]
    up = soxr.resample(audio, 16000, 44100)
    (res,) = base_asr.transcribe([up], 44100)
    assert _wer(ref, res["text"]) <= 0.1


def test_stage_fills_transcript_fields(english_clips) -> None:
    path, ref = english_clips[0]
    audio = sf.read(path, dtype="float32")[0]
    stage = TranscribeStage(TranscribeConfig(model="pkg:whisper-tiny.en", beam_size=1))
    (row,) = stage([{"recording_id": "r", "source": "s", "status": "ok", "sample_rate": 16000,
                     "duration_s": len(audio) / 16000, "audio": audio, "segment_index": 0}])
    assert _wer(ref, row["text"]) <= 0.2
    assert row["language"] == "en" and row["language_prob"] is None  # .en models detect nothing
    assert row["provenance"]["transcribe"]["model"] == "faster-whisper:pkg:whisper-tiny.en"
    assert row["timings"]["transcribe"] > 0


def test_compression_ratio_flags_loops() -> None:
    assert compression_ratio("hello there, general kenobi") < 1.5
    assert compression_ratio("I'm happy that " * 40) > 2.4
    assert compression_ratio("") == 0.0


def _tiny_whisper_checkpoint(path: Path) -> Path:
    """A randomly initialised openai-whisper model saved exactly like the upstream .pt files."""
    import whisper

    torch.manual_seed(0)
    dims = whisper.model.ModelDimensions(
        n_mels=80, n_audio_ctx=1500, n_audio_state=16, n_audio_head=2, n_audio_layer=1,
        n_vocab=51865, n_text_ctx=448, n_text_state=16, n_text_head=2, n_text_layer=1,
    )
    model = whisper.model.Whisper(dims)
    torch.save({"dims": dims.__dict__, "model_state_dict": model.state_dict()}, path)
    return path


def test_openai_whisper_checkpoint_loads_through_the_same_loader(tmp_path: Path) -> None:
    ckpt = _tiny_whisper_checkpoint(tmp_path / "tiny-random.pt")
    model = load_openai_whisper(ckpt)
    assert model.dims.n_audio_state == 16
    cfg = TranscribeConfig(backend="openai-whisper", model=str(ckpt), beam_size=1, max_new_tokens=8)
    asr = build_asr(cfg, StageContext(cache_dir=tmp_path))
    (res,) = asr.transcribe([np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1], 16000)
    assert set(res) >= {"text", "language", "language_prob", "avg_logprob", "no_speech_prob", "compression_ratio"}
    # A bare name resolves in the cache directory, as openai-whisper's download_root does.
    (tmp_path / "whisper").mkdir()
    ckpt.rename(tmp_path / "whisper" / "tiny-random.pt")
    TranscribeStage(cfg.model_copy(update={"model": "tiny-random"}), StageContext(cache_dir=tmp_path)).check()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable openai-whisper checkpoint"):
        load_openai_whisper(bad)
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="expected keys 'dims', 'model_state_dict'"):
        load_openai_whisper(bad)


@pytest.mark.parametrize(
    "backend,model,needle",
    [
        ("openai-whisper", "large-v3", "whisper/large-v3.pt"),
        ("faster-whisper", "/nonexistent/whisper-large-v3-ct2", "whisper-large-v3-ct2"),
        ("kimia", "/nonexistent/Kimi-Audio-7B-Instruct", "Kimi-Audio-7B-Instruct"),
    ],
)
def test_missing_weights_name_file_key_and_fix(tmp_path: Path, backend: str, model: str, needle: str) -> None:
    stage = TranscribeStage(TranscribeConfig(backend=backend, model=model), StageContext(cache_dir=tmp_path))
    with pytest.raises(ModelNotFoundError) as err:
        stage.check()
    msg = str(err.value)
    assert needle in msg and "transcribe.model" in msg and ("Copy" in msg or "convert" in msg)
    assert "\n" not in msg


def test_incomplete_ct2_directory(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        TranscribeStage(TranscribeConfig(model=str(tmp_path / "m"))).check()

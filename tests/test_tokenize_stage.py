"""TokenizeStage on plain row lists with tiny random checkpoints (no Ray)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from kimia_model.refs import ModelNotFoundError
from kimia_model.whisper_vq.codebook_file import CodebookFile
from kimia_model.whisper_vq.timing import token_count
from stages.base import StageContext
from stages.tokenize import TokenizeConfig, TokenizeStage

torch.set_num_threads(1)


def _pt(path: Path, n_layer: int = 2, seed: int = 0) -> Path:
    import whisper.model as wm

    dims = wm.ModelDimensions(
        n_mels=80, n_audio_ctx=1500, n_audio_state=16, n_audio_head=2, n_audio_layer=n_layer,
        n_vocab=60, n_text_ctx=8, n_text_state=16, n_text_head=2, n_text_layer=1,
    )
    torch.manual_seed(seed)
    torch.save({"dims": asdict(dims), "model_state_dict": wm.Whisper(dims).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("models")
    cb = tmp / "cb.safetensors"
    CodebookFile(np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32), pool_layer=2).save(cb)
    return {"pt": _pt(tmp / "w.pt"), "pt3": _pt(tmp / "w3.pt", n_layer=3, seed=1), "cb": cb, "dir": tmp}


def _row(i: int, sr: int, seconds: float, **extra: object) -> dict:
    rng = np.random.default_rng(i)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    audio = (0.2 * np.sin(2 * np.pi * (150 + 50 * i) * t) + 0.02 * rng.standard_normal(n)).astype(np.float32)
    return {"recording_id": f"r{i}", "status": "ok", "segment_index": 0, "sample_rate": sr, "audio": audio,
            "duration_s": seconds, **extra}


def test_tokens_and_features_for_mixed_rates(models: dict[str, Path]) -> None:
    cfg = TokenizeConfig(model=str(models["pt"]), codebook=str(models["cb"]), store_features=True, batch_size=4)
    stage = TokenizeStage(cfg)
    stage.check()
    rows = [_row(0, 16000, 1.0), _row(1, 8000, 2.5), _row(2, 44100, 0.37), _row(3, 16000, 31.0)]
    out = stage(rows)
    assert [r["recording_id"] for r in out] == ["r0", "r1", "r2", "r3"]
    for r in out:
        n16 = int(round(len(r["audio"]) * 16000 / r["sample_rate"]))
        tok, feat = r["semantic_tokens"], r["whisper_features"]
        assert tok.dtype == np.int32 and tok.shape == (token_count(n16),)
        assert feat.dtype == np.float16 and feat.shape == (len(tok), 4 * 16)
        assert tok.max() < 32
        assert r["provenance"]["tokenize"]["model"].startswith(str(models["pt"]) + "+codebook:cb@")
        assert r["provenance"]["tokenize"]["config_hash"] == cfg.config_hash()
    assert out[3]["semantic_tokens"].shape == (388,)
    # Same rows one by one give the same tokens (batch invariance through the stage).
    single = TokenizeStage(cfg)([_row(1, 8000, 2.5)])[0]
    np.testing.assert_array_equal(single["semantic_tokens"], out[1]["semantic_tokens"])


def test_audio_field_and_feature_layer(models: dict[str, Path]) -> None:
    row = _row(0, 16000, 2.0)
    row["audio_enhanced"] = _row(5, 16000, 2.0)["audio"]
    base = dict(model=str(models["pt"]), codebook=str(models["cb"]), store_features=True)
    plain = TokenizeStage(TokenizeConfig(**base))([dict(row)])[0]
    enh = TokenizeStage(TokenizeConfig(**base, audio_field="auto"))([dict(row)])[0]
    assert not np.array_equal(plain["whisper_features"], enh["whisper_features"])
    l1 = TokenizeStage(TokenizeConfig(**base, feature_layer=1))([dict(row)])[0]
    assert not np.array_equal(plain["whisper_features"], l1["whisper_features"])
    np.testing.assert_array_equal(plain["semantic_tokens"], l1["semantic_tokens"])  # tokens: codebook layer
    # A separate feature model (Kimi-Audio's whisper-large-v3 role) changes features, not tokens.
    sep = TokenizeStage(TokenizeConfig(**base, features_model=str(models["pt3"])))([dict(row)])[0]
    np.testing.assert_array_equal(plain["semantic_tokens"], sep["semantic_tokens"])
    assert sep["whisper_features"].shape == plain["whisper_features"].shape
    assert not np.allclose(sep["whisper_features"], plain["whisper_features"])
    no_feat = TokenizeStage(TokenizeConfig(model=str(models["pt"]), codebook=str(models["cb"])))([dict(row)])[0]
    assert "whisper_features" not in no_feat


def test_bad_rows_are_quarantined_alone(models: dict[str, Path]) -> None:
    stage = TokenizeStage(TokenizeConfig(model=str(models["pt"]), codebook=str(models["cb"]),
                                         audio_field="audio_enhanced"))
    good = _row(0, 16000, 1.0)
    good["audio_enhanced"] = good["audio"]
    nan = _row(1, 16000, 1.0)
    nan["audio_enhanced"] = np.full(100, np.nan, np.float32)
    missing = _row(2, 16000, 1.0)
    bad_sr = _row(3, 16000, 1.0, sample_rate=0)
    bad_sr["audio_enhanced"] = bad_sr["audio"]
    out = {r["recording_id"]: r for r in stage([good, nan, missing, bad_sr])}
    assert out["r0"]["status"] == "ok" and len(out["r0"]["semantic_tokens"]) == 13
    assert out["r1"]["status"] == "quarantined" and "NaN" in out["r1"]["error"]
    assert out["r2"]["failed_stage"] == "tokenize" and "audio_enhanced" in out["r2"]["error"]
    assert "sample_rate" in out["r3"]["error"]


def test_check_names_missing_weights(models: dict[str, Path], tmp_path: Path) -> None:
    ctx = StageContext(cache_dir=tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"tokenize\.codebook.*tokenizer fit"):
        TokenizeStage(TokenizeConfig(model=str(models["pt"]), codebook="nope-1024"), ctx).check()
    with pytest.raises(ModelNotFoundError, match=r"tokenize\.codebook"):
        TokenizeStage(TokenizeConfig(model=str(models["pt"]), codebook=None), ctx).check()
    with pytest.raises(ModelNotFoundError, match=r"tokenize\.model"):
        TokenizeStage(TokenizeConfig(model=str(tmp_path / "missing.pt")), ctx).check()
    vq = tmp_path / "glm"
    vq.mkdir()
    (vq / "config.json").write_text(json.dumps({"quantize_vocab_size": 16384}))
    with pytest.raises(ValueError, match="own codebook"):
        TokenizeStage(TokenizeConfig(model=str(vq)), ctx).check()
    with pytest.raises(ValueError):
        TokenizeConfig(max_batch_windows=0)
    with pytest.raises(ValueError):
        TokenizeConfig(unknown_key=1)


def test_kept_only_leaves_dropped_segments_alone(models: dict[str, Path]) -> None:
    """After the filter, a dropped segment gets no tokens and no tokenize provenance; a kept one
    gets the tokens it would get alone, so dropping a neighbour does not change them."""
    audio = _row(0, 16000, 3.0)["audio"]
    segments = [{"segment_index": k, "start_s": k * 1.0, "end_s": k + 1.0, "status": "ok", "verdict": v}
                for k, v in enumerate(("keep", "drop", "keep"))]
    rec = {"recording_id": "r", "source": "/r.wav", "status": "ok", "sample_rate": 16000, "duration_s": 3.0,
           "audio": audio, "segments": segments}
    cfg = TokenizeConfig(model=str(models["pt"]), codebook=str(models["cb"]))
    (out,) = TokenizeStage(cfg)([rec])
    kept, dropped = [out["segments"][k] for k in (0, 2)], out["segments"][1]
    assert all(s["semantic_tokens"].shape == (13,) and "tokenize" in s["provenance"] for s in kept)
    assert "semantic_tokens" not in dropped and "tokenize" not in (dropped.get("provenance") or {})
    alone = TokenizeStage(cfg)([{**rec, "segments": [segments[2]]}])[0]["segments"][0]
    # Each segment is encoded on its own; only the batch around it differs, which may move a
    # float by an ulp on another CPU (a nearest code could flip), not the tokens as a whole.
    assert np.mean(alone["semantic_tokens"] == kept[1]["semantic_tokens"]) >= 0.9
    # kept_only: false tokenizes every segment, verdict or not.
    (every,) = TokenizeStage(cfg.model_copy(update={"kept_only": False}))([rec])
    assert all(s["semantic_tokens"].shape == (13,) for s in every["segments"])


def test_stage_order_puts_model_work_after_the_checks_that_drop() -> None:
    from pipeline.config import load_config
    from pipeline.run import plan_stages

    root = Path(__file__).resolve().parent.parent

    def order(*sets: str) -> list[str]:
        names = [s.name for s in plan_stages(load_config(root / "configs" / "local.yaml", list(sets)), StageContext())]
        return names[names.index("diarize") + 1:]

    # Default: the audio checks before transcribe (transcribe.kept_only), tokenize after the filter.
    first = ["quality", "filter_audio", "transcribe"]
    assert order() == [*first, "quality_text", "filter", "tokenize", "write"]
    assert order("tokenize.kept_only=false") == [*first, "tokenize", "quality_text", "filter", "write"]
    late = ("transcribe.kept_only=false",)
    assert order(*late) == ["transcribe", "quality", "filter", "tokenize", "write"]
    assert order(*late, "tokenize.kept_only=false") == ["transcribe", "tokenize", "quality", "filter", "write"]
    assert order("filter.enabled=false") == ["transcribe", "tokenize", "quality", "write"]
    assert order("quality.enabled=false") == ["transcribe", "filter", "tokenize", "write"]
    tokens_rt = ("roundtrip.enabled=true", "roundtrip.mode=tokens", "roundtrip.detokenizer_model=/m/kimia")
    assert order(*tokens_rt) == [*first, "tokenize", "roundtrip", "quality_text", "filter", "write"]
    assert order(*late, *tokens_rt) == ["transcribe", "tokenize", "roundtrip", "quality", "filter", "write"]
    assert order("roundtrip.enabled=true") == [*first, "roundtrip", "quality_text", "filter", "tokenize", "write"]


def test_preflight_asks_for_the_enhanced_stream_only_where_a_waveform_is_read() -> None:
    """With enhance off, a stage told to read the enhanced waveform is refused before any work;
    quality_text shares quality's settings (audio_field follows filter.stream, "enhanced" by
    default) but reads only the transcript, so it is never refused for them."""
    from pipeline.config import RunConfig
    from pipeline.run import PreflightError, preflight
    from stages.quality import TranscriptQualityStage
    from stages.transcribe import TranscribeStage

    cfg = RunConfig.model_validate({"enhance": {"enabled": False}, "transcribe": {"input_stream": "enhanced"}})
    assert cfg.quality.audio_field == "audio_enhanced"
    preflight(cfg, [TranscriptQualityStage(cfg.quality)])
    with pytest.raises(PreflightError, match="transcribe reads the enhanced stream"):
        preflight(cfg, [TranscribeStage(cfg.transcribe), TranscriptQualityStage(cfg.quality)])

"""Kimi-Audio LM: upstream checkpoint layout, dual-stream mixing, branch point, KV cache.

Every test loads a tiny random checkpoint written in the release's layout (config.json with
the Kimi keys, bf16 safetensors shards + index, upstream tensor names) through the same
loader real weights use.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from factories import tiny_config_dict, write_random_checkpoint
from kimia_model.kimia_lm import (
    CheckpointError,
    KimiaLM,
    KVCache,
    load_config,
    media_span_mask,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("kimia_lm"), tiny_config_dict(), seed=0, shards=3)


@pytest.fixture(scope="module")
def lm(ckpt: Path) -> KimiaLM:
    return KimiaLM.from_pretrained(ckpt)


def _inputs(lm: KimiaLM, length: int = 24, seed: int = 1):
    """Random dual-stream ids with one media span (positions 4..11) and its features."""
    c = lm.config
    g = torch.Generator().manual_seed(seed)
    audio = torch.randint(0, c.vocab_size, (1, length), generator=g)
    text = torch.randint(0, c.kimia_token_offset, (1, length), generator=g)
    audio[0, 3], audio[0, 12] = c.kimia_media_begin, c.kimia_media_end
    feats = torch.randn(8, c.kimia_adaptor_input_dim, generator=g)
    return audio, text, feats


def test_checkpoint_uses_upstream_tensor_names(ckpt: Path) -> None:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    for name in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.3.mlp.down_proj.weight",
        "model.norm.weight",
        "model.mimo_layers.1.self_attn.o_proj.weight",
        "model.mimo_layers.0.post_attention_layernorm.weight",
        "model.mimo_norm.weight",
        "model.vq_adaptor.layers.0.weight",
        "model.vq_adaptor.layers.3.bias",
        "model.vq_adaptor.layers.4.weight",
        "lm_head.weight",
        "mimo_output.weight",
    ):
        assert name in index, name
    assert len(set(index.values())) == 3
    assert "model.layers.0.self_attn.o_proj.bias" not in index  # Qwen2: o_proj has no bias
    with safe_open(str(ckpt / sorted(set(index.values()))[0]), framework="pt") as f:
        assert f.get_tensor(f.keys()[0]).dtype == torch.bfloat16


def test_config_defaults_and_validation(tmp_path: Path) -> None:
    cfg = tiny_config_dict()
    del cfg["kimia_mimo_audiodelaytokens"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_config(tmp_path).kimia_mimo_audiodelaytokens == 6  # report value, not class default 5
    cfg["kimia_mimo_transformer_from_layer_index"] = 9
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="kimia_mimo_transformer_from_layer_index=9"):
        load_config(tmp_path)
    with pytest.raises(CheckpointError, match="config not found"):
        load_config(tmp_path / "nowhere")


def test_incremental_decoding_with_cache_equals_full_forward(lm: KimiaLM) -> None:
    audio, text, feats = _inputs(lm)
    full = lm(audio, text, whisper_features=[feats], all_logits=True)
    cache = KVCache()
    parts = [lm(audio[:, :14], text[:, :14], whisper_features=[feats], cache=cache, all_logits=True)]
    parts.append(lm(audio[:, 14:17], text[:, 14:17], cache=cache, all_logits=True))  # multi-token chunk
    for i in range(17, audio.shape[1]):
        parts.append(lm(audio[:, i : i + 1], text[:, i : i + 1], cache=cache, all_logits=True))
    inc_text = torch.cat([p.text_logits for p in parts], dim=1)
    inc_audio = torch.cat([p.audio_logits for p in parts], dim=1)
    assert cache.num_layers() == lm.config.num_hidden_layers + lm.config.kimia_mimo_layers
    assert cache.get_seq_length() == audio.shape[1]
    scale = full.text_logits.abs().max().item()
    assert scale > 1.0
    torch.testing.assert_close(inc_text, full.text_logits, atol=1e-4 * scale, rtol=1e-4)
    torch.testing.assert_close(inc_audio, full.audio_logits, atol=1e-4 * scale, rtol=1e-4)
    # The default returns only the last position, equal to the full pass's last row.
    last = lm(audio, text, whisper_features=[feats])
    torch.testing.assert_close(last.text_logits[:, 0], full.text_logits[:, -1])


def test_whisper_features_mixed_at_media_positions_as_upstream(lm: KimiaLM) -> None:
    audio, text, feats = _inputs(lm)
    derived = media_span_mask(audio, lm.config.kimia_media_begin, lm.config.kimia_media_end)
    assert derived[0].nonzero().squeeze(-1).tolist() == list(range(4, 12))
    got = lm.embed(audio, text, [feats])
    E = lm.model.embed_tokens.weight
    want = E[audio[0]] + E[text[0]]
    adapted = lm.model.vq_adaptor(feats)
    want[4:12] = (E[audio[0, 4:12]] + adapted) * math.sqrt(2.0) + E[text[0, 4:12]]
    torch.testing.assert_close(got[0], want)
    # Two audio spans: features are consumed in mask order (upstream reads only the first audio).
    audio2 = audio.clone()
    audio2[0, 14], audio2[0, 18] = lm.config.kimia_media_begin, lm.config.kimia_media_end
    feats2 = torch.cat([feats, torch.randn(3, feats.shape[1])])
    emb2 = lm.embed(audio2, text, [feats2])
    torch.testing.assert_close(
        emb2[0, 15:18], (E[audio2[0, 15:18]] + lm.model.vq_adaptor(feats2[8:])) * math.sqrt(2.0) + E[text[0, 15:18]]
    )
    with pytest.raises(ValueError, match="7 whisper feature frames for 8 continuous positions"):
        lm.embed(audio, text, [feats[:7]])
    with pytest.raises(ValueError, match=r"must be \[N, 16\]"):
        lm.embed(audio, text, [feats[:, :5]])


def test_audio_branch_forks_after_configured_layer(ckpt: Path, lm: KimiaLM) -> None:
    audio, text, feats = _inputs(lm)
    base = lm(audio, text, whisper_features=[feats], all_logits=True)
    text_only = lm(audio, text, whisper_features=[feats], all_logits=True, compute_audio=False)
    assert text_only.audio_logits is None
    torch.testing.assert_close(text_only.text_logits, base.text_logits)
    fork = lm.config.kimia_mimo_transformer_from_layer_index
    other = KimiaLM.from_pretrained(ckpt)

    def run():
        return other(audio, text, whisper_features=[feats], all_logits=True)

    # A trunk layer after the fork changes text logits only.
    with torch.no_grad():
        other.model.layers[fork + 1].mlp.down_proj.weight.mul_(3.0)
    out = run()
    torch.testing.assert_close(out.audio_logits, base.audio_logits)
    assert not torch.allclose(out.text_logits, base.text_logits)
    # An audio-branch layer changes audio logits only.
    other = KimiaLM.from_pretrained(ckpt)
    with torch.no_grad():
        other.model.mimo_layers[0].mlp.down_proj.weight.mul_(3.0)
    out = run()
    torch.testing.assert_close(out.text_logits, base.text_logits)
    assert not torch.allclose(out.audio_logits, base.audio_logits)
    # The layer at the fork index feeds both heads.
    other = KimiaLM.from_pretrained(ckpt)
    with torch.no_grad():
        other.model.layers[fork].mlp.down_proj.weight.mul_(3.0)
    out = run()
    assert not torch.allclose(out.text_logits, base.text_logits)
    assert not torch.allclose(out.audio_logits, base.audio_logits)


def test_eager_attention_and_split_devices_match_sdpa(ckpt: Path, lm: KimiaLM) -> None:
    audio, text, feats = _inputs(lm)
    base = lm(audio, text, whisper_features=[feats], all_logits=True)
    eager = KimiaLM.from_pretrained(ckpt, attn_implementation="eager")
    out = eager(audio, text, whisper_features=[feats], all_logits=True)
    torch.testing.assert_close(out.text_logits, base.text_logits, atol=1e-4, rtol=1e-4)
    split = KimiaLM.from_pretrained(ckpt, device=["cpu", "cpu"])
    out = split(audio, text, whisper_features=[feats], all_logits=True)
    torch.testing.assert_close(out.audio_logits, base.audio_logits)


def test_flash_attention_requested_without_package_is_a_clear_error(ckpt: Path) -> None:
    from kimia_model.kimia_lm import flash_attn_available

    if flash_attn_available() and torch.cuda.is_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(RuntimeError, match="flash_attention_2 unavailable"):
        KimiaLM.from_pretrained(ckpt, attn_implementation="flash_attention_2")
    assert KimiaLM.from_pretrained(ckpt, attn_implementation="auto").config._attn_implementation == "sdpa"


def _copy(ckpt: Path, dst: Path) -> Path:
    shutil.copytree(ckpt, dst)
    return dst


def _edit_shard(d: Path, fn) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"]["mimo_output.weight"]
    state = load_file(str(shard))
    fn(state, index)
    save_file(state, str(shard), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_unexpected_and_mismatched_tensors_are_listed(ckpt: Path, tmp_path: Path) -> None:
    d = _copy(ckpt, tmp_path / "missing")

    def drop(state, index):
        del state["mimo_output.weight"]
        del index["weight_map"]["mimo_output.weight"]

    _edit_shard(d, drop)
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): mimo_output.weight"):
        KimiaLM.from_pretrained(d)

    d = _copy(ckpt, tmp_path / "bad_shape")

    def reshape(state, index):
        state["mimo_output.weight"] = state["mimo_output.weight"][:-1].clone()
        state["model.extra.weight"] = torch.zeros(2)

    _edit_shard(d, reshape)
    with pytest.raises(CheckpointError) as err:
        KimiaLM.from_pretrained(d)
    msg = str(err.value)
    assert "shape mismatch in 1 tensor(s): mimo_output.weight: checkpoint [996, 32] vs model [997, 32]" in msg
    assert "unexpected 1 tensor(s): model.extra.weight" in msg
    # Extra tensors under an allowed prefix are ignored, but the shape error stays.
    with pytest.raises(CheckpointError, match="shape mismatch") as err:
        KimiaLM.from_pretrained(d, allow_unexpected=("model.extra.",))
    assert "unexpected 1 tensor" not in str(err.value)

    d = _copy(ckpt, tmp_path / "lost_shard")
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="lists shard"):
        KimiaLM.from_pretrained(d)

    d = tmp_path / "no_weights"
    d.mkdir()
    shutil.copy(ckpt / "config.json", d)
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        KimiaLM.from_pretrained(d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_matches_cpu(ckpt: Path, lm: KimiaLM) -> None:
    audio, text, feats = _inputs(lm)
    base = lm(audio, text, whisper_features=[feats], all_logits=True)
    gpu = KimiaLM.from_pretrained(ckpt, device="cuda", dtype="float32")
    out = gpu(audio, text, whisper_features=[feats.cuda()], all_logits=True)
    torch.testing.assert_close(out.text_logits.cpu(), base.text_logits, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out.audio_logits.cpu(), base.audio_logits, atol=1e-3, rtol=1e-3)

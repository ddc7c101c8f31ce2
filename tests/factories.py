"""Factories of tiny random models and files in the upstream layouts, for tests and benchmarks.

They live under ``tests/`` because nothing the product runs needs them: the real weights and
tokenizer files come with the models. Tests import them as ``from factories import ...``
(pytest puts this folder on ``sys.path``); benchmarks add this folder to ``sys.path`` first.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kimia_model.bigvgan import BigVGAN, BigVGANConfig
from kimia_model.bsrnn import BSRNN, BSRNNConfig
from kimia_model.detokenizer import DiTConfig, DiTPrefix, Detokenizer, FlowConfig, StreamingConfig
from kimia_model.kimia_lm import KimiaLM, config_from_dict
from kimia_model.kimia_prompt import special_token_layout
from kimia_model.whisper_vq.model import WhisperVQConfig, WhisperVQEncoder


# -- Kimi-Audio LM: config and random checkpoint ----------------------------------------------


def tiny_config_dict(**overrides: Any) -> dict[str, Any]:
    """A small ``config.json`` dict in the upstream key layout (for tests and benchmarks).

    Text ids follow the upstream tokenizer layout (``num_base_tokens`` BPE ids, then 421
    special/reserved ids, then audio codes at ``kimia_token_offset``), so a tiny tokenizer
    built by :func:`write_tiktoken_files` with the same number of
    base tokens fits.
    """
    num_base = overrides.pop("num_base_tokens", 512)
    offset = num_base + 421
    codes = overrides.pop("num_audio_codes", 64)
    cfg: dict[str, Any] = {
        "architectures": ["MoonshotKimiaForCausalLM"],
        "model_type": "kimia",
        "auto_map": {"AutoModelForCausalLM": "modeling_moonshot_kimia.MoonshotKimiaForCausalLM"},
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "vocab_size": offset + codes,
        "num_base_tokens": num_base,
        "kimia_token_offset": offset,
        "kimia_text_output_vocab": offset,
        "kimia_audio_output_vocab": codes,
        "kimia_mimo_layers": 2,
        "kimia_mimo_transformer_from_layer_index": 1,
        "kimia_mimo_audiodelaytokens": 6,
        "use_whisper_feature": True,
        "kimia_adaptor_input_dim": 16,
        # Slots of <|im_media_begin|> / <|im_media_end|> in the special-token block
        # (151661 / 151663 = 151643 + 18 / + 20 in the real release).
        "kimia_media_begin": num_base + 18,
        "kimia_media_end": num_base + 20,
        "torch_dtype": "bfloat16",
    }
    cfg.update(overrides)
    return cfg


def write_random_checkpoint(
    out_dir: str | Path,
    config: dict[str, Any],
    *,
    seed: int = 0,
    shards: int = 2,
    std: float = 0.2,
) -> Path:
    """Save a random model in the upstream layout: config.json + safetensors shards + index.

    Weights are drawn with a larger spread than a trained model's init so that random
    logits are peaked enough for greedy decoding to be stable under float rounding.
    The files are saved in bfloat16, as the real release is.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_from_dict(config)
    gen = torch.Generator().manual_seed(seed)
    model = KimiaLM(cfg)
    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith("layers.4.weight"):
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith("bias"):
            t = 0.05 * torch.randn(p.shape, generator=gen)
        else:
            t = std * torch.randn(p.shape, generator=gen)
        state[name] = t.to(torch.bfloat16).contiguous()
    names = list(state)
    per = math.ceil(len(names) / max(1, shards))
    weight_map: dict[str, str] = {}
    total = max(1, math.ceil(len(names) / per))
    for s in range(total):
        chunk = names[s * per : (s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{total:05d}.safetensors"
        save_file({n: state[n] for n in chunk}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    size = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=1)
    )
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


# -- Kimi-Audio text tokenizer ------------------------------------------------------------------


def write_tiktoken_files(out_dir: str | Path, words: Sequence[str] = (), *, num_base_tokens: int | None = None) -> Path:
    """Write a small ``tiktoken.model`` (+ ``tokenizer_config.json``) in the release's format.

    The BPE has all 256 bytes, then merges that build each word (and its space-prefixed
    form) left to right, then filler merges up to ``num_base_tokens``. For tests and
    benchmarks; the real file comes with the model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}

    def add(tok: bytes) -> None:
        if tok not in ranks:
            ranks[tok] = len(ranks)

    for w in words:
        for form in (w.encode(), b" " + w.encode()):
            for end in range(2, len(form) + 1):
                add(form[:end])
    if num_base_tokens is not None:
        if len(ranks) > num_base_tokens:
            raise ValueError(f"{len(ranks)} BPE tokens do not fit num_base_tokens={num_base_tokens}")
        i = 0
        while len(ranks) < num_base_tokens:
            add(b"\x00\x01" + i.to_bytes(4, "big"))  # unreachable merges: pure id padding
            i += 1
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    (out / "tiktoken.model").write_text("\n".join(lines) + "\n")
    base = len(ranks)
    added = {
        str(base + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True}
        for i, t in enumerate(special_token_layout())
    }  # fmt: skip
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "TikTokenTokenizer", "added_tokens_decoder": added}, indent=1)
    )
    return out / "tiktoken.model"


# -- detokenizer and vocoder -------------------------------------------------------------------


def tiny_bigvgan_config() -> BigVGANConfig:
    """A few-thousand-parameter BigVGAN with the real hop (480) for tests and benchmarks."""
    return BigVGANConfig(
        upsample_rates=(5, 4, 4, 3, 2),
        upsample_kernel_sizes=(9, 8, 8, 5, 4),
        upsample_initial_channel=64,
        resblock_kernel_sizes=(3,),
        resblock_dilation_sizes=((1, 3),),
    )


def tiny_flow_config(vocab: int = 64, **dit_overrides: Any) -> FlowConfig:
    """Upstream-shaped config with a tiny DiT (hidden 64, depth 2, 4 heads, RoPE)."""
    dit = DiTConfig(semantic_vocab_size=vocab, hidden_size=64, depth=2, num_heads=4, mlp_ratio=2.0,
                    use_rope=True, position_embedding_type="skip", max_seq_len=4096)
    if dit_overrides:
        dit = replace(dit, **dit_overrides)
    return FlowConfig(dit=dit, normalize_mel=True, mel_mean=-5.0, mel_std=2.0)


def randomize_(model: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    """Give every parameter non-trivial random values.

    Upstream initialises adaLN and output layers to zero (adaLN-Zero), which makes an
    untrained network output exactly 0 and would hide bugs; random tests need all paths live.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (scale / math.sqrt(fan_in) if p.ndim > 1 else 0.05))
    return model


def random_tiny_detokenizer(seed: int = 0, vocab: int = 64, streaming: StreamingConfig | None = None,
                            **dit_overrides: Any) -> Detokenizer:
    """A small random detokenizer (hidden 64, 2 layers, tiny BigVGAN) for tests and benchmarks."""
    cfg = tiny_flow_config(vocab, **dit_overrides)
    torch.manual_seed(seed)
    flow = DiTPrefix(cfg.dit)
    randomize_(flow, seed, scale=1.0)
    voc = randomize_(BigVGAN(tiny_bigvgan_config()), seed + 1, scale=0.5)
    return Detokenizer(flow, cfg, voc, streaming)


# -- GLM-4-Voice Whisper+VQ tokenizer -----------------------------------------------------------


def glm_tokenizer_config(**over: object) -> dict:
    """A tiny config.json in GLM-4-Voice's layout (same keys as the shipped one)."""
    cfg = {
        "architectures": ["WhisperVQEncoder"],
        "model_type": "whisper",
        "d_model": 16,
        "encoder_layers": 4,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 32,
        "num_mel_bins": 128,
        "max_source_positions": 1500,
        "activation_function": "gelu",
        "encoder_causal_convolution": True,
        "encoder_causal_attention": False,
        "quantize_causal_encoder": False,
        "quantize_causal_block_size": 200,
        "pooling_kernel_size": 4,
        "pooling_type": "avg",
        "pooling_position": 2,
        "quantize_position": 2,
        "quantize_vocab_size": 64,
        "quantize_encoder_only": True,
        "quantize_ema_decay": 0.99,
        "quantize_commit_coefficient": 0.25,
        "scale_embedding": False,
        "torch_dtype": "float32",
    }
    cfg.update(over)
    return cfg


def write_glm_tokenizer(out_dir: Path, seed: int = 0, drop: tuple[str, ...] = (), **over: object) -> Path:
    """Random weights saved exactly as the upstream tokenizer ships: config.json + model.safetensors."""
    from safetensors.torch import save_file

    cfg = glm_tokenizer_config(**over)
    torch.manual_seed(seed)
    model = WhisperVQEncoder(WhisperVQConfig.from_dict(cfg))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in drop}
    save_file(state, str(out_dir / "model.safetensors"))
    return out_dir


# -- BSRNN enhancer ------------------------------------------------------------------------------

#: A few-thousand-parameter BSRNN at 48 kHz with three bands.
TINY_BSRNN = dict(feature_dim=12, hidden_dim=12, num_layers=2,
                  band_scheme=((2000.0, 500.0), (8000.0, 2000.0), (24000.0, 8000.0)))


def tiny_bsrnn(**kw: object) -> BSRNN:
    """A random :data:`TINY_BSRNN` (seed 0), ``kw`` overriding its config."""
    torch.manual_seed(0)
    return BSRNN(BSRNNConfig(**{**TINY_BSRNN, **kw})).eval()


def identity_masks_(model: BSRNN) -> BSRNN:
    """Set the mask heads to output exactly 1+0j: the model then must reproduce its input.

    Every other weight stays random, so all of BSRNN's computation still runs; what comes out
    is the input, which keeps downstream stages hearing speech.
    """
    with torch.no_grad():
        for (lo, hi), fc in zip(model.bands, model.mask.fc2):
            bw = hi - lo
            fc.weight.zero_()
            # GLU(a, b) = a * sigmoid(b); a is (re, im) interleaved per bin.
            fc.bias[: 2 * bw] = torch.tensor([1.0, 0.0]).repeat(bw)
            fc.bias[2 * bw :] = 40.0
    return model


def recording_from_segments(segments: list[dict]) -> dict:
    """A recording row that holds each segment's ``audio`` at its offsets, and the segments by offset.

    Tests that think in segments (each with its own audio) build what the pipeline carries:
    one recording, its audio once, segments as offsets. The recording's own fields are taken
    from the first segment; the rest stay with each segment.
    """
    import numpy as np

    first = segments[0]
    sr = int(first["sample_rate"])
    duration = float(first.get("recording_duration_s") or max(float(s["end_s"]) for s in segments))
    audio = np.zeros(int(round(duration * sr)), dtype=np.float32)
    shared = {k: first[k] for k in ("recording_id", "source", "sample_rate", "source_meta", "loudness_lufs")
              if k in first}
    out_segments = []
    for s in segments:
        a = int(round(float(s["start_s"]) * sr))
        clip = np.asarray(s["audio"], dtype=np.float32)
        audio[a:a + clip.shape[0]] = clip[: audio.shape[0] - a]
        seg = {k: v for k, v in s.items() if k not in shared and k not in (
            "audio", "audio_enhanced", "duration_s", "segment_count", "recording_duration_s")}
        seg["end_s"] = float(s["start_s"]) + clip.shape[0] / sr
        out_segments.append(seg)
    return {**shared, "status": "ok", "duration_s": duration, "audio": audio, "segments": out_segments}

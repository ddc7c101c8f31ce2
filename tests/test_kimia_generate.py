"""Kimi-Audio prompting and generation on a tiny random checkpoint in the upstream layout.

Termination tests steer the (random) model by adding a large bonus to chosen logits at
chosen steps, so each documented stop rule is exercised on a known schedule; the loop, the
sampler and the model are the real ones.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from factories import tiny_config_dict, write_random_checkpoint, write_tiktoken_files
from kimia_model.kimia_generate import (
    BOTH_MAX_TOTAL,
    KimiaGenerator,
    SamplingParams,
    sample_token,
)
from kimia_model.kimia_prompt import (
    KimiaTextTokenizer,
    PromptError,
    special_token_layout,
)
from stages.base import StageError

torch.set_num_threads(1)

WORDS = ["hello", "world", "transcribe", "the", "audio", "please", "yes"]
N_CODES = 64


def fake_audio_tokenizer(wav: np.ndarray) -> np.ndarray:
    """12.5 Hz codes that depend on the audio (mean energy of each 1280-sample hop)."""
    n = int(np.ceil(len(wav) / 1280))
    padded = np.pad(wav, (0, n * 1280 - len(wav)))
    energy = np.abs(padded.reshape(n, 1280)).mean(axis=1)
    return (np.floor(energy * 1000) % N_CODES).astype(np.int32)


def fake_features(wav: np.ndarray) -> np.ndarray:
    n = int(np.ceil(len(wav) / 1280))
    rng = np.random.default_rng(len(wav))
    return rng.standard_normal((n, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("kimia_gen")
    write_tiktoken_files(d, WORDS, num_base_tokens=512)
    write_random_checkpoint(d, tiny_config_dict(num_audio_codes=N_CODES), seed=0)
    return d


@pytest.fixture()
def gen(model_dir: Path) -> KimiaGenerator:
    return KimiaGenerator.from_pretrained(model_dir, audio_tokenizer=fake_audio_tokenizer, feature_extractor=fake_features)


def tone(seconds: float = 1.0, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + t)).astype(np.float32)


def asr_messages(audio: Any = None) -> list[dict[str, Any]]:
    return [
        {"role": "user", "message_type": "text", "content": "please transcribe the audio"},
        {"role": "user", "message_type": "audio", "content": tone() if audio is None else audio},
    ]


def steer(gen: KimiaGenerator, schedule: dict[int, dict[str, int]]) -> list[bool]:
    """Add +1e4 to ``schedule[step]["text"|"audio"]`` logits; returns compute_audio per call."""
    original = gen.lm.forward
    calls: list[bool] = []

    def forward(*args: Any, **kwargs: Any):
        out = original(*args, **kwargs)
        step = len(calls)
        calls.append(kwargs.get("compute_audio", True))
        for stream, tok in schedule.get(step, {}).items():
            logits = out.text_logits if stream == "text" else out.audio_logits
            logits[0, -1, tok] += 1e4
        return out

    gen.lm.forward = forward  # type: ignore[method-assign]
    return calls


# -- tokenizer and prompt layout --------------------------------------------------------------


def test_tokenizer_roundtrip_and_release_special_ids(model_dir: Path) -> None:
    tok = KimiaTextTokenizer.from_dir(model_dir)
    ids = tok.encode("hello world, please transcribe")
    assert all(i < tok.num_base_tokens for i in ids)
    assert tok.decode(ids) == "hello world, please transcribe"
    # Special-token strings in user text stay text, never control ids.
    assert all(i < 512 for i in tok.encode("<|im_media_end|>"))
    assert tok.decode(ids + [tok.token_id("<|im_kimia_text_eos|>")]) == "hello world, please transcribe"
    # The layout gives the published ids for the release's 151643 BPE ids.
    layout = {t: 151643 + i for i, t in enumerate(special_token_layout())}
    published = {"<|im_msg_end|>": 151645, "<|im_media_begin|>": 151661, "<|im_media_end|>": 151663,
                 "<|im_kimia_text_blank|>": 151666, "<|im_kimia_text_eos|>": 151667,
                 "<|im_kimia_user_msg_start|>": 151670, "<|im_kimia_assistant_msg_start|>": 151671,
                 "<|im_kimia_speech_ct_id|>": 151675, "<|im_kimia_speech_ctd_id|>": 151676}  # fmt: skip
    assert {k: layout[k] for k in published} == published
    assert len(layout) == 152064 - 151643
    with pytest.raises(FileNotFoundError, match="tiktoken.model"):
        KimiaTextTokenizer.from_dir(model_dir / "nowhere")


def test_asr_prompt_layout_matches_upstream(gen: KimiaGenerator) -> None:
    ids, off = gen.ids, gen.offset
    wav = tone(1.0)
    codes = fake_audio_tokenizer(wav)
    instr = gen.tok.encode("please transcribe the audio")
    for output, ct in (("text", ids.speech_ct), ("both", ids.speech_ctd)):
        p = gen.prompts.build(asr_messages(wav), output=output)
        n, k = len(codes), len(instr)
        want_audio = [ids.user_start] + [ids.text_blank] * k + [ids.media_begin] + list(codes + off) + [
            ids.media_end, ct, ids.msg_end, ids.assistant_start]  # fmt: skip
        want_text = [ids.text_blank] + instr + [ids.text_blank] * (n + 2) + [ids.text_blank] * 3
        assert p.audio_ids.tolist() == want_audio
        assert p.text_ids.tolist() == want_text
        assert p.continuous_mask.tolist() == [False] * (k + 2) + [True] * n + [False] * 4
        assert p.features_concat().shape == (n, 16)


def test_multiturn_layout_audio_text_history(gen: KimiaGenerator, tmp_path: Path) -> None:
    ids, off, delay = gen.ids, gen.offset, gen.delay
    answer = tmp_path / "answer.wav"
    sf.write(answer, tone(0.8), 16000)
    msgs = [
        {"role": "user", "message_type": "audio", "content": tone(0.5)},
        {"role": "assistant", "message_type": "audio-text", "content": [str(answer), "yes"]},
        {"role": "assistant", "message_type": "text", "content": "hello"},
        {"role": "user", "type": "text", "content": "world"},
    ]
    p = gen.prompts.build(msgs, output="both")
    a_codes = fake_audio_tokenizer(tone(0.8))
    q = len(fake_audio_tokenizer(tone(0.5)))
    yes, hello, world = (gen.tok.encode(w) for w in ("yes", "hello", "world"))
    b = ids.text_blank
    want_audio = (
        [ids.user_start, ids.media_begin] + [off] * 0 + list(fake_audio_tokenizer(tone(0.5)) + off)
        + [ids.media_end, ids.speech_ctd, ids.msg_end]
        + [ids.assistant_start] + [b] * delay + list(a_codes + off)
        + [b] * len(hello) + [b, ids.msg_end]
        + [ids.user_start] + [b] * len(world) + [ids.msg_end, ids.assistant_start]
    )  # fmt: skip
    want_text = (
        [b, b] + [b] * q + [b, b, b]
        + [b] + yes + [b] * (delay + len(a_codes) - len(yes))
        + hello + [ids.text_eos, b]
        + [b] + world + [b, b]
    )  # fmt: skip
    assert p.audio_ids.tolist() == want_audio
    assert p.text_ids.tolist() == want_text
    assert int(p.continuous_mask.sum()) == q  # assistant speech is not continuous


# -- validation ---------------------------------------------------------------------------


def test_input_validation_errors(gen: KimiaGenerator, tmp_path: Path) -> None:
    bad_file = tmp_path / "broken.wav"
    bad_file.write_bytes(b"RIFF not really audio")
    cases: list[tuple[Any, str]] = [
        ([], "non-empty list"),
        ([{"role": "system", "message_type": "text", "content": "hi"}], "unknown role 'system'"),
        ([{"role": "user", "message_type": "video", "content": "x"}], "unknown message_type 'video'"),
        ([{"role": "user", "message_type": "text", "content": "  "}], "empty content"),
        ([{"role": "user", "message_type": "audio", "content": str(tmp_path / "nope.wav")}], "audio file not found"),
        ([{"role": "user", "message_type": "audio", "content": str(bad_file)}], "cannot read audio file"),
        ([{"role": "user", "message_type": "audio", "content": np.zeros(0, np.float32)}], "waveform is empty"),
        ([{"role": "user", "message_type": "audio", "content": np.full(800, np.nan, np.float32)}], "NaN"),
        ([{"role": "assistant", "message_type": "text", "content": "hi"}], "starts with a user message"),
        (asr_messages() + [{"role": "assistant", "message_type": "text", "content": "hi"}], "last message"),
        ([{"role": "user", "message_type": "audio-text", "content": [tone(), "yes"]}], "assistant history"),
        ([{"role": "user", "message_type": "audio", "semantic_tokens": [1, 2, N_CODES]}], r"in \[0, 64\)"),
        ([{"role": "user", "message_type": "audio", "content": tone(), "whisper_features": np.zeros((3, 16))}],
         "3 whisper feature frames for 13 semantic tokens"),
    ]  # fmt: skip
    for messages, pattern in cases:
        with pytest.raises(PromptError, match=pattern):
            gen.generate(messages)
    long_text = [
        {"role": "user", "message_type": "audio", "content": tone(0.5)},
        {"role": "assistant", "message_type": "audio-text", "content": [tone(0.1), "hello world " * 8]},
        {"role": "user", "message_type": "text", "content": "yes"},
    ]
    with pytest.raises(PromptError, match="text must lead the speech"):
        gen.generate(long_text)
    gen.prompts.max_audio_s = 0.5
    with pytest.raises(PromptError, match="audio is 1.0 s; the limit is 0.5 s"):
        gen.generate(asr_messages())
    gen.prompts.max_audio_s = None
    # Too long for a spoken answer: upstream's 1500-position budget (120 s at 12.5 Hz).
    long_audio = [{"role": "user", "message_type": "audio", "semantic_tokens": np.zeros(BOTH_MAX_TOTAL, int)}]
    with pytest.raises(PromptError, match="allows 1500 positions"):
        gen.generate(long_audio, output="both")
    with pytest.raises(PromptError, match="output must be"):
        gen.generate(asr_messages(), output="speech")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)


# -- generation -------------------------------------------------------------------------------


def test_text_mode_stops_at_text_eos_and_never_runs_audio(gen: KimiaGenerator) -> None:
    built: list[int] = []

    def factory() -> Callable[[np.ndarray], np.ndarray]:
        built.append(1)
        raise AssertionError("text mode must not build the detokenizer")

    gen = KimiaGenerator(gen.lm, gen.prompts, factory, lazy_detokenizer=True)
    hello = gen.tok.encode("hello")[0]
    calls = steer(gen, {0: {"text": hello}, 1: {"text": hello}, 2: {"text": gen.ids.text_eos}})
    res = gen.generate(asr_messages(), output="text", max_new_tokens=40)
    assert res.stop_reason == "text_eos" and res.steps == 3
    assert res.text_tokens == [hello, hello] and res.text == "hellohello"
    assert len(res.text_logprobs) == 3 and all(lp <= 0 for lp in res.text_logprobs)
    assert set(res.extra["audio_history"]) == {gen.ids.text_blank}
    assert res.audio_tokens.size == 0 and res.waveform is None
    assert calls == [False, False, False] and not built and not gen.detokenizer_loaded


def test_both_mode_audio_blank_for_delay_and_stops_at_audio_end(gen: KimiaGenerator) -> None:
    ids, off, delay = gen.ids, gen.offset, gen.delay
    assert delay == 6
    code = off + 5
    yes = gen.tok.encode("yes")[0]
    schedule: dict[int, dict[str, int]] = {s: {"audio": code} for s in range(0, 12)}
    schedule[0]["text"] = yes
    schedule[1]["text"] = ids.text_eos
    schedule[12] = {"audio": ids.msg_end}
    detok_calls: list[np.ndarray] = []

    def detok(codes: np.ndarray) -> np.ndarray:
        detok_calls.append(codes)
        return np.zeros(len(codes) * 1920, np.float32)  # 24 kHz / 12.5 Hz samples per token

    gen = KimiaGenerator(gen.lm, gen.prompts, lambda: detok, lazy_detokenizer=True)
    calls = steer(gen, schedule)
    res = gen.generate(asr_messages(), output="both", seed=1)
    audio_hist = res.extra["audio_history"]
    text_hist = res.extra["text_history"]
    assert audio_hist[:delay] == [ids.text_blank] * delay  # text leads: audio blank for the delay
    assert audio_hist[delay:12] == [code] * (12 - delay)
    assert res.stop_reason == "audio_end" and res.steps == 13 and audio_hist[-1] == ids.msg_end
    assert text_hist[:2] == [yes, ids.text_eos] and set(text_hist[2:]) == {ids.text_blank}
    assert res.text == "yes"
    assert res.audio_tokens.tolist() == [5] * (12 - delay) and res.audio_tokens.dtype == np.int32
    assert len(detok_calls) == 1 and res.waveform is not None and res.waveform.size == 6 * 1920
    assert all(calls)
    # <|im_media_end|> ends the audio stream too.
    gen.lm.forward = type(gen.lm).forward.__get__(gen.lm)  # type: ignore[method-assign]
    steer(gen, {**{s: {"audio": code} for s in range(8)}, 8: {"audio": ids.media_end}})
    res = gen.generate(asr_messages(), output="both", seed=1)
    assert res.stop_reason == "audio_end" and res.steps == 9 and res.audio_tokens.tolist() == [5, 5]


def test_length_limits(gen: KimiaGenerator) -> None:
    # A text EOS does not stop a spoken answer; the limit does.
    steer(gen, {0: {"text": gen.ids.text_eos}})
    res = gen.generate(asr_messages(), output="both", max_new_tokens=9)
    assert res.stop_reason == "max_new_tokens" and res.steps == 9
    assert gen.step_budget(100, "both") == BOTH_MAX_TOTAL - 100
    assert gen.step_budget(100, "text") == min(7500, gen.lm.config.max_position_embeddings) - 100
    assert gen.step_budget(100, "text", max_new_tokens=7) == 7
    gen.lm.forward = type(gen.lm).forward.__get__(gen.lm)  # type: ignore[method-assign]
    res = gen.generate(asr_messages(), output="text", max_new_tokens=5)
    assert res.steps <= 5


def test_same_seed_same_output(gen: KimiaGenerator) -> None:
    hot = SamplingParams(temperature=1.0, top_k=0)
    kw = dict(output="both", text_sampling=hot, audio_sampling=hot, max_new_tokens=20)
    a = gen.generate(asr_messages(), seed=7, **kw)
    b = gen.generate(asr_messages(), seed=7, **kw)
    assert a.extra == b.extra and a.text_tokens == b.text_tokens
    assert np.array_equal(a.audio_tokens, b.audio_tokens)
    others = [gen.generate(asr_messages(), seed=s, **kw).extra for s in (8, 9, 10)]
    assert any(o != a.extra for o in others)


def test_sampler_rules() -> None:
    logits = torch.tensor([2.0, 1.9, -1.0, 0.5])
    greedy = SamplingParams(temperature=0.0, repetition_penalty=2.0, repetition_window=2)
    assert sample_token(logits, [0, 0], greedy, None) == 0  # history not longer than window: no penalty
    assert sample_token(logits, [3, 0, 0], greedy, None) == 1  # 2.0 / 2 < 1.9
    g = torch.Generator().manual_seed(0)
    top2 = SamplingParams(temperature=1.0, top_k=2)
    assert {sample_token(logits, [], top2, g) for _ in range(50)} == {0, 1}
    # Very low temperature must not underflow into an invalid distribution.
    assert sample_token(logits, [], SamplingParams(temperature=1e-4, top_k=3), g) == 0


# -- ASR backend --------------------------------------------------------------------------------


def test_kimia_asr_backend_fields(model_dir: Path) -> None:
    from stages.transcribe_kimia import KimiaASR, guess_language

    asr = KimiaASR(
        model_dir, "cpu", audio_tokenizer=fake_audio_tokenizer, feature_extractor=fake_features, max_new_tokens=6
    )
    out = asr.transcribe([tone(0.7), tone(1.2, sr=8000)], sample_rate=16000)
    assert len(out) == 2
    for r in out:
        assert set(r) == {"text", "language", "language_prob", "avg_logprob", "no_speech_prob", "compression_ratio"}
        assert r["no_speech_prob"] is None and r["avg_logprob"] <= 0
    with pytest.raises(StageError, match="non-empty mono"):
        asr.transcribe([np.zeros(0, np.float32)])
    assert guess_language("the cat and the dog") == ("en", 1.0)
    assert guess_language("el perro y la casa de mi madre")[0] == "es"
    assert guess_language("これは日本語です")[0] == "ja"
    assert guess_language("1234 !!") == (None, 0.0)


def test_streamed_codes_match_batch_and_arrive_lazily(gen: KimiaGenerator) -> None:
    code = gen.offset + 3
    schedule = {s: {"audio": code + (s % 2)} for s in range(0, 16)}
    schedule[16] = {"audio": gen.ids.msg_end}
    calls = steer(gen, schedule)
    batch = gen.generate(asr_messages(), output="both", seed=5)
    n_batch = len(calls)
    calls.clear()
    stream = gen.stream_audio_codes(asr_messages(), seed=5)
    first = next(stream)
    assert len(calls) == gen.delay + 1 < n_batch  # the first code comes before the answer ends
    assert [first, *stream] == batch.audio_tokens.tolist() == [3 + (s % 2) for s in range(gen.delay, 16)]

    from kimia_model.tts import KimiaTTS

    class FakeDetok:
        sample_rate = 24000

        def stream(self, tokens, seed=0):
            for t in tokens:
                yield np.full(1920, t, np.float32)

    calls.clear()
    audio, sr = KimiaTTS(gen.tts_token_generator(seed=5), FakeDetok()).synthesize("hello world")
    assert sr == 24000 and audio.size == 1920 * (16 - gen.delay)


def test_check_model_dir_names_missing_files(model_dir: Path, tmp_path: Path) -> None:
    from kimia_model.refs import ModelNotFoundError
    from stages.transcribe_kimia import check_model_dir

    with pytest.raises(ModelNotFoundError, match=r"whisper-large-v3/config.json \(config key `transcribe.model`\)"):
        check_model_dir(model_dir)
    with pytest.raises(ModelNotFoundError, match="glm-4-voice-tokenizer"):
        check_model_dir(model_dir, use_whisper_features=False)
    glm = tmp_path / "glm"
    glm.mkdir()
    (glm / "config.json").write_text("{}")
    check_model_dir(model_dir, glm, use_whisper_features=False)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="tiktoken.model"):
        check_model_dir(tmp_path, glm)


def test_kimia_labels_carry_the_language_id_models_decision(model_dir: Path, audioeval_dir: Path) -> None:
    """The LM has no language head: the stage's language comes from Whisper's, so language_prob
    means the same as with a Whisper labeller (a random tiny LM cannot change it)."""
    import soundfile as sf

    from kimia_model.audio import resample
    from stages.base import StageContext
    from stages.transcribe import TranscribeConfig, TranscribeStage
    from stages.transcribe_kimia import KimiaASR

    stage = TranscribeStage(TranscribeConfig(backend="kimia", model=str(model_dir), beam_size=1), StageContext())
    stage.asr = KimiaASR(
        model_dir, "cpu", audio_tokenizer=fake_audio_tokenizer, feature_extractor=fake_features, max_new_tokens=4
    )
    stage.lid = stage._build_lid("cpu")
    stage._ready = True
    rows = []
    for rec, path in (("es", audioeval_dir / "es" / "conteo.wav"), ("en", audioeval_dir / "en" / "counting.wav")):
        a, sr = sf.read(path, dtype="float32")
        a = resample(a if a.ndim == 1 else a.mean(axis=1), sr, 16000)
        rows.append({"status": "ok", "recording_id": rec, "segment_index": 0, "speaker": "S0",
                     "sample_rate": 16000, "duration_s": len(a) / 16000, "audio": a})  # fmt: skip
    out = stage(rows)
    # Each clip is far from the boundary (Whisper alone: es 0.98, en 0.95), so each decision is a
    # property of the language head, not of one CPU's rounding.
    assert out[0]["language"] == "es" and out[1]["language"] == "en"
    assert all(r["language_prob"] > 0.8 and r["language_source"] == "speaker" for r in out)

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from kimia_model.refs import ModelNotFoundError
from stages.base import StageContext
from stages.textnorm import cer as _cer
from stages.textnorm import normalize_text
from stages.textnorm import wer as _wer
from stages.transcribe import (
    REPAIRED_NOTE,
    WINDOW_SAMPLES,
    TranscribeConfig,
    TranscribeStage,
    assign_words,
    build_asr,
    compression_ratio,
    load_openai_whisper,
    plan_grouped_windows,
    plan_windows,
)


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
    # A batch of N and a batch of 1 run different GEMM shapes, so their floats (and, on some
    # CPUs and thread counts, a punctuation or a word: "1, 2, 3" vs "1-2-3") may differ.
    # What must hold is that each segment gets its own words whatever shares its batch: a mix-up
    # between segments would put a WER near 1 between the two, a CPU difference near 0.
    unpacked = build_asr(TranscribeConfig(model="pkg:whisper-base", pack_windows=False), StageContext())
    audios = [sf.read(p, dtype="float32")[0] for p, _ in english_clips]
    together = [r["text"] for r in unpacked.transcribe(audios, 16000)]
    alone = [unpacked.transcribe([a], 16000)[0]["text"] for a in audios]
    packed = [r["text"] for r in base_asr.transcribe(audios, 16000)]
    for (_, ref), t, a, p in zip(english_clips, together, alone, packed):
        assert t.strip() and a.strip() and p.strip()
        assert _wer(a, t) <= 0.1 and _wer(a, p) <= 0.1, (a, t, p)
        assert _wer(ref, t) <= 0.1, (ref, t)


def test_concurrent_decoders_keep_each_call_to_its_own_audio(base_asr, english_clips) -> None:
    # A worker with two decoders is called from two threads at once (the pipeline's threaded
    # actor). Each call must get its own clips' words, as the one-decoder worker gives them:
    # a mix-up between the calls would put a WER near 1 against the references.
    from concurrent.futures import ThreadPoolExecutor

    two = build_asr(TranscribeConfig(model="pkg:whisper-base"), StageContext(), decoders=2)
    assert two.model.num_workers == 2
    audios = [sf.read(p, dtype="float32")[0] for p, _ in english_clips]
    calls = [audios[k::2] for k in range(2)] * 2  # four calls, two at a time
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda batch: two.transcribe(batch, 16000), calls))
    for batch, results in zip(calls, together):
        alone = base_asr.transcribe(batch, 16000)
        for a, t in zip(alone, results):
            assert _wer(a["text"], t["text"]) <= 0.1 and t["language"] == "en", (a, t)  # English clips
    refs = [r for _, r in english_clips]
    for k in range(2):
        for ref, res in zip(refs[k::2], together[k]):
            assert _wer(ref, res["text"]) <= 0.1, (ref, res["text"])


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


# --- packed windows (pack_windows) -------------------------------------------------------------

# Recorded from the path before packing existed (commit 9c1ab4b): pack_windows=false must
# keep producing exactly these.
def _spoken(tmp_path: Path, text: str, voice: str) -> np.ndarray:
    import shutil
    import subprocess

    import soxr

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    wav = tmp_path / f"{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(wav), text], check=True, capture_output=True)
    audio, sr = sf.read(wav, dtype="float32")
    return soxr.resample(audio, sr, 16000).astype(np.float32)


def test_plan_windows_is_greedy_in_order_and_never_splits() -> None:
    # 10 + 1 + 10 + 1 + 10 > 30: the third segment opens a new window.
    assert plan_windows([10, 10, 10, 5], window=30, gap=1) == [[0, 1], [2, 3]]
    assert plan_windows([14, 15], window=30, gap=1) == [[0, 1]]  # exactly full
    assert plan_windows([14, 16], window=30, gap=1) == [[0], [1]]
    assert plan_windows([30, 1, 40, 2], window=30, gap=1) == [[0], [1], [2], [3]]  # order kept
    assert plan_windows([], window=30, gap=1) == []


def test_packed_windows_never_mix_recordings_or_languages() -> None:
    # Alternating recordings of one language, short enough that one window could hold all.
    lengths = [10] * 6
    groups = ["a", "b", "a", "b", "a", "c"]
    languages = ["en", "en", "en", "en", "zh", "en"]
    windows = plan_grouped_windows(lengths, languages, groups, window=1000, gap=1)
    covered = sorted(m for _, members, _ in windows for m in members)
    assert covered == list(range(6))  # every segment exactly once
    for lang, members, spans in windows:
        assert len({groups[m] for m in members}) == 1
        assert {languages[m] for m in members} == {lang}
        assert members == sorted(members)  # input order kept inside a window
        assert all(b - a == lengths[m] for m, (a, b) in zip(members, spans))
    # A recording's windows depend only on its own segments: drop "b" and "c", "a" is unchanged.
    only_a = plan_grouped_windows([10] * 3, ["en", "en", "zh"], ["a"] * 3, window=1000, gap=1)
    mapped = [(lang, [[0, 2, 4][m] for m in members]) for lang, members, _ in only_a]
    assert mapped == [(lang, members) for lang, members, _ in windows if groups[members[0]] == "a"]


def test_stage_tells_the_backend_which_recording_each_segment_is() -> None:
    seen: list[list[str] | None] = []

    class Recorder:
        model_id = "fake"

        def transcribe(self, audios, sample_rate=16000, *, groups=None):
            seen.append(groups)
            return [{"text": "x"} for _ in audios]

    stage = TranscribeStage(TranscribeConfig(model="pkg:whisper-base"), StageContext())
    stage.asr = Recorder()
    stage._ready = True
    rows = [
        {"status": "ok", "recording_id": rid, "segment_index": i, "sample_rate": 16000,
         "duration_s": 1.0, "audio": np.zeros(16000, np.float32)}
        for i, rid in enumerate(["r1", "r2", "r1"])
    ]
    out = stage(rows)
    assert seen == [["r1", "r2", "r1"]]
    assert [r["text"] for r in out] == ["x"] * 3


def test_assign_words_by_overlap_then_nearest() -> None:
    spans = [(0.0, 3.0), (4.0, 7.0)]
    # Inside each span; a last word stretched over the gap stays with the speech it overlaps;
    # a first word pulled back into the gap too; a word wholly in the gap goes to the nearer.
    words = [(0.5, 1.0), (2.6, 3.9), (3.2, 4.3), (5.0, 5.5)]
    assert assign_words(words, spans) == [0, 0, 1, 1]
    assert assign_words([(3.1, 3.3), (3.7, 3.9)], spans) == [0, 1]
    # Never goes back to an earlier segment: Whisper writes the window in time order.
    assert assign_words([(5.0, 5.5), (1.0, 1.5)], spans) == [1, 1]


def test_packed_window_gives_each_segment_its_own_words(base_asr, english_clips, tmp_path: Path) -> None:
    clips = {p.name: (sf.read(p, dtype="float32")[0], ref) for p, ref in english_clips}
    extra = [
        ("The library will be closed on Monday because of the national holiday.", "en+f3"),
        ("When the network fails, the job can be started again without losing finished work.", "en-us+m3"),
    ]
    items = [clips["quick_brown_fox.wav"], clips["hello_world.wav"]]
    items += [(_spoken(tmp_path, t, v), t) for t, v in extra] + [clips["counting.wav"]]
    audios, refs = [a for a, _ in items], [r for _, r in items]
    assert plan_windows([len(a) for a in audios], WINDOW_SAMPLES, 16000) == [[0, 1, 2, 3, 4]]  # one window
    results = base_asr.transcribe(audios, 16000)
    vocab = [set(normalize_text(r).split()) for r in refs]
    for k, (ref, res) in enumerate(zip(refs, results)):
        assert _wer(ref, res["text"]) <= 0.1, (ref, res["text"])
        foreign = set().union(*(v for j, v in enumerate(vocab) if j != k)) - vocab[k]
        assert not set(normalize_text(res["text"]).split()) & foreign, (ref, res["text"])
        assert res["language"] == "en" and res["language_prob"] > 0.5
        assert -1.0 < res["avg_logprob"] <= 0.0 and 0.0 <= res["no_speech_prob"] < 0.5
        assert res["compression_ratio"] == compression_ratio(res["text"])
    # The window's no_speech_prob is shared; avg_logprob is each segment's own.
    assert len({r["no_speech_prob"] for r in results}) == 1
    assert len({r["avg_logprob"] for r in results}) == len(results)
    # Reversed order: every segment still gets its own words (assignment follows the audio).
    back = base_asr.transcribe(audios[::-1], 16000)[::-1]
    for ref, res in zip(refs, back):
        assert _wer(ref, res["text"]) <= 0.1, (ref, res["text"])


def test_unpacked_path_is_unchanged(english_clips) -> None:
    asr = build_asr(TranscribeConfig(model="pkg:whisper-base", pack_windows=False), StageContext())
    audios = [sf.read(p, dtype="float32")[0] for p, _ in english_clips]
    together = asr.transcribe(audios, 16000)
    # Another CPU may write "1, 2, 3" where this one writes "1-2-3": compare words, not strings.
    for (path, ref), res in zip(english_clips, together):
        assert _wer(ref, res["text"]) <= 0.1, (path.name, ref, res["text"])
        assert res["language"] == "en" and -1.0 < res["avg_logprob"] <= 0.0
    # One window per segment: results do not depend on what else is in the batch (up to the
    # float noise of another batch shape: same words, same language, close log-probability).
    (alone,) = asr.transcribe(audios[1:2], 16000)
    assert _wer(together[1]["text"], alone["text"]) <= 0.1, (together[1]["text"], alone["text"])
    assert alone["language"] == together[1]["language"]
    assert alone["avg_logprob"] == pytest.approx(together[1]["avg_logprob"], abs=0.05)


def test_mixed_languages_keep_per_segment_language(base_asr, audioeval_dir: Path) -> None:
    names = ["en/quick_brown_fox", "es/hola_mundo", "en/counting", "es/pangrama"]
    audios = [sf.read(audioeval_dir / f"{n}.wav", dtype="float32")[0] for n in names]
    results = base_asr.transcribe(audios, 16000)
    # English is detected with p > 0.9 here; these two short Spanish clips only with p 0.5-0.7,
    # so another CPU may name a neighbouring language. What must hold on any CPU: each segment
    # keeps a language of its own (the Spanish ones never inherit their neighbours' "en") and
    # is decoded in it (characters close to the Spanish reference).
    assert results[0]["language"] == results[2]["language"] == "en"
    assert results[1]["language"] != "en" and results[3]["language"] != "en", [r["language"] for r in results]
    assert _wer("The quick brown fox jumps over the lazy dog.", results[0]["text"]) <= 0.1
    assert _wer("One two three four five six seven eight nine ten.", results[2]["text"]) <= 0.1
    assert _cer("Hola mundo.", results[1]["text"]) <= 0.35, results[1]["text"]
    assert _cer("El veloz murciélago hindú comía feliz cardillo y kiwi.", results[3]["text"]) <= 0.35, results[3]["text"]
    # A forced language skips detection and applies to every segment.
    forced = build_asr(TranscribeConfig(model="pkg:whisper-base", language="es"), StageContext())
    assert {r["language"] for r in forced.transcribe(audios[1:2], 16000)} == {"es"}


def test_long_and_silent_segments_fall_back_to_their_own_window(english_clips) -> None:
    fox = sf.read(english_clips[2][0], dtype="float32")[0]
    long = np.concatenate([fox, np.zeros(WINDOW_SAMPLES, np.float32)])  # > 30 s: truncated, alone
    silence = np.zeros(32000, np.float32)
    # Forced language: a detected one would put the silence in a window of its own.
    cfg = TranscribeConfig(model="pkg:whisper-base", language="en")
    packed = build_asr(cfg, StageContext()).transcribe([fox, long, silence], 16000)
    unpacked = build_asr(cfg.model_copy(update={"pack_windows": False}), StageContext())
    # Compared with tolerances, not ==: the packed call decodes the fallbacks in another batch
    # shape than the unpacked one, and floats (so a hallucination on silence) may differ by CPU.
    (long_alone,) = unpacked.transcribe([long], 16000)
    assert _wer(english_clips[2][1], packed[1]["text"]) <= 0.1, packed[1]["text"]
    assert _wer(long_alone["text"], packed[1]["text"]) <= 0.1, (long_alone["text"], packed[1]["text"])
    assert packed[1]["avg_logprob"] == pytest.approx(long_alone["avg_logprob"], abs=0.05)
    # Silence gets no words in the packed window, so it is decoded again alone (where Whisper
    # may well hallucinate, but then its no_speech_prob is its own, not the window's).
    (silence_alone,) = unpacked.transcribe([silence], 16000)
    assert packed[2]["no_speech_prob"] == pytest.approx(silence_alone["no_speech_prob"], abs=0.05)
    assert packed[2]["no_speech_prob"] != packed[0]["no_speech_prob"]
    assert packed[2]["language"] == "en"  # forced
    assert _wer(english_clips[2][1], packed[0]["text"]) <= 0.1


def test_segment_alone_in_its_window_is_labelled_as_unpacked(english_clips) -> None:
    """A packed window with one segment skips alignment: text and avg_logprob are the decoder's."""
    audios = [sf.read(p, dtype="float32")[0] for p, _ in english_clips[:1]]
    packed = build_asr(TranscribeConfig(model="pkg:whisper-base", language="en"), StageContext())
    unpacked = build_asr(TranscribeConfig(model="pkg:whisper-base", language="en", pack_windows=False), StageContext())
    (a,) = packed.transcribe(audios, 16000, groups=["rec"])
    (b,) = unpacked.transcribe(audios, 16000, groups=["rec"])
    assert _wer(b["text"], a["text"]) <= 0.05, (a["text"], b["text"])
    assert a["avg_logprob"] == pytest.approx(b["avg_logprob"], abs=0.02)


def test_batch_mixing_shared_and_lone_windows(base_asr, english_clips) -> None:
    """One recording's short clips share a window, another's lone clip has its own: the
    shared window is aligned and the lone one is not, in one call, each getting its words."""
    audios = [sf.read(p, dtype="float32")[0] for p, _ in english_clips[:3]]
    refs = [r for _, r in english_clips[:3]]
    assert sum(len(a) for a in audios[:2]) + 16000 <= WINDOW_SAMPLES
    out = base_asr.transcribe(audios, 16000, groups=["a", "a", "b"])
    for ref, res in zip(refs, out):
        assert _wer(ref, res["text"]) <= 0.25, (ref, res["text"])


def _fox_hello_fox(english_clips) -> tuple[np.ndarray, str, str]:
    """A sentence, a short one, the first again (pauses between): the audio, its transcript,
    and the transcript Whisper writes when it drops the repeat."""
    clips = {p.stem: (sf.read(p, dtype="float32")[0], ref) for p, ref in english_clips}
    (fox, fox_ref), (hello, hello_ref) = clips["quick_brown_fox"], clips["hello_world"]
    pause = np.zeros(12800, np.float32)
    audio = np.concatenate([fox, pause, hello, pause, fox])
    return audio, f"{fox_ref} {hello_ref} {fox_ref}", f"{fox_ref} {hello_ref}"


def _repair(asr, audio: np.ndarray, text: str) -> dict:
    """What :meth:`_repair_holes` makes of ``text`` as the decoded transcript of ``audio``."""
    tok = asr._tokenizer("en")
    encoded = asr._host(asr.model.encode(asr._storage([asr._mel(audio, asr.n_frames)])))
    out = [{"text": text, "avg_logprob": -0.2, "compression_ratio": compression_ratio(text)}]
    asr._repair_holes([audio], encoded, [tok.encode(" " + text)], ["en"], out)
    return out[0]


def test_speech_the_transcript_leaves_out_is_decoded_again_in_pieces(english_clips) -> None:
    """Whisper writes a sentence said twice once; the aligned transcript then leaves ~3 s of
    speech uncovered, and the segment decoded in pieces cut at the pauses gets it back."""
    asr = build_asr(TranscribeConfig(model="pkg:whisper-base"), StageContext())
    audio, full, dropped = _fox_hello_fox(english_clips)
    repaired = _repair(asr, audio, dropped)
    assert _wer(full, repaired["text"]) <= 0.15, repaired["text"]
    assert -1.0 <= repaired["avg_logprob"] <= 0.0
    assert repaired["labeller_note"] == REPAIRED_NOTE  # audits can find stitched labels
    untouched = _repair(asr, audio, full)
    assert untouched["text"] == full and "labeller_note" not in untouched  # nothing uncovered: left as it is
    asr.config.fill_holes_s = 0.0
    assert _repair(asr, audio, dropped)["text"] == dropped


def test_pieces_whisper_is_unsure_of_do_not_replace_the_transcript(english_clips, monkeypatch) -> None:
    """A hole of noise or music decodes to invented text with a low log-probability: the
    segment then keeps its own transcript."""
    asr = build_asr(TranscribeConfig(model="pkg:whisper-base"), StageContext())
    audio, _full, dropped = _fox_hello_fox(english_clips)
    decode = asr._transcribe_unpacked

    def unsure(*args, **kwargs):
        return [{**r, "avg_logprob": -1.5} for r in decode(*args, **kwargs)]

    monkeypatch.setattr(asr, "_transcribe_unpacked", unsure)
    assert _repair(asr, audio, dropped)["text"] == dropped


def test_a_packed_segment_robbed_of_its_words_is_decoded_again_alone(english_clips, monkeypatch) -> None:
    """When the aligner hands most of a segment's words to its neighbour (or Whisper writes a
    repeated sentence once), the short-changed segment is decoded again on its own window."""
    asr = build_asr(TranscribeConfig(model="pkg:whisper-base"), StageContext())
    clips = {p.name: (sf.read(p, dtype="float32")[0], ref) for p, ref in english_clips}
    (fox, fox_ref), (count, count_ref) = clips["quick_brown_fox.wav"], clips["counting.wav"]
    split = asr._split_words

    def rob_the_second(*args, **kwargs):  # the second segment keeps its last word only
        words = split(*args, **kwargs)
        last = max(i for i, (_t, _lp, k, _s) in enumerate(words) if k == 1)
        return [(t, lp, 1 if i == last else 0, s) for i, (t, lp, _k, s) in enumerate(words)]

    monkeypatch.setattr(asr, "_split_words", rob_the_second)
    first, second = asr.transcribe([fox, count], 16000)
    assert _wer(count_ref, second["text"]) <= 0.1, second["text"]  # redone alone: its own words back
    assert _wer(fox_ref, first["text"]) > 0.3  # the first one kept what it was handed
    asr.config.pack_redo_below = 0.0  # that guard off: the speech its one word leaves uncovered still counts
    assert _wer(count_ref, asr.transcribe([fox, count], 16000)[1]["text"]) <= 0.1
    asr.config.fill_holes_s = 0.0  # both guards off: the second segment keeps one word
    assert len(asr.transcribe([fox, count], 16000)[1]["text"].split()) == 1

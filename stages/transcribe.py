"""Transcribe: model-in-the-loop ASR labelling of speech segments.

Two Whisper backends share one interface (:class:`AsrBackend`):

* ``faster-whisper``: a CTranslate2 model directory (``model.bin``, ``config.json``,
  ``tokenizer.json``), e.g. the packaged ``pkg:whisper-base``. Segments of a batch are
  encoded in one call, language is detected from that same encoder output, and all of them
  are decoded in one batched ``generate``: no VAD pass, no per-segment Python loop, which is
  what makes labelling cheaper than running ``WhisperModel.transcribe`` per segment.
  With ``pack_windows`` (default) short segments are packed, whole and in order, into shared
  30 s windows separated by silence, so one encoder pass serves several diarization turns;
  the window transcript is split back onto its segments by word timing (see
  :meth:`FasterWhisperBackend._transcribe_packed`).
* ``openai-whisper``: a model name resolved in the cache (``<cache>/whisper/base.pt``) or a
  ``.pt`` path, batched through ``whisper.decode`` on a stacked mel batch.

Per segment both return ``text``, ``language``, ``language_prob``, ``avg_logprob``,
``no_speech_prob`` and ``compression_ratio`` (Whisper's hallucination signals, measured the
same way Whisper's own fallback logic measures them).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field

from kimia_model.audio import frame_levels, quiet_runs, resample
from kimia_model.refs import ModelNotFoundError, missing, resolve
from stages.base import Row, Stage, StageConfig, StageContext, machine_threads, node_cpus, runtime_label
from stages.language import Decision, Evidence, PoolingParams, mean_distribution, pool_languages
from stages.textnorm import compression_ratio, is_unspaced, spoken_chars

ASR_SAMPLE_RATE = 16000
WINDOW_S = 30.0

TRANSCRIPT_FIELDS = ("text", "language", "language_prob", "avg_logprob", "no_speech_prob", "compression_ratio")
#: How the language was decided (language pooling): "speaker" or "segment", and the segment's own
#: top language and probability, kept for audits.
LANGUAGE_FIELDS = ("language_source", "language_segment", "language_segment_prob")
#: Which model labelled the segment, and why it is not the one ``by_language`` names (if not).
LABELLER_FIELDS = ("labeller", "labeller_note", "chars")


class TranscribeConfig(StageConfig):
    """ASR labelling settings."""

    backend: Literal["faster-whisper", "openai-whisper", "kimia"] = Field(
        "faster-whisper", description="Which ASR implementation labels the segments."
    )
    model: str = Field(
        "pkg:whisper-base",
        description="faster-whisper: CTranslate2 dir or pkg:whisper-base / pkg:whisper-tiny.en; "
        "openai-whisper: a name (resolved as <cache>/whisper/NAME.pt) or a .pt path; kimia: model dir.",
    )
    compute_type: str = Field(
        "auto", description="CTranslate2 compute type: auto = int8 on CPU, float16 on GPU."
    )
    cpu_threads: int = Field(
        0, ge=0, le=256,
        description="faster-whisper on CPU: CTranslate2 intra-op threads per decoder (other backends: per "
        "worker); 0 = machine-sized (see cpu_decoders). Threads never change outputs.",
    )
    cpu_decoders: int = Field(
        0, ge=0, le=64,
        description="faster-whisper on CPU: batches one worker decodes at once, each on cpu_threads threads, "
        "over one copy of the weights (CTranslate2 inter_threads; the pipeline runs that many calls per "
        "actor). 0 = machine-sized: with cpu_threads 0, one single-thread decoder per CPU Ray sees (at most "
        "8), because decoding gains more from a second batch than from a second thread (whisper-base int8 "
        "on 2 cores: 2 threads 1.32x one thread, 2 decoders 1.66x, benchmarks/bench_decoders.py); with "
        "cpu_threads N, CPUs / N decoders. "
        "Each call is one machine-independent batch, so this never changes outputs. The transcribe stage's "
        "only: roundtrip.asr decodes one batch at a time.",
    )
    kept_only: bool = Field(
        True,
        description="Transcribe only the segments the filter's audio checks keep (duration, SNR, DNSMOS, "
        "clipping, silence, one speaker): quality runs before transcription and the filter judges those "
        "signals first (the filter_audio stage), so no decoder time goes into audio that is dropped "
        "whatever it says (37 % of the segment audio in the speed benchmark's corpus, all for DNSMOS). "
        "Samples the audio checks drop are written without a transcript. false = transcribe every "
        "segment, then measure and filter. Only with quality and filter enabled; the transcribe "
        "stage's only (roundtrip.asr ignores it).",
    )
    language: str | None = Field(
        None, description="Force a language code (e.g. en); null decides it from language-ID evidence "
        "(see language_pooling)."
    )
    language_pooling: bool = Field(
        True,
        description="Decide each segment's language from the duration-weighted language-ID evidence of "
        "its speaker and recording (stages/language.py), then decode with it; a segment keeps its own "
        "language only when its own evidence is strong and disagrees. false = each segment decides "
        "alone (unreliable on short turns: measured on espeak-ng English, most 1-3 s turns got "
        "another language or a probability below 0.8).",
    )
    lid_model: str | None = Field(
        None,
        description="Language-ID model (CTranslate2 Whisper directory or pkg:whisper-base) for backends "
        "without a language head of their own (kimia). null = the ASR model itself where it has one, "
        "else pkg:whisper-base. language_prob then means the same for every backend: this model's "
        "pooled probability.",
    )
    language_prior_s: float = Field(
        10.0, ge=0.0, le=600.0,
        description="Seconds of the recording's language evidence a speaker's own is shrunk towards.",
    )
    language_override_prob: float = Field(
        0.9, ge=0.5, le=1.0,
        description="A segment keeps its own top language (a code switch) only with at least this "
        "probability on the segment alone.",
    )
    language_recheck_prob: float = Field(
        0.95, ge=0.0, le=1.0,
        description="Language ID first hears each segment's first detect_window_s; a segment whose pooled "
        "decision has at most this probability is heard whole (its first 30 s, in detect_window_s windows) and "
        "decided again. 1.0 = always hear every segment whole (about 2.6x the language-ID cost on 20 s VAD "
        "segments); 0 = the first window only. On espeak-ng English VAD segments 15 of 222 longer than 8 s "
        "were below 0.95, among them one Latin on its first 8 s (0.66) and English heard whole.",
    )
    language_override_min_s: float = Field(
        2.0, ge=0.0, le=30.0, description="...and only when the segment is at least this long."
    )
    task: Literal["transcribe", "translate"] = Field("transcribe", description="Whisper task token.")
    beam_size: int = Field(5, ge=1, le=16, description="Beam width; 1 = greedy (faster, slightly worse).")
    max_new_tokens: int = Field(224, ge=1, le=440, description="Longest transcript per segment in tokens.")
    pack_windows: bool = Field(
        True,
        description="faster-whisper: pack short segments (whole, in order, same detected language) into "
        "shared 30 s windows so the encoder runs once per window instead of once per segment; each "
        "segment's words are recovered by word-level alignment. false = one padded window per segment.",
    )
    pack_gap_s: float = Field(
        1.0,
        ge=0.2,
        le=5.0,
        description="Silence (s) between packed segments: room for the aligner to put word boundaries "
        "in, and a pause Whisper reads as a sentence break. Larger = fewer segments per window.",
    )
    pack_redo_below: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="A packed segment whose share of its window's text tokens is below this fraction of its "
        "share of the window's audio is decoded again alone: Whisper can write a sentence said twice in "
        "one window only once, and the aligner can then hand a segment's words to its neighbour. "
        "0 = never.",
    )
    fill_holes_s: float = Field(
        1.5,
        ge=0.0,
        le=30.0,
        description="faster-whisper: a segment whose aligned transcript leaves at least this many seconds "
        "of sound unaccounted for is cut at the pauses around that stretch and the pieces are decoded "
        "again; their joined text replaces the segment's when it has more letters and digits and every "
        "piece decoded with avg_logprob >= -1 (Whisper's own failure threshold). Whisper writes a "
        "sentence said twice in a row once, or skips one, more often the longer the segment: on a 23 s "
        "VAD segment of espeak-ng speech a repeated 5 s sentence was dropped, and the full stop before "
        "it was aligned across 7 s of speech. Costs one alignment pass (a teacher-forced decoder pass) "
        "per segment with text. 0 = never.",
    )
    pack_timestamps: bool = Field(
        False,
        description="Decode packed windows in Whisper's timestamp mode. Off by default: measured on "
        "espeak-ng turns it was ~25% slower (timestamp tokens) and, as in long-form transcription, "
        "sometimes deferred a window's last utterance to a next window, leaving it to the "
        "re-decode fallback; word timing comes from alignment either way.",
    )
    detect_window_s: float = Field(
        8.0,
        ge=2.0,
        le=30.0,
        description="Multilingual model, no forced language: language ID hears each segment's first "
        "detect_window_s (a shorter segment zero-padded), and a segment still unsure after pooling "
        "(language_recheck_prob) the rest of its first 30 s in windows of this length; a window costs "
        "~0.15 of a 30 s encoder pass at 8 s. Measured with whisper-base: at 8-10 s, 43/43 espeak-ng turns English and "
        "23/27 pytest-audioeval clips (9 languages) right, the same as full 30 s windows; at 6 s two "
        "turns became Latin, at 3-4 s up to 12 became Finnish etc. (the encoder needs context). "
        "Setting `language` skips detection.",
    )
    input_stream: Literal["original", "enhanced"] = Field(
        "original", description="Which audio stream the ASR hears."
    )
    by_language: dict[str, Literal["whisper", "paraformer"]] = Field(
        default_factory=lambda: {"zh": "paraformer"},
        description="Labeller per decided language, as Kimi-Audio labels Mandarin with Paraformer-zh: "
        "'whisper' = this section's backend, 'paraformer' = paraformer_model. Languages not listed go "
        "to the backend; the filter's allow-list then keeps or drops them. Where paraformer_model is "
        "not staged, its languages fall back to the backend, and for Mandarin with faster-whisper "
        "the text is punctuated from the pauses between Whisper's timed words; each segment's "
        "`labeller` field and the run summary say so.",
    )
    paraformer_model: str | None = Field(
        None,
        description="Paraformer-zh (FunASR) ONNX directory for Mandarin labels with character timestamps, "
        "punctuated from the pauses between characters as Kimi-Audio does (stages/zh_punct.py): "
        "model_quant.onnx or model.onnx (a BiCif Paraformer, with us_cif_peak output), config.yaml, "
        "tokens.json, am.mvn, e.g. the paraformer-large-vad-punc zh -onnx release. A path, or a name "
        "under <cache_dir>/paraformer/. null: no Paraformer (Mandarin falls back to Whisper).",
    )
    kimia_tokenizer: str | None = Field(
        None,
        description="kimia backend: GLM-4-Voice tokenizer dir (null: <model>/glm-4-voice-tokenizer, "
        "then <cache_dir>/glm-4-voice-tokenizer).",
    )


class AsrBackend(Protocol):
    """What every ASR backend offers (also used by the round-trip stage)."""

    model_id: str

    def transcribe(
        self,
        audios: list[np.ndarray],
        sample_rate: int = ASR_SAMPLE_RATE,
        *,
        groups: list[str] | None = None,
        languages: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Transcribe each (<= 30 s) clip; one result dict per clip, keys TRANSCRIPT_FIELDS.

        ``groups`` names the recording each clip belongs to. A backend that packs several clips
        into one decoding window packs only clips of the same group, so one recording's labels
        never depend on what other recordings shared its batch. ``languages`` (one code per
        clip) is the language already decided for each clip (:mod:`stages.language`); a backend
        that has a language token decodes with it instead of detecting one.
        """
        ...


class LanguageId(Protocol):
    """An acoustic language-ID head: per clip, a probability distribution over languages."""

    def language_probs(self, audios: list[np.ndarray], sample_rate: int = ASR_SAMPLE_RATE) -> list[dict[str, float]]:
        """The top languages of each clip with their probabilities (a softmax: they sum to <= 1)."""
        ...


WINDOW_SAMPLES = int(WINDOW_S * ASR_SAMPLE_RATE)
# Whisper's decoder context (n_text_ctx) for every model size: prompt + generated tokens.
MAX_DECODER_LENGTH = 448
# Punctuation that Whisper writes as its own "word" right after the word it closes.
_CLOSING_PUNCT = "\"'.。,，!！?？:：;；”’)]}、…"


def _to_16k(audios: list[np.ndarray], sample_rate: int, *, truncate: bool = True) -> list[np.ndarray]:
    out = []
    for a in audios:
        a = resample(np.asarray(a, np.float32), sample_rate, ASR_SAMPLE_RATE)
        out.append(a[:WINDOW_SAMPLES] if truncate else a)
    return out


def detection_windows(samples: int, window: int) -> list[tuple[int, int]]:
    """Where language ID listens in a clip of ``samples``: windows of ``window`` samples, as few
    as cover the clip, spread evenly from its start to its end (a shorter clip is one window).

    Every window has the same length, so each is one fixed-size encoder input and a clip's
    evidence never depends on what else shares its batch.

    >>> detection_windows(100, 40)
    [(0, 40), (30, 70), (60, 100)]
    >>> detection_windows(30, 40), detection_windows(40, 40), detection_windows(41, 40)
    ([(0, 30)], [(0, 40)], [(0, 40), (1, 41)])
    """
    n = -(-samples // window)
    if n <= 1:
        return [(0, samples)]
    starts = [round(k * (samples - window) / (n - 1)) for k in range(n)]
    return [(a, a + window) for a in starts]


def plan_windows(lengths: list[int], window: int, gap: int) -> list[list[int]]:
    """Greedily pack segments, whole and in the given order, into windows of ``window`` samples.

    Order is kept (never sorted by length) so that a window holds consecutive turns of a
    conversation: the decoder then sees the context it would see in long-form transcription,
    and the packing is a deterministic function of the input. A segment that does not fit in
    the current window opens a new one; one longer than ``window`` gets a window to itself
    (callers send those down the unpacked path instead).

    Args:
        lengths: Segment lengths in samples.
        window: Window length in samples.
        gap: Silence in samples between two segments of a window.

    Returns:
        Per window, the indices of its segments.
    """
    windows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        need = used + gap + n if current else n
        if current and need > window:
            windows.append(current)
            current, need = [], n
        current.append(i)
        used = need
    if current:
        windows.append(current)
    return windows


def plan_grouped_windows(
    lengths: list[int], languages: list[str | None], groups: list[str], window: int, gap: int
) -> list[tuple[str | None, list[int], list[tuple[int, int]]]]:
    """Decoding windows that never mix recordings or languages.

    Segments are grouped by (recording, language), input order kept within a group, and each
    group is packed by :func:`plan_windows`. Keeping a window inside one recording is what
    makes a recording's labels independent of whatever else shared its batch: the decoder
    never conditions one file's words on another file's speech.

    Args:
        lengths: Segment lengths in samples.
        languages: Detected language per segment.
        groups: Recording id per segment.
        window: Window length in samples.
        gap: Silence in samples between two segments of a window.

    Returns:
        Per window: its language, its segments' indices, and each segment's (start, end) in
        samples within the window.

    >>> [m for _, m, _ in plan_grouped_windows([10, 10, 10], ["en"] * 3, ["a", "b", "a"], 100, 5)]
    [[0, 2], [1]]
    """
    by_group: dict[tuple[str, str | None], list[int]] = {}
    for i, lang in enumerate(languages):
        by_group.setdefault((groups[i], lang), []).append(i)
    windows: list[tuple[str | None, list[int], list[tuple[int, int]]]] = []
    for (_, lang), idx in by_group.items():
        for plan in plan_windows([lengths[i] for i in idx], window, gap):
            members = [idx[j] for j in plan]
            spans, t = [], 0
            for m in members:
                spans.append((t, t + lengths[m]))
                t += lengths[m] + gap
            windows.append((lang, members, spans))
    return windows


def under_share(tokens: list[int], lengths: list[int], below: float) -> list[int]:
    """Members of a packed window whose text is short for their audio (indices into the window).

    A member's expected tokens are the window's tokens times its share of the window's audio;
    one that got fewer than ``below`` times that (and the window said something) lost words,
    typically a sentence repeated in the window that Whisper wrote once.

    >>> under_share([12, 1, 10], [16000, 16000, 16000], 0.5)
    [1]
    >>> under_share([0, 0], [16000, 16000], 0.5), under_share([3, 9], [8000, 24000], 0.5)
    ([], [])
    """
    total, audio = sum(tokens), sum(lengths)
    if below <= 0 or total == 0 or audio == 0 or len(tokens) < 2:
        return []
    return [k for k, (n, length) in enumerate(zip(tokens, lengths)) if n < below * total * length / audio]


def assign_words(words: list[tuple[float, float]], spans: list[tuple[float, float]]) -> list[int]:
    """Which packed segment each aligned word belongs to.

    A word goes to the segment its time interval overlaps most; a word lying entirely in a gap
    goes to the segment nearest its midpoint. Overlap is used rather than the bare midpoint
    because DTW alignment tends to stretch the word before or after a pause across the silence
    (a sentence-final word "ends" when the next one starts): its midpoint can then fall in the
    gap, while its overlap with real speech still names the right segment. Assignments are made
    non-decreasing, since Whisper writes the window's speech in time order.

    Args:
        words: (start_s, end_s) per word, in transcript order.
        spans: (start_s, end_s) per segment within the window, in order.

    Returns:
        Segment index per word.
    """
    starts = np.array([s for s, _ in spans], dtype=np.float64)
    ends = np.array([e for _, e in spans], dtype=np.float64)
    out: list[int] = []
    floor = 0
    for w0, w1 in words:
        overlap = np.minimum(ends, w1) - np.maximum(starts, w0)
        if overlap.max() > 0:
            k = int(np.argmax(overlap))
        else:
            mid = 0.5 * (w0 + w1)
            distance = np.maximum(starts - mid, 0) + np.maximum(mid - ends, 0)
            k = int(np.argmin(distance))
        floor = max(floor, k)
        out.append(floor)
    return out


#: A piece re-decoded by the hole check counts only when Whisper scored its text at least this
#: well: openai-whisper's ``logprob_threshold``, below which it treats a decode as failed.
HOLE_MIN_LOGPROB = -1.0
#: How far (s) a hole's edge may move to reach the middle of a pause, so a cut falls between words.
HOLE_REACH_S = 1.0
#: Pieces shorter than this (s) hold no word and are not decoded.
HOLE_MIN_PIECE_S = 0.2
#: ``labeller_note`` of a segment whose text :meth:`FasterWhisperBackend._repair_holes` replaced,
#: so audits can find (and the run summary counts) labels stitched from pieces.
REPAIRED_NOTE = "decoded again in pieces: the first transcript left speech out"
#: Only sound within this many dB of the segment's loud level (95th percentile of its 10 ms
#: frames) counts towards a hole: a sentence Whisper dropped is as loud as the rest, while
#: background chatter, music beds and room noise that Whisper rightly left out are not.
HOLE_LEVEL_DB = 20.0


def transcript_holes(
    words: list[tuple[float, float]], audio: np.ndarray, sr: int, min_sound_s: float
) -> list[tuple[float, float]]:
    """Stretches of ``audio`` holding at least ``min_sound_s`` of sound no transcript word accounts for.

    Alignment (DTW over cross-attention) must consume every frame, so speech that Whisper did
    not write down lands inside one word's interval (a full stop "lasting" 7 s), or before the
    first word or after the last. A word takes well under a second of sound, so an interval
    with ``min_sound_s`` of sound as loud as the segment's speech (within :data:`HOLE_LEVEL_DB`
    of its loud level, 10 ms frames, pauses left out) means lost speech. Each hole's edges move to the middle of
    the nearest pause (:func:`kimia_model.audio.quiet_runs`) within :data:`HOLE_REACH_S`, so
    cutting there splits no word.

    Args:
        words: (start_s, end_s) per transcript word, in order, relative to ``audio``.

    Returns:
        (start_s, end_s) per hole, in order.

    >>> sr = 100
    >>> speech = lambda s: np.ones(int(s * sr), np.float32)
    >>> pause = lambda s: np.zeros(int(s * sr), np.float32)
    >>> audio = np.concatenate([speech(2), pause(1), speech(3), pause(1), speech(2)])
    >>> written = [(t, t + 0.5) for t in np.arange(0.0, 9.0, 0.5)]  # every stretch has its word
    >>> transcript_holes(written, audio, sr, 2.0)
    []
    >>> skipped = written[:3] + [(1.5, 7.0)] + written[14:]  # the 3 s utterance never written
    >>> transcript_holes(skipped, audio, sr, 2.0)
    [(2.5, 6.5)]
    >>> audio[300:600] *= 0.01  # the unwritten stretch 40 dB down: background, not a lost sentence
    >>> transcript_holes(skipped, audio, sr, 2.0)
    []
    """
    duration = len(audio) / sr
    hop_s = 0.01
    levels = frame_levels(audio, sr, hop_s)
    if levels.size == 0:
        return []
    runs = quiet_runs(audio, sr, hop_s=hop_s, levels=levels)
    db = 20 * np.log10(levels + 1e-10)
    sounding = db >= np.percentile(db, 95) - HOLE_LEVEL_DB
    for r0, r1 in runs:  # pauses do not count, even where the noise floor is high
        sounding[round(r0 / hop_s) : round(r1 / hop_s)] = False
    loud = np.concatenate([[0], np.cumsum(sounding)])

    def sound_s(a: float, b: float) -> float:
        i, j = (min(levels.size, max(0, round(t / hop_s))) for t in (a, b))
        return float(loud[j] - loud[i]) * hop_s

    intervals: list[tuple[float, float]] = []
    covered = 0.0
    for start, end in words:
        if start > covered:
            intervals.append((covered, start))
        intervals.append((start, max(start, end)))
        covered = max(covered, end)
    if duration > covered:
        intervals.append((covered, duration))

    def to_pause(t: float) -> float:
        best, best_d = t, HOLE_REACH_S
        for r0, r1 in runs:
            d = 0.0 if r0 <= t <= r1 else min(abs(r0 - t), abs(r1 - t))
            if d < best_d or (d == 0.0 and best == t):
                best, best_d = 0.5 * (r0 + r1), d
        return min(max(best, 0.0), duration)

    return [(to_pause(a), to_pause(b)) for a, b in intervals if sound_s(a, b) >= min_sound_s]


def hole_pieces(holes: list[tuple[float, float]], duration: float) -> list[tuple[float, float]]:
    """The clip cut at every hole edge, pieces under :data:`HOLE_MIN_PIECE_S` left out.

    >>> hole_pieces([(2.5, 6.5)], 9.0)
    [(0.0, 2.5), (2.5, 6.5), (6.5, 9.0)]
    >>> hole_pieces([(0.05, 6.5)], 9.0)
    [(0.0, 6.5), (6.5, 9.0)]
    """
    cuts = sorted({t for hole in holes for t in hole if HOLE_MIN_PIECE_S <= t <= duration - HOLE_MIN_PIECE_S})
    edges = [0.0, *cuts, duration]
    return [(a, b) for a, b in itertools.pairwise(edges) if b - a >= HOLE_MIN_PIECE_S]


def cpu_decoding(cpu_threads: int, cpu_decoders: int, cpus: int) -> tuple[int, int]:
    """Decoders one faster-whisper worker runs at once on CPU, and intra-op threads per decoder.

    Beam search over whisper-sized matrices gains about a third from a second thread, and
    about two thirds from a second batch decoded beside the first
    (``benchmarks/bench_decoders.py``); CTranslate2 runs such decoders (``inter_threads``)
    over one copy of the weights. So with both settings 0 a worker runs one
    single-thread decoder per CPU, up to :data:`~stages.base.MAX_AUTO_THREADS` (a bigger node
    gets more workers instead); a fixed ``cpu_threads`` gets the CPUs it leaves; a fixed
    ``cpu_decoders`` shares the CPUs out.

    >>> cpu_decoding(0, 0, 2), cpu_decoding(0, 0, 64), cpu_decoding(4, 0, 16), cpu_decoding(0, 2, 8)
    ((2, 1), (8, 1), (2, 4), (2, 4))
    >>> cpu_decoding(0, 1, 2), cpu_decoding(3, 2, 2)  # one decoder: the old machine-sized threads
    ((1, 2), (2, 3))
    """
    machine = machine_threads(0, cpus)
    decoders = cpu_decoders or (max(1, machine // cpu_threads) if cpu_threads else machine)
    return decoders, cpu_threads or max(1, machine // decoders)


class FasterWhisperBackend:
    """Batched CTranslate2 Whisper, driven at the level of encode / detect / generate / align.

    ``decoders`` > 1 lets that many threads call it at once, each call decoded in parallel
    with the others (:func:`cpu_decoding`); every method is safe to call from several threads.
    """

    def __init__(self, model_dir: Path, *, device: str, config: TranscribeConfig, decoders: int = 1) -> None:
        import ctranslate2
        import tokenizers
        from faster_whisper.feature_extractor import FeatureExtractor
        from faster_whisper.tokenizer import Tokenizer

        self.config = config
        self.model_id = f"faster-whisper:{config.model}"
        compute = config.compute_type
        if compute == "auto":
            compute = "float16" if device == "cuda" else "int8"
        _, threads = cpu_decoding(config.cpu_threads, decoders, node_cpus())
        self.model = ctranslate2.models.Whisper(
            str(model_dir), device=device, compute_type=compute, intra_threads=threads, inter_threads=decoders
        )
        # CTranslate2's own attention kernels: its PyPI wheels are built without flash-attn (from
        # 4.4), so flash_attention=True would not run; compute_type is what CTranslate2 settled on.
        self.runtime = runtime_label(device, self.model.compute_type, "ctranslate2")
        self.hf_tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        n_mels = self.model.n_mels if hasattr(self.model, "n_mels") else 80
        self.features = FeatureExtractor(feature_size=n_mels)
        self._Tokenizer = Tokenizer
        self.multilingual = bool(self.model.is_multilingual)
        self.n_frames = WINDOW_SAMPLES // self.features.hop_length
        # The encoder halves the frame rate: 100 mel frames/s -> 50 encoder positions/s, the
        # unit of the time indices in CTranslate2's alignment path.
        self.positions_per_second = ASR_SAMPLE_RATE / self.features.hop_length / 2

    def _tokenizer(self, language: str | None) -> Any:
        return self._Tokenizer(
            self.hf_tokenizer,
            self.multilingual,
            task=self.config.task if self.multilingual else None,
            language=language if self.multilingual else None,
        )

    def _frames(self, samples: int) -> int:
        """Encoder frames that hold a clip of ``samples`` at 16 kHz, at most a window's worth.

        Alignment is told where the speech ends so the path does not stretch the last word
        over the zero-padded rest of the window.
        """
        return min(self.n_frames, -(-samples // self.features.hop_length))

    def _mel(self, audio: np.ndarray, n_frames: int) -> np.ndarray:
        feat = self.features(audio, padding=0)[:, :n_frames]  # [n_mels, frames]
        if feat.shape[1] < n_frames:
            feat = np.pad(feat, ((0, 0), (0, n_frames - feat.shape[1])))
        return feat

    @staticmethod
    def _storage(mels: list[np.ndarray]) -> Any:
        import ctranslate2

        return ctranslate2.StorageView.from_array(np.ascontiguousarray(np.stack(mels), dtype=np.float32))

    def transcribe(
        self,
        audios: list[np.ndarray],
        sample_rate: int = ASR_SAMPLE_RATE,
        *,
        groups: list[str] | None = None,
        languages: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        if not audios:
            return []
        forced = list(languages) if languages is not None and self.multilingual else None
        if not self.config.pack_windows:
            return self._transcribe_unpacked(_to_16k(audios, sample_rate), forced)
        clips = _to_16k(audios, sample_rate, truncate=False)
        # A segment longer than a window cannot share one; it is truncated and decoded alone,
        # exactly as in the unpacked path.
        long = [i for i, c in enumerate(clips) if len(c) > WINDOW_SAMPLES]
        short = [i for i, c in enumerate(clips) if len(c) <= WINDOW_SAMPLES]
        out: list[dict[str, Any] | None] = [None] * len(clips)
        if long:
            todo = [clips[i][:WINDOW_SAMPLES] for i in long]
            for i, res in zip(long, self._transcribe_unpacked(todo, [forced[i] for i in long] if forced else None)):
                out[i] = res
        if short:
            keys = [groups[i] if groups else "" for i in short]
            langs = [forced[i] for i in short] if forced else None
            for i, res in zip(short, self._transcribe_packed([clips[i] for i in short], keys, langs)):
                out[i] = res
        return out  # type: ignore[return-value]

    def language_probs(self, audios: list[np.ndarray], sample_rate: int = ASR_SAMPLE_RATE) -> list[dict[str, float]]:
        """Whisper's language head on each clip's first ``detect_window_s`` (top 5 languages).

        The pooled decision hands it windows of that length (:func:`detection_windows`).

        Raises:
            ValueError: an English-only model, which has no language head.
        """
        if not self.multilingual:
            raise ValueError(f"{self.model_id} is English-only: it has no language head")
        return self._language_distributions(_to_16k(audios, sample_rate, truncate=False))

    def _language_distributions(self, clips: list[np.ndarray]) -> list[dict[str, float]]:
        if not clips:
            return []
        samples = int(self.config.detect_window_s * ASR_SAMPLE_RATE)
        frames = samples // self.features.hop_length
        mels = [self._mel(clip[:samples], frames) for clip in clips]
        detected = self.model.detect_language(self.model.encode(self._storage(mels), to_cpu=False))
        return [{tok[2:-2]: float(p) for tok, p in d[:5]} for d in detected]  # "<|en|>" -> "en"

    def _transcribe_unpacked(
        self, clips: list[np.ndarray], forced: list[str] | None = None, *, repair: bool = True
    ) -> list[dict[str, Any]]:
        """One zero-padded 30 s window per segment, decoded without timestamps; then, with
        ``repair``, segments whose transcript leaves speech unwritten are decoded again in
        pieces (:meth:`_repair_holes`)."""
        encoded = self.model.encode(self._storage([self._mel(c, self.n_frames) for c in clips]), to_cpu=False)

        languages: list[str | None]
        probs: list[float | None]
        if forced:
            languages, probs = list(forced), [None] * len(clips)
        elif not self.multilingual:
            languages, probs = ["en"] * len(clips), [None] * len(clips)
        elif self.config.language:
            languages, probs = [self.config.language] * len(clips), [None] * len(clips)
        else:
            detected = self.model.detect_language(encoded)
            languages = [d[0][0][2:-2] for d in detected]  # "<|en|>" -> "en"
            probs = [float(d[0][1]) for d in detected]

        prompts = []
        for lang in languages:
            tok = self._tokenizer(lang)
            prompts.append(list(tok.sot_sequence) + [tok.no_timestamps])
        tok0 = self._tokenizer(languages[0])
        results = self.model.generate(
            encoded,
            prompts,
            beam_size=self.config.beam_size,
            max_length=self.config.max_new_tokens + len(prompts[0]),
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=[-1],
        )
        out = []
        all_ids = []
        for res, lang, prob in zip(results, languages, probs):
            ids = [t for t in res.sequences_ids[0] if t < tok0.eot]
            all_ids.append(ids)
            text = tok0.decode(ids).strip()
            out.append(
                {
                    "text": text,
                    "language": lang,
                    "language_prob": prob,
                    "avg_logprob": self._avg_logprob(res, len(ids)),
                    "no_speech_prob": float(res.no_speech_prob),
                    "compression_ratio": compression_ratio(text),
                }
            )
        if repair and self.config.fill_holes_s > 0:
            self._repair_holes(clips, self._host(encoded), all_ids, languages, out)
        return out

    @staticmethod
    def _host(encoded: Any) -> np.ndarray:
        """Encoder output as a host array (CTranslate2 takes a subset of rows only from the host)."""
        import ctranslate2

        return np.asarray(encoded if str(encoded.device) == "cpu" else encoded.to_device(ctranslate2.Device.cpu))

    def _word_times(self, tok: Any, ids: list[int], alignment: Any) -> tuple[list[str], list[list[int]], np.ndarray]:
        """Words of a transcript, their tokens, and the time (s) each word starts, plus the end of text.

        The alignment is a monotone path of (token index, encoder position) pairs over the text
        tokens plus end-of-text; a token starts where the path first reaches it, so a word spans
        from its first token's start to the next word's start.
        """
        words, word_tokens = tok.split_to_word_tokens(ids + [tok.eot])
        words, word_tokens = words[:-1], word_tokens[:-1]  # drop end-of-text
        path = np.asarray(alignment.alignments, dtype=np.int64).reshape(-1, 2)
        n = len(ids)
        if len(path):
            first = np.searchsorted(path[:, 0], np.arange(n + 1), side="left")
            token_start = path[np.minimum(first, len(path) - 1), 1] / self.positions_per_second
        else:  # no path (should not happen for non-empty text): everything at the window start
            token_start = np.zeros(n + 1)
        bounds = np.concatenate([[0], np.cumsum([len(t) for t in word_tokens])]).astype(int)
        return words, word_tokens, token_start[np.minimum(bounds, n)]

    def _repair_holes(
        self,
        clips: list[np.ndarray],
        encoded: np.ndarray,
        ids: list[list[int]],
        languages: list[str | None],
        out: list[dict[str, Any]],
        rows: list[int] | None = None,
    ) -> None:
        """Decode again, in pieces cut at pauses, each segment whose transcript leaves speech unwritten.

        Each segment alone in its window (``encoded`` holds its encoder output, ``ids`` its
        decoded text tokens) is aligned to its transcript, and :func:`transcript_holes` finds
        stretches of sound no word accounts for. Such a segment is cut at the holes' edges
        (:func:`hole_pieces`) and every piece decoded alone in the segment's language. The
        pieces' joined text replaces the segment's only when it has more letters and digits and
        every piece with text decoded with ``avg_logprob`` of at least :data:`HOLE_MIN_LOGPROB`,
        so a hole of noise or music cannot bring in an invented sentence. ``avg_logprob``
        becomes the pieces' mean weighted by their letters and digits; ``no_speech_prob`` stays
        the segment's, and ``labeller_note`` says the text was stitched (:data:`REPAIRED_NOTE`).
        Results are updated in place. ``rows`` gives each clip's row of ``encoded`` when that is
        not the clip's own index (the packed path passes its whole batch of windows, uncopied).
        """
        min_s = self.config.fill_holes_s
        at = rows if rows is not None else list(range(len(clips)))
        todo = [i for i, t in enumerate(ids) if min_s > 0 and t and len(clips[i]) >= min_s * ASR_SAMPLE_RATE]
        holes: dict[int, list[tuple[float, float]]] = {}
        for lang in dict.fromkeys(languages[i] for i in todo):
            ks = [i for i in todo if languages[i] == lang]
            tok = self._tokenizer(lang)
            frames = [self._frames(len(clips[i])) for i in ks]
            aligned = self.model.align(self._storage([encoded[at[i]] for i in ks]), list(tok.sot_sequence),
                                       [ids[i] for i in ks], frames)
            for i, alignment in zip(ks, aligned):
                _, _, starts = self._word_times(tok, ids[i], alignment)
                found = transcript_holes(list(itertools.pairwise(starts)), clips[i], ASR_SAMPLE_RATE, min_s)
                if found:
                    holes[i] = found
        if not holes:
            return
        jobs = [(i, a, b) for i, found in holes.items()
                for a, b in hole_pieces(found, len(clips[i]) / ASR_SAMPLE_RATE)]
        pieces = self._transcribe_unpacked(
            [clips[i][round(a * ASR_SAMPLE_RATE) : round(b * ASR_SAMPLE_RATE)] for i, a, b in jobs],
            [languages[i] for i, _, _ in jobs] if self.multilingual else None,  # type: ignore[misc]
            repair=False,
        )
        for i in holes:
            mine = [p for (j, _, _), p in zip(jobs, pieces) if j == i and p["text"]]
            if any(p["avg_logprob"] < HOLE_MIN_LOGPROB for p in mine):
                continue
            text = ("" if is_unspaced(languages[i]) else " ").join(p["text"] for p in mine)
            if spoken_chars(text) <= spoken_chars(out[i]["text"]):
                continue
            weights = [max(1, spoken_chars(p["text"])) for p in mine]
            out[i]["text"] = text
            out[i]["avg_logprob"] = float(np.average([p["avg_logprob"] for p in mine], weights=weights))
            out[i]["compression_ratio"] = compression_ratio(text)
            out[i]["labeller_note"] = REPAIRED_NOTE

    @staticmethod
    def _avg_logprob(res: Any, seq_len: int) -> float:
        # CTranslate2 returns the length-normalised score; undo it the way faster-whisper
        # does so avg_logprob means what Whisper's thresholds (-1.0) expect.
        return float(res.scores[0] * (seq_len**1.0) / (seq_len + 1))

    def _detect_languages(self, clips: list[np.ndarray]) -> tuple[list[str | None], list[float | None]]:
        """Per-segment language from an encoder pass over each segment's first ``detect_window_s``.

        Detecting on the packed window would give one language to all its segments, and
        detecting on each segment's own 30 s window costs the encoder pass packing saves. The
        encoder accepts shorter inputs, and its cost falls faster than linearly with length
        (self-attention is quadratic): a 10 s pass costs about a sixth of a 30 s one.
        """
        n = len(clips)
        if not self.multilingual:
            return ["en"] * n, [None] * n
        if self.config.language:
            return [self.config.language] * n, [None] * n
        tops = [next(iter(d.items())) for d in self._language_distributions(clips)]
        return [lang for lang, _ in tops], [p for _, p in tops]

    def _transcribe_packed(
        self, clips: list[np.ndarray], groups: list[str], forced: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Pack segments into shared windows, decode each window once, split words back.

        Steps, each one batched call over all windows of the batch:

        1. language per segment (:meth:`_detect_languages`); segments are grouped by recording
           (``groups``) and language (input order kept within a group) so that a window never
           mixes recordings and is decoded with the right language token, then packed with
           ``pack_gap_s`` of silence between segments;
        2. encode the windows and decode them (without timestamp tokens unless
           ``pack_timestamps``: the word times come from step 3, not from the decoder);
        3. align the decoded text tokens to the audio (CTranslate2 cross-attention DTW, one call
           per language because the start sequence is shared) and give each word to a segment
           with :func:`assign_words`.

        Per segment, ``avg_logprob`` is the mean log-probability of that segment's own text
        tokens as scored by the alignment pass (teacher-forced on the window's audio and the
        window's transcript; timestamp tokens are not scored), except for a segment alone in
        its window, which is not aligned: its text and ``avg_logprob`` are the decoder's own, as
        in the unpacked path. ``no_speech_prob`` is the
        window's: Whisper computes it once, at the first decoding step, so it describes the
        window, and a silent segment packed with speech gets a low value (it still gets empty
        text). A segment left with no words, or with far fewer than its share of the audio
        (``pack_redo_below``, :func:`under_share`), is decoded again alone (unpacked path), so
        its fields are then exactly the unpacked ones.
        """
        if forced:
            languages: list[str | None] = list(forced)
            lang_probs: list[float | None] = [None] * len(clips)
        else:
            languages, lang_probs = self._detect_languages(clips)
        gap = round(self.config.pack_gap_s * ASR_SAMPLE_RATE)
        windows = plan_grouped_windows([len(c) for c in clips], languages, groups, WINDOW_SAMPLES, gap)

        mels = []
        for _, members, spans in windows:
            # Gaps are digital silence in the waveform; after the last segment the features are
            # zero-padded exactly as in the unpacked path (and faster-whisper), so a segment
            # alone in its window sees the same input as unpacked.
            buf = np.zeros(spans[-1][1], np.float32)
            for m, (a, b) in zip(members, spans):
                buf[a:b] = clips[m]
            mels.append(self._mel(buf, self.n_frames))
        window_languages = list(dict.fromkeys(lang for lang, _, _ in windows))
        encoded = self.model.encode(self._storage(mels), to_cpu=len(window_languages) > 1)

        toks = {lang: self._tokenizer(lang) for lang in window_languages}
        prompts = [
            list(toks[lang].sot_sequence) + ([] if self.config.pack_timestamps else [toks[lang].no_timestamps])
            for lang, _, _ in windows
        ]
        most = max(len(members) for _, members, _ in windows)
        # Each segment keeps the token budget it had alone, within the decoder's context.
        budget = min(self.config.max_new_tokens * most, MAX_DECODER_LENGTH - len(prompts[0]))
        results = self.model.generate(
            encoded,
            prompts,
            beam_size=self.config.beam_size,
            max_length=len(prompts[0]) + budget,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=[-1],
        )
        eot = toks[windows[0][0]].eot
        texts = [[t for t in res.sequences_ids[0] if t < eot] for res in results]

        alignments: list[Any] = [None] * len(windows)
        encoded_np: np.ndarray | None = None
        for lang in window_languages:
            # A window holding one segment needs no word timing: all its words are that
            # segment's, so it skips the alignment pass (a decoder pass over the text).
            todo = [w for w, (wl, members, _) in enumerate(windows) if wl == lang and texts[w] and len(members) > 1]
            if not todo:
                continue
            if len(todo) == len(windows):
                feats = encoded
            else:  # the encoder output of these windows only
                if encoded_np is None:
                    encoded_np = self._host(encoded)
                feats = self._storage([encoded_np[w] for w in todo])
            frames = [self._frames(windows[w][2][-1][1]) for w in todo]  # up to the last segment's end
            aligned = self.model.align(feats, list(toks[lang].sot_sequence), [texts[w] for w in todo], frames)
            for w, a in zip(todo, aligned):
                alignments[w] = a

        out: list[dict[str, Any] | None] = [None] * len(clips)
        thin: list[int] = []  # segments that got far fewer tokens than their share of the audio
        for w, (lang, members, spans) in enumerate(windows):
            tok = toks[lang]
            window_logprob = self._avg_logprob(results[w], len(texts[w]))
            seg_tokens: list[list[int]] = [[] for _ in members]
            seg_logprobs: list[list[float]] = [[] for _ in members]
            if texts[w] and len(members) == 1:
                seg_tokens[0] = list(texts[w])  # avg_logprob: the decoder's, as unpacked
            elif texts[w]:
                span_s = [(a / ASR_SAMPLE_RATE, b / ASR_SAMPLE_RATE) for a, b in spans]
                seg_times: list[list[tuple[float, float]]] = [[] for _ in members]
                for word_tokens, logps, k, (t0, t1) in self._split_words(tok, texts[w], alignments[w], span_s):
                    seg_tokens[k] += word_tokens
                    seg_logprobs[k] += logps
                    a, b = span_s[k]  # the word's time within its own segment
                    seg_times[k].append((min(max(t0, a), b) - a, min(max(t1, a), b) - a))
                thin += [members[k] for k in under_share([len(t) for t in seg_tokens], [b - a for a, b in spans],
                                                          self.config.pack_redo_below)]
                if self.config.fill_holes_s > 0:  # speech its words do not cover: decoded again alone
                    thin += [m for k, m in enumerate(members) if seg_times[k] and transcript_holes(
                        seg_times[k], clips[m], ASR_SAMPLE_RATE, self.config.fill_holes_s)]
            for k, m in enumerate(members):
                text = tok.decode(seg_tokens[k]).strip()
                out[m] = {
                    "text": text,
                    "language": lang,
                    "language_prob": lang_probs[m],
                    "avg_logprob": float(np.mean(seg_logprobs[k])) if seg_logprobs[k] else window_logprob,
                    "no_speech_prob": float(results[w].no_speech_prob),
                    "compression_ratio": compression_ratio(text),
                }
        # Whisper may leave a segment of a window untranscribed (in timestamp mode it "defers" a
        # last utterance to a next window that never comes), or write a sentence said twice in
        # the window once; such a segment is decoded again on its own window, so packing never
        # silently loses speech. Silent segments pay for this.
        empty = sorted({i for i, o in enumerate(out) if o is not None and not o["text"]} | set(thin))
        if empty:
            redo = self._transcribe_unpacked([clips[i] for i in empty], [forced[i] for i in empty] if forced else None)
            for i, res in zip(empty, redo):
                out[i] = res
        # A segment alone in its window was decoded exactly as unpacked, so it is checked for
        # unwritten speech the same way, on its window's encoder output.
        alone = [w for w, (_, members, _) in enumerate(windows) if len(members) == 1 and texts[w]
                 and members[0] not in empty]
        if alone and self.config.fill_holes_s > 0:
            host = encoded_np if encoded_np is not None else self._host(encoded)
            self._repair_holes(
                [clips[windows[w][1][0]] for w in alone],
                host,
                [texts[w] for w in alone],
                [windows[w][0] for w in alone],
                [out[windows[w][1][0]] for w in alone],  # type: ignore[misc]
                rows=alone,
            )
        return out  # type: ignore[return-value]

    def _split_words(
        self, tok: Any, text: list[int], alignment: Any, spans: list[tuple[float, float]]
    ) -> list[tuple[list[int], list[float], int, tuple[float, float]]]:
        """Words of one window's transcript with their tokens, log-probs, segment index and
        (start_s, end_s) in the window (see :meth:`_word_times`)."""
        words, word_tokens, starts = self._word_times(tok, text, alignment)
        probs = np.clip(np.asarray(alignment.text_token_probs, dtype=np.float64), 1e-10, 1.0)
        bounds = np.concatenate([[0], np.cumsum([len(t) for t in word_tokens])]).astype(int)
        times = [(float(a), float(b)) for a, b in itertools.pairwise(starts)]
        owner = assign_words(times, spans)
        # Closing punctuation is written as its own word but belongs with the word it closes;
        # its DTW time sits at the pause, so it follows its predecessor instead of its own time.
        for i, word in enumerate(words):
            if i and word and not word[0].isspace() and word.strip() and all(c in _CLOSING_PUNCT for c in word.strip()):
                owner[i] = owner[i - 1]
        return [
            (list(word_tokens[i]), list(np.log(probs[bounds[i] : bounds[i + 1]])), owner[i], times[i])
            for i in range(len(words))
        ]


    def transcribe_timed(
        self,
        audios: list[np.ndarray],
        sample_rate: int = ASR_SAMPLE_RATE,
        *,
        groups: list[str] | None = None,
        languages: list[str] | None = None,
        punctuate: tuple[str, ...] = ("zh",),
    ) -> list[dict[str, Any]]:
        """:meth:`transcribe`, plus timed words in ``chars``, and pause punctuation for Mandarin.

        The Mandarin fallback when no Paraformer-zh is staged: Kimi-Audio punctuates Mandarin
        from the pauses between timed characters (:mod:`stages.zh_punct`), and Whisper gives
        no such times by itself. Each result's text is aligned again to its own clip (one more
        encoder pass and a cross-attention DTW, batched), split into Whisper words (for zh:
        every run of tokens that decodes to whole characters), and each boundary between two
        words is snapped to the silence around it (:func:`snap_words_to_pauses`): DTW puts a word
        boundary somewhere inside a pause, so without this every gap would be 0. ``chars`` is
        ``[(word, start_s, end_s), ...]`` from the clip's start (the recogniser's punctuation
        stays attached to the word it follows); for a language in ``punctuate`` the text
        becomes :func:`stages.zh_punct.punctuate_by_pauses` of it (Whisper's own marks
        replaced), other languages keep Whisper's text.
        """
        from stages.zh_punct import is_punct, punctuate_by_pauses

        results = self.transcribe(audios, sample_rate, groups=groups, languages=languages)
        clips = [c[:WINDOW_SAMPLES] for c in _to_16k(audios, sample_rate, truncate=False)]
        todo = [i for i, r in enumerate(results) if r["text"]]
        for r in results:
            r["chars"] = []
        if not todo:
            return results
        encoded = np.asarray(self.model.encode(self._storage([self._mel(clips[i], self.n_frames) for i in todo]),
                                               to_cpu=True))
        by_lang: dict[str | None, list[int]] = {}
        for k, i in enumerate(todo):
            by_lang.setdefault(results[i]["language"], []).append(k)
        for lang, ks in by_lang.items():
            tok = self._tokenizer(lang)
            texts = [tok.encode(results[todo[k]]["text"]) for k in ks]
            frames = [self._frames(len(clips[todo[k]])) for k in ks]
            aligned = self.model.align(self._storage([encoded[k] for k in ks]), list(tok.sot_sequence), texts, frames)
            for k, ids, al in zip(ks, texts, aligned):
                i = todo[k]
                words, _, starts = self._word_times(tok, ids, al)
                units: list[list[Any]] = []
                for w, t0, t1 in zip(words, starts[:-1], starts[1:]):
                    if units and w.strip() and all(is_punct(ch) for ch in w.strip()):
                        units[-1][0] += w.strip()  # a mark stays with the word it closes
                        continue
                    if w.strip():
                        units.append([w.strip(), float(t0), float(t1)])
                timed = snap_words_to_pauses([tuple(u) for u in units], clips[i], ASR_SAMPLE_RATE)
                results[i]["chars"] = timed
                if lang in punctuate:
                    results[i]["text"] = punctuate_by_pauses(timed)
                    results[i]["compression_ratio"] = compression_ratio(results[i]["text"])
        return results


def snap_words_to_pauses(
    words: list[tuple[str, float, float]], audio: np.ndarray, sr: int, *, reach_s: float = 0.3
) -> list[tuple[str, float, float]]:
    """Words whose boundaries open onto the silence they were aligned into.

    Alignment gives contiguous words (each ends where the next starts). For each boundary,
    the quiet stretch of ``audio`` that contains it, or else the nearest one within
    ``reach_s`` of it, still between the two words' starts and ends, becomes the gap: the
    first word ends where it begins and the second starts where it ends. Boundaries with no
    quiet stretch near them stay contiguous (no pause).
    """
    if len(words) < 2:
        return [(w, round(float(s), 3), round(float(e), 3)) for w, s, e in words]
    runs = quiet_runs(audio, sr)
    out = [[w, float(s), float(e)] for w, s, e in words]
    # Silence before the first word and after the last is no pause between words: trim it off.
    for r0, r1 in runs:
        if r0 <= out[0][1] < r1 < out[0][2]:
            out[0][1] = r1
        if out[-1][1] < r0 < out[-1][2] <= r1:
            out[-1][2] = r0
    for a, b in itertools.pairwise(out):
        t = b[1]
        lo, hi = a[1], max(b[2], b[1])
        best, best_d = None, reach_s
        for r0, r1 in runs:
            r0, r1 = max(r0, lo), min(r1, hi)
            if r1 <= r0 or r0 <= lo:  # a pause after the first word starts, not before it
                continue
            d = 0.0 if r0 <= t <= r1 else min(abs(r0 - t), abs(r1 - t))
            if d < best_d or (d == best_d == 0.0 and best is not None and r1 - r0 > best[1] - best[0]):
                best, best_d = (r0, r1), d
        if best is not None:
            a[2], b[1] = best
            b[2] = max(b[2], b[1])
    return [(w, round(float(s), 3), round(float(max(e, s)), 3)) for w, s, e in out]


class OpenAIWhisperBackend:
    """openai-whisper from a ``.pt`` checkpoint, batched through ``whisper.decode``."""

    def __init__(self, checkpoint: Path, *, device: str, config: TranscribeConfig) -> None:
        import whisper

        self.config = config
        self.model_id = f"openai-whisper:{checkpoint.name}"
        self._whisper = whisper
        self.device = device
        self.model = load_openai_whisper(checkpoint, device)
        # fp16 decoding on CUDA (DecodingOptions below; whisper's layers cast weights to it).
        attention = "sdpa" if getattr(whisper.model.MultiHeadAttention, "use_sdpa", False) else "eager"
        self.runtime = runtime_label(device, "float16" if device == "cuda" else "float32", attention)
        self.multilingual = bool(self.model.is_multilingual)

    def _mels(self, audios: list[np.ndarray], sample_rate: int) -> Any:
        import torch

        whisper = self._whisper
        return torch.stack(
            [
                whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(c)), n_mels=self.model.dims.n_mels)
                for c in _to_16k(audios, sample_rate)
            ]
        ).to(self.device)

    def language_probs(self, audios: list[np.ndarray], sample_rate: int = ASR_SAMPLE_RATE) -> list[dict[str, float]]:
        """Whisper's language head on each clip's 30 s window (top 5 languages).

        Raises:
            ValueError: an English-only model, which has no language head.
        """
        if not self.model.is_multilingual:
            raise ValueError(f"{self.model_id} is English-only: it has no language head")
        if not audios:
            return []
        _, probs = self.model.detect_language(self._mels(audios, sample_rate))
        return [dict(sorted(p.items(), key=lambda kv: -kv[1])[:5]) for p in probs]

    def transcribe(
        self,
        audios: list[np.ndarray],
        sample_rate: int = ASR_SAMPLE_RATE,
        *,
        groups: list[str] | None = None,
        languages: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        import torch

        whisper = self._whisper
        if not audios:
            return []
        mels = self._mels(audios, sample_rate)
        multilingual = self.model.is_multilingual
        if languages is not None and multilingual:
            # One decode call per decided language: DecodingOptions carries a single language.
            plan = {lang: [i for i, x in enumerate(languages) if x == lang] for lang in dict.fromkeys(languages)}
        else:
            plan = {(self.config.language if multilingual else "en"): list(range(len(audios)))}
        lang_probs: list[float | None] = [None] * len(audios)
        if multilingual and not self.config.language and languages is None:
            _, probs = self.model.detect_language(mels)
            lang_probs = [max(p.values()) for p in probs]
        results: list[Any] = [None] * len(audios)
        for lang, idx in plan.items():
            options = whisper.DecodingOptions(
                task=self.config.task,
                language=lang,
                beam_size=self.config.beam_size if self.config.beam_size > 1 else None,
                without_timestamps=True,
                fp16=self.device == "cuda",
                sample_len=self.config.max_new_tokens,
            )
            with torch.inference_mode():
                for i, r in zip(idx, whisper.decode(self.model, mels[idx], options)):
                    results[i] = r
        return [
            {
                "text": r.text.strip(),
                "language": r.language,
                "language_prob": lp,
                "avg_logprob": float(r.avg_logprob),
                "no_speech_prob": float(r.no_speech_prob),
                "compression_ratio": compression_ratio(r.text.strip()),
            }
            for r, lp in zip(results, lang_probs)
        ]


def load_openai_whisper(checkpoint: Path, device: str = "cpu") -> Any:
    """Load an openai-whisper ``.pt`` (``{"dims", "model_state_dict"}``) safely.

    Uses ``weights_only=True`` (the upstream files hold only tensors and a dict of ints), and
    reports a readable error for a file that is not such a checkpoint.
    """
    import torch
    import whisper

    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{checkpoint}: not a readable openai-whisper checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ValueError(f"{checkpoint}: not an openai-whisper checkpoint (expected keys 'dims', 'model_state_dict')")
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**ckpt["dims"]))
    try:
        model.load_state_dict(ckpt["model_state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{checkpoint}: weights do not match its dims: {str(exc).splitlines()[0]}") from exc
    if "alignment_heads" in ckpt:
        model.set_alignment_heads(ckpt["alignment_heads"])
    return model.to(device).eval()


_HOW = {
    "faster-whisper": "Give a CTranslate2 Whisper directory (model.bin, config.json, tokenizer.json), "
    "e.g. convert with `ct2-transformers-converter --model openai/whisper-large-v3 --output_dir DIR "
    "--copy_files tokenizer.json` on a machine with a hub, copy DIR here; or use pkg:whisper-base.",
    "openai-whisper": "Copy the upstream checkpoint (e.g. large-v3.pt from openai-whisper's model list) to "
    "<cache_dir>/whisper/NAME.pt or give its path.",
    "kimia": "Copy the Kimi-Audio model directory (config.json, *.safetensors, tokenizer files) here.",
}


def resolve_asr_model(config: TranscribeConfig, context: StageContext, key: str = "transcribe.model") -> Path:
    """Resolve and sanity-check the model files without loading them (cheap: used by check())."""
    how = _HOW[config.backend]
    if config.backend == "openai-whisper":
        path = resolve(config.model, key, how=how, cache_dir=context.cache_dir, cache_subdir="whisper", suffixes=(".pt",))
        if path.is_dir():
            raise missing(path / "<name>.pt", key, how)
        return path
    path = resolve(config.model, key, how=how, cache_dir=context.cache_dir)
    if config.backend == "kimia":
        from stages.transcribe_kimia import check_model_dir

        check_model_dir(path, config.kimia_tokenizer, config_key=key)
    if config.backend == "faster-whisper":
        for name in ("model.bin", "config.json", "tokenizer.json"):
            if not (path / name).is_file():
                raise missing(path / name, key, how)
    return path


def build_asr(config: TranscribeConfig, context: StageContext, device: str = "cpu", *, decoders: int = 1) -> AsrBackend:
    """Load the configured ASR backend (once per worker); ``decoders``: faster-whisper's
    concurrent decoders (:func:`cpu_decoding`), for a worker that is called from that many threads."""
    path = resolve_asr_model(config, context)
    if config.backend == "faster-whisper":
        return FasterWhisperBackend(path, device=device, config=config, decoders=decoders)
    if config.backend == "openai-whisper":
        return OpenAIWhisperBackend(path, device=device, config=config)
    from stages.transcribe_kimia import KimiaASR

    return KimiaASR(  # type: ignore[return-value]
        path, device=device, glm_tokenizer_dir=config.kimia_tokenizer, max_new_tokens=config.max_new_tokens
    )


class TranscribeStage(Stage):
    """Segment rows in, the same rows with transcript fields out (batched, actor pool).

    Per batch (whole recordings, never part of one): language-ID evidence on every segment,
    pooled per speaker and recording into one decision per segment (:mod:`stages.language`),
    then one batched decode with those languages.
    """

    name = "transcribe"
    reads = ("audio", "audio_enhanced", "sample_rate")
    writes = (*TRANSCRIPT_FIELDS, *LANGUAGE_FIELDS, *LABELLER_FIELDS)
    cpu_share = 0.4

    config: TranscribeConfig
    # What setup() loads; None / empty until then, so a stage given a backend directly (tests,
    # benchmarks) decides per segment and routes everything to that backend.
    asr: AsrBackend | None = None
    lid: LanguageId | None = None
    labellers: Mapping[str, AsrBackend] = MappingProxyType({})
    fallbacks: Mapping[str, str] = MappingProxyType({})

    def takes(self, row: Row) -> bool:
        """Every segment, except one the audio checks dropped when ``kept_only`` (the pipeline
        then runs quality and the filter_audio stage first; without them no row has a verdict)."""
        return not (self.config.kept_only and row.get("verdict") == "drop")

    def _decodes_on_cpu(self) -> bool:
        return self.config.backend == "faster-whisper" and self.config.device != "cuda" and self.config.num_gpus == 0

    def worker_threads(self, node_cpus: int) -> int:
        """All threads of one worker: decoders x threads each for faster-whisper on CPU
        (:func:`cpu_decoding`), else ``cpu_threads`` (machine-sized when 0)."""
        if self._decodes_on_cpu():
            decoders, threads = cpu_decoding(self.config.cpu_threads, self.config.cpu_decoders, node_cpus)
            return decoders * threads
        return machine_threads(self.config.cpu_threads, node_cpus)

    def concurrent_calls(self, node_cpus: int) -> int:
        """faster-whisper on CPU: one call per decoder (:func:`cpu_decoding`); on GPU one batch
        at a time keeps the device busy."""
        if self._decodes_on_cpu():
            return cpu_decoding(self.config.cpu_threads, self.config.cpu_decoders, node_cpus)[0]
        return 1

    def check(self) -> None:
        resolve_asr_model(self.config, self.context)
        if self.config.paraformer_model and "paraformer" in self.config.by_language.values():
            from stages.transcribe_paraformer import resolve_paraformer

            resolve_paraformer(self.config, self.context)  # named but absent: one line, before the run
        if self.config.lid_model:
            resolve(self.config.lid_model, "transcribe.lid_model", how=_HOW["faster-whisper"],
                    cache_dir=self.context.cache_dir)  # fmt: skip
        if self.config.device == "cuda" or (self.config.num_gpus > 0 and self.config.device != "cpu"):
            import torch

            if self.config.device == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("transcribe.device=cuda but no CUDA GPU is visible; set transcribe.device=cpu")

    def _decoders(self, device: str) -> int:
        """CTranslate2 decoders for this worker's models: one per call it runs at once, on CPU."""
        return self.concurrency if device == "cpu" else 1

    def setup(self) -> None:
        device = self.resolve_device()
        self.asr = build_asr(self.config, self.context, device, decoders=self._decoders(device))
        self.lid = self._build_lid(device)
        self.labellers, self.fallbacks = self._build_labellers(device)

    def _build_labellers(self, device: str) -> tuple[dict[str, AsrBackend], dict[str, str]]:
        """The labellers ``by_language`` names besides the backend, and why any fell back.

        A labeller whose weights are not staged is not an error: its languages are labelled by
        the backend, and the reason travels with every segment it would have labelled.
        """
        labellers: dict[str, AsrBackend] = {}
        fallbacks: dict[str, str] = {}
        if "paraformer" in self.config.by_language.values():
            if self.config.paraformer_model is None:
                fallbacks["paraformer"] = "transcribe.paraformer_model is not set"
            else:
                from stages.transcribe_paraformer import build_paraformer

                try:
                    labellers["paraformer"] = build_paraformer(self.config, self.context, device)
                except ModelNotFoundError as exc:
                    fallbacks["paraformer"] = str(exc).splitlines()[0]
        return labellers, fallbacks

    def _build_lid(self, device: str) -> LanguageId | None:
        """The language-ID head the pooled decision reads, or None where none applies.

        None when the language is forced or pooling is off (the backend then decides per
        segment, as it always did), and for an English-only ASR model with no ``lid_model``
        (it can only hear English).
        """
        cfg = self.config
        if cfg.language or not cfg.language_pooling:
            return None
        if cfg.lid_model is None:
            if hasattr(self.asr, "language_probs"):
                return self.asr if getattr(self.asr, "multilingual", False) else None
            ref = "pkg:whisper-base"
        else:
            ref = cfg.lid_model
        path = resolve(ref, "transcribe.lid_model", how=_HOW["faster-whisper"], cache_dir=self.context.cache_dir)
        lid_cfg = cfg.model_copy(update={"backend": "faster-whisper", "model": ref, "compute_type": "auto"})
        lid = FasterWhisperBackend(path, device=device, config=lid_cfg, decoders=self._decoders(device))
        if not lid.multilingual:
            raise ValueError(f"transcribe.lid_model={ref} is English-only: it has no language head")
        return lid

    def model_id(self) -> str:
        return f"{self.config.backend}:{self.config.model}"

    def runtime(self) -> str | None:
        return getattr(self.asr, "runtime", None)  # a backend handed in by a test may not say

    def _decide_languages(self, rows: list[Row], key: str) -> list[Decision] | None:
        """Each segment's language, pooled (:func:`stages.language.pool_languages`) from what the
        language-ID head heard of it, in two passes.

        The head hears ``detect_window_s`` windows (:func:`detection_windows` covering a
        segment's first 30 s, what Whisper decodes of it). First every segment's first window,
        then, for a segment whose pooled decision is still at most ``language_recheck_prob``, the
        rest of its windows, averaged with the first (:func:`stages.language.mean_distribution`).
        A segment weighs the seconds heard of it. Sure decisions (about 9 in 10 long VAD
        segments of espeak-ng English) cost one window; an unsure one is not left to its first
        8 s: on the speed benchmark's seed 19 a 23 s segment of four English sentences was
        "la" 0.54-0.57 there, and its three windows average to English.
        """
        if self.lid is None:
            return None
        params = PoolingParams(
            prior_s=self.config.language_prior_s,
            override_prob=self.config.language_override_prob,
            override_min_s=self.config.language_override_min_s,
        )
        audio = [r.get(key, r["audio"]) for r in rows]
        rates = [int(r["sample_rate"]) for r in rows]
        windows = [
            detection_windows(min(len(a), int(WINDOW_S * sr)), int(self.config.detect_window_s * sr)) if len(a) else []
            for a, sr in zip(audio, rates)
        ]
        heard: list[list[tuple[float, dict[str, float]]]] = [[] for _ in rows]

        def listen(todo: list[tuple[int, int]]) -> None:  # (row, window) pairs, each row's in order
            by_rate: dict[int, list[tuple[int, int]]] = {}
            for i, k in todo:
                by_rate.setdefault(rates[i], []).append((i, k))
            for sr, pairs in by_rate.items():
                clips = [audio[i][slice(*windows[i][k])] for i, k in pairs]
                for (i, k), p in zip(pairs, self.lid.language_probs(clips, sr)):
                    heard[i].append(((windows[i][k][1] - windows[i][k][0]) / sr, p))

        def decide() -> list[Decision]:
            evidence = [
                Evidence(
                    recording=str(r.get("recording_id") or r.get("source") or ""),
                    speaker=r.get("speaker"),
                    duration_s=windows[i][len(heard[i]) - 1][1] / rates[i] if heard[i] else 0.0,
                    probs=mean_distribution(heard[i]) if heard[i] else {},
                )
                for i, r in enumerate(rows)
            ]
            return pool_languages(evidence, params)

        listen([(i, 0) for i in range(len(rows)) if windows[i]])
        decisions = decide()
        again = [
            (i, k)
            for i, d in enumerate(decisions)
            if d.probability <= self.config.language_recheck_prob
            for k in range(1, len(windows[i]))
        ]
        if again:
            listen(again)
            decisions = decide()
        return decisions

    def process_batch(self, rows: list[Row]) -> list[Row]:
        key = "audio_enhanced" if self.config.input_stream == "enhanced" else "audio"
        decisions = self._decide_languages(rows, key)
        by_rate: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_rate.setdefault(int(r["sample_rate"]), []).append(i)
        results: list[dict[str, Any] | None] = [None] * len(rows)
        names: list[str] = [""] * len(rows)
        for sr, idx in by_rate.items():
            for route, members in self._routes(idx, decisions).items():
                forced = [decisions[i].language for i in members] if decisions else None
                kwargs: dict[str, Any] = {
                    "groups": [str(rows[i].get("recording_id") or rows[i].get("source") or "") for i in members]
                }
                if forced and all(forced) and route != "paraformer":
                    kwargs["languages"] = forced
                audios = [rows[i].get(key, rows[i]["audio"]) for i in members]
                if route == "paraformer":
                    labeller: Any = self.labellers["paraformer"]
                    outs, name = labeller.transcribe(audios, sr, **kwargs), labeller.model_id
                elif route == "timed":
                    outs, name = self.asr.transcribe_timed(audios, sr, **kwargs), f"{self.asr.model_id}+pauses"
                else:
                    outs, name = self.asr.transcribe(audios, sr, **kwargs), self.asr.model_id
                for i, o in zip(members, outs):
                    results[i], names[i] = o, name
        out = []
        for i, (r, res) in enumerate(zip(rows, results)):
            row = {**r, **(res or {})}
            if decisions:
                d = decisions[i]
                row.update(
                    language=d.language or row.get("language"),
                    language_prob=d.probability,
                    language_source=d.source,
                    language_segment=d.segment_language,
                    language_segment_prob=d.segment_probability,
                )
            row["labeller"] = names[i]
            fallback = self.fallbacks.get(self.config.by_language.get(str(row.get("language")), ""), "")
            if fallback:
                note = f"{self.config.by_language[row['language']]} not used: {fallback}"
                row["labeller_note"] = "; ".join(n for n in (note, row.get("labeller_note")) if n)
            out.append(row)
        return out

    def _routes(self, idx: list[int], decisions: list[Decision] | None) -> dict[str, list[int]]:
        """Which labeller each segment goes to: "paraformer", "timed" (Whisper with pause
        punctuation, the Mandarin fallback) or "backend"; input order kept within a route."""
        routes: dict[str, list[int]] = {}
        fallbacks, labellers = self.fallbacks, self.labellers
        for i in idx:
            lang = decisions[i].language if decisions else (self.config.language or "")
            wanted = self.config.by_language.get(lang, "whisper")
            if wanted == "paraformer" and "paraformer" in labellers:
                route = "paraformer"
            elif wanted == "paraformer" and "paraformer" in fallbacks and lang == "zh" and hasattr(
                self.asr, "transcribe_timed"
            ):
                route = "timed"
            else:
                route = "backend"
            routes.setdefault(route, []).append(i)
        return routes

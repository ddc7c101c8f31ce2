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
import zlib
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field

from kimia_model.audio import resample
from kimia_model.refs import missing, resolve
from stages.base import Row, Stage, StageConfig, StageContext, machine_threads

ASR_SAMPLE_RATE = 16000
WINDOW_S = 30.0

TRANSCRIPT_FIELDS = ("text", "language", "language_prob", "avg_logprob", "no_speech_prob", "compression_ratio")


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
        description="CTranslate2 intra-op threads per worker; 0 = the node's CPUs as Ray sees them (at most 8).",
    )
    language: str | None = Field(
        None, description="Force a language code (e.g. en); null detects it per segment."
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
        description="Packed mode, multilingual model, no forced language: each segment's language is "
        "detected on an encoder pass over its first detect_window_s seconds (features zero-padded), "
        "costing ~0.15 of a 30 s pass at 8 s. Measured with whisper-base: at 8-10 s, 43/43 espeak-ng "
        "turns English and 23/27 pytest-audioeval clips (9 languages) right, the same as full 30 s "
        "windows; at 6 s two turns became Latin, at 3-4 s up to 12 became Finnish etc. (the encoder "
        "needs context). Setting `language` skips detection.",
    )
    input_stream: Literal["original", "enhanced"] = Field(
        "original", description="Which audio stream the ASR hears."
    )
    kimia_tokenizer: str | None = Field(
        None,
        description="kimia backend: GLM-4-Voice tokenizer dir (null: <model>/glm-4-voice-tokenizer, "
        "then <cache_dir>/glm-4-voice-tokenizer).",
    )


def compression_ratio(text: str) -> float:
    """zlib compression ratio of the text, as Whisper computes it (> 2.4 suggests looping)."""
    data = text.encode("utf-8")
    if not data:
        return 0.0
    return len(data) / len(zlib.compress(data))


class AsrBackend(Protocol):
    """What every ASR backend offers (also used by the round-trip stage)."""

    model_id: str

    def transcribe(
        self, audios: list[np.ndarray], sample_rate: int = ASR_SAMPLE_RATE, *, groups: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Transcribe each (<= 30 s) clip; one result dict per clip, keys TRANSCRIPT_FIELDS.

        ``groups`` names the recording each clip belongs to. A backend that packs several clips
        into one decoding window packs only clips of the same group, so one recording's labels
        never depend on what other recordings shared its batch.
        """
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


class FasterWhisperBackend:
    """Batched CTranslate2 Whisper, driven at the level of encode / detect / generate / align."""

    def __init__(self, model_dir: Path, *, device: str, config: TranscribeConfig) -> None:
        import ctranslate2
        import tokenizers
        from faster_whisper.feature_extractor import FeatureExtractor
        from faster_whisper.tokenizer import Tokenizer

        self.config = config
        self.model_id = f"faster-whisper:{config.model}"
        compute = config.compute_type
        if compute == "auto":
            compute = "float16" if device == "cuda" else "int8"
        threads = machine_threads(config.cpu_threads)
        self.model = ctranslate2.models.Whisper(
            str(model_dir), device=device, compute_type=compute, intra_threads=threads
        )
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
        self, audios: list[np.ndarray], sample_rate: int = ASR_SAMPLE_RATE, *, groups: list[str] | None = None
    ) -> list[dict[str, Any]]:
        if not audios:
            return []
        if not self.config.pack_windows:
            return self._transcribe_unpacked(_to_16k(audios, sample_rate))
        clips = _to_16k(audios, sample_rate, truncate=False)
        # A segment longer than a window cannot share one; it is truncated and decoded alone,
        # exactly as in the unpacked path.
        long = [i for i, c in enumerate(clips) if len(c) > WINDOW_SAMPLES]
        short = [i for i, c in enumerate(clips) if len(c) <= WINDOW_SAMPLES]
        out: list[dict[str, Any] | None] = [None] * len(clips)
        if long:
            for i, res in zip(long, self._transcribe_unpacked([clips[i][:WINDOW_SAMPLES] for i in long])):
                out[i] = res
        if short:
            keys = [groups[i] if groups else "" for i in short]
            for i, res in zip(short, self._transcribe_packed([clips[i] for i in short], keys)):
                out[i] = res
        return out  # type: ignore[return-value]

    def _transcribe_unpacked(self, clips: list[np.ndarray]) -> list[dict[str, Any]]:
        """One zero-padded 30 s window per segment, decoded without timestamps."""
        encoded = self.model.encode(self._storage([self._mel(c, self.n_frames) for c in clips]), to_cpu=False)

        languages: list[str | None]
        probs: list[float | None]
        if not self.multilingual:
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
        for res, lang, prob in zip(results, languages, probs):
            ids = [t for t in res.sequences_ids[0] if t < tok0.eot]
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
        return out

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
        samples = int(self.config.detect_window_s * ASR_SAMPLE_RATE)
        frames = samples // self.features.hop_length
        mels = [self._mel(clip[:samples], frames) for clip in clips]
        detected = self.model.detect_language(self.model.encode(self._storage(mels), to_cpu=False))
        return [d[0][0][2:-2] for d in detected], [float(d[0][1]) for d in detected]

    def _transcribe_packed(self, clips: list[np.ndarray], groups: list[str]) -> list[dict[str, Any]]:
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
        text). A segment left with no words is decoded again alone (unpacked path), so its
        fields are then exactly the unpacked ones.
        """
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
            else:  # the encoder output of these windows only (host copy, as CTranslate2 takes it)
                if encoded_np is None:
                    import ctranslate2

                    host = encoded if str(encoded.device) == "cpu" else encoded.to_device(ctranslate2.Device.cpu)
                    encoded_np = np.asarray(host)
                feats = self._storage([encoded_np[w] for w in todo])
            frames = [
                min(self.n_frames, -(-windows[w][2][-1][1] // self.features.hop_length)) for w in todo
            ]  # speech frames up to the end of the window's last segment
            aligned = self.model.align(feats, list(toks[lang].sot_sequence), [texts[w] for w in todo], frames)
            for w, a in zip(todo, aligned):
                alignments[w] = a

        out: list[dict[str, Any] | None] = [None] * len(clips)
        for w, (lang, members, spans) in enumerate(windows):
            tok = toks[lang]
            window_logprob = self._avg_logprob(results[w], len(texts[w]))
            seg_tokens: list[list[int]] = [[] for _ in members]
            seg_logprobs: list[list[float]] = [[] for _ in members]
            if texts[w] and len(members) == 1:
                seg_tokens[0] = list(texts[w])  # avg_logprob: the decoder's, as unpacked
            elif texts[w]:
                span_s = [(a / ASR_SAMPLE_RATE, b / ASR_SAMPLE_RATE) for a, b in spans]
                for word_tokens, logps, k in self._split_words(tok, texts[w], alignments[w], span_s):
                    seg_tokens[k] += word_tokens
                    seg_logprobs[k] += logps
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
        # last utterance to a next window that never comes); such a segment is decoded again on
        # its own window, so packing never silently loses speech. Silent segments pay for this.
        empty = [i for i, o in enumerate(out) if o is not None and not o["text"]]
        if empty:
            for i, res in zip(empty, self._transcribe_unpacked([clips[i] for i in empty])):
                out[i] = res
        return out  # type: ignore[return-value]

    def _split_words(
        self, tok: Any, text: list[int], alignment: Any, spans: list[tuple[float, float]]
    ) -> list[tuple[list[int], list[float], int]]:
        """Words of one window's transcript with their tokens, log-probs and segment index.

        The alignment is a monotone path of (token index, encoder position) pairs over the text
        tokens plus end-of-text; a token starts where the path first reaches it, so a word spans
        from its first token's start to the next word's start.
        """
        words, word_tokens = tok.split_to_word_tokens(text + [tok.eot])
        words, word_tokens = words[:-1], word_tokens[:-1]  # drop end-of-text
        path = np.asarray(alignment.alignments, dtype=np.int64).reshape(-1, 2)
        n = len(text)
        if len(path):
            first = np.searchsorted(path[:, 0], np.arange(n + 1), side="left")
            token_start = path[np.minimum(first, len(path) - 1), 1] / self.positions_per_second
        else:  # no path (should not happen for non-empty text): everything at the window start
            token_start = np.zeros(n + 1)
        probs = np.clip(np.asarray(alignment.text_token_probs, dtype=np.float64), 1e-10, 1.0)
        bounds = np.concatenate([[0], np.cumsum([len(t) for t in word_tokens])]).astype(int)
        times = [(float(token_start[b0]), float(token_start[b1])) for b0, b1 in itertools.pairwise(bounds)]
        owner = assign_words(times, spans)
        # Closing punctuation is written as its own word but belongs with the word it closes;
        # its DTW time sits at the pause, so it follows its predecessor instead of its own time.
        for i, word in enumerate(words):
            if i and word and not word[0].isspace() and word.strip() and all(c in _CLOSING_PUNCT for c in word.strip()):
                owner[i] = owner[i - 1]
        return [
            (list(word_tokens[i]), list(np.log(probs[bounds[i] : bounds[i + 1]])), owner[i])
            for i in range(len(words))
        ]


class OpenAIWhisperBackend:
    """openai-whisper from a ``.pt`` checkpoint, batched through ``whisper.decode``."""

    def __init__(self, checkpoint: Path, *, device: str, config: TranscribeConfig) -> None:
        import whisper

        self.config = config
        self.model_id = f"openai-whisper:{checkpoint.name}"
        self._whisper = whisper
        self.device = device
        self.model = load_openai_whisper(checkpoint, device)

    def transcribe(
        self, audios: list[np.ndarray], sample_rate: int = ASR_SAMPLE_RATE, *, groups: list[str] | None = None
    ) -> list[dict[str, Any]]:
        import torch

        whisper = self._whisper
        if not audios:
            return []
        clips = _to_16k(audios, sample_rate)
        mels = torch.stack(
            [
                whisper.log_mel_spectrogram(
                    whisper.pad_or_trim(torch.from_numpy(c)), n_mels=self.model.dims.n_mels
                )
                for c in clips
            ]
        ).to(self.device)
        options = whisper.DecodingOptions(
            task=self.config.task,
            language=self.config.language if self.model.is_multilingual else "en",
            beam_size=self.config.beam_size if self.config.beam_size > 1 else None,
            without_timestamps=True,
            fp16=self.device == "cuda",
            sample_len=self.config.max_new_tokens,
        )
        lang_probs: list[float | None] = [None] * len(clips)
        if self.model.is_multilingual and not self.config.language:
            _, probs = self.model.detect_language(mels)
            lang_probs = [max(p.values()) for p in probs]
        with torch.inference_mode():
            results = whisper.decode(self.model, mels, options)
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


def build_asr(config: TranscribeConfig, context: StageContext, device: str = "cpu") -> AsrBackend:
    """Load the configured ASR backend (once per worker)."""
    path = resolve_asr_model(config, context)
    if config.backend == "faster-whisper":
        return FasterWhisperBackend(path, device=device, config=config)
    if config.backend == "openai-whisper":
        return OpenAIWhisperBackend(path, device=device, config=config)
    from stages.transcribe_kimia import KimiaASR

    return KimiaASR(  # type: ignore[return-value]
        path, device=device, glm_tokenizer_dir=config.kimia_tokenizer, max_new_tokens=config.max_new_tokens
    )


class TranscribeStage(Stage):
    """Segment rows in, the same rows with transcript fields out (batched, actor pool)."""

    name = "transcribe"
    reads = ("audio", "audio_enhanced", "sample_rate")
    writes = TRANSCRIPT_FIELDS

    config: TranscribeConfig

    def check(self) -> None:
        resolve_asr_model(self.config, self.context)
        if self.config.device == "cuda" or (self.config.num_gpus > 0 and self.config.device != "cpu"):
            import torch

            if self.config.device == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("transcribe.device=cuda but no CUDA GPU is visible; set transcribe.device=cpu")

    def setup(self) -> None:
        self.asr = build_asr(self.config, self.context, self.resolve_device())

    def model_id(self) -> str:
        return f"{self.config.backend}:{self.config.model}"

    def process_batch(self, rows: list[Row]) -> list[Row]:
        key = "audio_enhanced" if self.config.input_stream == "enhanced" else "audio"
        by_rate: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_rate.setdefault(int(r["sample_rate"]), []).append(i)
        results: list[dict[str, Any] | None] = [None] * len(rows)
        for sr, idx in by_rate.items():
            outs = self.asr.transcribe(
                [rows[i].get(key, rows[i]["audio"]) for i in idx], sr,
                groups=[str(rows[i].get("recording_id") or rows[i].get("source") or "") for i in idx],
            )
            for i, o in zip(idx, outs):
                results[i] = o
        return [{**r, **(res or {})} for r, res in zip(rows, results)]

"""Round-trip check: does a segment's transcript survive speech -> ASR?

Modes (``roundtrip.mode``):

* ``forced`` (default): score the row's ``text`` on the segment's own audio with the ASR's
  Whisper weights (``stages.label_score``): the label's mean token log-probability teacher-forced
  on the audio (``min_mean_logprob``: another segment's text, shuffled words), the worst sum over
  ``window_tokens`` consecutive tokens (``min_window_logprob``: a repeated or inserted phrase),
  and the probability that the transcript ends where the label ends (``min_eot_logprob``: a
  truncated label). Optionally (``forced_redecode``) a free re-decode gated by ``max_wer``. The
  only mode that separates right labels from fluent wrong ones; thresholds and the measured
  separation are in docs/models.md ("The round-trip verdict").
* ``label``: synthesize the row's ``text`` with the TTS backend, recognize it with the
  configured ASR, score WER/CER against ``text``. Catches labels that are not speech: Whisper
  hallucination markers ("[Music]", "♪"), the wrong language or script, symbol soup, runaway
  fragments. It never hears the segment, so a fluent transcript of the wrong words passes.
* ``tokens``: resynthesize the row's ``semantic_tokens`` with the Kimi-Audio detokenizer and
  vocoder, recognize, score against ``text``. Checks that the tokens a model will train on
  still carry the transcript's words (needs the detokenizer weights).
* ``audio``: recognize the segment's own audio with the round-trip ASR and score against
  ``text``: a second ASR's opinion on the labeller, the only mode that sees a fluent but wrong
  transcript without detokenizer weights.

Text is normalised the way Whisper's evaluation does (``EnglishTextNormalizer`` for English,
``BasicTextNormalizer`` otherwise), so punctuation, casing, spelled-out numbers and British /
American spelling do not count as errors. CER is ``stages.textnorm.cer`` on that text (NFKC,
punctuation and spaces removed, traditional Chinese mapped to simplified), and languages
written without spaces are judged by CER alone.

Written per row: ``rt_mode``, ``rt_tts``, ``rt_text``, ``rt_wer``, ``rt_cer``, ``rt_max_wer``,
``rt_max_cer``, ``rt_pass`` (None when the row was not checked, with ``rt_skipped`` saying why),
in mode ``forced`` also ``rt_logprob``, ``rt_window_logprob``, ``rt_eot_logprob``,
``rt_continuation`` (what Whisper says after the label) and ``rt_detail`` (each failed gate with
its measured value), and failing reasons appended to ``drop_reasons`` (``"roundtrip_wer>0.3"``,
``"roundtrip_eot<-2.5"``: the threshold, never the value, so reasons count by kind). The filter stage
sets ``verdict`` from ``drop_reasons`` later.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field, model_validator

from kimia_model.refs import ModelNotFoundError, missing
from kimia_model.tts import ESPEAK_BINARY, TokenGenerator, TTSBackend, TTSError, build_tts
from stages.base import Row, Stage, StageConfig, StageContext, StageError, joined_runtime, runtime_label
from stages.label_score import WhisperLabelScorer
from stages.textnorm import UNSPACED_LANGUAGES, cer
from stages.transcribe import TranscribeConfig


class AsrLike(Protocol):
    """The part of ``stages.transcribe.AsrBackend`` this stage uses."""

    def transcribe(self, audios: list[np.ndarray], sample_rate: int) -> list[dict[str, Any]]: ...


def _asr_default() -> TranscribeConfig:
    # A check, not the label: greedy decoding, language pinned so a robotic TTS voice is not
    # mistaken for another language.
    return TranscribeConfig(language="en", beam_size=1)


class RoundtripConfig(StageConfig):
    """Round-trip check settings (config section ``roundtrip``)."""

    mode: Literal["forced", "label", "tokens", "audio"] = Field(
        "forced", description="forced: score the transcript on the segment's own audio (teacher-forced "
        "log-probs, end-of-text probability and a free re-decode, Whisper via faster-whisper); label: TTS of "
        "the transcript, re-recognized (only shows the label is speakable); tokens: detokenize "
        "semantic_tokens, re-recognize; audio: re-recognize the segment's own audio. Scored against the "
        "transcript."
    )
    tts_backend: Literal["espeak-ng", "kimia"] = Field(
        "espeak-ng", description="TTS for mode=label (kimia needs the LM and the detokenizer)."
    )
    voices: dict[str, str] = Field(
        default_factory=lambda: {"en": "en-us", "zh": "cmn"},
        description="TTS voice per transcript language (espeak-ng names, or 'kimia').",
    )
    languages: list[str] = Field(
        default_factory=lambda: ["en"],
        description="Languages to check; rows in other languages get rt_pass=null and rt_skipped. "
        "The ASR's language (asr.language) should match when only one is listed.",
    )
    max_wer: float = Field(0.3, ge=0.0, le=10.0, description="Fail when WER exceeds this (spaced languages).")
    min_mean_logprob: float = Field(
        -1.8, le=0.0, description="mode=forced: fail when the label's mean token log-probability, "
        "teacher-forced on the segment's audio, is below this (another segment's text, shuffled words)."
    )
    min_window_logprob: float = Field(
        -12.0, le=0.0, description="mode=forced: fail when some window_tokens consecutive label tokens sum "
        "to a log-probability below this (words the audio does not hold: a repeated phrase, an insertion)."
    )
    window_tokens: int = Field(3, ge=1, le=16, description="mode=forced: window of min_window_logprob.")
    min_eot_logprob: float = Field(
        -2.5, le=0.0, description="mode=forced: fail when log P(end of text | audio, label) is below this: "
        "the audio goes on after the label (a truncated label)."
    )
    forced_redecode: bool = Field(
        False, description="mode=forced: also decode the audio freely and gate on max_wer / max_cer against "
        "the label (one more decoder pass; a correct label the recognizer mishears a word of then fails)."
    )
    max_cer: float | None = Field(
        None, ge=0.0, le=10.0, description="Optional extra CER gate for every language (null = off)."
    )
    max_cer_unspaced: float = Field(
        0.2, ge=0.0, le=10.0, description="Fail when CER exceeds this for languages written without spaces."
    )
    espeak_binary: str = Field(ESPEAK_BINARY, description="espeak-ng executable.")
    espeak_rate_wpm: int = Field(160, ge=80, le=450, description="espeak-ng speaking rate (words per minute).")
    detokenizer_model: str | None = Field(
        None, description="Kimi-Audio model dir holding audio_detokenizer/ and vocoder/ "
        "(mode=tokens, or tts_backend=kimia)."
    )
    ode_steps: int = Field(30, ge=2, le=200, description="Euler points of the flow-matching ODE (upstream: 30).")
    seed: int = Field(0, ge=0, description="Flow-matching noise seed (same seed, same audio).")
    input_stream: Literal["original", "enhanced"] = Field(
        "original", description="mode=audio: which audio stream the ASR hears."
    )
    asr: TranscribeConfig = Field(
        default_factory=_asr_default, description="The recognizer (same options as the transcribe section)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> RoundtripConfig:
        if self.tts_backend == "kimia" and self.mode == "label" and not self.detokenizer_model:
            raise ValueError("roundtrip.tts_backend=kimia needs roundtrip.detokenizer_model")
        if self.mode == "tokens" and not self.detokenizer_model:
            raise ValueError("roundtrip.mode=tokens needs roundtrip.detokenizer_model (a Kimi-Audio model dir)")
        return self


# -- scoring -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _normalizer(language: str) -> Callable[[str], str]:
    from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

    if language == "en":
        return EnglishTextNormalizer()
    return BasicTextNormalizer(remove_diacritics=False, split_letters=language in UNSPACED_LANGUAGES)


def normalize_text(text: str, language: str = "en") -> str:
    """Whisper-style normalisation, whitespace collapsed.

    >>> normalize_text("Mr. Smith paid $20, didn't he?")
    'mister smith paid $20 did not he'
    """
    return " ".join(_normalizer(language)(text or "").split())


def score(reference: str, hypothesis: str, language: str = "en") -> dict[str, float | str]:
    """WER and CER of ``hypothesis`` against ``reference`` after normalisation.

    CER (``stages.textnorm.cer`` of the normalised texts) counts characters without spaces or
    punctuation, so it means the same for spaced and unspaced scripts. An empty reference is
    an error: there is nothing to score against.

    >>> s = score("今天天氣很好。", "今天天汽很好", "zh")
    >>> round(s["cer"], 4)
    0.1667
    """
    import jiwer

    ref, hyp = normalize_text(reference, language), normalize_text(hypothesis, language)
    if not ref:
        raise ValueError("reference has no words after normalisation")
    wer = jiwer.wer(ref, hyp) if hyp else 1.0
    return {"wer": float(wer), "cer": float(cer(ref, hyp)), "ref_norm": ref, "hyp_norm": hyp}


# -- the stage ---------------------------------------------------------------------------------


class RoundtripStage(Stage):
    """Segment rows in, the same rows with round-trip measurements out (actor pool).

    Models can be injected (``tts``, ``asr``, ``detokenizer``, ``generate``) so the stage runs
    in tests and in the synth workflow without loading anything twice.
    """

    name = "roundtrip"
    reads = ("text", "language", "semantic_tokens", "audio", "audio_enhanced", "sample_rate")
    writes = ("rt_mode", "rt_tts", "rt_text", "rt_wer", "rt_cer", "rt_max_wer", "rt_max_cer", "rt_pass",
              "rt_skipped", "rt_logprob", "rt_window_logprob", "rt_eot_logprob", "rt_continuation", "rt_detail",
              "drop_reasons")

    config: RoundtripConfig

    def __init__(self, config: RoundtripConfig, context: StageContext | None = None, *,
                 tts: TTSBackend | None = None, asr: AsrLike | None = None, detokenizer: Any | None = None,
                 generate: TokenGenerator | None = None) -> None:
        super().__init__(config, context)
        self.tts, self.asr, self.detokenizer, self.generate = tts, asr, detokenizer, generate
        self.scorer: WhisperLabelScorer | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def _needs_detokenizer(self) -> bool:
        c = self.config
        return c.mode == "tokens" or (c.mode == "label" and c.tts_backend == "kimia")

    def check(self) -> None:
        c = self.config
        if c.mode == "label" and c.tts_backend == "espeak-ng" and self.tts is None:
            if not Path(c.espeak_binary).is_file():
                raise ModelNotFoundError(
                    f"espeak-ng not found at {c.espeak_binary} (config key `roundtrip.espeak_binary`). "
                    "Install the Debian package: apt-get install espeak-ng"
                )
        if self._needs_detokenizer() and self.detokenizer is None:
            root = Path(c.detokenizer_model or "")
            how = ("Copy the Kimi-Audio model directory (moonshotai/Kimi-Audio-7B-Instruct) here; it holds "
                   "audio_detokenizer/{config.yaml,model.pt} and vocoder/{config.json,model.pt}.")
            for rel in ("audio_detokenizer/config.yaml", "audio_detokenizer/model.pt",
                        "vocoder/config.json", "vocoder/model.pt"):
                if not (root / rel).is_file():
                    raise missing(root / rel, "roundtrip.detokenizer_model", how)
        if c.mode == "label" and c.tts_backend == "kimia" and self.generate is None:
            root = Path(c.detokenizer_model or "")
            for rel in ("config.json", "tiktoken.model"):
                if not (root / rel).is_file():
                    raise missing(root / rel, "roundtrip.detokenizer_model",
                                  "tts_backend=kimia speaks with the Kimi-Audio LM: copy the whole model directory.")
        if self.asr is None:
            from stages.transcribe import resolve_asr_model

            resolve_asr_model(c.asr, self.context, key="roundtrip.asr.model")

    def setup(self) -> None:
        c = self.config
        device = self.resolve_device()
        if self._needs_detokenizer() and self.detokenizer is None:
            from kimia_model.detokenizer import Detokenizer, StreamingConfig

            self.detokenizer = Detokenizer.from_pretrained(
                c.detokenizer_model, device=device, streaming=StreamingConfig(ode_steps=c.ode_steps)
            )
        if c.mode == "label" and c.tts_backend == "kimia" and self.generate is None:
            from kimia_model.kimia_generate import KimiaGenerator

            lm = KimiaGenerator.from_pretrained(c.detokenizer_model, device=device)  # text prompt: no audio tokenizer
            self.generate = lm.tts_token_generator(seed=c.seed)
        if c.mode == "label" and self.tts is None:
            self.tts = build_tts(c.tts_backend, generate=self.generate, detokenizer=self.detokenizer,
                                 espeak_binary=c.espeak_binary, rate_wpm=c.espeak_rate_wpm, seed=c.seed)
        if self.asr is None:
            from stages.transcribe import build_asr

            self.asr = build_asr(c.asr, self.context, device)
        if c.mode == "forced" and self.scorer is None:
            self.scorer = self._build_scorer()

    def _build_scorer(self) -> WhisperLabelScorer:
        if not hasattr(self.asr, "model") or not hasattr(self.asr.model, "generate"):
            raise StageError("roundtrip.mode=forced scores labels with a CTranslate2 Whisper: set "
                             "roundtrip.asr.backend=faster-whisper")
        c = self.config
        return WhisperLabelScorer(self.asr, window=c.window_tokens, redecode=c.forced_redecode)

    def runtime(self) -> str | None:
        detok = self.detokenizer
        return joined_runtime(  # ASR, then detokenizer
            getattr(self.asr, "runtime", None),
            runtime_label(detok.device, detok.dtype, detok.attention) if detok is not None else None,
        )

    def model_id(self) -> str:
        c = self.config
        src = {"label": c.tts_backend, "tokens": f"detokenizer:{c.detokenizer_model}", "audio": "segment",
               "forced": "segment"}[c.mode]
        return f"{c.mode}:{src}+{c.asr.backend}:{c.asr.model}"

    # -- per row ------------------------------------------------------------------------------
    def _speech(self, row: Row, language: str) -> tuple[np.ndarray, int, str]:
        """The audio to recognize for this row, its rate, and what produced it."""
        c = self.config
        if c.mode == "label":
            voice = c.voices.get(language) or self.tts.default_voice  # type: ignore[union-attr]
            audio, sr = self.tts.synthesize(row["text"], voice)  # type: ignore[union-attr]
            return audio, sr, f"{self.tts.name}:{voice}"  # type: ignore[union-attr]
        if c.mode == "tokens":
            tokens = row.get("semantic_tokens")
            if tokens is None:
                raise StageError("roundtrip.mode=tokens but the row has no semantic_tokens (run tokenize first)")
            try:
                wav = self.detokenizer.detokenize(np.asarray(tokens), seed=c.seed)  # type: ignore[union-attr]
            except ValueError as exc:
                raise StageError(f"cannot detokenize semantic_tokens: {exc}") from exc
            return wav, int(self.detokenizer.sample_rate), "kimia-detokenizer"  # type: ignore[union-attr]
        return self._segment_audio(row)

    def _segment_audio(self, row: Row) -> tuple[np.ndarray, int, str]:
        c = self.config
        key = "audio_enhanced" if c.input_stream == "enhanced" and row.get("audio_enhanced") is not None else "audio"
        if row.get(key) is None or "sample_rate" not in row:
            raise StageError("roundtrip.mode=audio but the row has no audio / sample_rate")
        return np.asarray(row[key], np.float32), int(row["sample_rate"]), f"segment:{key}"

    def takes(self, row: Row) -> bool:
        """Every segment but one the audio checks dropped before transcription
        (``transcribe.kept_only``): it has no label to check."""
        return not (row.get("verdict") == "drop" and "text" not in row)

    def process_batch(self, rows: list[Row]) -> list[Row]:
        c = self.config
        out: list[Row] = []
        todo: list[tuple[int, np.ndarray, int, str]] = []  # (index in out, audio, sr, language)
        forced: list[tuple[int, np.ndarray, int, str]] = []
        for row in rows:
            language = row.get("language") or "en"
            new: Row = {**row, "rt_mode": c.mode, "rt_tts": None, "rt_text": None, "rt_wer": None,
                        "rt_cer": None, "rt_pass": None, "rt_skipped": None, "rt_logprob": None,
                        "rt_window_logprob": None, "rt_eot_logprob": None, "rt_continuation": None,
                        "rt_detail": None,
                        "rt_max_wer": None if language in UNSPACED_LANGUAGES else c.max_wer,
                        "rt_max_cer": c.max_cer_unspaced if language in UNSPACED_LANGUAGES else c.max_cer,
                        "drop_reasons": list(row.get("drop_reasons") or [])}
            if c.mode == "forced" and not c.forced_redecode:  # no re-decode, no WER/CER gate
                new["rt_max_wer"] = new["rt_max_cer"] = None
            out.append(new)
            if c.languages and language not in c.languages:
                new["rt_skipped"] = f"language {language} not in roundtrip.languages"
                continue
            if not normalize_text(row.get("text") or "", language):
                # Nothing a speaker could say: a non-speech or empty label fails outright.
                new["rt_pass"] = False
                new["drop_reasons"].append("roundtrip_no_words")
                continue
            if c.mode == "forced":
                audio, sr, source = self._segment_audio(row)
                new["rt_tts"] = source
                forced.append((len(out) - 1, audio, sr, language))
                continue
            try:
                audio, sr, source = self._speech(row, language)
            except TTSError as exc:
                # The label cannot be spoken at all: that is the check's verdict, not a crash.
                new.update(rt_pass=False, rt_skipped=None, rt_tts=f"error: {exc}")
                new["drop_reasons"].append("roundtrip_tts_failed")
                continue
            new["rt_tts"] = source
            todo.append((len(out) - 1, audio, sr, language))
        by_rate: dict[int, list[tuple[int, np.ndarray, str]]] = {}
        for i, audio, sr, lang in todo:
            by_rate.setdefault(sr, []).append((i, audio, lang))
        for sr, items in by_rate.items():
            results = self.asr.transcribe([a for _, a, _ in items], sr)  # type: ignore[union-attr]
            if len(results) != len(items):
                raise StageError(f"ASR returned {len(results)} results for {len(items)} clips")
            for (i, _, lang), res in zip(items, results):
                self._judge(out[i], str(res.get("text") or ""), lang)
        if forced:
            self._judge_forced(out, forced)
        return out

    def _judge_forced(self, out: list[Row], items: list[tuple[int, np.ndarray, int, str]]) -> None:
        """Score each label on its own segment's audio; every failed gate names its value."""
        from kimia_model.audio import resample

        c = self.config
        if self.scorer is None:
            self.scorer = self._build_scorer()
        by_lang: dict[str, list[tuple[int, np.ndarray]]] = {}
        for i, audio, sr, lang in items:
            row = out[i]
            if len(self.scorer.encode(row["text"], lang)) > self.scorer.max_label_tokens():
                row["rt_skipped"] = f"label longer than {self.scorer.max_label_tokens()} tokens"
                continue
            by_lang.setdefault(lang, []).append((i, resample(np.asarray(audio, np.float32), sr, 16000)))
        for lang, group in by_lang.items():
            scores = self.scorer.score([a for _, a in group], [out[i]["text"] for i, _ in group], lang)
            for (i, _), sc in zip(group, scores):
                row = out[i]
                row.update(rt_logprob=round(sc.mean_logprob, 4), rt_window_logprob=round(sc.window_logprob, 4),
                           rt_eot_logprob=round(sc.eot_logprob, 4), rt_continuation=sc.continuation)
                s: dict[str, Any] = {"wer": 0.0, "cer": 0.0}
                if sc.hypothesis is not None:
                    s = score(row["text"], sc.hypothesis, lang)
                    row.update(rt_text=sc.hypothesis, rt_wer=round(s["wer"], 4), rt_cer=round(s["cer"], 4))
                gates = [  # (failed, stable reason for drop_reasons, the measured value)
                    (sc.mean_logprob < c.min_mean_logprob, f"roundtrip_logprob<{c.min_mean_logprob:g}",
                     f"mean token logprob {sc.mean_logprob:.2f}"),
                    (sc.window_logprob < c.min_window_logprob, f"roundtrip_window_logprob<{c.min_window_logprob:g}",
                     f"{c.window_tokens} tokens sum to logprob {sc.window_logprob:.1f}"),
                    (sc.eot_logprob < c.min_eot_logprob, f"roundtrip_eot<{c.min_eot_logprob:g}",
                     f"end-of-text logprob {sc.eot_logprob:.2f}, continues {sc.continuation[:40]!r}"),
                    (sc.hypothesis is not None and row["rt_max_wer"] is not None and s["wer"] > row["rt_max_wer"],
                     f"roundtrip_wer>{row['rt_max_wer'] or 0:g}",
                     f"WER {s['wer']:.2f} vs {(sc.hypothesis or '')[:40]!r}"),
                    (sc.hypothesis is not None and row["rt_max_cer"] is not None and s["cer"] > row["rt_max_cer"],
                     f"roundtrip_cer>{row['rt_max_cer'] or 0:g}", f"CER {s['cer']:.2f}"),
                ]
                failed = [(reason, value) for bad, reason, value in gates if bad]
                row["rt_pass"] = not failed
                row["rt_detail"] = "; ".join(f"{r}: {v}" for r, v in failed) or None
                row["drop_reasons"].extend(r for r, _ in failed)

    def _judge(self, row: Row, hypothesis: str, language: str) -> None:
        s = score(row["text"], hypothesis, language)
        row.update(rt_text=hypothesis.strip(), rt_wer=round(s["wer"], 4), rt_cer=round(s["cer"], 4))
        reasons = []
        if row["rt_max_wer"] is not None and s["wer"] > row["rt_max_wer"]:
            reasons.append(f"roundtrip_wer>{row['rt_max_wer']:g}")
        if row["rt_max_cer"] is not None and s["cer"] > row["rt_max_cer"]:
            reasons.append(f"roundtrip_cer>{row['rt_max_cer']:g}")
        row["rt_pass"] = not reasons
        row["drop_reasons"].extend(reasons)

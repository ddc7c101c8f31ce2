"""Transcribe: model-in-the-loop ASR labelling of speech segments.

Two Whisper backends share one interface (:class:`AsrBackend`):

* ``faster-whisper``: a CTranslate2 model directory (``model.bin``, ``config.json``,
  ``tokenizer.json``), e.g. the packaged ``pkg:whisper-base``. Segments of a batch are
  encoded in one call, language is detected from that same encoder output, and all of them
  are decoded in one batched ``generate``: no VAD pass, no per-segment Python loop, which is
  what makes labelling cheaper than running ``WhisperModel.transcribe`` per segment.
* ``openai-whisper``: a model name resolved in the cache (``<cache>/whisper/base.pt``) or a
  ``.pt`` path, batched through ``whisper.decode`` on a stacked mel batch.

Per segment both return ``text``, ``language``, ``language_prob``, ``avg_logprob``,
``no_speech_prob`` and ``compression_ratio`` (Whisper's hallucination signals, measured the
same way Whisper's own fallback logic measures them).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field

from kimia_model.refs import missing, resolve
from stages.audio import resample
from stages.base import Row, Stage, StageConfig, StageContext

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
    cpu_threads: int = Field(0, ge=0, le=256, description="CTranslate2 intra-op threads per worker; 0 = num_cpus.")
    language: str | None = Field(
        None, description="Force a language code (e.g. en); null detects it per segment."
    )
    task: Literal["transcribe", "translate"] = Field("transcribe", description="Whisper task token.")
    beam_size: int = Field(5, ge=1, le=16, description="Beam width; 1 = greedy (faster, slightly worse).")
    max_new_tokens: int = Field(224, ge=1, le=440, description="Longest transcript per segment in tokens.")
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

    def transcribe(self, audios: list[np.ndarray], sample_rate: int = ASR_SAMPLE_RATE) -> list[dict[str, Any]]:
        """Transcribe each (<= 30 s) clip; one result dict per clip, keys TRANSCRIPT_FIELDS."""
        ...


def _to_16k(audios: list[np.ndarray], sample_rate: int) -> list[np.ndarray]:
    out = []
    for a in audios:
        a = resample(np.asarray(a, np.float32), sample_rate, ASR_SAMPLE_RATE)
        out.append(a[: int(WINDOW_S * ASR_SAMPLE_RATE)])
    return out


class FasterWhisperBackend:
    """Batched CTranslate2 Whisper, driven at the level of encode / detect / generate."""

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
        threads = config.cpu_threads or max(1, int(config.num_cpus))
        self.model = ctranslate2.models.Whisper(
            str(model_dir), device=device, compute_type=compute, intra_threads=threads
        )
        self.hf_tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        n_mels = self.model.n_mels if hasattr(self.model, "n_mels") else 80
        self.features = FeatureExtractor(feature_size=n_mels)
        self._Tokenizer = Tokenizer
        self.multilingual = bool(self.model.is_multilingual)

    def _tokenizer(self, language: str | None) -> Any:
        return self._Tokenizer(
            self.hf_tokenizer,
            self.multilingual,
            task=self.config.task if self.multilingual else None,
            language=language if self.multilingual else None,
        )

    def transcribe(self, audios: list[np.ndarray], sample_rate: int = ASR_SAMPLE_RATE) -> list[dict[str, Any]]:
        import ctranslate2

        if not audios:
            return []
        clips = _to_16k(audios, sample_rate)
        n_frames = int(WINDOW_S * ASR_SAMPLE_RATE) // self.features.hop_length
        mels = []
        for clip in clips:
            feat = self.features(clip, padding=0)  # [n_mels, frames]
            feat = feat[:, :n_frames]
            if feat.shape[1] < n_frames:
                feat = np.pad(feat, ((0, 0), (0, n_frames - feat.shape[1])))
            mels.append(feat)
        batch = ctranslate2.StorageView.from_array(np.ascontiguousarray(np.stack(mels), dtype=np.float32))
        encoded = self.model.encode(batch, to_cpu=False)

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
            seq_len = len(ids)
            # CTranslate2 returns the length-normalised score; undo it the way faster-whisper
            # does so avg_logprob means what Whisper's thresholds (-1.0) expect.
            cum = res.scores[0] * (seq_len**1.0)
            out.append(
                {
                    "text": text,
                    "language": lang,
                    "language_prob": prob,
                    "avg_logprob": float(cum / (seq_len + 1)),
                    "no_speech_prob": float(res.no_speech_prob),
                    "compression_ratio": compression_ratio(text),
                }
            )
        return out


class OpenAIWhisperBackend:
    """openai-whisper from a ``.pt`` checkpoint, batched through ``whisper.decode``."""

    def __init__(self, checkpoint: Path, *, device: str, config: TranscribeConfig) -> None:
        import whisper

        self.config = config
        self.model_id = f"openai-whisper:{checkpoint.name}"
        self._whisper = whisper
        self.device = device
        self.model = load_openai_whisper(checkpoint, device)

    def transcribe(self, audios: list[np.ndarray], sample_rate: int = ASR_SAMPLE_RATE) -> list[dict[str, Any]]:
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
            outs = self.asr.transcribe([rows[i].get(key, rows[i]["audio"]) for i in idx], sr)
            for i, o in zip(idx, outs):
                results[i] = o
        return [{**r, **(res or {})} for r, res in zip(rows, results)]

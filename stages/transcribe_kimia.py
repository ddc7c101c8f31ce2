"""Kimi-Audio as an ASR labeller (``transcribe.backend: kimia``).

The LM hears each clip through upstream's ASR prompt (a user text instruction followed by
the user audio, text output; ``infer.py``) and decodes the text stream greedily with
Kimi-Audio-Evalkit's text repetition penalty (1.1 over 16 tokens). It returns the same
fields as the Whisper backends so the stage and the round-trip check need no special case:

* ``avg_logprob``: mean log-probability of the generated text tokens and the closing EOS
  under the text head (Whisper's signal, measured the same way);
* ``language`` / ``language_prob``: the LM does not emit a language tag, so the language is
  inferred from the transcript's writing system (and, for Latin script, from common function
  words); ``language_prob`` is the share of evidence for it, not a model probability;
* ``no_speech_prob``: None (the LM has no no-speech head);
* ``compression_ratio``: zlib ratio of the text, as Whisper computes it.

The Whisper+VQ semantic tokenizer and the Whisper-large-v3 feature encoder come from
:mod:`kimia_model.whisper_vq.tokenizer` unless callables are injected (tests use fakes).
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from kimia_model.audio import resample
from kimia_model.kimia_generate import KimiaGenerator, SamplingParams
from kimia_model.kimia_prompt import AudioTokenizer, FeatureExtractor, PromptError
from kimia_model.refs import ModelNotFoundError, default_cache_dir, missing
from stages.base import StageError, runtime_label

#: Upstream's ASR instruction (``infer.py``: "convert the audio content to text").
ASR_PROMPT = "请将音频内容转换为文字。"
#: The English instruction of upstream's fine-tuning demo data, for English-tuned checkpoints.
ASR_PROMPT_EN = "Please transcribe the spoken content into written text."
#: Kimi-Audio-Evalkit's ASR decoding: greedy text, repetition penalty 1.1 over 16 tokens.
ASR_SAMPLING = SamplingParams(temperature=0.0, top_k=5, repetition_penalty=1.1, repetition_window=16)

SAMPLE_RATE = 16000
GLM_TOKENIZER_DIRNAME = "glm-4-voice-tokenizer"
WHISPER_DIRNAME = "whisper-large-v3"


def compression_ratio(text: str) -> float:
    """zlib compression ratio, Whisper's looping signal (0.0 for empty text)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


_SCRIPT_LANG = {
    "CJK": "zh", "HIRAGANA": "ja", "KATAKANA": "ja", "HANGUL": "ko", "CYRILLIC": "ru", "ARABIC": "ar",
    "DEVANAGARI": "hi", "THAI": "th", "GREEK": "el", "HEBREW": "he",
}  # fmt: skip
_STOPWORDS = {
    "en": "the and of to a in is that it you was for on are with as i be this have not",
    "es": "el la de que y en los se del las un por con no una su para es lo como",
    "fr": "le la de et les des est un une du en que qui pas pour dans ce il elle",
    "de": "der die und das ist nicht ich sie es den zu mit ein eine auf dem von",
    "it": "il di che la e per un non una sono del della le gli con",
    "pt": "o a de que e do da em um para com não uma os no se na por",
    "nl": "de het een en van is dat niet ik je op te met voor zijn",
}
_STOP_SETS = {lang: set(words.split()) for lang, words in _STOPWORDS.items()}


def guess_language(text: str) -> tuple[str | None, float]:
    """Language code and a confidence in [0, 1] from the writing system of ``text``.

    Non-Latin scripts map to their main language (Han -> zh unless kana appear, which make
    it ja). Latin text is voted on by function words of seven languages. Returns
    ``(None, 0.0)`` when there is no evidence (no letters, or Latin with no known words).

    >>> guess_language("the cat sat on the mat")[0], guess_language("你好世界")[0]
    ('en', 'zh')
    """
    scripts: Counter[str] = Counter()
    for ch in text:
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        script = next((s for s in _SCRIPT_LANG if name.startswith(s)), None)
        if script is None and "LATIN" in name:
            script = "LATIN"
        scripts[script or "OTHER"] += 1
    letters = sum(scripts.values())
    if not letters:
        return None, 0.0
    if scripts["HIRAGANA"] + scripts["KATAKANA"] > 0:
        share = (scripts["HIRAGANA"] + scripts["KATAKANA"] + scripts["CJK"]) / letters
        return "ja", round(share, 4)
    top, count = max(((s, c) for s, c in scripts.items() if s != "OTHER"), key=lambda sc: sc[1], default=(None, 0))
    if top is None:
        return None, 0.0
    share = count / letters
    if top != "LATIN":
        return _SCRIPT_LANG[top], round(share, 4)
    words = re.findall(r"[^\W\d_]+", text.lower())
    votes = Counter({lang: sum(w in stops for w in words) for lang, stops in _STOP_SETS.items()})
    best, hits = votes.most_common(1)[0]
    total = sum(votes.values())
    if hits == 0:
        return None, 0.0
    return best, round(share * hits / total, 4)


class KimiaASR:
    """Transcribe 16 kHz clips with the Kimi-Audio LM (the ``AsrBackend`` interface).

    Args:
        model_dir: Kimi-Audio directory (``config.json``, safetensors, ``tiktoken.model``,
            ``whisper-large-v3/``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
        audio_tokenizer: ``audio16k -> int codes``; default: GLM-4-Voice's Whisper+VQ from
            ``glm_tokenizer_dir``.
        feature_extractor: ``audio16k -> [T, 5120]``; default: the release's fine-tuned
            ``whisper-large-v3`` encoder, 4 frames stacked per token. Pass
            ``use_whisper_features=False`` to run on tokens alone (worse, but cheaper).
        glm_tokenizer_dir: the ``THUDM/glm-4-voice-tokenizer`` directory; default
            ``<model_dir>/glm-4-voice-tokenizer`` then ``<cache>/glm-4-voice-tokenizer``.
        prompt: the instruction placed before the audio.
        sampling: text-stream sampling (default greedy + 1.1 repetition penalty).
        max_new_tokens: cap on transcript length in tokens.
        dtype: LM dtype (``"auto"``: bf16 on CUDA, fp32 on CPU).
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        *,
        audio_tokenizer: AudioTokenizer | None = None,
        feature_extractor: FeatureExtractor | None = None,
        use_whisper_features: bool = True,
        glm_tokenizer_dir: str | Path | None = None,
        prompt: str = ASR_PROMPT,
        sampling: SamplingParams = ASR_SAMPLING,
        max_new_tokens: int = 448,
        dtype: str = "auto",
        seed: int = 0,
    ) -> None:
        model_dir = Path(model_dir)
        self.model_id = f"kimia:{model_dir.name}"
        if audio_tokenizer is None:
            audio_tokenizer = _default_audio_tokenizer(model_dir, glm_tokenizer_dir, device)
        if feature_extractor is None and use_whisper_features:
            feature_extractor = _default_feature_extractor(model_dir, device)
        self.generator = KimiaGenerator.from_pretrained(
            model_dir,
            device=device,
            dtype=dtype,
            audio_tokenizer=audio_tokenizer,
            feature_extractor=feature_extractor if use_whisper_features else None,
        )
        lm = self.generator.lm
        # The LM's choice (bf16 + flash-attn on CUDA when installed, else SDPA); the Whisper
        # encoders that hear the audio run in float32 with SDPA.
        self.runtime = runtime_label(lm.device, lm.dtype, lm.attn_implementation)
        self.prompt = prompt
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.seed = seed

    def transcribe(
        self,
        audios: list[np.ndarray],
        sample_rate: int = SAMPLE_RATE,
        *,
        groups: list[str] | None = None,
        languages: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """One result dict per clip (keys as the Whisper backends return).

        Each clip is decoded on its own, so ``groups`` (the clips' recordings) changes nothing.
        The LM takes no language token, so ``languages`` changes nothing either: the transcribe
        stage replaces the text-based language guess with its language-ID decision.

        Raises:
            StageError: a clip that cannot be prompted (empty, non-finite, too long).
        """
        results = []
        for i, audio in enumerate(audios):
            wav = np.asarray(audio, np.float32)
            if wav.ndim != 1 or wav.size == 0:
                raise StageError(f"kimia ASR: clip {i} must be non-empty mono audio, got shape {list(wav.shape)}")
            if sample_rate != SAMPLE_RATE:
                wav = resample(wav, sample_rate, SAMPLE_RATE)
            messages = [
                {"role": "user", "message_type": "text", "content": self.prompt},
                {"role": "user", "message_type": "audio", "content": wav, "sample_rate": SAMPLE_RATE},
            ]
            try:
                res = self.generator.generate(
                    messages, output="text", text_sampling=self.sampling, seed=self.seed,
                    max_new_tokens=self.max_new_tokens,
                )  # fmt: skip
            except PromptError as exc:
                raise StageError(f"kimia ASR: clip {i}: {exc}") from exc
            text = res.text.strip()
            language, language_prob = guess_language(text)
            results.append(
                {
                    "text": text,
                    "language": language,
                    "language_prob": language_prob,
                    "avg_logprob": res.avg_logprob,
                    "no_speech_prob": None,
                    "compression_ratio": compression_ratio(text),
                }
            )
        return results


def check_model_dir(
    model_dir: str | Path, glm_tokenizer_dir: str | Path | None = None, *, use_whisper_features: bool = True,
    config_key: str = "transcribe.model",
) -> None:
    """Cheap file check for a stage's ``check()``: every file KimiaASR will load exists.

    Raises:
        ModelNotFoundError: naming the first missing file, the config key and how to stage it.
    """
    d = Path(model_dir)
    how = "Copy the whole Kimi-Audio release directory (e.g. Kimi-Audio-7B-Instruct) here."
    for name in ("config.json", "tiktoken.model"):
        if not (d / name).is_file():
            raise missing(d / name, config_key, how)
    if not ((d / "model.safetensors.index.json").is_file() or any(d.glob("*.safetensors"))):
        raise missing(d / "model.safetensors.index.json", config_key, how)
    if use_whisper_features and not (d / WHISPER_DIRNAME / "config.json").is_file():
        raise missing(d / WHISPER_DIRNAME / "config.json", config_key, how)
    cands = [Path(glm_tokenizer_dir)] if glm_tokenizer_dir is not None else [
        d / GLM_TOKENIZER_DIRNAME, default_cache_dir() / GLM_TOKENIZER_DIRNAME]  # fmt: skip
    if not any((c / "config.json").is_file() for c in cands):
        raise missing(cands[0] / "config.json", config_key,
                      "Copy the THUDM/glm-4-voice-tokenizer directory there (Kimi-Audio's audio tokenizer).")


def _default_audio_tokenizer(model_dir: Path, glm_dir: str | Path | None, device: str) -> AudioTokenizer:
    cands = [Path(glm_dir)] if glm_dir is not None else [
        model_dir / GLM_TOKENIZER_DIRNAME,
        default_cache_dir() / GLM_TOKENIZER_DIRNAME,
    ]  # fmt: skip
    found = next((c for c in cands if (c / "config.json").is_file()), None)
    if found is None:
        raise missing(
            cands[0],
            "transcribe.model",
            "Kimi-Audio reads audio through GLM-4-Voice's tokenizer: copy the THUDM/glm-4-voice-tokenizer "
            f"directory to {cands[0]} (or pass glm_tokenizer_dir).",
        )
    from kimia_model.whisper_vq.tokenizer import WhisperVQTokenizer

    tok = WhisperVQTokenizer.load(found, device=device)

    def tokens(wav: np.ndarray) -> np.ndarray:
        out = tok([wav], tokens=True)[0].tokens
        assert out is not None
        return out

    return tokens


def _default_feature_extractor(model_dir: Path, device: str) -> FeatureExtractor:
    wdir = model_dir / WHISPER_DIRNAME
    if not (wdir / "config.json").is_file():
        raise ModelNotFoundError(
            f"model weights not found: {wdir} (config key `transcribe.model`). The Kimi-Audio release ships "
            "its fine-tuned whisper-large-v3 encoder in this subdirectory; copy the whole model directory."
        )
    from kimia_model.whisper_vq.tokenizer import WhisperVQTokenizer

    # Kimi-Audio's continuous path pads every window to 30 s without a mask (plain Whisper).
    enc = WhisperVQTokenizer.load(wdir, device=device, padding="full")

    def features(wav: np.ndarray) -> np.ndarray:
        out = enc([wav], tokens=False, features=True)[0].features
        assert out is not None
        return out

    return features

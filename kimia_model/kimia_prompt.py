"""Kimi-Audio prompts: validated messages in, the two parallel token streams out.

A conversation is a list of messages ``{"role", "message_type", "content"}`` (upstream's
schema; ``"type"`` is accepted as an alias of ``"message_type"``):

* ``text``: content is a string;
* ``audio``: content is a file path, or a float waveform (``np.ndarray``, 16 kHz unless the
  message gives ``"sample_rate"``). Precomputed ``"semantic_tokens"`` (GLM codes,
  unshifted, as the pipeline's rows carry them) / ``"audio_tokens"`` (upstream: already
  shifted by ``kimia_token_offset``) and ``"whisper_features"`` skip the models;
* ``audio-text`` (assistant history): content is ``[audio, transcript]``.

:class:`PromptBuilder` turns them into a :class:`DualStreamPrompt` exactly as upstream's
``KimiAPromptManager`` lays the streams out, and checks
the input first, with errors that say which message is wrong and why (upstream asserts or
fails deep in the model; its issues #1, #92, #124, #157).

The text tokenizer (:class:`KimiaTextTokenizer`) is the release's tiktoken BPE
(``tiktoken.model``) with Kimi's block of 421 special/reserved tokens after the BPE ids;
it is read from the model directory without running the release's remote code.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

#: Kimi's special tokens in id order after the BPE ids (id = num_base_tokens + index). The
#: ``<|reserved_token_N|>`` fillers keep the published ids: msg_end 151645, media_begin
#: 151661, media_end 151663, text_blank 151666, text_eos 151667, user/assistant starts
#: 151670/151671, speech ct/ctd 151675/151676 for the 151643 BPE ids of the release.
USED_SPECIAL_TOKENS: tuple[str, ...] = (
    "[BOS]", "[EOS]", "<|im_msg_end|>", "<|im_user_msg_start|>", "<|im_assistant_msg_start|>",
    "<|reserved_token_0|>", "<|reserved_token_1|>", "<|reserved_token_2|>", "<|reserved_token_3|>", "[EOT]",
    "<|reserved_token_4|>", "<|reserved_token_5|>", "<|reserved_token_6|>", "<|reserved_token_7|>",
    "<|reserved_token_8|>", "<|reserved_token_9|>", "<|reserved_token_10|>", "<|reserved_token_11|>",
    "<|im_media_begin|>", "<|reserved_token_12|>", "<|im_media_end|>", "<|reserved_token_13|>",
    "<|reserved_token_14|>", "<|im_kimia_text_blank|>", "<|im_kimia_text_eos|>", "<|reserved_token_15|>",
    "<|reserved_token_16|>", "<|im_kimia_user_msg_start|>", "<|im_kimia_assistant_msg_start|>",
    "<|reserved_token_17|>", "<|reserved_token_18|>", "<|reserved_token_19|>",
    "<|im_kimia_speech_ct_id|>", "<|im_kimia_speech_ctd_id|>",
)  # fmt: skip
NUM_SPECIAL_TOKENS = 421  # 152064 - 151643: the block ends where audio ids begin

#: Qwen2-style pre-tokenizer split (single digits), as the release's tokenizer uses.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ROLES = ("user", "assistant")
MESSAGE_TYPES = ("text", "audio", "audio-text")
AUDIO_SAMPLE_RATE = 16000
TOKEN_HZ = 12.5


class PromptError(ValueError):
    """A message list that cannot be turned into a prompt; the text says which and why."""


def special_token_layout() -> list[str]:
    """All 421 special token strings in id order (used ones, then reserved fillers)."""
    fill = [f"<|reserved_token_{i}|>" for i in range(20, 20 + NUM_SPECIAL_TOKENS - len(USED_SPECIAL_TOKENS))]
    return list(USED_SPECIAL_TOKENS) + fill


class KimiaTextTokenizer:
    """The release's tiktoken text tokenizer, loaded natively.

    Attributes:
        num_base_tokens: number of BPE ids (151643 in the release); specials follow.
        special_tokens: token string to id.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int] | None = None) -> None:
        import tiktoken

        self.num_base_tokens = len(mergeable_ranks)
        if special_tokens is None:
            special_tokens = {t: self.num_base_tokens + i for i, t in enumerate(special_token_layout())}
        clash = [t for t, i in special_tokens.items() if i < self.num_base_tokens]
        if clash:
            raise ValueError(f"special token ids overlap the {self.num_base_tokens} BPE ids: {clash[:5]}")
        self.special_tokens = dict(special_tokens)
        self._special_ids = set(self.special_tokens.values())
        self.model = tiktoken.Encoding(
            name="kimia", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self.vocab_size = max(self._special_ids | {self.num_base_tokens - 1}) + 1

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> KimiaTextTokenizer:
        """Read ``tiktoken.model`` (and special ids from ``tokenizer_config.json`` if listed).

        Raises:
            FileNotFoundError: no ``tiktoken.model`` in the directory.
        """
        from tiktoken.load import load_tiktoken_bpe

        model_dir = Path(model_dir)
        path = model_dir / "tiktoken.model"
        if not path.is_file():
            raise FileNotFoundError(
                f"Kimi-Audio text tokenizer not found: {path} (the release ships tiktoken.model "
                "next to config.json; copy it with the model directory)"
            )
        ranks = load_tiktoken_bpe(str(path))
        specials = {t: len(ranks) + i for i, t in enumerate(special_token_layout())}
        cfg = model_dir / "tokenizer_config.json"
        if cfg.is_file():
            try:
                added = json.loads(cfg.read_text()).get("added_tokens_decoder") or {}
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"cannot read {cfg}: {exc}") from exc
            # Ids the file states win over the computed layout (they are the ground truth).
            for tid, entry in added.items():
                content = entry.get("content") if isinstance(entry, dict) else None
                if content:
                    specials[content] = int(tid)
        return cls(ranks, specials)

    def token_id(self, token: str) -> int:
        """Id of a special token string, with a clear error for an unknown one."""
        try:
            return self.special_tokens[token]
        except KeyError:
            raise KeyError(f"special token {token!r} is not in this tokenizer") from None

    def encode(self, text: str) -> list[int]:
        """BPE ids of plain text; special-token strings inside it are encoded as text."""
        return self.model.encode(text, allowed_special=set(), disallowed_special=())

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of BPE ids; special (and out-of-range, e.g. audio) ids are dropped by default."""
        keep = [int(i) for i in ids if int(i) < self.num_base_tokens or (not skip_special and int(i) in self._special_ids)]
        return self.model.decode(keep)


@dataclass(frozen=True)
class SpecialIds:
    """The control ids the prompt layout and the generation loop use."""

    msg_end: int
    media_begin: int
    media_end: int
    text_blank: int
    text_eos: int
    user_start: int
    assistant_start: int
    speech_ct: int
    speech_ctd: int

    @classmethod
    def from_tokenizer(cls, tok: KimiaTextTokenizer) -> SpecialIds:
        return cls(
            msg_end=tok.token_id("<|im_msg_end|>"),
            media_begin=tok.token_id("<|im_media_begin|>"),
            media_end=tok.token_id("<|im_media_end|>"),
            text_blank=tok.token_id("<|im_kimia_text_blank|>"),
            text_eos=tok.token_id("<|im_kimia_text_eos|>"),
            user_start=tok.token_id("<|im_kimia_user_msg_start|>"),
            assistant_start=tok.token_id("<|im_kimia_assistant_msg_start|>"),
            speech_ct=tok.token_id("<|im_kimia_speech_ct_id|>"),
            speech_ctd=tok.token_id("<|im_kimia_speech_ctd_id|>"),
        )


@dataclass
class DualStreamPrompt:
    """The model input: two equal-length id streams and where Whisper features go.

    Attributes:
        audio_ids / text_ids: int64 ``[L]``.
        continuous_mask: bool ``[L]``, True at user-audio token positions that get a feature.
        features: per continuous span in order, float32 ``[N_i, D]``; their rows fill the
            mask's True positions in order.
    """

    audio_ids: np.ndarray
    text_ids: np.ndarray
    continuous_mask: np.ndarray
    features: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.audio_ids.shape[0])

    def features_concat(self) -> np.ndarray | None:
        """All features stacked ``[sum N_i, D]`` (None when the prompt has none)."""
        return np.concatenate(self.features, axis=0) if self.features else None


AudioTokenizer = Callable[[np.ndarray], np.ndarray]
FeatureExtractor = Callable[[np.ndarray], np.ndarray]


class PromptBuilder:
    """Validates messages and lays out Kimi-Audio's dual-stream prompt.

    Args:
        text_tokenizer: the model's :class:`KimiaTextTokenizer`.
        token_offset: ``kimia_token_offset`` (audio code ``c`` is id ``offset + c``).
        num_audio_codes: size of the semantic codebook (``vocab_size - offset``).
        audio_delay: ``kimia_mimo_audiodelaytokens`` (blank audio slots before assistant speech).
        audio_tokenizer: ``audio16k -> int codes`` at 12.5 Hz (the Whisper+VQ tokenizer, or a
            fake in tests); needed only for audio messages without precomputed tokens.
        feature_extractor: ``audio16k -> [T, D]`` Whisper features at 12.5 Hz; optional. When
            absent, user audio spans carry tokens only (no continuous features).
        max_audio_s: reject a single audio longer than this (None = no per-audio limit).
    """

    def __init__(
        self,
        text_tokenizer: KimiaTextTokenizer,
        *,
        token_offset: int,
        num_audio_codes: int,
        audio_delay: int,
        audio_tokenizer: AudioTokenizer | None = None,
        feature_extractor: FeatureExtractor | None = None,
        max_audio_s: float | None = None,
    ) -> None:
        self.tok = text_tokenizer
        self.ids = SpecialIds.from_tokenizer(text_tokenizer)
        self.offset = int(token_offset)
        self.num_codes = int(num_audio_codes)
        self.delay = int(audio_delay)
        self.audio_tokenizer = audio_tokenizer
        self.feature_extractor = feature_extractor
        self.max_audio_s = max_audio_s

    # -- validation ---------------------------------------------------------------------------
    def validate(self, messages: Any) -> list[dict[str, Any]]:
        """Check structure and content of every message; return normalised copies.

        Raises:
            PromptError: naming the message index and the problem.
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise PromptError("messages must be a non-empty list of {role, message_type, content} dicts")
        out = []
        for i, m in enumerate(messages):
            where = f"message {i}"
            if not isinstance(m, dict):
                raise PromptError(f"{where}: expected a dict, got {type(m).__name__}")
            role = m.get("role")
            if role not in ROLES:
                raise PromptError(
                    f"{where}: unknown role {role!r}; Kimi-Audio knows only 'user' and 'assistant' (no system role)"
                )
            mtype = m.get("message_type", m.get("type"))
            if mtype not in MESSAGE_TYPES:
                raise PromptError(f"{where}: unknown message_type {mtype!r}; expected one of {MESSAGE_TYPES}")
            has_pre = any(k in m for k in ("semantic_tokens", "audio_tokens"))
            content = m.get("content")
            if mtype == "text":
                if not isinstance(content, str) or not content.strip():
                    raise PromptError(f"{where}: text message has empty content")
            elif mtype == "audio":
                if content is None and not has_pre:
                    raise PromptError(f"{where}: audio message has no content (a file path or a waveform)")
                if content is not None:
                    _check_audio_ref(content, where)
            else:  # audio-text
                if role != "assistant":
                    raise PromptError(f"{where}: audio-text messages are assistant history (role 'assistant')")
                if not isinstance(content, (list, tuple)) or len(content) != 2:
                    raise PromptError(f"{where}: audio-text content must be [audio, transcript]")
                _check_audio_ref(content[0], where)
                if not isinstance(content[1], str) or not content[1].strip():
                    raise PromptError(f"{where}: audio-text message has an empty transcript")
            out.append({**m, "message_type": mtype})
        if out[0]["role"] != "user":
            raise PromptError("message 0: a conversation starts with a user message")
        if out[-1]["role"] != "user":
            raise PromptError(f"message {len(out) - 1}: the last message must be the user's (the model answers it)")
        return out

    # -- layout -------------------------------------------------------------------------------
    def build(self, messages: Any, output: Literal["text", "both"] = "text") -> DualStreamPrompt:
        """Validate, tokenize and lay out the conversation (then the assistant start).

        Args:
            messages: see the module docstring.
            output: ``"text"`` or ``"both"``; picks the turn-closing speech token after the
                last user audio (upstream's ``ct`` for text answers, ``ctd`` for spoken ones).
        """
        if output not in ("text", "both"):
            raise PromptError(f"output must be 'text' or 'both', got {output!r}")
        msgs = self.validate(messages)
        ids = self.ids
        audio: list[int] = []
        text: list[int] = []
        cont: list[bool] = []
        feats: list[np.ndarray] = []

        def put(a: list[int], t: list[int], c: bool = False) -> None:
            assert len(a) == len(t)
            audio.extend(a)
            text.extend(t)
            cont.extend([c] * len(a))

        for i, m in enumerate(msgs):
            where = f"message {i}"
            role = m["role"]
            new_turn = i == 0 or msgs[i - 1]["role"] != role
            ends_turn = i == len(msgs) - 1 or msgs[i + 1]["role"] != role
            if new_turn:
                put([ids.user_start if role == "user" else ids.assistant_start], [ids.text_blank])
            mtype = m["message_type"]
            if mtype == "text":
                t = self.tok.encode(m["content"])
                put([ids.text_blank] * len(t), t)
                if role == "assistant":
                    put([ids.text_blank], [ids.text_eos])
            elif mtype == "audio":
                codes, wav = self._audio_codes(m, m.get("content"), where)
                f = self._features(m, wav, len(codes), where)
                put([ids.media_begin], [ids.text_blank])
                put([self.offset + int(c) for c in codes], [ids.text_blank] * len(codes), c=f is not None)
                put([ids.media_end], [ids.text_blank])
                if f is not None:
                    feats.append(f)
                if ends_turn:
                    put([ids.speech_ct if output == "text" else ids.speech_ctd], [ids.text_blank])
            else:  # audio-text: assistant speech delayed behind its transcript
                codes, _ = self._audio_codes(m, m["content"][0], where)
                t = self.tok.encode(m["content"][1])
                room = self.delay + len(codes)
                if len(t) > room:
                    raise PromptError(
                        f"{where}: transcript is {len(t)} tokens but its audio leaves room for {room} "
                        f"({len(codes)} speech tokens + {self.delay} delay); text must lead the speech"
                    )
                put([ids.text_blank] * self.delay + [self.offset + int(c) for c in codes],
                    t + [ids.text_blank] * (room - len(t)))  # fmt: skip
            if ends_turn:
                put([ids.msg_end], [ids.text_blank])
        put([ids.assistant_start], [ids.text_blank])
        return DualStreamPrompt(
            audio_ids=np.asarray(audio, np.int64),
            text_ids=np.asarray(text, np.int64),
            continuous_mask=np.asarray(cont, bool),
            features=feats,
        )

    def _audio_codes(self, m: dict[str, Any], ref: Any, where: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Semantic codes (unshifted) of an audio message, plus its 16 kHz waveform if loaded."""
        wav = None
        if "semantic_tokens" in m:
            codes = np.asarray(m["semantic_tokens"])
        elif "audio_tokens" in m:
            codes = np.asarray(m["audio_tokens"]) - self.offset  # upstream stores them shifted
        else:
            wav = load_audio_16k(ref, m.get("sample_rate"), where)
            self._check_duration(wav, where)
            if self.audio_tokenizer is None:
                raise PromptError(f"{where}: audio needs an audio tokenizer (none configured) or 'semantic_tokens'")
            codes = np.asarray(self.audio_tokenizer(wav))
        if codes.ndim != 1 or codes.size == 0:
            raise PromptError(f"{where}: audio gave {codes.size} semantic tokens (shape {list(codes.shape)})")
        if not np.issubdtype(codes.dtype, np.integer):
            raise PromptError(f"{where}: semantic tokens must be integers, got {codes.dtype}")
        if codes.min() < 0 or codes.max() >= self.num_codes:
            raise PromptError(
                f"{where}: semantic tokens must lie in [0, {self.num_codes}), got [{codes.min()}, {codes.max()}]"
            )
        if self.max_audio_s is not None and codes.size / TOKEN_HZ > self.max_audio_s + 1 / TOKEN_HZ:
            raise PromptError(f"{where}: audio is {codes.size / TOKEN_HZ:.1f} s; the limit is {self.max_audio_s} s")
        return codes.astype(np.int64), wav

    def _features(self, m: dict[str, Any], wav: np.ndarray | None, n: int, where: str) -> np.ndarray | None:
        """Whisper features aligned to ``n`` tokens, or None when none are available."""
        if "whisper_features" in m and m["whisper_features"] is not None:
            f = np.asarray(m["whisper_features"], np.float32)
        elif self.feature_extractor is not None:
            if wav is None:
                ref = m.get("content")
                if ref is None:
                    return None  # tokens only, no audio to compute features from
                wav = load_audio_16k(ref, m.get("sample_rate"), where)
            f = np.asarray(self.feature_extractor(wav), np.float32)
        else:
            return None
        if f.ndim != 2:
            raise PromptError(f"{where}: whisper features must be [frames, dim], got shape {list(f.shape)}")
        if f.shape[0] < n:
            raise PromptError(f"{where}: {f.shape[0]} whisper feature frames for {n} semantic tokens")
        # Both run at 12.5 Hz from the same audio; upstream also keeps the first n frames.
        return f[:n]

    def _check_duration(self, wav: np.ndarray, where: str) -> None:
        if wav.size == 0:
            raise PromptError(f"{where}: audio is empty")
        if self.max_audio_s is not None and wav.size / AUDIO_SAMPLE_RATE > self.max_audio_s:
            raise PromptError(
                f"{where}: audio is {wav.size / AUDIO_SAMPLE_RATE:.1f} s; the limit is {self.max_audio_s} s"
            )


def _check_audio_ref(ref: Any, where: str) -> None:
    if isinstance(ref, (str, Path)):
        p = Path(ref)
        if not p.is_file():
            raise PromptError(f"{where}: audio file not found: {p}")
    elif isinstance(ref, np.ndarray):
        if ref.size == 0:
            raise PromptError(f"{where}: audio waveform is empty")
        if not np.issubdtype(ref.dtype, np.floating):
            raise PromptError(f"{where}: audio waveform must be float samples, got {ref.dtype}")
    else:
        raise PromptError(f"{where}: audio must be a file path or a float waveform, got {type(ref).__name__}")


def load_audio_16k(ref: Any, sample_rate: int | None, where: str = "audio") -> np.ndarray:
    """Mono float32 16 kHz audio from a path (any libsndfile format) or a waveform.

    Raises:
        PromptError: unreadable file, non-finite samples or an empty result.
    """
    from kimia_model.audio import downmix, resample

    if isinstance(ref, (str, Path)):
        import soundfile as sf

        try:
            data, sr = sf.read(str(ref), dtype="float32", always_2d=True)
        except Exception as exc:  # noqa: BLE001 - libsndfile raises several types
            raise PromptError(f"{where}: cannot read audio file {ref}: {exc}") from exc
        wav = downmix(data)
    else:
        wav = np.asarray(ref, np.float32)
        if wav.ndim == 2:
            wav = downmix(wav)
        sr = int(sample_rate or AUDIO_SAMPLE_RATE)
    if wav.ndim != 1:
        raise PromptError(f"{where}: audio must be mono or [frames, channels], got shape {list(wav.shape)}")
    if wav.size == 0:
        raise PromptError(f"{where}: audio is empty")
    if not np.isfinite(wav).all():
        raise PromptError(f"{where}: audio contains NaN or infinite samples")
    return resample(wav, int(sr), AUDIO_SAMPLE_RATE)

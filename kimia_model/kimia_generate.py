"""Kimi-Audio generation: both streams decoded step by step, text leading audio.

The loop follows upstream's ``KimiAudio._generate_loop``:

* prefill the dual-stream prompt (with Whisper features) once, then feed back one
  ``(audio, text)`` pair per step on the KV cache;
* each step samples a text token from the trunk head and an audio token from the audio
  branch, each with its own temperature / top-k / repetition penalty and window;
* **text leads audio**: the audio token is forced to ``<|im_kimia_text_blank|>`` for the
  first ``kimia_mimo_audiodelaytokens`` steps (6 for the release), and always in text mode;
* text ends at ``<|im_kimia_text_eos|>`` (not part of the text); later text slots are
  forced blank. Audio ends when the sampled audio token is ``<|im_msg_end|>`` or
  ``<|im_media_end|>``;
* stop rule: ``output="text"`` stops when the text ended; ``output="both"`` when the audio
  ended (the text may have ended long before). Otherwise at the length limit: for "both"
  ``int(12.5 * 120) - prompt_len`` new tokens (120 s of speech), for "text"
  ``7500 - prompt_len`` unless a smaller ``max_new_tokens`` is asked for; both never past
  ``max_position_embeddings``.

Entry points: :meth:`KimiaGenerator.generate` (messages in, :class:`GenerationResult` out),
:meth:`KimiaGenerator.stream_audio_codes` (semantic codes yielded as they are sampled, for a
streaming detokenizer) and :meth:`KimiaGenerator.tts_token_generator` (the callable
``kimia_model.tts.KimiaTTS`` takes).

Differences from upstream, on purpose: the text-only mode skips the audio branch (its
output is discarded there anyway, and text logits do not depend on it), histories are
unbounded lists (upstream's fixed 4096-slot buffers overflow on long outputs), sampling
uses a seeded generator so a seed fixes the output, and the detokenizer is injected and
only built when audio is actually produced.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from kimia_model.kimia_lm import KimiaLM, KVCache
from kimia_model.kimia_prompt import (
    AudioTokenizer,
    DualStreamPrompt,
    FeatureExtractor,
    KimiaTextTokenizer,
    PromptBuilder,
    PromptError,
)

#: Upstream length limits in new tokens (``KimiAudio.generate``): 120 s of 12.5 Hz speech for
#: spoken answers, a 7500-position budget for text answers.
BOTH_MAX_TOTAL = int(12.5 * 120)
TEXT_MAX_TOTAL = 7500
OUTPUT_SAMPLE_RATE = 24000

Detokenizer = Callable[[np.ndarray], np.ndarray]

#: Instruction for the TTS use (upstream ships no TTS prompt; this one is ours).
TTS_INSTRUCTION = "Read the following text aloud, word for word: {text}"


@dataclass(frozen=True)
class SamplingParams:
    """How one stream picks its next token (upstream's ``KimiASampler`` knobs).

    Attributes:
        temperature: <= 1e-6 means greedy argmax (upstream's threshold).
        top_k: sample among the k most likely tokens; 0 = the whole vocabulary.
        repetition_penalty: > 1 divides positive / multiplies negative logits of the last
            ``repetition_window`` tokens of this stream (forced blanks included); applied
            only once the history is longer than the window, as upstream does.
        repetition_window: how many recent tokens the penalty looks at.
    """

    temperature: float = 0.0
    top_k: int = 5
    repetition_penalty: float = 1.0
    repetition_window: int = 16

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature <= 10.0):
            raise ValueError(f"temperature must be in [0, 10], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (1.0 <= self.repetition_penalty <= 10.0):
            raise ValueError(f"repetition_penalty must be in [1, 10], got {self.repetition_penalty}")
        if self.repetition_window < 1:
            raise ValueError(f"repetition_window must be >= 1, got {self.repetition_window}")


#: Upstream's recommended settings (README / infer.py): greedy text, sampled audio.
TEXT_SAMPLING = SamplingParams(temperature=0.0, top_k=5, repetition_penalty=1.0, repetition_window=16)
AUDIO_SAMPLING = SamplingParams(temperature=0.8, top_k=10, repetition_penalty=1.0, repetition_window=64)


def sample_token(
    logits: torch.Tensor, history: Sequence[int], params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Pick one token from ``[vocab]`` logits (float32), upstream's procedure.

    Top-k is taken on temperature-scaled log-probs and sampled with a softmax over the k
    survivors: the same distribution as upstream's multinomial over ``exp(logp / T)``, but it
    cannot underflow to all-zero weights at very low temperatures.
    """
    logits = logits.float()
    if params.repetition_penalty > 1.0 and len(history) > params.repetition_window:
        recent = torch.as_tensor(list(history[-params.repetition_window :]), device=logits.device, dtype=torch.long)
        recent = recent[(recent >= 0) & (recent < logits.shape[-1])]
        logits = logits.clone()
        scores = logits[recent]
        logits[recent] = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)
    logp = torch.log_softmax(logits, dim=-1)
    if params.temperature <= 1e-6:
        return int(torch.argmax(logp).item())
    logp = logp / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logp.shape[-1])
        top, idx = torch.topk(logp, k)
        pick = torch.multinomial(torch.softmax(top, dim=-1), 1, generator=generator)
        return int(idx[pick].item())
    return int(torch.multinomial(torch.softmax(logp, dim=-1), 1, generator=generator).item())


StopReason = Literal["text_eos", "audio_end", "max_new_tokens"]


@dataclass
class GenerationResult:
    """What one ``generate`` call produced.

    Attributes:
        text: decoded text answer (special and audio ids dropped).
        text_tokens: the text ids before the text EOS (raw, as sampled).
        text_logprobs: the model's log-probability of each of ``text_tokens`` (plain
            log-softmax of the text head: no temperature, no penalty), then of the EOS when
            one was produced.
        audio_tokens: int32 semantic codes (unshifted, 12.5 Hz) of the spoken answer.
        waveform: float32 24 kHz audio from the detokenizer, or None (text mode, no
            detokenizer, or no audio tokens).
        stop_reason: ``text_eos`` / ``audio_end`` / ``max_new_tokens``.
        prompt_length: positions in the prompt.
        steps: decoding steps run.
        seconds: wall time of prefill + decoding.
    """

    text: str
    text_tokens: list[int]
    text_logprobs: list[float]
    audio_tokens: np.ndarray
    waveform: np.ndarray | None
    stop_reason: StopReason
    prompt_length: int
    steps: int
    seconds: float = 0.0
    sample_rate: int = OUTPUT_SAMPLE_RATE
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def avg_logprob(self) -> float | None:
        """Mean of ``text_logprobs`` (Whisper's confidence signal); None if empty."""
        return float(np.mean(self.text_logprobs)) if self.text_logprobs else None


class KimiaGenerator:
    """Kimi-Audio LM + prompt builder + (lazily) a detokenizer.

    Args:
        lm: the loaded :class:`KimiaLM`.
        prompt_builder: lays out and validates messages.
        detokenizer: ``codes (int32, 12.5 Hz) -> 24 kHz float waveform``, or a zero-argument
            factory returning one (``lazy_detokenizer=True``). It is called only when
            ``output="both"`` produced audio tokens, so the text mode never loads it.
        lazy_detokenizer: treat ``detokenizer`` as a factory.
    """

    def __init__(
        self,
        lm: KimiaLM,
        prompt_builder: PromptBuilder,
        detokenizer: Detokenizer | Callable[[], Detokenizer] | None = None,
        *,
        lazy_detokenizer: bool = False,
    ) -> None:
        self.lm = lm
        self.prompts = prompt_builder
        self.ids = prompt_builder.ids
        self.tok = prompt_builder.tok
        self._detok_source = detokenizer
        self._detok_lazy = lazy_detokenizer
        self._detok: Detokenizer | None = None if lazy_detokenizer else detokenizer  # type: ignore[assignment]
        cfg = lm.config
        self.offset = int(cfg.kimia_token_offset)
        self.vocab_size = int(cfg.vocab_size)
        self.delay = int(cfg.kimia_mimo_audiodelaytokens)
        self.audio_end_ids = (self.ids.msg_end, self.ids.media_end)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        device: str | Sequence[str] = "cpu",
        dtype: torch.dtype | str = "auto",
        attn_implementation: str = "auto",
        audio_tokenizer: AudioTokenizer | None = None,
        feature_extractor: FeatureExtractor | None = None,
        detokenizer: Detokenizer | Callable[[], Detokenizer] | None = None,
        lazy_detokenizer: bool = False,
        max_audio_s: float | None = None,
    ) -> KimiaGenerator:
        """Load LM and text tokenizer from a Kimi-Audio directory; inject the audio models.

        ``dtype`` and ``attn_implementation`` default to ``"auto"`` (bf16 and flash-attn where
        the GPU and packages allow, else SDPA; fp32 on CPU): the pipeline's stages load through
        here, and a GPU run should not need a config key to get the fast kernels.
        """
        lm = KimiaLM.from_pretrained(model_dir, device=device, dtype=dtype, attn_implementation=attn_implementation)
        tok = KimiaTextTokenizer.from_dir(model_dir)
        cfg = lm.config
        builder = PromptBuilder(
            tok,
            token_offset=cfg.kimia_token_offset,
            num_audio_codes=cfg.vocab_size - cfg.kimia_token_offset,
            audio_delay=cfg.kimia_mimo_audiodelaytokens,
            audio_tokenizer=audio_tokenizer,
            feature_extractor=feature_extractor,
            max_audio_s=max_audio_s,
        )
        return cls(lm, builder, detokenizer, lazy_detokenizer=lazy_detokenizer)

    @property
    def detokenizer_loaded(self) -> bool:
        return self._detok is not None

    def _detokenizer(self) -> Detokenizer | None:
        if self._detok is None and self._detok_lazy and self._detok_source is not None:
            self._detok = self._detok_source()  # type: ignore[call-arg]
        return self._detok

    # -- public API ------------------------------------------------------------------------
    def generate(
        self,
        messages: list[dict[str, Any]],
        output: Literal["text", "both"] = "text",
        text_sampling: SamplingParams = TEXT_SAMPLING,
        audio_sampling: SamplingParams = AUDIO_SAMPLING,
        seed: int | None = 0,
        max_new_tokens: int = -1,
    ) -> GenerationResult:
        """Answer a conversation with text, or with text and speech.

        Args:
            messages: ``[{"role", "message_type", "content"}, ...]`` (see kimia_prompt).
            output: ``"text"`` (text answer; audio branch never run, detokenizer never
                loaded) or ``"both"`` (spoken answer with its text).
            text_sampling / audio_sampling: per-stream :class:`SamplingParams`.
            seed: fixes every random choice (same seed, same inputs, same device: same
                output). None draws a fresh seed.
            max_new_tokens: cap on decoding steps; -1 = upstream's limit for the mode.

        Raises:
            PromptError: invalid messages, or a prompt too long for the mode's limit.
        """
        prompt = self.prompts.build(messages, output=output)
        return self.generate_from_prompt(
            prompt, output=output, text_sampling=text_sampling, audio_sampling=audio_sampling, seed=seed,
            max_new_tokens=max_new_tokens,
        )  # fmt: skip

    def step_budget(self, prompt_length: int, output: str, max_new_tokens: int = -1) -> int:
        """New-token budget for a prompt of this length (upstream's limits, see module doc)."""
        total = BOTH_MAX_TOTAL if output == "both" else TEXT_MAX_TOTAL
        total = min(total, int(self.lm.config.max_position_embeddings))
        budget = total - prompt_length
        if budget <= 0:
            what = "spoken answers (120 s of 12.5 Hz tokens)" if output == "both" else "text answers"
            raise PromptError(
                f"prompt is {prompt_length} tokens; output={output!r} allows {total} positions in total for "
                f"{what}: shorten the audio or the conversation"
            )
        if max_new_tokens is not None and max_new_tokens > 0:
            budget = min(budget, int(max_new_tokens))
        return budget

    def generate_from_prompt(
        self,
        prompt: DualStreamPrompt,
        output: Literal["text", "both"] = "text",
        text_sampling: SamplingParams = TEXT_SAMPLING,
        audio_sampling: SamplingParams = AUDIO_SAMPLING,
        seed: int | None = 0,
        max_new_tokens: int = -1,
    ) -> GenerationResult:
        """The decoding loop on an already built prompt (see :meth:`generate`)."""
        state = _LoopState()
        for _ in self._steps(prompt, output, text_sampling, audio_sampling, seed, max_new_tokens, state):
            pass
        codes = state.codes(self.offset, self.vocab_size)
        waveform = None
        if output == "both" and codes.size:
            detok = self._detokenizer()
            if detok is not None:
                waveform = np.asarray(detok(codes), dtype=np.float32).reshape(-1)
        return GenerationResult(
            text=self.tok.decode([t for t in state.text_tokens if t < self.offset]),
            text_tokens=state.text_tokens,
            text_logprobs=state.text_logprobs,
            audio_tokens=codes,
            waveform=waveform,
            stop_reason=state.stop,
            prompt_length=len(prompt),
            steps=state.steps,
            seconds=state.seconds,
            extra={"text_history": state.text_hist, "audio_history": state.audio_hist},
        )

    def stream_audio_codes(
        self,
        messages: list[dict[str, Any]],
        audio_sampling: SamplingParams = AUDIO_SAMPLING,
        text_sampling: SamplingParams = TEXT_SAMPLING,
        seed: int | None = 0,
        max_new_tokens: int = -1,
    ) -> Iterator[int]:
        """Yield the spoken answer's semantic codes (unshifted) as they are sampled.

        Runs ``output="both"``; blanks, control ids and the closing end token are not
        yielded. Feed it to a streaming detokenizer to get audio while the LM still runs.
        """
        prompt = self.prompts.build(messages, output="both")
        state = _LoopState()
        for _text_tok, audio_tok in self._steps(
            prompt, "both", text_sampling, audio_sampling, seed, max_new_tokens, state
        ):
            if audio_tok is not None and self.offset <= audio_tok < self.vocab_size:
                yield audio_tok - self.offset

    def tts_token_generator(
        self,
        instruction: str = TTS_INSTRUCTION,
        audio_sampling: SamplingParams = AUDIO_SAMPLING,
        seed: int = 0,
        max_new_tokens: int = -1,
    ) -> Callable[[str, str], Iterator[int]]:
        """A ``(text, voice) -> codes`` callable for ``kimia_model.tts.KimiaTTS`` (one voice, "kimia").

        Upstream has no TTS mode (its issue #35); this prompts the model to read the text
        with ``instruction`` (``{text}`` is replaced) and streams the spoken answer's codes.
        """

        def generate(text: str, voice: str = "kimia") -> Iterator[int]:
            msgs = [{"role": "user", "message_type": "text", "content": instruction.format(text=text)}]
            return self.stream_audio_codes(msgs, audio_sampling=audio_sampling, seed=seed, max_new_tokens=max_new_tokens)

        return generate

    @torch.inference_mode()
    def _steps(
        self,
        prompt: DualStreamPrompt,
        output: str,
        text_sampling: SamplingParams,
        audio_sampling: SamplingParams,
        seed: int | None,
        max_new_tokens: int,
        state: _LoopState,
    ) -> Iterator[tuple[int | None, int | None]]:
        """Decode step by step; yield ``(text token or None, audio token or None)`` per step.

        None marks a slot the loop forced (blank after the text EOS / during the audio
        delay / in text mode). Results accumulate in ``state``.
        """
        if output not in ("text", "both"):
            raise PromptError(f"output must be 'text' or 'both', got {output!r}")
        t0 = time.perf_counter()
        budget = self.step_budget(len(prompt), output, max_new_tokens)
        want_audio = output == "both"
        dev = self.lm.device
        gen = torch.Generator(device=self.lm.lm_head.weight.device)
        gen.manual_seed(int(seed) if seed is not None else int(torch.seed() % (2**63)))

        audio_in = torch.as_tensor(prompt.audio_ids, device=dev).unsqueeze(0)
        text_in = torch.as_tensor(prompt.text_ids, device=dev).unsqueeze(0)
        feats = prompt.features_concat()
        whisper = [torch.as_tensor(feats)] if feats is not None else None
        mask = torch.as_tensor(prompt.continuous_mask, device=dev).unsqueeze(0) if feats is not None else None
        cache = KVCache()
        pos = len(prompt)
        ids = self.ids
        text_done = False
        out = self.lm(audio_in, text_in, whisper_features=whisper, continuous_mask=mask, cache=cache,
                      compute_audio=want_audio)  # fmt: skip
        for step in range(budget):
            state.steps = step + 1
            text_logits = out.text_logits[0, -1]
            sampled_text: int | None = None
            if text_done:
                text_tok = ids.text_blank
            else:
                text_tok = sampled_text = sample_token(text_logits, state.text_hist, text_sampling, gen)
                state.text_logprobs.append(float(torch.log_softmax(text_logits, dim=-1)[text_tok].item()))
                if text_tok == ids.text_eos:
                    text_done = True
                else:
                    state.text_tokens.append(text_tok)
            state.text_hist.append(text_tok)

            sampled_audio: int | None = None
            if want_audio and step >= self.delay:
                assert out.audio_logits is not None
                audio_tok = sampled_audio = sample_token(out.audio_logits[0, -1], state.audio_hist, audio_sampling, gen)
                state.audio_tokens.append(audio_tok)
            else:
                audio_tok = ids.text_blank  # text leads: audio stays blank for the delay
            state.audio_hist.append(audio_tok)
            state.seconds = time.perf_counter() - t0
            yield sampled_text, sampled_audio

            if output == "text" and text_done:
                state.stop = "text_eos"
                break
            if want_audio and audio_tok in self.audio_end_ids:
                state.stop = "audio_end"
                break
            if step + 1 == budget:
                break
            out = self.lm(
                torch.tensor([[audio_tok]], device=dev),
                torch.tensor([[text_tok]], device=dev),
                position_ids=torch.tensor([[pos]], device=dev),
                cache=cache,
                compute_audio=want_audio,
            )
            pos += 1
        state.seconds = time.perf_counter() - t0


@dataclass
class _LoopState:
    """What the decoding loop accumulates (shared by the batch and streaming entry points)."""

    text_hist: list[int] = field(default_factory=list)
    audio_hist: list[int] = field(default_factory=list)
    text_tokens: list[int] = field(default_factory=list)
    text_logprobs: list[float] = field(default_factory=list)
    audio_tokens: list[int] = field(default_factory=list)
    stop: StopReason = "max_new_tokens"
    steps: int = 0
    seconds: float = 0.0

    def codes(self, offset: int, vocab_size: int) -> np.ndarray:
        """Sampled audio ids that are semantic codes, unshifted (upstream's filter)."""
        return np.asarray([t - offset for t in self.audio_tokens if offset <= t < vocab_size], dtype=np.int32)

"""How well a transcript explains a segment's own audio, measured with Whisper weights.

Speaking a label with a TTS and re-hearing it only shows that the label is speakable; it
cannot tell a fluent but wrong label (another segment's text, shuffled words) from the right
one. Scoring the label *on the segment's audio* can. One CTranslate2 Whisper pass per segment:

1. **teacher-forced scoring** (``generate`` with the label as a forced prefix and
   ``return_logits_vocab``): the log-probability of every label token given the audio and the
   tokens before it, over the full vocabulary, and then the probability that the transcript
   *ends* there (``eot_logprob``) and what the model would say next (``continuation``). Another
   segment's text or shuffled words get low token log-probs; a truncated label gets a low
   end-of-text probability and a continuation holding the missing words; a hallucinated repeat
   gets low log-probs where the audio does not repeat.
2. optionally, **free decoding** of the same encoder output (greedy): the recognizer's own
   transcript, to score against the label as WER (a word-level view of the same evidence, and
   a noisier one: a correct label the recognizer mishears a word of fails it).

The label is tokenized with openai-whisper's tiktoken tokenizer (the ids the model was
trained on). The ``tokenizer.json`` shipped with the packaged CTranslate2 Whisper base lacks
GPT-2's first BPE merge (``Ġ t``), so ``tokenizers`` encodes " to", " the", ... as a bare
space plus the word: decoding is unaffected, but forced scoring of such ids would see a
token sequence Whisper never produces and score it at about -12.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Whisper's decoder context; forced prefix + continuation must fit in half of it (CTranslate2
#: caps a generation at max_length / 2 steps).
MAX_DECODER_LENGTH = 448


@dataclass(frozen=True)
class LabelScore:
    """Measurements of one label on one segment's audio (log-probs are natural logs)."""

    n_tokens: int
    #: Mean log-probability of the label's tokens, teacher-forced on the audio.
    mean_logprob: float
    #: Lowest sum of log-probabilities over ``window`` consecutive label tokens: a burst of
    #: words the audio does not hold (a repeated phrase, an insertion); one misheard word is a
    #: single dip, a repeat a run of them.
    window_logprob: float
    #: log P(end of text | audio, whole label): low when the audio goes on after the label.
    eot_logprob: float
    #: Greedy continuation after the forced label (empty when the model stops there).
    continuation: str
    #: The recognizer's own greedy transcript of the audio (None unless asked for).
    hypothesis: str | None = None


@functools.lru_cache(maxsize=16)
def _tokenizer(multilingual: bool, num_languages: int, language: str | None) -> Any:
    from whisper.tokenizer import get_tokenizer

    return get_tokenizer(multilingual, num_languages=num_languages, language=language if multilingual else None,
                         task="transcribe")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


class WhisperLabelScorer:
    """Scores labels on audio with the model of a ``stages.transcribe.FasterWhisperBackend``.

    Args:
        backend: a loaded faster-whisper backend (its CTranslate2 model and feature extractor
            are shared, nothing is loaded twice).
        window: consecutive tokens summed for ``window_logprob``.
        continuation_tokens: greedy tokens decoded after the forced label.
        redecode: also decode the audio freely (``hypothesis``), one more decoder pass.
        max_hyp_tokens: longest free transcript.
    """

    def __init__(self, backend: Any, *, window: int = 3, continuation_tokens: int = 6, redecode: bool = False,
                 max_hyp_tokens: int = 160) -> None:
        self.backend = backend
        self.model = backend.model
        self.window = int(window)
        self.redecode = bool(redecode)
        self.continuation_tokens = int(continuation_tokens)
        self.max_hyp_tokens = int(max_hyp_tokens)
        self.multilingual = bool(self.model.is_multilingual)
        self.num_languages = int(getattr(self.model, "num_languages", 99) or 99)

    def tokenizer(self, language: str) -> Any:
        return _tokenizer(self.multilingual, self.num_languages, language)

    def max_label_tokens(self) -> int:
        """Longest label (in tokens) the forced pass can score."""
        return MAX_DECODER_LENGTH // 2 - 4 - self.continuation_tokens - 1

    def encode(self, label: str, language: str = "en") -> list[int]:
        return list(self.tokenizer(language).encode(" " + label.strip()))

    def score(self, audios_16k: list[np.ndarray], labels: list[str], language: str = "en") -> list[LabelScore]:
        """Score each label on its audio (16 kHz mono, at most 30 s: longer audio is cut).

        Raises:
            ValueError: a label has no tokens or more than :meth:`max_label_tokens`.
        """
        if len(audios_16k) != len(labels):
            raise ValueError(f"{len(audios_16k)} audios for {len(labels)} labels")
        if not labels:
            return []
        tok = self.tokenizer(language)
        b = self.backend
        label_ids = [self.encode(t, language) for t in labels]
        for t, ids in zip(labels, label_ids):
            if not ids or len(ids) > self.max_label_tokens():
                raise ValueError(f"label has {len(ids)} tokens (1..{self.max_label_tokens()} can be scored): {t[:60]!r}")
        # The same array passed for several labels (a benchmark scoring variants of one clip)
        # is encoded once.
        first: dict[int, int] = {}
        for a in audios_16k:
            first.setdefault(id(a), len(first))
        uniq = {v: a for a in audios_16k for k, v in [(id(a), first[id(a)])]}
        mels = [b._mel(np.asarray(uniq[i], np.float32)[: 30 * 16000], b.n_frames) for i in range(len(uniq))]
        if len(uniq) == len(audios_16k):
            encoded = self.model.encode(b._storage(mels), to_cpu=False)
        else:
            enc = np.asarray(self.model.encode(b._storage(mels), to_cpu=True))
            encoded = b._storage([enc[first[id(a)]] for a in audios_16k])
        start = [*tok.sot_sequence, tok.no_timestamps]

        free: list[Any] = [None] * len(labels)
        if self.redecode:
            free = self.model.generate(encoded, [start] * len(labels), beam_size=1,
                                       max_length=2 * (len(start) + self.max_hyp_tokens),
                                       suppress_blank=True, suppress_tokens=[-1])
        longest = max(len(ids) for ids in label_ids)
        forced = self.model.generate(
            encoded, [start + ids for ids in label_ids], beam_size=1,
            max_length=min(MAX_DECODER_LENGTH, 2 * (len(start) + longest + self.continuation_tokens + 1)),
            return_logits_vocab=True, suppress_blank=False, suppress_tokens=[],
        )
        out = []
        for ids, fr, fo in zip(label_ids, free, forced):
            logits = fo.logits[0] if fo.logits else []
            steps = [_log_softmax(np.asarray(v)) for v in logits[: len(ids) + 1]]
            if len(steps) < len(ids) + 1:  # should not happen: the budget above covers the label + 1
                raise RuntimeError(f"forced decoding returned {len(steps)} steps for {len(ids)} label tokens")
            lp = np.array([steps[k][t] for k, t in enumerate(ids)])
            cont = [t for t in fo.sequences_ids[0][len(ids):] if t < tok.eot]
            w = min(self.window, len(lp))
            windows = np.convolve(lp, np.ones(w), mode="valid")
            out.append(LabelScore(
                n_tokens=len(ids),
                mean_logprob=float(lp.mean()),
                window_logprob=float(windows.min()),
                eot_logprob=float(steps[len(ids)][tok.eot]),
                continuation=tok.decode(cont).strip(),
                hypothesis=None if fr is None else tok.decode([t for t in fr.sequences_ids[0] if t < tok.eot]).strip(),
            ))
        return out

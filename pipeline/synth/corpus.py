"""Synthetic speech from text, kept only when it survives the round-trip check.

Kimi-Audio built its conversation SFT data by speaking text with TTS voices; a synthetic
sample is only worth training on when the speech really says its text. This module speaks
each line of a JSONL file with a choice of voices, recognizes the result with an ASR, and
yields recording-like rows (audio + transcript + round-trip scores) for the samples whose
WER is within the threshold. The lead's ``kimia-curate synth --texts texts.jsonl`` writes the
rows to shards in the usual format.

Input lines: ``{"text": "...", "id": "optional", "language": "en", "voice": "optional"}``.
A line without ``voice`` gets the next voice of ``voices`` in turn, so a corpus is spread
over all of them; ``per_text="each"`` speaks every text with every voice instead.

Example:
    >>> from kimia_model.tts import EspeakTTS
    >>> stats = SynthStats()
    >>> rows = list(synthesize_corpus(Path("texts.jsonl"), ["en-us", "en+f3"], EspeakTTS(), asr, 0.3,
    ...                               stats=stats))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kimia_model.tts import TTSBackend, TTSError
from stages.roundtrip import AsrLike, normalize_text, score
from stages.textnorm import primary_metric
from stages.rows import recording_id


@dataclass
class SynthStats:
    """What happened to every input line (nothing is dropped silently)."""

    lines: int = 0
    attempted: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    errors: list[str] = field(default_factory=list)  # first few bad lines, for the run summary

    def drop(self, reason: str, detail: str | None = None) -> None:
        self.dropped[reason] += 1
        if detail and len(self.errors) < 20:
            self.errors.append(detail)


def _read_texts(path: Path, stats: SynthStats) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            stats.lines += 1
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                stats.drop("bad_json", f"{path}:{n}: {exc.msg}")
                continue
            if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
                stats.drop("no_text", f"{path}:{n}: needs a non-empty string 'text'")
                continue
            item.setdefault("id", f"{path.stem}-{n:06d}")
            yield item


def synthesize_corpus(texts_jsonl: Path, voices: list[str], backend: TTSBackend, asr: AsrLike,
                      threshold: float = 0.3, *, per_text: Literal["cycle", "each"] = "cycle",
                      batch_size: int = 8, stats: SynthStats | None = None) -> Iterator[dict[str, Any]]:
    """Speak each text, recognize it, and yield the samples whose WER <= ``threshold``.

    Args:
        texts_jsonl: one JSON object per line with at least ``text``.
        voices: backend voice names (espeak-ng: en-us, en+f3, en+m7, en-gb+f2, ...).
        backend: a TTS backend (``kimia_model.tts``).
        asr: anything with ``transcribe(audios, sample_rate) -> [{"text": ...}]``.
        threshold: the largest WER a kept sample may have (CER for languages written without
            spaces, ``stages.textnorm.UNSPACED_LANGUAGES``).
        per_text: ``cycle`` = one voice per text in turn; ``each`` = every voice for every text.
        batch_size: clips per ASR call.
        stats: filled with counts of kept and dropped samples by reason.

    Yields:
        Recording rows: ``recording_id``, ``source``, ``status``, ``sample_rate``, ``duration_s``,
        ``audio`` (float32 mono), ``text``, ``language``, ``speaker`` (the voice),
        ``source_meta`` and the round-trip fields (``rt_wer``, ``rt_cer``, ``rt_text``, ...).
    """
    if not voices:
        raise ValueError("synthesize_corpus needs at least one voice")
    if threshold < 0:
        raise ValueError("threshold must be >= 0")
    stats = stats if stats is not None else SynthStats()
    pending: list[dict[str, Any]] = []
    turn = 0

    def flush() -> Iterator[dict[str, Any]]:
        by_rate: dict[int, list[dict[str, Any]]] = {}
        for row in pending:
            by_rate.setdefault(row["sample_rate"], []).append(row)
        for sr, rows in by_rate.items():
            results = asr.transcribe([r["audio"] for r in rows], sr)
            for row, res in zip(rows, results):
                hyp = str(res.get("text") or "")
                s = score(row["text"], hyp, row["language"])
                # Languages written without spaces are judged by CER: their "words" are a tokenizer's.
                metric = primary_metric(row["language"])
                row.update(rt_mode="label", rt_text=hyp.strip(), rt_wer=round(s["wer"], 4),
                           rt_cer=round(s["cer"], 4), rt_pass=s[metric] <= threshold,
                           rt_max_wer=threshold if metric == "wer" else None,
                           rt_max_cer=threshold if metric == "cer" else None)
                if row["rt_pass"]:
                    stats.kept += 1
                    yield row
                else:
                    stats.drop(f"roundtrip_{metric}>{threshold:g}")
        pending.clear()

    for item in _read_texts(Path(texts_jsonl), stats):
        language = str(item.get("language") or "en")
        if not normalize_text(item["text"], language):
            stats.drop("roundtrip_no_words", f"{item['id']}: no words after normalisation")
            continue
        if item.get("voice"):
            chosen = [str(item["voice"])]
        elif per_text == "each":
            chosen = list(voices)
        else:
            chosen = [voices[turn % len(voices)]]
            turn += 1
        for voice in chosen:
            stats.attempted += 1
            try:
                audio, sr = backend.synthesize(item["text"], voice)
            except TTSError as exc:
                stats.drop("roundtrip_tts_failed", f"{item['id']} ({voice}): {exc}")
                continue
            uri = f"synth://{backend.name}/{voice}/{item['id']}"
            digest = hashlib.sha256(np.ascontiguousarray(audio).tobytes()).hexdigest()
            pending.append({
                "recording_id": recording_id(uri, digest),
                "source": uri,
                "status": "ok",
                "sample_rate": int(sr),
                "duration_s": audio.size / sr,
                "audio": audio.astype(np.float32, copy=False),
                "text": item["text"].strip(),
                "language": language,
                "speaker": voice,
                "source_meta": {k: v for k, v in item.items() if k != "text"} | {"tts": backend.name},
            })
            if len(pending) >= batch_size:
                yield from flush()
    if pending:
        yield from flush()

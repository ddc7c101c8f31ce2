"""Export a run's shards as Kimi-Audio fine-tuning data (``kimia-curate export kimi-audio``).

Kimi-Audio's ``finetune_codes`` read a JSONL file, one sample per line (the layout
of its fine-tuning data)::

    {"task_type": "understanding",
     "conversation": [
       {"role": "user", "message_type": "text", "content": "Please transcribe the spoken content into written text."},
       {"role": "user", "message_type": "audio", "content": "/abs/audio/<key>.flac",
        "audio_tokens": [152064 + code, ...]},
       {"role": "assistant", "message_type": "text", "content": "<transcript>"}]}

``audio_tokens`` is what their ``extract_semantic_codes.py`` would add: GLM codes shifted by the
audio token offset 152064, one per 80 ms; our shards already hold the unshifted codes
(``tokens.npy``), so no GPU pass is needed. The waveform still has to exist as a file because
the fine-tuning model computes its continuous Whisper features from the raw 16 kHz audio, so
each sample's FLAC is written next to the JSONL.

Every line is validated before it is written (schema, roles, token range, file present, token
count equal to ``ceil(samples_16k / 1280)`` of the written audio); a sample that fails is left
out and counted under its reason, never written half-right. Before anything is written, the
tokenizer recorded in every sample's provenance is checked against the one asked for.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from stages.tokenize import tokenizer_matches
from stages.write.layout import KEPT, OutLayout

#: ``kimia_token_offset``: LLM id of GLM code 0 (the text vocabulary of Kimi-Audio's Qwen2.5 LM ends below it).
AUDIO_TOKEN_OFFSET = 152064
#: GLM-4-Voice codebook size; shifted ids must stay below offset + this.
AUDIO_VOCAB = 16384
ASR_INSTRUCTION = "Please transcribe the spoken content into written text."
ROLES = ("user", "assistant")
MESSAGE_TYPES = ("text", "audio", "audio-text")
#: task -> Kimi-Audio task_type ("understanding" makes the model answer in text only).
TASKS = {"asr": "understanding"}


def _expected_tokens(path: Path) -> int:
    from kimia_model.whisper_vq.timing import SAMPLE_RATE, token_count

    info = sf.info(str(path))
    return token_count(int(round(info.frames * SAMPLE_RATE / info.samplerate)))


def validate_line(obj: dict[str, Any], *, check_files: bool = True) -> None:
    """Raise ``ValueError`` unless ``obj`` is a line Kimi-Audio's fine-tuning code can read."""
    if not isinstance(obj, dict):
        raise ValueError("line is not an object")
    if not isinstance(obj.get("task_type"), str) or not obj["task_type"]:
        raise ValueError("task_type must be a non-empty string")
    conv = obj.get("conversation")
    if not isinstance(conv, list) or not conv:
        raise ValueError("conversation must be a non-empty list")
    n_audio = 0
    for i, msg in enumerate(conv):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i} is not an object")
        if msg.get("role") not in ROLES:
            raise ValueError(f"message {i}: role {msg.get('role')!r} not in {ROLES}")
        mtype = msg.get("message_type")
        if mtype not in MESSAGE_TYPES:
            raise ValueError(f"message {i}: message_type {mtype!r} not in {MESSAGE_TYPES}")
        content = msg.get("content")
        if mtype == "text" and (not isinstance(content, str) or not content.strip()):
            raise ValueError(f"message {i}: text content must be a non-empty string")
        if mtype == "audio":
            n_audio += 1
            if msg["role"] != "user":
                raise ValueError(f"message {i}: audio messages must come from the user")
            if not isinstance(content, str) or not content:
                raise ValueError(f"message {i}: audio content must be a file path")
            toks = msg.get("audio_tokens")
            if not isinstance(toks, list) or not toks or not all(type(t) is int for t in toks):
                raise ValueError(f"message {i}: audio_tokens must be a non-empty list of ints")
            lo, hi = min(toks), max(toks)
            if lo < AUDIO_TOKEN_OFFSET or hi >= AUDIO_TOKEN_OFFSET + AUDIO_VOCAB:
                raise ValueError(
                    f"message {i}: audio_tokens outside [{AUDIO_TOKEN_OFFSET}, {AUDIO_TOKEN_OFFSET + AUDIO_VOCAB})"
                )
            if check_files:
                p = Path(content)
                if not p.is_file():
                    raise ValueError(f"message {i}: audio file {p} does not exist")
                want = _expected_tokens(p)
                if want != len(toks):
                    raise ValueError(f"message {i}: {len(toks)} audio_tokens but the audio needs {want}")
    if n_audio != 1:
        # Kimi-Audio uses only the first audio of a sample for Whisper features (upstream #92/#123).
        raise ValueError(f"{n_audio} audio messages; Kimi-Audio fine-tuning supports exactly one per sample")
    if obj["task_type"] == "understanding":
        last = conv[-1]
        if last["role"] != "assistant" or last["message_type"] != "text":
            raise ValueError("an understanding sample must end with the assistant's text answer")
    json.dumps(obj, ensure_ascii=False)  # must serialise (no numpy scalars)


def committed_shards(run_dir: Path) -> list[dict[str, Any]]:
    """The kept shards an export reads: those the run's ledger commits, never a shard in flight."""
    return OutLayout(run_dir).committed_shards(KEPT)


def iter_shard_samples(run_dir: Path) -> Iterator[tuple[str, str, dict[str, bytes]]]:
    """``(shard name, key, {member: bytes})`` for every committed sample of ``run_dir``, in order."""
    layout = OutLayout(run_dir)
    shards = committed_shards(run_dir)
    if not shards:
        raise FileNotFoundError(f"no committed shards in {run_dir} (is it a kimia-curate output?)")
    for shard in shards:
        for key, members in layout.iter_samples(shard):
            yield shard["name"], key, members


class TokenizerMismatchError(ValueError):
    """The run's tokens came from another tokenizer than the one the export was asked for."""


def tokenizer_counts(run_dir: Path) -> dict[str, int]:
    """``{provenance.tokenize.model: samples}`` over the committed samples that carry ``tokens.npy``.

    Read from the shards' Parquet index (members and provenance of every sample), so it costs
    nothing next to the export itself. Samples tokenized with no recorded provenance count as
    ``"<unknown>"``.
    """
    layout = OutLayout(run_dir)
    counts: dict[str, int] = {}
    for shard in committed_shards(run_dir):
        columns = [c for c in ("members", "provenance") if c in layout.index_columns(shard)]
        table = layout.read_index(shard, columns).to_pylist()
        for row in table:
            if "tokens.npy" not in (row.get("members") or []):
                continue
            try:
                prov = json.loads(row.get("provenance") or "{}") or {}
            except (TypeError, ValueError):
                prov = {}
            model = (prov.get("tokenize") or {}).get("model") or "<unknown>"
            counts[model] = counts.get(model, 0) + 1
    return counts


def check_tokenizer(run_dir: Path, requested: str) -> dict[str, int]:
    """Raise :class:`TokenizerMismatchError` (one line) unless every tokenized sample matches.

    Returns:
        The per-tokenizer sample counts of the run.
    """
    counts = tokenizer_counts(run_dir)
    other = {m: n for m, n in counts.items() if not tokenizer_matches(m, requested)}
    if other:
        found = ", ".join(f"{m} ({n} samples)" for m, n in sorted(other.items(), key=lambda kv: -kv[1]))
        raise TokenizerMismatchError(
            f"{run_dir}: tokens come from {found}, not the requested tokenizer {requested}; "
            "export with --tokenizer set to the run's tokenizer (or the --config it ran with), or re-run into a new OUT"
        )
    return counts


def export_kimi_audio(
    out_dir_of_run: Path,
    dest: Path,
    task: str = "asr",
    *,
    instruction: str = ASR_INSTRUCTION,
    lowercase: bool = False,
    audio_member: str = "audio.flac",
    relative_paths: bool = False,
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Write ``dest/data.jsonl`` and ``dest/audio/<key>.flac`` from a run's shards.

    Args:
        out_dir_of_run: the run's OUT directory (holds ``shards/``).
        dest: export directory (created).
        task: ``"asr"`` (Kimi-Audio's fine-tuning code supports understanding tasks out of the box).
        instruction: the user's text instruction before the audio.
        lowercase: lower-case transcripts (Kimi's LibriSpeech recipe does).
        audio_member: shard member to export (``audio.flac`` or ``enhanced.flac``).
        relative_paths: write audio paths relative to ``dest`` instead of absolute (then run the
            fine-tuning from ``dest``; it opens paths as given).
        tokenizer: the tokenizer id the training expects (``provenance.tokenize.model`` form,
            see :func:`stages.tokenize.tokenizer_matches`); checked against every tokenized sample before
            anything is written. None skips the check.

    Raises:
        TokenizerMismatchError: some samples were tokenized by another tokenizer.

    Returns:
        ``{"jsonl", "written", "skipped": {reason: n}, "errors" (first 20 messages), "seconds",
        "tokens", "token_rate_hz", "tokenizers": {tokenizer id: samples}}``.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} not supported; choose from {sorted(TASKS)}")
    run = Path(out_dir_of_run)
    dest = Path(dest)
    tokenizers = check_tokenizer(run, tokenizer) if tokenizer is not None else tokenizer_counts(run)
    audio_dir = dest / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    jsonl = dest / "data.jsonl"
    tmp = dest / f".data.jsonl.tmp{os.getpid()}"
    skipped: dict[str, int] = {}
    errors: list[str] = []
    written = 0
    seconds = 0.0
    n_tokens = 0

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    with open(tmp, "w", encoding="utf-8") as out:
        for _shard, key, members in iter_shard_samples(run):
            if "json" not in members:
                skip("no_json")
                continue
            meta = json.loads(members["json"])
            if meta.get("verdict", "keep") != "keep":
                skip("not_kept")
                continue
            text = (meta.get("text") or "").strip()
            if not text:
                skip("empty_text")
                continue
            if "tokens.npy" not in members:
                skip("no_tokens")
                continue
            if audio_member not in members:
                skip(f"no_{audio_member}")
                continue
            tokens = np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False)
            if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
                skip("bad_tokens")
                continue
            wav_path = audio_dir / f"{key}.flac"
            wav_path.write_bytes(members[audio_member])
            content = os.path.relpath(wav_path, dest) if relative_paths else str(wav_path.resolve())
            line = {
                "id": key,
                "task_type": TASKS[task],
                "conversation": [
                    {"role": "user", "message_type": "text", "content": instruction},
                    {
                        "role": "user",
                        "message_type": "audio",
                        "content": content,
                        "audio_tokens": [int(t) + AUDIO_TOKEN_OFFSET for t in tokens.tolist()],
                    },
                    {"role": "assistant", "message_type": "text", "content": text.lower() if lowercase else text},
                ],
            }
            try:
                if relative_paths:
                    # Validate against the real file, then keep the relative path in the line.
                    probe = json.loads(json.dumps(line))
                    probe["conversation"][1]["content"] = str(wav_path)
                    validate_line(probe)
                else:
                    validate_line(line)
            except ValueError as exc:
                wav_path.unlink(missing_ok=True)
                skip("invalid_token_count" if "audio needs" in str(exc) else "invalid_line")
                if len(errors) < 20:
                    errors.append(f"{key}: {exc}")
                continue
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            written += 1
            n_tokens += len(tokens)
            seconds += float(meta.get("duration_s") or 0.0)
    os.replace(tmp, jsonl)
    return {
        "jsonl": str(jsonl),
        "written": written,
        "skipped": skipped,
        "errors": errors,
        "seconds": seconds,
        "tokens": n_tokens,
        "token_rate_hz": n_tokens / seconds if seconds > 0 else math.nan,
        "tokenizers": tokenizers,
    }

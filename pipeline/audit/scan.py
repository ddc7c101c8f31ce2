"""Scan one shard: verify it sample by sample and return mergeable aggregates.

A scan streams the tar once (``tarfile`` stream mode, one sample in memory at a time) while
hashing its bytes, so a shard is read exactly once whatever its size, and the work unit is
small enough to ship to a Ray task. It returns only aggregates (see ``agg.py``), bounded
finding lists and three arrays of 64-bit hashes (keys, recordings, audio fingerprints) that
the driver needs for run-wide duplicate checks: 24 bytes per sample rather than the sample.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from pipeline.audit.agg import Example, SetAggregate, TopK
from stages.quality import audio_fingerprint
from stages.rows import finite_or_none

#: Semantic tokens per second (GLM-4-Voice Whisper-VQ: one token per 1280 samples at 16 kHz).
TOKEN_RATE_HZ = 12.5
#: Allowed difference between the token count and 12.5 x duration: one token of framing.
TOKEN_TOLERANCE = 1.0
#: Decoded audio may differ from duration_s by this much (seconds) before it is a finding.
DURATION_TOLERANCE_S = 0.01
#: Detailed findings kept per shard (all are counted).
MAX_FINDINGS_PER_SHARD = 50

CHECKS = (
    "manifest",
    "shard_sha256",
    "shard_readable",
    "sample_count",
    "decode",
    "duration",
    "tokens_rate",
    "transcript",
    "audio_fingerprint",
    "duplicate_keys",
    "index_match",
    "verdict_consistency",
    "recording_contiguity",
    "duplicate_audio",
)

#: Index columns compared with the shard's json (a hand-edited shard shows up here even when
#: no manifest hash exists).
_COMPARED = (
    "recording_id",
    "segment_index",
    "start_s",
    "end_s",
    "duration_s",
    "sample_rate",
    "speaker",
    "text",
    "language",
    "verdict",
    "snr_db",
    "dnsmos_ovrl",
    "audio_fp",
)


@dataclass(frozen=True)
class ScanOptions:
    """What the run's config says must be present in every kept sample."""

    require_transcript: bool = False
    require_tokens: bool = False
    worst_k: int = 3


@dataclass
class ShardResult:
    """What a scan returns to the driver (small; no audio)."""

    set_name: str
    shard: str
    pid: int = field(default_factory=os.getpid)  # which process scanned it (Ray worker or here)
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    agg: SetAggregate = field(default_factory=SetAggregate)
    topk: TopK = field(default_factory=lambda: TopK(3))
    findings: list[dict[str, Any]] = field(default_factory=list)
    finding_counts: Counter = field(default_factory=Counter)
    checked: Counter = field(default_factory=Counter)  # check -> items examined
    key_hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    rec_hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    fp_hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    def find(self, check: str, detail: str, key: str | None = None) -> None:
        self.finding_counts[check] += 1
        if len(self.findings) < MAX_FINDINGS_PER_SHARD:
            self.findings.append(
                {"check": check, "set": self.set_name, "shard": self.shard, "key": key, "detail": detail}
            )


def h64(text: str) -> int:
    """A 64-bit hash of a string (collisions at 10 M items: ~3e-6)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = self._raw.readinto(buf)
        if n:
            self.sha.update(memoryview(buf)[:n])
            self.nbytes += n
        return n or 0

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _as_dict(value: Any) -> dict[str, Any] | None:
    """A nested field as a dict: the index stores it as a JSON string, the sample JSON as an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def source_group(meta: dict[str, Any]) -> str:
    """The per-source breakdown's row: a dataset name from the manifest line, else the folder."""
    sm = _as_dict(meta.get("source_meta"))
    if sm:
        for k in ("dataset", "corpus", "source_name", "collection"):
            if sm.get(k):
                return str(sm[k])
    src = str(meta.get("source") or "")
    if not src:
        return "(unknown)"
    path = urlparse(src).path if "://" in src else src
    parent = str(Path(path).parent)
    return parent if parent not in ("", ".") else path


_num = finite_or_none


def _same(a: Any, b: Any) -> bool:
    """Index value vs json value, tolerant of float formatting and Arrow/JSON type drift."""
    if a is None or b is None:
        return (a is None or (isinstance(a, float) and math.isnan(a))) and (
            b is None or (isinstance(b, float) and math.isnan(b))
        )
    fa, fb = _num(a), _num(b)
    if fa is not None and fb is not None and not isinstance(a, str) and not isinstance(b, str):
        return math.isclose(fa, fb, rel_tol=1e-6, abs_tol=1e-6)
    return str(a) == str(b)


def _load_index(path: Path, res: ShardResult) -> dict[str, dict[str, Any]] | None:
    import pyarrow.parquet as pq

    if not path.exists():
        res.find("index_match", f"index file {path.name} is missing")
        return None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - any parquet failure is a finding
        res.find("index_match", f"index file {path.name} is unreadable: {exc}")
        return None
    wanted = [c for c in ("key", "shard", "members", *_COMPARED) if c in table.column_names]
    rows: dict[str, dict[str, Any]] = {}
    for row in table.select(wanted).to_pylist():
        key = str(row.get("key"))
        if key in rows:
            res.find("duplicate_keys", f"key appears twice in {path.name}", key)
        rows[key] = row
    return rows


def scan_shard(
    tar_path: str | Path,
    index_path: str | Path,
    set_name: str,
    options: ScanOptions = ScanOptions(),
) -> ShardResult:
    """Verify one shard against its index and measure its samples.

    Args:
        tar_path: ``OUT[/dropped]/shards/shard-NNNNNN.tar``.
        index_path: the matching ``index/shard-NNNNNN.parquet``.
        set_name: ``"kept"`` or ``"dropped"`` (which verdict every sample must carry).
        options: what the run requires of every sample.

    Returns:
        A :class:`ShardResult`; never raises for a damaged shard (damage is a finding).
    """
    import soundfile as sf

    tar_path, index_path = Path(tar_path), Path(index_path)
    res = ShardResult(set_name=set_name, shard=tar_path.name, topk=TopK(options.worst_k))
    index = _load_index(index_path, res)
    seen_keys: set[str] = set()
    key_hashes: list[int] = []
    fp_hashes: list[int] = []
    rec_speakers: dict[str, set[str]] = defaultdict(set)

    def check_sample(key: str, members: dict[str, bytes]) -> None:
        res.samples += 1
        key_hashes.append(h64(key))
        if key in seen_keys:
            res.find("duplicate_keys", "key appears twice in the shard", key)
        seen_keys.add(key)
        res.checked["decode"] += 1
        meta: dict[str, Any] = {}
        if "json" not in members:
            res.find("decode", "sample has no json member", key)
        else:
            try:
                meta = json.loads(members["json"])
                if not isinstance(meta, dict):
                    raise ValueError("json is not an object")
            except ValueError as exc:
                res.find("decode", f"json does not parse: {exc}", key)
                meta = {}
        frames, sr = None, None
        fp = meta.get("audio_fp") if isinstance(meta.get("audio_fp"), str) else None
        fp_matches: bool | None = None
        if "audio.flac" not in members:
            res.find("decode", "sample has no audio.flac", key)
        else:
            try:
                audio, sr = sf.read(io.BytesIO(members["audio.flac"]), dtype="float32", always_2d=True)
                frames = audio.shape[0]
                if frames == 0:
                    res.find("decode", "audio.flac decodes to zero samples", key)
                if fp and audio.shape[1] == 1:
                    fp_matches = audio_fingerprint(audio[:, 0], int(sr)) == fp
            except Exception as exc:  # noqa: BLE001
                res.find("decode", f"audio.flac does not decode: {exc}", key)
        if "enhanced.flac" in members:
            try:
                enhanced, esr = sf.read(io.BytesIO(members["enhanced.flac"]), dtype="float32", always_2d=True)
                if fp and not fp_matches and enhanced.shape[1] == 1:  # quality may measure the enhanced audio
                    fp_matches = audio_fingerprint(enhanced[:, 0], int(esr)) == fp
            except Exception as exc:  # noqa: BLE001
                res.find("decode", f"enhanced.flac does not decode: {exc}", key)
        if fp and fp_matches is not None:
            # The quality stage hashed exactly the 16-bit samples the FLAC holds, so a mismatch
            # means the audio changed after the run measured it.
            res.checked["audio_fingerprint"] += 1
            if not fp_matches:
                res.find("audio_fingerprint", "audio.flac does not match the audio_fp that quality measured", key)

        duration = _num(meta.get("duration_s"))
        if frames and sr:
            res.checked["duration"] += 1
            audio_s = frames / sr
            if duration is None:
                res.find("duration", "json has no duration_s", key)
                duration = audio_s
            elif abs(audio_s - duration) > DURATION_TOLERANCE_S:
                res.find("duration", f"audio is {audio_s:.3f} s but duration_s says {duration:.3f} s", key)
            if meta.get("sample_rate") not in (None, sr):
                res.find("duration", f"audio.flac is {sr} Hz but sample_rate says {meta.get('sample_rate')}", key)

        n_tokens = None
        if "tokens.npy" in members:
            res.checked["tokens_rate"] += 1
            try:
                tokens = np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False)
                if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
                    raise ValueError(f"expected 1-D integer tokens, got {tokens.dtype} {tokens.shape}")
                n_tokens = int(tokens.shape[0])
            except Exception as exc:  # noqa: BLE001
                res.find("decode", f"tokens.npy does not load: {exc}", key)
            if n_tokens is not None and duration:
                expected = TOKEN_RATE_HZ * duration
                if abs(n_tokens - expected) > TOKEN_TOLERANCE:
                    res.find(
                        "tokens_rate",
                        f"{n_tokens} tokens for {duration:.3f} s ({n_tokens / duration:.2f}/s); expected "
                        f"{expected:.1f} +/- {TOKEN_TOLERANCE:g}",
                        key,
                    )
                if "whisper.npy" in members:
                    try:
                        feats = np.load(io.BytesIO(members["whisper.npy"]), allow_pickle=False)
                        if feats.ndim != 2 or feats.shape[0] != n_tokens:
                            res.find("decode", f"whisper.npy shape {feats.shape} does not match {n_tokens} tokens", key)
                    except Exception as exc:  # noqa: BLE001
                        res.find("decode", f"whisper.npy does not load: {exc}", key)
        elif options.require_tokens and set_name == "kept":
            res.checked["tokens_rate"] += 1
            res.find("tokens_rate", "tokenize ran but the sample has no tokens.npy", key)

        text = meta.get("text")
        if options.require_transcript and set_name == "kept":
            res.checked["transcript"] += 1
            if not isinstance(text, str) or not text.strip():
                res.find("transcript", "transcription ran but the kept sample has no transcript", key)

        verdict = meta.get("verdict")
        res.checked["verdict_consistency"] += 1
        want = "keep" if set_name == "kept" else "drop"
        if verdict is not None and verdict != want:
            res.find("verdict_consistency", f"verdict {verdict!r} in the {set_name} set", key)
        if set_name == "dropped" and not meta.get("drop_reasons"):
            res.find("verdict_consistency", "dropped sample without drop_reasons", key)

        if index is not None:
            res.checked["index_match"] += 1
            irow = index.pop(key, None)
            if irow is None:
                res.find("index_match", "sample is in the shard but not in the index", key)
            else:
                if "members" in irow and irow["members"] is not None:
                    listed = sorted(str(m) for m in irow["members"])
                    if listed != sorted(members):
                        res.find("index_match", f"index lists members {listed}, shard has {sorted(members)}", key)
                if irow.get("shard") not in (None, tar_path.name, tar_path.stem):
                    res.find("index_match", f"index says shard {irow.get('shard')!r}", key)
                for col in _COMPARED:
                    if col in irow and col in meta and not _same(irow[col], meta[col]):
                        res.find("index_match", f"{col}: index {irow[col]!r} != shard {meta[col]!r}", key)

        # -- measurements ------------------------------------------------------------------
        dur = duration or 0.0
        agg = res.agg
        agg.samples += 1
        agg.seconds += dur
        if meta.get("segment_index") == 0 and _num(meta.get("recording_duration_s")) is not None:
            agg.recording_seconds += float(meta["recording_duration_s"])
        rec = str(meta.get("recording_id") or key.rsplit("_", 1)[0])
        rec_speakers[rec].add(str(meta.get("speaker")))
        agg.hists["duration_s"].add(duration)
        for m in ("snr_db", "dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak", "words_per_s", "chars_per_s",
                  "clipping_ratio", "silence_ratio", "language_prob", "rt_wer",
                  "rt_cer"):
            agg.hists[m].add(_num(meta.get(m)))
        if n_tokens is not None and dur > 0:
            agg.hists["tokens_per_s"].add(n_tokens / dur)
        if isinstance(text, str):
            agg.hists["transcript_chars"].add(len(text.strip()))
        if meta.get("language"):
            agg.languages[str(meta["language"])] += 1
        for reason in meta.get("drop_reasons") or []:
            agg.drop_reasons[str(reason)] += 1
        agg.add_source(source_group(meta), dur)
        prov = _as_dict(meta.get("provenance"))
        if prov:
            for stage, stamp in prov.items():
                if isinstance(stamp, dict):
                    agg.provenance[f"{stage}|{stamp.get('model')}|{stamp.get('config_hash')}"] += 1
        fp = meta.get("audio_fp")
        if set_name == "kept" and isinstance(fp, str) and fp:
            fp_hashes.append(h64(fp))

        info = {k: meta.get(k) for k in ("text", "language", "duration_s", "source", "speaker", "drop_reasons")}
        push = res.topk.push
        if set_name == "kept":
            for metric, value, score in (
                ("snr_db", _num(meta.get("snr_db")), lambda v: -v),
                ("dnsmos_ovrl", _num(meta.get("dnsmos_ovrl")), lambda v: -v),
                ("repeat_ngram_ratio", _num(meta.get("repeat_ngram_ratio")), lambda v: v),
                ("clipping_ratio", _num(meta.get("clipping_ratio")), lambda v: v),
            ):
                # A clipping or repetition score of 0 is perfect: not an example of anything.
                if value is not None and not (metric in ("repeat_ngram_ratio", "clipping_ratio") and value <= 0):
                    push(Example(score(value), key, tar_path.name, set_name, metric, value, info))
        else:
            for reason in meta.get("drop_reasons") or []:
                # A stable pseudo-random pick among a reason's samples (not the first k seen,
                # which would all come from one recording).
                push(Example(h64(key) / 2**64, key, tar_path.name, set_name, f"drop:{reason}", reason, info))

    # -- stream the tar --------------------------------------------------------------------
    try:
        raw = open(tar_path, "rb")  # noqa: SIM115 - closed in finally
    except OSError as exc:
        res.find("shard_readable", f"cannot open shard: {exc}")
        return res
    reader = _HashingReader(raw)
    current: str | None = None
    members: dict[str, bytes] = {}
    try:
        res.checked["shard_readable"] += 1
        try:
            with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    base = info.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    data = tar.extractfile(info).read()  # type: ignore[union-attr]
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
                    if key != current:
                        if current is not None:
                            check_sample(current, members)
                        current, members = key, {}
                    if ext in members:
                        res.find("duplicate_keys", f"member {ext} appears twice", key)
                    members[ext] = data
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            res.find("shard_readable", f"shard is damaged (truncated or not a tar): {exc}")
            current = None  # the half-read sample is not checked
        if current is not None:
            check_sample(current, members)
        with contextlib.suppress(OSError):
            reader.drain()  # tar padding after the end marker counts towards the sha256
    finally:
        raw.close()
    res.bytes = reader.nbytes
    res.sha256 = reader.sha.hexdigest()
    if index is not None:
        for key in index:  # rows the tar never produced
            res.find("index_match", "index row has no sample in the shard", key)
    counts = Counter(len(s) for s in rec_speakers.values())
    if set_name == "kept":
        res.agg.speakers_per_recording.update(counts)
    res.key_hashes = np.asarray(key_hashes, dtype=np.uint64)
    res.rec_hashes = np.unique(np.asarray([h64(r) for r in rec_speakers], dtype=np.uint64))
    res.fp_hashes = np.asarray(fp_hashes, dtype=np.uint64)
    return res

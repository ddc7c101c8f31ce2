"""Write: WebDataset shards, Parquet index, quarantine and manifest, committed atomically.

Two halves:

* :class:`EncodeStage` runs on the workers (a Ray task): it turns a segment's arrays into the
  bytes of its shard members (FLAC, ``.npy``, JSON), so the driver never spends CPU on codecs.
* :class:`ShardSink` runs in the driver: it receives every row of a recording, writes the
  recording's samples to the open shard (all of them, in order, in one shard), and commits.

The commit protocol makes a kill at any moment (SIGKILL included) safe to resume from:

1. a shard tar and its index are written under temporary names, fsynced, then renamed;
2. only then is ``_state/commit-NNNNNN.json`` written (temporary name, fsync, rename). It
   lists the shards and *every recording* the commit completes, including recordings that
   were quarantined, empty or entirely dropped. The commit file is the single point of truth.

On start, :meth:`ShardSink.open` reads the commits, deletes shards and index files that no
commit names (the remains of a killed run) and reports which sources are done, so the
pipeline skips them. Nothing is ever appended to a committed file, so a committed shard is
never half-written and no sample is written twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from kimia_model.audio import encode_flac
from stages.base import KIND_BAD_INPUT, KIND_TRANSIENT, STATUS_EMPTY, STATUS_OK, STATUS_QUARANTINED, Row, Stage, StageConfig
from stages.rows import ARRAY_FIELDS, sample_key

#: Fields that never go into the sample JSON or the index.
_INTERNAL = ("_members", "error_detail")
#: Nested fields stored as JSON strings in the Parquet index (their shapes vary by stage).
_JSON_COLUMNS = ("provenance", "timings", "source_meta")


class WriteConfig(StageConfig):
    """Shard layout and commit cadence."""

    batch_size: int = Field(16, ge=1, le=4096, description="Segments per encode task.")
    num_workers: int = Field(2, ge=1, le=4096, description="Concurrent encode tasks.")
    shard_max_samples: int = Field(2000, ge=1, description="Start a new shard after this many samples.")
    shard_max_mb: float = Field(
        1024.0, gt=0, description="Start a new shard once it holds this much (a recording is never split)."
    )
    store_enhanced: bool = Field(True, description="Write enhanced.flac beside audio.flac when present.")
    commit_interval_s: float = Field(
        120.0, gt=0, description="Commit quarantined/empty recordings at least this often, even if no shard is full."
    )


def _plain(value: Any) -> Any:
    """JSON-safe version of a metadata value (numpy scalars, non-finite floats)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def sample_metadata(row: Row) -> dict[str, Any]:
    """The JSON member of a sample: every field but bulk arrays and internals."""
    return {k: _plain(v) for k, v in row.items() if k not in ARRAY_FIELDS and k not in _INTERNAL}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class EncodeStage(Stage):
    """Segment rows to shard member bytes (FLAC, NPY, JSON); arrays are dropped afterwards."""

    name = "encode"
    reads = ARRAY_FIELDS
    writes = ("_members",)
    uses_model = False

    config: WriteConfig

    def process_batch(self, rows: list[Row]) -> list[Row]:
        out = []
        for row in rows:
            sr = int(row["sample_rate"])
            members: dict[str, bytes] = {"audio.flac": encode_flac(row["audio"], sr)}
            if self.config.store_enhanced and row.get("audio_enhanced") is not None:
                members["enhanced.flac"] = encode_flac(row["audio_enhanced"], sr)
            if row.get("semantic_tokens") is not None:
                members["tokens.npy"] = _npy(np.asarray(row["semantic_tokens"], dtype=np.int32))
            if row.get("whisper_features") is not None:
                members["whisper.npy"] = _npy(np.asarray(row["whisper_features"], dtype=np.float16))
            slim = {k: v for k, v in row.items() if k not in ARRAY_FIELDS}
            slim["_members"] = members
            out.append(slim)
        return out

    def __call__(self, rows: list[Row]) -> list[Row]:
        # Timing of encode is bookkeeping, but provenance of a codec is noise: stamp timings only.
        out = super().__call__(rows)
        for r in out:
            (r.get("provenance") or {}).pop(self.name, None)
        return out


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class _OpenShard:
    """A shard being filled, kept in memory until commit (bounded by shard_max_mb)."""

    name: str
    buffer: io.BytesIO = field(default_factory=io.BytesIO)
    tar: tarfile.TarFile | None = None
    index_rows: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0

    def __post_init__(self) -> None:
        self.tar = tarfile.open(fileobj=self.buffer, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, members: dict[str, bytes], meta: dict[str, Any]) -> None:
        assert self.tar is not None
        payload = dict(members)
        payload["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()
        for ext in sorted(payload):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload[ext])
            info.mtime = 0  # deterministic bytes: same input, same shard
            info.mode = 0o644
            self.tar.addfile(info, io.BytesIO(payload[ext]))
        row = {k: (json.dumps(v, sort_keys=True) if k in _JSON_COLUMNS else v) for k, v in meta.items()}
        row.update(key=key, shard=f"{self.name}.tar", members=sorted(payload))
        self.index_rows.append(row)
        self.samples += 1

    @property
    def nbytes(self) -> int:
        return self.buffer.tell()

    def finish(self) -> bytes:
        assert self.tar is not None
        self.tar.close()
        return self.buffer.getvalue()


def _index_table(rows: list[dict[str, Any]]) -> Any:
    """Rows to an Arrow table; columns missing in some rows become nulls."""
    import pyarrow as pa

    columns: dict[str, list[Any]] = {}
    for row in rows:
        for k in row:
            columns.setdefault(k, [])
    for row in rows:
        for k, col in columns.items():
            col.append(row.get(k))
    arrays = {}
    for k, col in columns.items():
        try:
            arrays[k] = pa.array(col)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep them readable as JSON
            arrays[k] = pa.array([None if v is None else json.dumps(_plain(v)) for v in col])
    return pa.table(arrays)


class _ShardSet:
    """Shards under one root (``OUT`` or ``OUT/dropped``): naming, open shard, file commit."""

    def __init__(self, root: Path, next_number: int) -> None:
        self.root = root
        self.next_number = next_number
        self.open: _OpenShard | None = None
        (root / "shards").mkdir(parents=True, exist_ok=True)
        (root / "index").mkdir(parents=True, exist_ok=True)

    def shard(self) -> _OpenShard:
        if self.open is None:
            self.open = _OpenShard(f"shard-{self.next_number:06d}")
            self.next_number += 1
        return self.open

    def flush(self) -> dict[str, Any] | None:
        """Write the open shard and its index under temp names, fsync, rename. Not yet committed."""
        import pyarrow.parquet as pq

        if self.open is None or self.open.samples == 0:
            self.open = None
            return None
        shard = self.open
        self.open = None
        data = shard.finish()
        tar_path = self.root / "shards" / f"{shard.name}.tar"
        _fsync_write(tar_path, data)
        idx_path = self.root / "index" / f"{shard.name}.parquet"
        buf = io.BytesIO()
        pq.write_table(_index_table(shard.index_rows), buf)
        _fsync_write(idx_path, buf.getvalue())
        _fsync_dir(tar_path.parent)
        _fsync_dir(idx_path.parent)
        return {
            "name": f"{shard.name}.tar",
            "index": f"{shard.name}.parquet",
            "samples": shard.samples,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "root": "" if self.root.name != "dropped" else "dropped",
        }


@dataclass
class RecordingOutcome:
    """What happened to one recording; stored in commits and summed into the run summary."""

    recording_id: str | None
    source: str
    status: str  # ok | empty | quarantined
    duration_s: float = 0.0
    kept_s: float = 0.0
    kept: int = 0
    dropped: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    quarantine: list[dict[str, Any]] = field(default_factory=list)


class ShardSink:
    """Driver-side writer with an atomic, resumable commit protocol (see module docstring).

    Use as a context manager::

        with ShardSink(out_dir, write_config) as sink:
            done = sink.committed_sources   # skip these inputs
            for rows in completed_recordings:
                sink.add_recording(rows)
    """

    def __init__(self, out: Path, config: WriteConfig, *, keep_dropped: bool = False) -> None:
        from stages.filter import DuplicateTracker

        self.out = Path(out)
        self.config = config
        self.keep_dropped = keep_dropped
        # Exact duplicates across the whole run: the filter only sees one batch at a time.
        self.dups = DuplicateTracker()
        self.state = self.out / "_state"
        self.pending: list[RecordingOutcome] = []
        self.committed: list[RecordingOutcome] = []
        self.shards: list[dict[str, Any]] = []
        self.commit_seq = 0
        self._last_commit = time.monotonic()
        self.kept: _ShardSet
        self.dropped: _ShardSet | None = None
        self.this_run: list[RecordingOutcome] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> ShardSink:
        self.open()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        # On error, nothing is committed: the next run redoes the pending recordings.

    def open(self) -> None:
        """Read prior commits and remove anything a killed run left uncommitted."""
        self.state.mkdir(parents=True, exist_ok=True)
        commits = sorted(self.state.glob("commit-*.json"))
        named: set[str] = set()
        for path in commits:
            record = json.loads(path.read_text())
            self.commit_seq = max(self.commit_seq, int(record["seq"]) + 1)
            for s in record["shards"]:
                self.shards.append(s)
                prefix = f"{s['root']}/" if s["root"] else ""
                named.add(f"{prefix}shards/{s['name']}")
                named.add(f"{prefix}index/{s['index']}")
            self.committed.extend(RecordingOutcome(**r) for r in record["recordings"])
        for root in (self.out, self.out / "dropped"):
            for sub in ("shards", "index"):
                d = root / sub
                if not d.is_dir():
                    continue
                for f in d.iterdir():
                    rel = f.relative_to(self.out).as_posix()
                    if f.name.startswith(".") or rel not in named:
                        f.unlink()  # remains of a killed run: never referenced, never read
        for f in self.state.glob(".*tmp"):
            f.unlink()

        def next_number(root: str) -> int:
            nums = [int(s["name"][6:12]) for s in self.shards if s["root"] == root]
            return max(nums) + 1 if nums else 0

        self.kept = _ShardSet(self.out, next_number(""))
        self._seed_duplicates()
        if self.keep_dropped:
            self.dropped = _ShardSet(self.out / "dropped", next_number("dropped"))

    def _seed_duplicates(self) -> None:
        """After a resume, samples committed earlier still count as seen for duplicate checks."""
        import pyarrow.parquet as pq

        for s in self.shards:
            if s["root"]:
                continue
            path = self.out / "index" / s["index"]
            if "audio_fp" not in pq.read_schema(path).names:
                continue
            table = pq.read_table(path, columns=["key", "audio_fp"])
            for key, fp in zip(table.column("key").to_pylist(), table.column("audio_fp").to_pylist()):
                self.dups.check(key, fp)

    def latest(self) -> list[RecordingOutcome]:
        """The newest committed outcome of each source (a retried input supersedes its quarantine)."""
        return list({o.source: o for o in self.committed}.values())

    def committed_sources(self, *, retry_quarantined: bool = False) -> set[str]:
        """Sources whose outcome is committed: the pipeline does not read them again.

        With ``retry_quarantined``, sources whose newest outcome is a quarantine are left out,
        so they are processed again (and their new outcome supersedes the old one).
        """
        return {o.source for o in self.latest() if not (retry_quarantined and o.status == STATUS_QUARANTINED)}

    # -- adding work -------------------------------------------------------------------------
    def add_recording(self, rows: list[Row]) -> RecordingOutcome:
        """Take every row of one recording (segments, or one empty/quarantine row)."""
        first = rows[0]
        outcome = RecordingOutcome(
            recording_id=first.get("recording_id"),
            source=str(first.get("source")),
            status=STATUS_OK,
            duration_s=float(first.get("recording_duration_s", first.get("duration_s")) or 0.0),
        )
        segments = sorted(
            (r for r in rows if r.get("segment_index") is not None), key=lambda r: int(r["segment_index"])
        )
        if first.get("status") == STATUS_QUARANTINED and first.get("segment_index") is None:
            outcome.status = STATUS_QUARANTINED
            outcome.duration_s = float(first.get("duration_s") or 0.0)
            outcome.quarantine.append(self._quarantine_record(first))
        elif first.get("status") == STATUS_EMPTY:
            outcome.status = STATUS_EMPTY
        for r in rows:
            for stage, t in (r.get("timings") or {}).items():
                outcome.timings[stage] = outcome.timings.get(stage, 0.0) + float(t)
        transient = [
            r for r in segments if r.get("status") == STATUS_QUARANTINED and r.get("error_kind") == KIND_TRANSIENT
        ]
        if transient:
            # A recording is committed whole or not at all: one segment that failed for a
            # passing reason quarantines the recording (no samples), and --retry-quarantined
            # redoes all of it.
            outcome.status = STATUS_QUARANTINED
            outcome.quarantine.extend(self._quarantine_record(r) for r in transient)
            segments = []
        kept_shard: _OpenShard | None = None
        for r in segments:
            if r.get("status") == STATUS_QUARANTINED:
                outcome.quarantine.append(self._quarantine_record(r))
                continue
            if r.get("verdict") != "drop":  # a dropped copy must not condemn a later good one
                self.dups.apply(r)
            drop = r.get("verdict") == "drop"
            if drop:
                outcome.dropped += 1
                for reason in r.get("drop_reasons") or ["unspecified"]:
                    outcome.drop_reasons[reason] = outcome.drop_reasons.get(reason, 0) + 1
                if self.dropped is None:
                    continue
                target = self.dropped.shard()
            else:
                outcome.kept += 1
                outcome.kept_s += float(r.get("duration_s") or 0.0)
                kept_shard = target = self.kept.shard()
            meta = sample_metadata(r)
            target.add(sample_key(str(r["recording_id"]), int(r["segment_index"])), r.get("_members") or {}, meta)
        self.pending.append(outcome)
        self.this_run.append(outcome)
        full = kept_shard is not None and (
            kept_shard.samples >= self.config.shard_max_samples or kept_shard.nbytes >= self.config.shard_max_mb * 1e6
        )
        if full or time.monotonic() - self._last_commit > self.config.commit_interval_s:
            self.commit()
        return outcome

    @staticmethod
    def _quarantine_record(row: Row) -> dict[str, Any]:
        return {
            "source": str(row.get("source")),
            "recording_id": row.get("recording_id"),
            "segment_index": row.get("segment_index"),
            "stage": row.get("failed_stage", "unknown"),
            "error": row.get("error", ""),
            "kind": row.get("error_kind", KIND_BAD_INPUT),
        }

    def commit(self) -> None:
        """Flush open shards and make everything pending durable in one atomic step."""
        if not self.pending and (self.kept.open is None):
            return
        new_shards = [s for s in (self.kept.flush(), self.dropped.flush() if self.dropped else None) if s]
        record = {
            "seq": self.commit_seq,
            "time": time.time(),
            "shards": new_shards,
            "recordings": [o.__dict__ for o in self.pending],
        }
        _fsync_write(self.state / f"commit-{self.commit_seq:06d}.json", json.dumps(record).encode())
        _fsync_dir(self.state)
        self.commit_seq += 1
        self.shards.extend(new_shards)
        self.committed.extend(self.pending)
        self.pending = []
        self._last_commit = time.monotonic()

    def close(self) -> None:
        """Commit what is pending and write the run-level files."""
        self.commit()
        self.write_quarantine()

    # -- run-level files ---------------------------------------------------------------------
    def write_quarantine(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        records = [{"kind": KIND_BAD_INPUT, **q} for o in self.latest() for q in o.quarantine]
        schema = pa.schema(
            [
                ("source", pa.string()),
                ("recording_id", pa.string()),
                ("segment_index", pa.int64()),
                ("stage", pa.string()),
                ("error", pa.string()),
                ("kind", pa.string()),
            ]
        )
        table = pa.Table.from_pylist(records, schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        _fsync_write(self.out / "quarantine.parquet", buf.getvalue())

    def write_manifest(self, summary: dict[str, Any]) -> None:
        manifest = {"shards": [s for s in self.shards if not s["root"]], "dropped_shards": [
            s for s in self.shards if s["root"] == "dropped"
        ], "summary": summary}
        _fsync_write(self.out / "manifest.json", json.dumps(manifest, indent=2).encode())


def summarize(outcomes: Iterable[RecordingOutcome]) -> dict[str, Any]:
    """Hours in and kept, per-stage compute time and real-time factor, counts by reason."""
    outcomes = list(outcomes)
    hours_in = sum(o.duration_s for o in outcomes) / 3600
    hours_kept = sum(o.kept_s for o in outcomes) / 3600
    stage_s: dict[str, float] = defaultdict(float)
    for o in outcomes:
        for k, v in o.timings.items():
            stage_s[k] += v
    drops: Counter[str] = Counter()
    for o in outcomes:
        drops.update(o.drop_reasons)
    quarantine: Counter[str] = Counter()
    for o in outcomes:
        for q in o.quarantine:
            quarantine[f"{q['stage']}: {str(q['error']).split(':')[0]}"] += 1
    audio_s = hours_in * 3600
    return {
        "recordings": len(outcomes),
        "recordings_by_status": dict(Counter(o.status for o in outcomes)),
        "hours_in": round(hours_in, 6),
        "hours_kept": round(hours_kept, 6),
        "segments_kept": sum(o.kept for o in outcomes),
        "segments_dropped": sum(o.dropped for o in outcomes),
        "stage_seconds": {k: round(v, 3) for k, v in sorted(stage_s.items())},
        "stage_rtf": {k: (round(v / audio_s, 5) if audio_s else None) for k, v in sorted(stage_s.items())},
        "drop_reasons": dict(drops.most_common()),
        "quarantine_reasons": dict(quarantine.most_common()),
    }

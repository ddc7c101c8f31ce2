"""Write: finished recordings become WebDataset shards and Parquet index rows, committed on the worker.

The write stage is the last stage of the graph and runs where the recordings were
processed: the driver never receives audio. Each call takes a batch of whole recordings and
opens a :class:`ShardWriter`, which

1. encodes each kept (and, with ``filter.keep_dropped``, each dropped) segment: the segment's
   slice of the recording's audio becomes ``audio.flac`` (the first and only copy of it),
   plus ``enhanced.flac``, ``tokens.npy``, ``whisper.npy`` and the JSON metadata;
2. fills shards named after a random writer id (``shard-<writer>-<n>``), so writers on
   different workers never coordinate; a recording never straddles two shards;
3. on a clean exit, writes each shard and its index durably and then one ledger entry that
   lists the shards and *every recording* of the batch, including quarantined, empty and
   entirely dropped ones (:meth:`stages.write.layout.OutLayout.commit`).

So shards commit as recordings finish, and a SIGKILL at any moment loses at most the
recordings in flight: a resume sweeps their uncommitted files and redoes them.

Example:
    >>> import tempfile, numpy as np
    >>> from stages.write.layout import OutLayout
    >>> out = OutLayout(tempfile.mkdtemp())
    >>> rec = {"recording_id": "ab", "source": "/a.wav", "status": "ok", "sample_rate": 16000,
    ...        "duration_s": 1.0, "audio": np.zeros(16000, np.float32),
    ...        "segments": [{"segment_index": 0, "start_s": 0.0, "end_s": 0.5, "status": "ok"}]}
    >>> with ShardWriter(out, WriteConfig()) as w:
    ...     outcome = w.add(rec)
    >>> outcome.kept, [s["samples"] for s in out.committed_shards()]
    (1, [1])
"""

from __future__ import annotations

import io
import json
import tarfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
from pydantic import Field

from kimia_model.audio import encode_flac
from stages.base import KIND_BAD_INPUT, STATUS_EMPTY, STATUS_OK, STATUS_QUARANTINED, Row, Stage, StageConfig, merge_cpu, merge_spans
from stages.rows import ARRAY_FIELDS, sample_key, segment_duration, segment_views
from stages.write.layout import DROPPED, JSON_COLUMNS, KEPT, OutLayout, RecordingOutcome, plain

#: Fields that never go into the sample JSON or the index.
_INTERNAL = ("error_detail", "segments", "reason_detail", "spans", "cpu")


class WriteConfig(StageConfig):
    """Shard layout and commit cadence."""

    batch_size: int = Field(
        4, ge=1, le=4096,
        description="Recordings per write task. Each task commits its recordings at once, as one shard "
        "(or more at the size caps): smaller commits sooner, larger makes fewer, bigger shards.",
    )
    num_workers: int = Field(2, ge=0, le=4096, description="Concurrent write tasks; 0 = one per CPU Ray sees.")
    shard_max_samples: int = Field(2000, ge=1, description="Start a new shard after this many samples.")
    shard_max_mb: float = Field(
        1024.0, gt=0, description="Start a new shard once it holds this much (a recording is never split)."
    )
    store_enhanced: bool = Field(True, description="Write enhanced.flac beside audio.flac when present.")


class Duplicates(Protocol):
    """Run-wide exact-duplicate registry: ``(key, audio_fp)`` pairs to the key each duplicates, or None."""

    def check_many(self, pairs: list[tuple[str, str | None]]) -> list[str | None]: ...


class LocalDuplicates:
    """A :class:`Duplicates` registry inside one process (tests, ``synth``, a single writer)."""

    def __init__(self) -> None:
        from stages.filter import DuplicateTracker

        self.tracker = DuplicateTracker()

    def check_many(self, pairs: list[tuple[str, str | None]]) -> list[str | None]:
        return [self.tracker.check(k, fp) for k, fp in pairs]


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def sample_metadata(view: Row, segment_count: int, recording_timings: dict[str, float], share: float) -> dict[str, Any]:
    """The JSON member of a sample: its recording's fields and its own, no bulk arrays.

    Recording-level compute time (decode, enhance, diarize) is shared out by duration, so
    summing a recording's samples gives it back once.
    """
    meta = {k: plain(v) for k, v in view.items() if k not in ARRAY_FIELDS and k not in _INTERNAL}
    meta["segment_count"] = segment_count
    timings = {k: v * share for k, v in recording_timings.items()}
    for k, v in (view.get("timings") or {}).items():
        timings[k] = timings.get(k, 0.0) + float(v)
    meta["timings"] = timings
    return meta


def sample_members(view: Row, store_enhanced: bool) -> dict[str, bytes]:
    """The shard members of one segment view: the audio is copied (encoded) here, once."""
    sr = int(view["sample_rate"])
    members = {"audio.flac": encode_flac(np.asarray(view["audio"], dtype=np.float32), sr)}
    if store_enhanced and view.get("audio_enhanced") is not None:
        members["enhanced.flac"] = encode_flac(np.asarray(view["audio_enhanced"], dtype=np.float32), sr)
    if view.get("semantic_tokens") is not None:
        members["tokens.npy"] = _npy(np.asarray(view["semantic_tokens"], dtype=np.int32))
    if view.get("whisper_features") is not None:
        members["whisper.npy"] = _npy(np.asarray(view["whisper_features"], dtype=np.float16))
    return members


class _OpenShard:
    """A shard being filled in memory (bounded by ``shard_max_mb``) until it is written."""

    def __init__(self, stem: str) -> None:
        self.stem = stem
        self.buffer = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buffer, mode="w", format=tarfile.USTAR_FORMAT)
        self.index_rows: list[dict[str, Any]] = []

    def add(self, key: str, members: dict[str, bytes], meta: dict[str, Any]) -> None:
        payload = dict(members)
        payload["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()
        for ext in sorted(payload):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload[ext])
            info.mtime = 0  # deterministic bytes: same input, same shard
            info.mode = 0o644
            self.tar.addfile(info, io.BytesIO(payload[ext]))
        row = {k: (json.dumps(v, sort_keys=True) if k in JSON_COLUMNS else v) for k, v in meta.items()}
        row.update(key=key, shard=f"{self.stem}.tar", members=sorted(payload))
        self.index_rows.append(row)

    @property
    def samples(self) -> int:
        return len(self.index_rows)

    @property
    def nbytes(self) -> int:
        return self.buffer.tell()

    def finish(self) -> bytes:
        self.tar.close()
        return self.buffer.getvalue()


def quarantine_record(row: Row, segment_index: int | None = None) -> dict[str, Any]:
    """A quarantine entry for a failed recording or segment (stored in the ledger)."""
    return {
        "source": str(row.get("source")),
        "recording_id": row.get("recording_id"),
        "segment_index": row.get("segment_index", segment_index),
        "stage": row.get("failed_stage", "unknown"),
        "error": row.get("error", ""),
        "kind": row.get("error_kind", KIND_BAD_INPUT),
    }


class ShardWriter:
    """Write whole recordings into new shards and commit them with one ledger entry.

    A context manager: on a clean exit everything added is committed; on an exception
    nothing is (the shards already written stay unreferenced and the next run's sweep
    removes them). :meth:`commit` may also be called along the way.

    Args:
        layout: the OUT.
        config: the ``write`` section.
        keep_dropped: also write dropped samples, under ``OUT/dropped``.
        duplicates: the run-wide duplicate registry (default: this writer's own).
        writer: a name unique among the run's writers (default: random).
    """

    def __init__(
        self, layout: OutLayout, config: WriteConfig, *, keep_dropped: bool = False,
        duplicates: Duplicates | None = None, writer: str | None = None,
    ) -> None:
        self.layout = layout
        self.config = config
        self.keep_dropped = keep_dropped
        self.duplicates = duplicates or LocalDuplicates()
        self.writer = writer or uuid.uuid4().hex[:12]
        self._open: dict[str, _OpenShard] = {}
        self._written: list[dict[str, Any]] = []
        self._pending: list[RecordingOutcome] = []
        self._shard_seq = 0
        self._commit_seq = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.commit()

    def _shard(self, root: str) -> _OpenShard:
        if root not in self._open:
            self._open[root] = _OpenShard(f"shard-{self.writer}-{self._shard_seq:04d}")
            self._shard_seq += 1
        return self._open[root]

    def _flush(self, root: str) -> None:
        shard = self._open.pop(root, None)
        if shard is not None and shard.samples:
            self._written.append(self.layout.write_shard(shard.stem, shard.finish(), shard.index_rows, root))

    def add(self, rec: Row) -> RecordingOutcome:
        """Add one finished recording row (ok with segments, empty, or quarantined)."""
        status = rec.get("status", STATUS_OK)
        outcome = RecordingOutcome(
            recording_id=rec.get("recording_id"), source=str(rec.get("source")),
            status=status if status in (STATUS_EMPTY, STATUS_QUARANTINED) else STATUS_OK,
            duration_s=float(rec.get("duration_s") or 0.0),
        )
        timings = dict(rec.get("timings") or {})
        for seg in rec.get("segments") or []:
            for stage, t in (seg.get("timings") or {}).items():
                timings[stage] = timings.get(stage, 0.0) + float(t)
        outcome.timings = timings
        if status == STATUS_QUARANTINED:
            outcome.quarantine.append(quarantine_record(rec))
        if status == STATUS_OK:
            self._add_segments(rec, outcome)
        self._pending.append(outcome)
        return outcome

    def _add_segments(self, rec: Row, outcome: RecordingOutcome) -> None:
        segments = rec.get("segments") or []
        for seg in segments:
            if seg.get("status", STATUS_OK) == STATUS_QUARANTINED:
                outcome.quarantine.append(quarantine_record({**seg, "source": rec.get("source"),
                                                             "recording_id": rec.get("recording_id")}))
        views = segment_views(rec)
        rid = str(rec["recording_id"])
        keys = [sample_key(rid, int(v["segment_index"])) for v in views]
        # A dropped copy must not condemn a later good one: only candidates for keeping register.
        candidates = [n for n, v in enumerate(views) if v.get("verdict") != "drop"]
        originals = self.duplicates.check_many([(keys[n], views[n].get("audio_fp")) for n in candidates])
        for n, orig in zip(candidates, originals):
            if orig is not None:
                from stages.filter import apply_duplicate

                views[n] = apply_duplicate(dict(views[n]), orig)
        total = sum(segment_duration(s) for s in segments if s.get("status", STATUS_OK) == STATUS_OK) or 1.0
        rec_timings = dict(rec.get("timings") or {})
        placed: set[str] = set()
        for key, view in zip(keys, views):
            provenance = {**(rec.get("provenance") or {}), **(view.get("provenance") or {})}
            for stage, stamp in provenance.items():
                if isinstance(stamp, dict) and stamp.get("runtime"):
                    label = f"{stage}: {stamp['runtime']}"
                    outcome.runtimes[label] = outcome.runtimes.get(label, 0) + 1
            if view.get("labeller"):
                label = f"{view.get('language') or '?'}: {view['labeller']}"
                if view.get("labeller_note"):
                    label += f" ({view['labeller_note']})"
                outcome.labellers[label] = outcome.labellers.get(label, 0) + 1
            drop = view.get("verdict") == "drop"
            if drop:
                outcome.dropped += 1
                for reason in view.get("drop_reasons") or ["unspecified"]:
                    outcome.drop_reasons[reason] = outcome.drop_reasons.get(reason, 0) + 1
                if not self.keep_dropped:
                    continue
            else:
                outcome.kept += 1
                outcome.kept_s += float(view["duration_s"])
            root = DROPPED if drop else KEPT
            view = {**view, "provenance": provenance}
            meta = sample_metadata(view, len(segments), rec_timings, float(view["duration_s"]) / total)
            self._shard(root).add(key, sample_members(view, self.config.store_enhanced), meta)
            placed.add(root)
        for root in placed:  # caps are checked between recordings: a recording never straddles shards
            shard = self._open[root]
            if shard.samples >= self.config.shard_max_samples or shard.nbytes >= self.config.shard_max_mb * 1e6:
                self._flush(root)

    def commit(self, name: str | None = None) -> list[RecordingOutcome]:
        """Write the open shards, then one ledger entry for them and every recording added.

        Args:
            name: a deterministic name for the ledger entry (see ``OutLayout.find_commit``).
        """
        for root in list(self._open):
            self._flush(root)
        if not self._pending and not self._written:
            return []
        self.layout.commit(self.writer, self._commit_seq, self._written, self._pending, name=name)
        committed, self._pending, self._written = self._pending, [], []
        self._commit_seq += 1
        return committed


class WriteStage(Stage):
    """The graph's last stage: finished recordings to committed shards; returns outcomes only.

    Unlike other stages it takes every row, quarantined and empty ones included (they are
    committed too, so a resume skips them), and it returns one small row per recording,
    ``{"source", "recording_id", "outcome"}``: no audio goes back to the driver.
    """

    name = "write"
    level = "recording"
    reads = ("audio", "audio_enhanced", "segments")
    writes = ("outcome",)
    uses_model = False

    config: WriteConfig

    def __init__(
        self, config: WriteConfig, context: Any = None, *, out: str | None = None, keep_dropped: bool = False,
        duplicates: Duplicates | None = None, run_id: str | None = None,
    ) -> None:
        """Args:
            out: the OUT directory (storage every worker can write).
            keep_dropped: also write dropped samples under ``OUT/dropped``.
            duplicates: the run-wide duplicate registry (default: one per call).
            run_id: names this run's commits; a batch retried by Ray finds its commit by it.
        """
        super().__init__(config, context)
        self.out = out
        self.keep_dropped = keep_dropped
        self.duplicates = duplicates
        self.run_id = run_id or uuid.uuid4().hex

    def commit_name(self, rows: list[Row]) -> str:
        """The ledger entry's name for a batch: the same batch in the same run, the same name."""
        import hashlib

        blob = "\n".join([self.run_id, *(str(r.get("source")) for r in rows)]).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    def process_batch(self, rows: list[Row]) -> list[Row]:
        if self.out is None:
            raise RuntimeError("WriteStage needs out= (the OUT directory) to write to")
        layout = OutLayout(self.out)
        name = self.commit_name(rows)
        outcomes = layout.find_commit(name)  # a retry of a batch that committed before its task died
        started, c0 = time.time(), time.process_time()
        if outcomes is None:
            t0 = time.perf_counter()
            writer = ShardWriter(layout, self.config, keep_dropped=self.keep_dropped, duplicates=self.duplicates)
            outcomes = [writer.add(r) for r in rows]
            elapsed = time.perf_counter() - t0
            total = sum(o.duration_s for o in outcomes) or float(len(outcomes))
            for o in outcomes:  # shared out by duration, like every stage's time
                o.timings[self.name] = elapsed * ((o.duration_s or 1.0) / total)
            writer.commit(name)
        # When each stage worked on each recording goes to the driver's summary only (never
        # into OUT: clock times would make two runs' outputs differ).
        spans = {str(r.get("source")): recording_spans(r) for r in rows}
        written = {"write": (started, time.time())}
        mine = self.cpu_reading(time.process_time() - c0)
        cpu = {str(r.get("source")): merge_cpu(recording_cpu(r), mine) for r in rows}
        return [{"source": o.source, "recording_id": o.recording_id, "outcome": o,
                 "spans": merge_spans(spans.get(o.source), written), "cpu": cpu.get(o.source, {})} for o in outcomes]

    def __call__(self, rows: list[Row]) -> list[Row]:
        # Every row is written, whatever its status, and a failure here is not a bad input:
        # it fails the task, nothing of the batch is committed, and a resume redoes it.
        return self.process_batch(rows) if rows else []


def recording_spans(rec: Row) -> dict[str, list[float]]:
    """A recording's stage spans (:func:`stages.base.merge_spans`), its segments' included."""
    return merge_spans(rec.get("spans"), *(seg.get("spans") for seg in rec.get("segments") or []))


def recording_cpu(rec: Row) -> dict[str, dict[str, float]]:
    """The stages' CPU readings a recording carries (:func:`stages.base.merge_cpu`),
    its segments' included: a stage that works per segment stamps the segments."""
    return merge_cpu(rec.get("cpu"), *(seg.get("cpu") for seg in rec.get("segments") or []))


class Summary:
    """A run summary built one outcome at a time, in memory that does not grow with the run.

    Hours in and kept, per-stage compute time and real-time factor, counts by status and
    by reason: sums and counters only, so a driver can summarise 10,000 recordings without
    keeping their outcomes.

    >>> s = Summary()
    >>> s.add(RecordingOutcome("r", "/a.wav", "ok", duration_s=7200.0, kept_s=3600.0, kept=3, timings={"asr": 720.0}))
    >>> r = s.result()
    >>> r["hours_in"], r["hours_kept"], r["segments_kept"], r["stage_rtf"]
    (2.0, 1.0, 3, {'asr': 0.1})
    """

    def __init__(self) -> None:
        self.recordings = 0
        self.by_status: Counter[str] = Counter()
        self.seconds_in = 0.0
        self.seconds_kept = 0.0
        self.kept = 0
        self.dropped = 0
        self.stage_s: dict[str, float] = defaultdict(float)
        self.drops: Counter[str] = Counter()
        self.quarantine: Counter[str] = Counter()
        self.labellers: Counter[str] = Counter()
        self.runtimes: Counter[str] = Counter()

    def add(self, o: RecordingOutcome) -> None:
        self.recordings += 1
        self.by_status[o.status] += 1
        self.seconds_in += o.duration_s
        self.seconds_kept += o.kept_s
        self.kept += o.kept
        self.dropped += o.dropped
        for k, v in o.timings.items():
            self.stage_s[k] += v
        self.drops.update(o.drop_reasons)
        self.labellers.update(o.labellers)
        self.runtimes.update(o.runtimes)
        for q in o.quarantine:
            self.quarantine[f"{q['stage']}: {str(q['error']).split(':')[0]}"] += 1

    def result(self) -> dict[str, Any]:
        audio_s = self.seconds_in
        return {
            "recordings": self.recordings,
            "recordings_by_status": dict(self.by_status),
            "hours_in": round(audio_s / 3600, 6),
            "hours_kept": round(self.seconds_kept / 3600, 6),
            "segments_kept": self.kept,
            "segments_dropped": self.dropped,
            "stage_seconds": {k: round(v, 3) for k, v in sorted(self.stage_s.items())},
            "stage_rtf": {k: (round(v / audio_s, 5) if audio_s else None) for k, v in sorted(self.stage_s.items())},
            "drop_reasons": dict(self.drops.most_common()),
            "quarantine_reasons": dict(self.quarantine.most_common()),
            "labellers": dict(self.labellers.most_common()),
            "runtimes": dict(self.runtimes.most_common()),
        }


def summarize(outcomes: Iterable[RecordingOutcome]) -> dict[str, Any]:
    """The :class:`Summary` of ``outcomes``."""
    summary = Summary()
    for o in outcomes:
        summary.add(o)
    return summary.result()

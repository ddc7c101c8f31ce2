"""OUT's on-disk layout: the one module that knows where every file of an output lives.

::

    OUT/shards/shard-<writer>-<n>.tar          kept samples, WebDataset (one sample per segment)
    OUT/index/shard-<writer>-<n>.parquet       one row per sample of that shard
    OUT/dropped/shards/, OUT/dropped/index/    dropped samples, same layout (filter.keep_dropped)
    OUT/_state/commit-<ns>-<writer>-<n>.json   the ledger: one entry per commit
    OUT/quarantine.parquet                     inputs that could not be processed (derived)
    OUT/manifest.json                          committed shards and the run summary (derived)
    OUT/config.yaml                            the resolved config of the run
    OUT/audit/                                 report.html and audit.json (kimia-curate audit)

The **ledger is the single point of truth**. Writers run on the workers and never
coordinate: each names its shards after a random writer id, writes a shard and its index
under temporary names, fsyncs and renames them, and only then writes its ledger entry
(temporary name, fsync, rename). A shard no ledger entry names does not exist for any
reader; the driver sweeps such remains of a killed run before the next run starts. The
quarantine table and the manifest are derived from the ledger at the end of a run, so a
run killed before that still has every committed sample, and the next run rewrites them.

Readers (``inspect``, ``audit``, ``export``) and writers go through :class:`OutLayout`;
nothing else opens these files by path.

Example:
    >>> import tempfile
    >>> out = OutLayout(tempfile.mkdtemp())
    >>> ref = out.write_shard("shard-ab12-0000", b"tar bytes", [{"key": "r_00000"}])
    >>> _ = out.commit("ab12", 0, [ref], [RecordingOutcome("r", "/a.wav", "ok", kept=1)])
    >>> [s["name"] for s in out.committed_shards()], [o.source for o in out.latest_outcomes()]
    (['shard-ab12-0000.tar'], ['/a.wav'])
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kimia_model.refs import sha256_file

#: ``root`` of a shard reference: kept samples live in OUT, dropped ones in OUT/dropped.
KEPT = ""
DROPPED = "dropped"
#: Nested fields stored as JSON strings in the Parquet index (their shapes vary by stage).
JSON_COLUMNS = ("provenance", "timings", "source_meta", "chars")


@dataclass
class RecordingOutcome:
    """What happened to one recording: a ledger record, summed into the run summary."""

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
    #: Segments per "language: labeller (why not the configured one)", e.g. Mandarin that fell
    #: back to Whisper because no Paraformer-zh was staged.
    labellers: dict[str, int] = field(default_factory=dict)
    #: Segments per "stage: device dtype attention" of the model stages that touched them
    #: (``provenance.<stage>.runtime``), so a summary says which numerics a run measured.
    runtimes: dict[str, int] = field(default_factory=dict)


def plain(value: Any) -> Any:
    """A JSON-safe copy of a metadata value (numpy scalars and arrays, non-finite floats)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary name, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def index_table(rows: list[dict[str, Any]]) -> Any:
    """Index rows to an Arrow table; columns missing in some rows become nulls."""
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
            arrays[k] = pa.array([None if v is None else json.dumps(plain(v)) for v in col])
    return pa.table(arrays)


class OutLayout:
    """Paths, atomic writes and ledger reads of one OUT (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- paths -------------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.root / "_state"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def quarantine_path(self) -> Path:
        return self.root / "quarantine.parquet"

    @property
    def audit_dir(self) -> Path:
        """Where ``kimia-curate audit`` writes ``report.html`` and ``audit.json``."""
        return self.root / "audit"

    def base(self, root: str = KEPT) -> Path:
        return self.root / root if root else self.root

    def shards_dir(self, root: str = KEPT) -> Path:
        return self.base(root) / "shards"

    def index_dir(self, root: str = KEPT) -> Path:
        return self.base(root) / "index"

    @staticmethod
    def ref(name: str, root: str = KEPT) -> dict[str, Any]:
        """A minimal shard reference for a shard known only by its tar name."""
        return {"name": name, "index": f"{Path(name).stem}.parquet", "root": root}

    def shard_path(self, shard: dict[str, Any]) -> Path:
        """The tar of a shard reference (an entry of :meth:`committed_shards`)."""
        return self.base(shard.get("root", KEPT)) / "shards" / shard["name"]

    def index_path(self, shard: dict[str, Any]) -> Path:
        return self.base(shard.get("root", KEPT)) / "index" / shard["index"]

    def is_output(self) -> bool:
        """Whether this folder looks like the OUT of a run (so a reader may write beside it)."""
        return any(p.exists() for p in (self.manifest_path, self.state_dir, self.index_dir()))

    # -- writing -----------------------------------------------------------------------------
    def write_shard(self, stem: str, tar: bytes, index_rows: list[dict[str, Any]], root: str = KEPT) -> dict[str, Any]:
        """Write a shard and its index durably (not yet committed); returns its reference."""
        import pyarrow.parquet as pq

        base = self.base(root)
        (base / "shards").mkdir(parents=True, exist_ok=True)
        (base / "index").mkdir(parents=True, exist_ok=True)
        ref = {
            "name": f"{stem}.tar", "index": f"{stem}.parquet", "samples": len(index_rows),
            "bytes": len(tar), "sha256": hashlib.sha256(tar).hexdigest(), "root": root,
        }
        fsync_write(self.shard_path(ref), tar)
        buf = io.BytesIO()
        pq.write_table(index_table(index_rows), buf)
        fsync_write(self.index_path(ref), buf.getvalue())
        fsync_dir(base / "shards")
        fsync_dir(base / "index")
        return ref

    def commit(
        self, writer: str, seq: int, shards: list[dict[str, Any]], recordings: list[RecordingOutcome],
        *, name: str | None = None,
    ) -> Path:
        """Make ``shards`` and ``recordings`` part of the output in one atomic step.

        ``name`` makes the entry's file name deterministic (see :meth:`find_commit`).
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        now = time.time_ns()
        record = {
            "time": now / 1e9, "writer": writer, "seq": seq, "shards": shards,
            "recordings": [asdict(o) for o in recordings],
        }
        path = self.state_dir / (f"commit-{name}.json" if name else f"commit-{now:020d}-{writer}-{seq:06d}.json")
        fsync_write(path, json.dumps(plain(record)).encode())
        fsync_dir(self.state_dir)
        return path

    def write_config(self, text: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fsync_write(self.config_path, text.encode())

    def write_quarantine(self, records: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([
            ("source", pa.string()), ("recording_id", pa.string()), ("segment_index", pa.int64()),
            ("stage", pa.string()), ("error", pa.string()), ("kind", pa.string()),
        ])
        table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in records], schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        fsync_write(self.quarantine_path, buf.getvalue())

    def write_manifest(self, summary: dict[str, Any]) -> None:
        """``manifest.json``: every committed shard (kept and dropped) and the run summary."""
        shards = self.committed_shards()
        manifest = {
            "shards": [s for s in shards if s["root"] == KEPT],
            "dropped_shards": [s for s in shards if s["root"] == DROPPED],
            "summary": summary,
        }
        fsync_write(self.manifest_path, json.dumps(manifest, indent=2).encode())

    def sweep(self) -> list[Path]:
        """Delete shard and index files no ledger entry names, and temporary files.

        They are the remains of a run killed between writing a shard and committing it:
        never referenced, never read. Only the driver calls this, holding the OUT lock,
        before any writer of the run starts.
        """
        named = {p for s in self.committed_shards() for p in (self.shard_path(s), self.index_path(s))}
        removed = []
        for root in (KEPT, DROPPED):
            for sub in ("shards", "index"):
                d = self.base(root) / sub
                if not d.is_dir():
                    continue
                for f in d.iterdir():
                    if f.name.startswith(".") or f not in named:
                        f.unlink()
                        removed.append(f)
        if self.state_dir.is_dir():
            for f in self.state_dir.glob(".*tmp"):
                f.unlink()
                removed.append(f)
        return removed

    # -- reading -----------------------------------------------------------------------------
    def find_commit(self, name: str) -> list[RecordingOutcome] | None:
        """The recordings of the entry committed under ``name``, or None if there is none.

        A task that committed and then died before reporting back is run again by Ray with
        the same batch; a writer that names its commit after the batch finds its own earlier
        commit here and does not write the recordings a second time.
        """
        path = self.state_dir / f"commit-{name}.json"
        if not path.is_file():
            return None
        return [RecordingOutcome(**r) for r in json.loads(path.read_text())["recordings"]]

    def ledger(self, *, recordings: bool = True) -> list[dict[str, Any]]:
        """Every committed ledger entry, oldest first.

        Args:
            recordings: include each entry's recording outcomes; without them the ledger of a
                large output (10,000 recordings) costs little memory to list.
        """
        if not self.state_dir.is_dir():
            return []
        entries = []
        for path in sorted(self.state_dir.glob("commit-*.json")):
            entry = json.loads(path.read_text())
            entry["_file"] = path.name
            if not recordings:
                entry.pop("recordings", None)
            entries.append(entry)
        entries.sort(key=lambda e: (float(e.get("time", 0.0)), e["_file"]))
        return entries

    def committed_shards(self, root: str | None = None) -> list[dict[str, Any]]:
        """Shard references the ledger commits, oldest first (``root``: only ``KEPT`` or ``DROPPED``)."""
        shards = [s for e in self.ledger(recordings=False) for s in e["shards"]]
        return [s for s in shards if root is None or s.get("root", KEPT) == root]

    def latest_outcomes(self) -> list[RecordingOutcome]:
        """The newest committed outcome of each source (a retried input supersedes its quarantine)."""
        return list(self.iter_latest_outcomes())

    def iter_latest_outcomes(self) -> Iterator[RecordingOutcome]:
        """:meth:`latest_outcomes` one at a time: memory for a position per source, not an outcome.

        Two passes over the ledger: the first notes where each source's newest outcome is,
        the second yields those.
        """
        files = [e["_file"] for e in self.ledger(recordings=False)]  # in commit order
        newest: dict[str, tuple[int, int]] = {}
        for n, name in enumerate(files):
            for k, r in enumerate(json.loads((self.state_dir / name).read_text())["recordings"]):
                newest[r["source"]] = (n, k)
        for n, name in enumerate(files):
            for k, r in enumerate(json.loads((self.state_dir / name).read_text())["recordings"]):
                if newest.get(r["source"]) == (n, k):
                    yield RecordingOutcome(**r)

    def quarantine_records(self) -> list[dict[str, Any]]:
        """What ``quarantine.parquet`` holds: the quarantine records of each source's newest outcome."""
        return [{"kind": "bad_input", **q} for o in self.iter_latest_outcomes() for q in o.quarantine]

    def read_index(self, shard: dict[str, Any], columns: list[str] | None = None) -> Any:
        """The Parquet index of a committed shard, as an Arrow table."""
        import pyarrow.parquet as pq

        return pq.read_table(self.index_path(shard), columns=columns)

    def index_columns(self, shard: dict[str, Any]) -> list[str]:
        import pyarrow.parquet as pq

        return list(pq.read_schema(self.index_path(shard)).names)

    def iter_samples(self, shard: dict[str, Any]) -> Iterator[tuple[str, dict[str, bytes]]]:
        """``(key, {member extension: bytes})`` of a committed shard, in tar order."""
        with tarfile.open(self.shard_path(shard)) as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                k, _, ext = info.name.partition(".")
                if key is not None and k != key:
                    yield key, members
                    members = {}
                key = k
                f = tar.extractfile(info)
                members[ext] = f.read() if f else b""
            if key is not None:
                yield key, members

    def read_manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())

    def read_config(self) -> dict[str, Any] | None:
        """The run's resolved config (``config.yaml``), or None when absent or unreadable."""
        import yaml

        try:
            data = yaml.safe_load(self.config_path.read_text())
        except (OSError, yaml.YAMLError):
            return None
        return data if isinstance(data, dict) else None

    def read_quarantine(self) -> Any:
        import pyarrow.parquet as pq

        return pq.read_table(self.quarantine_path)

    def committed_fingerprints(self) -> Iterator[tuple[str, str]]:
        """``(key, audio_fp)`` of every committed kept sample: duplicates of them are dropped later."""
        for shard in self.committed_shards(KEPT):
            if "audio_fp" not in self.index_columns(shard):
                continue
            table = self.read_index(shard, ["key", "audio_fp"])
            yield from zip(table.column("key").to_pylist(), table.column("audio_fp").to_pylist())

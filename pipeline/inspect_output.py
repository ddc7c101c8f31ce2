"""``kimia-curate inspect OUT``: re-read every committed shard and check it against its index.

The ledger (``OUT/_state``) says which shards are committed; ``manifest.json`` must agree
with it. A shard is trusted only if its bytes hash to the sha256 its commit recorded, its samples are exactly
the index's rows in the same order, every sample has its JSON and decodable audio, and
every recording's segments sit together in one shard, in order. Any finding makes the
command exit non-zero, so it can gate an upload.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from stages.write import OutLayout, sha256_file
from stages.write.layout import KEPT

REQUIRED_JSON = ("recording_id", "source", "segment_index", "segment_count", "start_s", "end_s", "duration_s", "sample_rate")


def inspect_output(out: Path, *, decode_audio: bool = True) -> dict[str, Any]:
    """Verify an output directory; returns ``{"ok", "findings", "shards", "samples", ...}``."""
    layout = OutLayout(out)
    findings: list[str] = []
    if not layout.manifest_path.is_file():
        return {"ok": False, "findings": [f"{layout.manifest_path}: missing (the run did not finish)"],
                "shards": 0, "samples": 0}
    manifest = layout.read_manifest()
    listed = {s["name"]: s for s in layout.committed_shards(KEPT)}
    in_manifest = {s["name"] for s in manifest.get("shards", [])}
    if in_manifest != set(listed):
        findings.append(
            f"manifest.json lists {len(in_manifest)} shards, the ledger commits {len(listed)} "
            "(a run was interrupted: run the same command again to finish it)"
        )
    on_disk = {p.name for p in layout.shard_path({"name": "x", "root": KEPT}).parent.glob("*.tar")}
    for name in sorted(on_disk - set(listed)):
        findings.append(f"shards/{name}: on disk but not committed (an interrupted run's; the next run removes it)")
    total = 0
    seconds = 0.0
    where: dict[str, set[str]] = defaultdict(set)
    for name, entry in sorted(listed.items()):
        tar_path = layout.shard_path(entry)
        idx_path = layout.index_path(entry)
        if not tar_path.is_file():
            findings.append(f"shards/{name}: committed but missing")
            continue
        size = tar_path.stat().st_size
        if size != entry["bytes"]:
            findings.append(f"shards/{name}: {size} bytes, its commit says {entry['bytes']}")
        if sha256_file(tar_path) != entry["sha256"]:
            findings.append(f"shards/{name}: sha256 differs from its commit (edited or corrupted)")
        try:
            samples = list(layout.iter_samples(entry))
        except (tarfile.TarError, EOFError, OSError) as exc:
            findings.append(f"shards/{name}: unreadable tar ({exc})")
            continue
        if not idx_path.is_file():
            findings.append(f"index/{entry['index']}: missing")
            index_keys: list[str] = []
        else:
            index_keys = layout.read_index(entry, ["key"]).column("key").to_pylist()
        keys = [k for k, _ in samples]
        if keys != index_keys:
            missing_idx = sorted(set(keys) - set(index_keys))
            missing_tar = sorted(set(index_keys) - set(keys))
            findings.append(
                f"shards/{name}: index mismatch ({len(keys)} samples in tar, {len(index_keys)} index rows; "
                f"not in index: {missing_idx[:3]}, not in tar: {missing_tar[:3]})"
            )
        if len(samples) != entry["samples"]:
            findings.append(f"shards/{name}: {len(samples)} samples, its commit says {entry['samples']}")
        last: dict[str, int] = {}
        for key, members in samples:
            total += 1
            if "json" not in members:
                findings.append(f"{name}:{key}: no json member")
                continue
            try:
                meta = json.loads(members["json"])
            except json.JSONDecodeError:
                findings.append(f"{name}:{key}: json member is not valid JSON")
                continue
            absent = [f for f in REQUIRED_JSON if f not in meta]
            if absent:
                findings.append(f"{name}:{key}: json lacks {absent}")
                continue
            rec = str(meta["recording_id"])
            where[rec].add(name)
            idx = int(meta["segment_index"])
            if idx <= last.get(rec, -1):
                findings.append(f"{name}:{key}: segment {idx} of {rec} out of order")
            last[rec] = idx
            if "audio.flac" not in members:
                findings.append(f"{name}:{key}: no audio.flac")
            elif decode_audio:
                for member in ("audio.flac", "enhanced.flac"):
                    if member not in members:
                        continue
                    try:
                        audio, sr = sf.read(io.BytesIO(members[member]), dtype="float32")
                    except Exception as exc:  # noqa: BLE001
                        findings.append(f"{name}:{key}: {member} does not decode ({exc})")
                        continue
                    want = float(meta["duration_s"])
                    if abs(audio.shape[0] / sr - want) > 0.01:
                        findings.append(f"{name}:{key}: {member} lasts {audio.shape[0] / sr:.3f} s, json says {want:.3f} s")
                    if not np.all(np.isfinite(audio)):
                        findings.append(f"{name}:{key}: {member} has non-finite samples")
                seconds += float(meta["duration_s"])
            if "tokens.npy" in members:
                try:
                    np.load(io.BytesIO(members["tokens.npy"]), allow_pickle=False)
                except ValueError as exc:
                    findings.append(f"{name}:{key}: tokens.npy unreadable ({exc})")
    for rec, names in where.items():
        if len(names) > 1:
            findings.append(f"recording {rec} is split across shards {sorted(names)}")
    kept = manifest.get("summary", {}).get("segments_kept")
    if kept is not None and kept != total:
        findings.append(f"manifest summary says {kept} kept segments, shards hold {total}")
    return {
        "ok": not findings,
        "findings": findings,
        "shards": len(listed),
        "samples": total,
        "hours": round(seconds / 3600, 6),
        "recordings": len(where),
    }

"""The writer: whole recordings to shards, committed by a ledger entry, read back through the layout."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.inspect_output import inspect_output
from stages.base import STATUS_EMPTY, STATUS_OK, STATUS_QUARANTINED
from stages.write import OutLayout, ShardWriter, WriteConfig, WriteStage, summarize


def _recording(rec: str, n: int, sr: int = 16000, verdicts: list[str] | None = None) -> dict:
    """A recording of ``n`` one-second segments, each a different tone, carrying its audio once."""
    audio = np.concatenate([(0.1 * np.sin(np.arange(sr) * (i + 1) / 50)).astype(np.float32) for i in range(n)])
    segments = []
    for i in range(n):
        seg = {
            "segment_index": i, "status": STATUS_OK, "start_s": float(i), "end_s": float(i + 1), "speaker": None,
            "text": f"words {i}", "semantic_tokens": np.arange(13, dtype=np.int32),
            "provenance": {"transcribe": {"model": "m", "config_hash": "h"}}, "timings": {"transcribe": 0.1},
        }
        if verdicts:
            seg["verdict"] = verdicts[i]
            seg["drop_reasons"] = ["snr_db<5"] if verdicts[i] == "drop" else []
        segments.append(seg)
    return {
        "recording_id": rec, "source": f"/data/{rec}.wav", "status": STATUS_OK, "sample_rate": sr,
        "duration_s": float(n), "audio": audio, "segments": segments, "timings": {"decode": 0.5},
        "provenance": {"decode": {"model": "none", "config_hash": "d"}},
    }


def _write(out: Path, recordings: list[dict], keep_dropped: bool = False, **cfg) -> OutLayout:
    layout = OutLayout(out)
    with ShardWriter(layout, WriteConfig(**cfg), keep_dropped=keep_dropped, writer="w0") as w:
        for rec in recordings:
            w.add(rec)
    layout.write_quarantine(layout.quarantine_records())
    layout.write_manifest(summarize(layout.latest_outcomes()))
    return layout


def test_samples_in_order_and_a_recording_never_straddles_shards(tmp_path: Path) -> None:
    layout = _write(tmp_path, [_recording("aa", 3), _recording("bb", 4), _recording("cc", 2)], shard_max_samples=5)
    shards = layout.committed_shards()
    assert [s["name"] for s in shards] == ["shard-w0-0000.tar", "shard-w0-0001.tar"]
    with tarfile.open(layout.shard_path(shards[0])) as tar:
        names = tar.getnames()
    assert names[:4] == ["aa_00000.audio.flac", "aa_00000.json", "aa_00000.tokens.npy", "aa_00001.audio.flac"]
    keys = layout.read_index(shards[0]).column("key").to_pylist()
    assert keys == ["aa_00000", "aa_00001", "aa_00002", "bb_00000", "bb_00001", "bb_00002", "bb_00003"]
    report = inspect_output(tmp_path)
    assert report["ok"], report["findings"]
    assert report["samples"] == 9 and report["recordings"] == 3


def test_a_sample_is_its_segment_of_the_recording(tmp_path: Path) -> None:
    rec = _recording("aa", 2)
    layout = _write(tmp_path, [rec])
    samples = dict(layout.iter_samples(layout.committed_shards()[0]))
    audio, sr = sf.read(io.BytesIO(samples["aa_00001"]["audio.flac"]), dtype="float32")
    meta = json.loads(samples["aa_00001"]["json"])
    tokens = np.load(io.BytesIO(samples["aa_00001"]["tokens.npy"]))
    assert sr == 16000 and audio.shape == (16000,)
    assert np.abs(audio - rec["audio"][16000:32000]).max() < 1e-3  # FLAC is 16-bit
    assert meta["text"] == "words 1" and meta["duration_s"] == 1.0 and meta["recording_duration_s"] == 2.0
    # provenance of the recording's stages and of the segment's, and time shared by duration
    assert set(meta["provenance"]) == {"decode", "transcribe"}
    assert meta["timings"] == pytest.approx({"decode": 0.25, "transcribe": 0.1})
    assert meta["segment_count"] == 2 and "audio" not in meta and "segments" not in meta
    assert tokens.dtype == np.int32 and tokens.tolist() == list(range(13))


def test_quarantine_empty_and_dropped_are_committed(tmp_path: Path) -> None:
    q = {"source": "/data/bad.wav", "status": STATUS_QUARANTINED, "failed_stage": "decode", "error": "empty file (0 bytes)"}
    e = {"source": "/data/quiet.wav", "recording_id": "ee", "status": STATUS_EMPTY, "segments": [], "duration_s": 5.0}
    mixed = _recording("dd", 3, verdicts=["keep", "drop", "keep"])
    mixed["segments"].append({"segment_index": 3, "start_s": 2.5, "end_s": 3.0, "status": STATUS_QUARANTINED,
                              "failed_stage": "quality", "error": "empty audio", "error_kind": "bad_input"})
    layout = _write(tmp_path, [q, e, mixed], keep_dropped=True)
    table = layout.read_quarantine().to_pylist()
    assert table == [
        {"source": "/data/bad.wav", "recording_id": None, "segment_index": None, "stage": "decode",
         "error": "empty file (0 bytes)", "kind": "bad_input"},
        {"source": "/data/dd.wav", "recording_id": "dd", "segment_index": 3, "stage": "quality",
         "error": "empty audio", "kind": "bad_input"},
    ]
    summary = summarize(layout.latest_outcomes())
    assert summary["recordings_by_status"] == {"quarantined": 1, "empty": 1, "ok": 1}
    assert summary["segments_kept"] == 2 and summary["drop_reasons"] == {"snr_db<5": 1}
    dropped = layout.committed_shards("dropped")
    assert [layout.read_index(s).column("key").to_pylist() for s in dropped] == [["dd_00001"]]
    assert {o.source for o in layout.latest_outcomes()} == {"/data/bad.wav", "/data/quiet.wav", "/data/dd.wav"}
    assert inspect_output(tmp_path)["ok"]


def test_sweep_removes_what_no_commit_names(tmp_path: Path) -> None:
    layout = _write(tmp_path, [_recording("aa", 2)])
    # A kill after a shard was renamed into place but before its ledger entry, and one mid-write.
    (tmp_path / "shards" / "shard-dead-0000.tar").write_bytes(b"half")
    (tmp_path / "index" / "shard-dead-0000.parquet").write_bytes(b"half")
    (tmp_path / "shards" / ".shard-dead-0001.tar.tmp").write_bytes(b"tmp")
    assert not inspect_output(tmp_path)["ok"]  # an uncommitted shard on disk is reported
    assert len(layout.sweep()) == 3
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["shard-w0-0000.tar"]
    assert inspect_output(tmp_path)["ok"]


def test_duplicates_across_recordings_and_runs(tmp_path: Path) -> None:
    a, b = _recording("aa", 2), _recording("bb", 2)
    for rec in (a, b):
        for seg in rec["segments"]:
            seg["audio_fp"] = f"fp{seg['segment_index']}"  # bb's segments repeat aa's audio exactly
    layout = _write(tmp_path, [a], keep_dropped=True)
    from stages.write import LocalDuplicates

    seen = LocalDuplicates()
    seen.check_many(list(layout.committed_fingerprints()))  # what a resumed run is seeded with
    with ShardWriter(layout, WriteConfig(), keep_dropped=True, duplicates=seen) as w:
        outcome = w.add(b)
    assert outcome.kept == 0 and outcome.dropped == 2
    (dropped,) = layout.committed_shards("dropped")
    assert layout.read_index(dropped).column("duplicate_of").to_pylist() == ["aa_00000", "aa_00001"]


def test_a_failure_inside_the_writer_commits_nothing(tmp_path: Path) -> None:
    layout = OutLayout(tmp_path)
    with pytest.raises(RuntimeError):
        with ShardWriter(layout, WriteConfig(shard_max_samples=1)) as w:
            w.add(_recording("aa", 2))  # its shard is written (full at 1 sample) but not committed
            raise RuntimeError("worker died")
    assert layout.ledger() == [] and layout.latest_outcomes() == []
    layout.sweep()
    assert not list((tmp_path / "shards").iterdir())


def test_write_stage_returns_outcomes_not_audio(tmp_path: Path) -> None:
    stage = WriteStage(WriteConfig(), out=str(tmp_path))
    q = {"source": "/data/bad.wav", "status": STATUS_QUARANTINED, "failed_stage": "decode", "error": "x"}
    rows = stage([_recording("aa", 2), q])
    assert [r["source"] for r in rows] == ["/data/aa.wav", "/data/bad.wav"]
    assert all(set(r) == {"source", "recording_id", "outcome", "spans", "cpu"} for r in rows)
    assert rows[0]["outcome"].kept == 2 and "write" in rows[0]["outcome"].timings
    (start, end), = rows[1]["spans"].values()  # when this write ran, for the driver's summary
    assert rows[1]["spans"] == rows[0]["spans"] and start <= end
    (entry,) = OutLayout(tmp_path).ledger()  # one batch, one commit
    assert len(entry["recordings"]) == 2 and entry["shards"][0]["samples"] == 2


@pytest.mark.parametrize("damage", ["edited", "truncated", "index_row", "deleted"])
def test_inspect_finds_damage(tmp_path: Path, damage: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    layout = _write(tmp_path, [_recording("aa", 3), _recording("bb", 2)])
    (ref,) = layout.committed_shards()
    shard, index = layout.shard_path(ref), layout.index_path(ref)
    if damage == "edited":
        data = bytearray(shard.read_bytes())
        data[2000] ^= 0xFF
        shard.write_bytes(bytes(data))
        want = "sha256 differs"
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:5000])
        want = "bytes, its commit says"
    elif damage == "index_row":
        table = pq.read_table(index)
        pq.write_table(pa.concat_tables([table.slice(0, 1), table.slice(2)]), index)
        want = "index mismatch"
    else:
        shard.unlink()
        want = "missing"
    report = inspect_output(tmp_path)
    assert not report["ok"]
    assert any(want in f for f in report["findings"]), report["findings"]


def test_a_batch_retried_after_its_commit_is_not_written_twice(tmp_path: Path) -> None:
    """Ray re-runs a task whose worker died after the commit: the retry finds the commit."""
    stage = WriteStage(WriteConfig(), out=str(tmp_path), run_id="run1")
    first = stage([_recording("aa", 2)])
    again = stage([_recording("aa", 2)])
    assert [r["outcome"].kept for r in again] == [r["outcome"].kept for r in first] == [2]
    layout = OutLayout(tmp_path)
    assert len(layout.ledger()) == 1 and len(layout.committed_shards()) == 1
    # another run (a resume with --retry-quarantined, say) commits anew
    WriteStage(WriteConfig(), out=str(tmp_path), run_id="run2")([_recording("bb", 1)])
    assert len(layout.ledger()) == 2

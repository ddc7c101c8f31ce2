from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline.inspect_output import inspect_output
from stages.base import STATUS_EMPTY, STATUS_OK, STATUS_QUARANTINED
from stages.write import EncodeStage, ShardSink, WriteConfig, summarize


def _segments(rec: str, n: int, sr: int = 16000, verdicts: list[str] | None = None) -> list[dict]:
    rows = []
    for i in range(n):
        audio = (0.1 * np.sin(np.arange(sr) * (i + 1) / 50)).astype(np.float32)
        row = {
            "recording_id": rec, "source": f"/data/{rec}.wav", "status": STATUS_OK, "sample_rate": sr,
            "segment_index": i, "segment_count": n, "start_s": float(i), "end_s": float(i + 1),
            "duration_s": 1.0, "recording_duration_s": float(n), "speaker": None, "text": f"words {i}",
            "audio": audio, "semantic_tokens": np.arange(13, dtype=np.int32),
            "provenance": {"transcribe": {"model": "m", "config_hash": "h"}}, "timings": {"transcribe": 0.1},
        }
        if verdicts:
            row["verdict"] = verdicts[i]
            row["drop_reasons"] = ["snr_db<5"] if verdicts[i] == "drop" else []
        rows.append(row)
    return EncodeStage(WriteConfig())(rows)


def _write(out: Path, recordings: list[list[dict]], keep_dropped: bool = False, **cfg) -> ShardSink:
    with ShardSink(out, WriteConfig(**cfg), keep_dropped=keep_dropped) as sink:
        for rows in recordings:
            sink.add_recording(rows)
    sink.write_manifest(summarize(sink.latest()))
    return sink


def test_samples_in_order_one_shard_per_recording(tmp_path: Path) -> None:
    recs = [_segments("aa", 3), _segments("bb", 4), _segments("cc", 2)]
    _write(tmp_path, recs, shard_max_samples=5)
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    assert names[:4] == ["aa_00000.audio.flac", "aa_00000.json", "aa_00000.tokens.npy", "aa_00001.audio.flac"]
    keys = pq.read_table(tmp_path / "index" / "shard-000000.parquet").column("key").to_pylist()
    assert keys == ["aa_00000", "aa_00001", "aa_00002", "bb_00000", "bb_00001", "bb_00002", "bb_00003"]
    report = inspect_output(tmp_path)
    assert report["ok"], report["findings"]
    assert report["samples"] == 9 and report["recordings"] == 3


def test_sample_members_decode_to_what_was_written(tmp_path: Path) -> None:
    rows = _segments("aa", 1)
    _write(tmp_path, [rows])
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        audio, sr = sf.read(io.BytesIO(tar.extractfile("aa_00000.audio.flac").read()), dtype="float32")
        meta = json.loads(tar.extractfile("aa_00000.json").read())
        tokens = np.load(io.BytesIO(tar.extractfile("aa_00000.tokens.npy").read()))
    assert sr == 16000 and audio.shape == (16000,)
    assert meta["text"] == "words 0" and meta["provenance"]["transcribe"]["model"] == "m"
    assert "audio" not in meta and "_members" not in meta
    assert tokens.dtype == np.int32 and tokens.tolist() == list(range(13))


def test_quarantine_empty_and_dropped_are_recorded(tmp_path: Path) -> None:
    q = {"source": "/data/bad.wav", "status": STATUS_QUARANTINED, "failed_stage": "decode", "error": "empty file (0 bytes)"}
    e = {"source": "/data/quiet.wav", "recording_id": "ee", "status": STATUS_EMPTY, "segment_count": 0,
         "recording_duration_s": 5.0}
    mixed = _segments("dd", 3, verdicts=["keep", "drop", "keep"])
    sink = _write(tmp_path, [[q], [e], mixed], keep_dropped=True)
    table = pq.read_table(tmp_path / "quarantine.parquet").to_pylist()
    assert table == [{"source": "/data/bad.wav", "recording_id": None, "segment_index": None, "stage": "decode",
                      "error": "empty file (0 bytes)", "kind": "bad_input"}]
    summary = summarize(sink.latest())
    assert summary["recordings_by_status"] == {"quarantined": 1, "empty": 1, "ok": 1}
    assert summary["segments_kept"] == 2 and summary["drop_reasons"] == {"snr_db<5": 1}
    dropped = pq.read_table(tmp_path / "dropped" / "index" / "shard-000000.parquet").column("key").to_pylist()
    assert dropped == ["dd_00001"]
    assert sink.committed_sources() == {"/data/bad.wav", "/data/quiet.wav", "/data/dd.wav"}


def test_reopen_removes_uncommitted_files_and_continues_numbering(tmp_path: Path) -> None:
    _write(tmp_path, [_segments("aa", 2)])
    # Simulate a kill after a shard was renamed into place but before its commit record.
    (tmp_path / "shards" / "shard-000001.tar").write_bytes(b"half")
    (tmp_path / "index" / "shard-000001.parquet").write_bytes(b"half")
    (tmp_path / "shards" / ".shard-000002.tar.tmp").write_bytes(b"tmp")
    with ShardSink(tmp_path, WriteConfig()) as sink:
        assert sink.committed_sources() == {"/data/aa.wav"}
        assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-000000.tar"]
        sink.add_recording(_segments("bb", 1))
    sink.write_manifest(summarize(sink.latest()))
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    assert inspect_output(tmp_path)["ok"]


def test_duplicates_across_recordings_and_resumes(tmp_path: Path) -> None:
    a, b = _segments("aa", 2), _segments("bb", 2)
    for r in a + b:
        r["audio_fp"] = f"fp{r['segment_index']}"  # bb's segments repeat aa's audio exactly
        r["verdict"], r["drop_reasons"] = "keep", []
    _write(tmp_path, [a], keep_dropped=True)
    with ShardSink(tmp_path, WriteConfig(), keep_dropped=True) as sink:  # a resumed run
        outcome = sink.add_recording(b)
    assert outcome.kept == 0 and outcome.dropped == 2
    dropped = pq.read_table(tmp_path / "dropped" / "index" / "shard-000000.parquet").to_pylist()
    assert [r["duplicate_of"] for r in dropped] == ["aa_00000", "aa_00001"]


def test_failure_inside_the_block_commits_nothing_pending(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with ShardSink(tmp_path, WriteConfig()) as sink:
            sink.add_recording(_segments("aa", 2))
            raise RuntimeError("worker died")
    assert not list((tmp_path / "_state").glob("commit-*.json"))
    with ShardSink(tmp_path, WriteConfig()) as sink:
        assert sink.committed_sources() == set()
    assert not list((tmp_path / "shards").iterdir())


@pytest.mark.parametrize("damage", ["edited", "truncated", "index_row", "deleted"])
def test_inspect_finds_damage(tmp_path: Path, damage: str) -> None:
    import pyarrow as pa

    _write(tmp_path, [_segments("aa", 3), _segments("bb", 2)])
    shard = tmp_path / "shards" / "shard-000000.tar"
    index = tmp_path / "index" / "shard-000000.parquet"
    if damage == "edited":
        data = bytearray(shard.read_bytes())
        data[2000] ^= 0xFF
        shard.write_bytes(bytes(data))
        want = "sha256 differs"
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:5000])
        want = "bytes, manifest says"
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

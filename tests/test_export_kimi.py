"""Kimi-Audio fine-tuning export from a hand-built shard in the documented layout."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kimia_model.whisper_vq.timing import token_count
from pipeline.export.kimi_audio import AUDIO_TOKEN_OFFSET, export_kimi_audio, validate_line
from stages.write.layout import OutLayout


def _flac(n: int, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, 0.1 * np.sin(np.arange(n) / 10.0), sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def build_run(root: Path) -> Path:
    """One committed shard with four samples (member names as in the README, Output)."""
    sr = 24000
    samples = [  # (key, seconds, text, token count delta)
        ("abcd0001_00000", 1.0, "Hello there.", 0),
        ("abcd0001_00001", 2.3, "General Kenobi!", 0),
        ("abcd0002_00000", 1.5, "", 0),  # no transcript: not an ASR sample
        ("abcd0003_00000", 1.0, "Wrong count.", 3),  # tokens do not match the audio
    ]
    buf = io.BytesIO()
    index_rows = []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, sec, text, delta in samples:
            n = int(sec * sr)
            t = token_count(int(round(n * 16000 / sr))) + delta
            meta = {"recording_id": key.split("_")[0], "segment_index": int(key[-5:]), "text": text,
                    "duration_s": sec, "sample_rate": sr, "verdict": "keep", "drop_reasons": []}
            _add(tar, f"{key}.audio.flac", _flac(n, sr))
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            _add(tar, f"{key}.tokens.npy", _npy(np.arange(t, dtype=np.int32) % 1024))
            index_rows.append({"key": key, "members": ["audio.flac", "json", "tokens.npy"]})
    layout = OutLayout(root)
    layout.commit("test", 0, [layout.write_shard("shard-test-0000", buf.getvalue(), index_rows)], [])
    return root


def test_export_reads_only_committed_shards(tmp_path: Path) -> None:
    """A shard of a run still in flight (written, not yet in the ledger) is not part of the dataset."""
    run = build_run(tmp_path / "out")
    committed = run / "shards" / "shard-test-0000.tar"
    (run / "shards" / "shard-inflight-0000.tar").write_bytes(committed.read_bytes())
    report = export_kimi_audio(run, tmp_path / "kimi", "asr")
    assert report["written"] == 2  # the copy in flight added nothing


def test_export_writes_valid_kimi_jsonl(tmp_path: Path) -> None:
    run = build_run(tmp_path / "out")
    report = export_kimi_audio(run, tmp_path / "kimi", "asr")
    assert report["written"] == 2
    assert report["skipped"]["empty_text"] == 1
    assert report["skipped"]["invalid_token_count"] == 1
    assert "abcd0003_00000" in report["errors"][0] and "16 audio_tokens" in report["errors"][0]
    lines = [json.loads(x) for x in (tmp_path / "kimi" / "data.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["abcd0001_00000", "abcd0001_00001"]
    first = lines[0]
    assert first["task_type"] == "understanding"
    roles = [(m["role"], m["message_type"]) for m in first["conversation"]]
    assert roles == [("user", "text"), ("user", "audio"), ("assistant", "text")]
    audio_msg = first["conversation"][1]
    assert Path(audio_msg["content"]).is_file()
    assert Path(audio_msg["content"]).parent == (tmp_path / "kimi/audio").resolve()
    assert audio_msg["audio_tokens"][:3] == [AUDIO_TOKEN_OFFSET, AUDIO_TOKEN_OFFSET + 1, AUDIO_TOKEN_OFFSET + 2]
    assert len(audio_msg["audio_tokens"]) == 13  # 1 s -> ceil(16000 / 1280)
    assert len(lines[1]["conversation"][1]["audio_tokens"]) == 29  # 2.3 s -> ceil(36800 / 1280)
    assert first["conversation"][2]["content"] == "Hello there."
    assert not (tmp_path / "kimi/audio/abcd0003_00000.flac").exists()  # invalid sample left no file
    for line in lines:
        validate_line(line)
    low = export_kimi_audio(run, tmp_path / "kimi2", "asr", lowercase=True, relative_paths=True)
    line = json.loads((tmp_path / "kimi2" / "data.jsonl").read_text().splitlines()[0])
    assert low["written"] == 2 and line["conversation"][2]["content"] == "hello there."
    assert line["conversation"][1]["content"] == "audio/abcd0001_00000.flac"


def test_validate_line_rejects_malformed(tmp_path: Path) -> None:
    wav = tmp_path / "a.flac"
    wav.write_bytes(_flac(16000, 16000))
    good = {"task_type": "understanding", "conversation": [
        {"role": "user", "message_type": "text", "content": "Transcribe."},
        {"role": "user", "message_type": "audio", "content": str(wav),
         "audio_tokens": [AUDIO_TOKEN_OFFSET] * 13},
        {"role": "assistant", "message_type": "text", "content": "hi"}]}
    validate_line(good)
    cases = {
        "role": lambda d: d["conversation"][0].update(role="system"),
        "outside": lambda d: d["conversation"][1].update(audio_tokens=[5] * 13),
        "needs 13": lambda d: d["conversation"][1].update(audio_tokens=[AUDIO_TOKEN_OFFSET] * 12),
        "does not exist": lambda d: d["conversation"][1].update(content=str(tmp_path / "x.flac")),
        "end with": lambda d: d["conversation"].pop(),
        "exactly one": lambda d: d["conversation"].pop(1),
    }
    for match, mutate in cases.items():
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises(ValueError, match=match):
            validate_line(bad)


def test_export_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not supported"):
        export_kimi_audio(tmp_path, tmp_path / "x", "tts")
    with pytest.raises(FileNotFoundError, match="no committed shards"):
        export_kimi_audio(tmp_path, tmp_path / "x", "asr")

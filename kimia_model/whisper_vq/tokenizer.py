"""Audio in, 12.5 Hz tokens and aligned continuous features out (timing in
:mod:`kimia_model.whisper_vq.timing`).

Windows are padded in one of two ways, both independent of the other inputs of a batch so that
batched output equals one-by-one output:

* ``"multiple"`` (upstream GLM-4-Voice): pad the window to the next multiple of 1280 samples and
  mask the padded frames in attention. Windows of equal padded length are batched together, so a
  window is always computed with exactly the shapes it would have on its own.
* ``"full"`` (plain Whisper, and Kimi-Audio's continuous-feature path): pad every window to 30 s
  with no attention mask, the only input Whisper encoders were trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from kimia_model.whisper_vq.codebook_file import CodebookFile
from kimia_model.whisper_vq.loaders import load_encoder
from kimia_model.whisper_vq.model import HOP_LENGTH, CheckpointError, WhisperVQEncoder
from kimia_model.whisper_vq.timing import POOL, SAMPLES_PER_TOKEN, WINDOW_SAMPLES, tokens_in_window, window_bounds

PaddingMode = Literal["multiple", "full"]


@dataclass
class TokenizerOutput:
    """Per-utterance result; every array has ``token_count(len(audio))`` rows."""

    tokens: np.ndarray | None = None  # int32 [T]
    features: np.ndarray | None = None  # float32 [T, 4 D]
    pooled: np.ndarray | None = None  # float32 [T, D]


class WhisperVQTokenizer:
    """Audio in, 12.5 Hz tokens and aligned continuous features out (see the module docstring).

    Args:
        encoder: a loaded :class:`WhisperVQEncoder` (with its own or an attached codebook).
        padding: ``"multiple"`` or ``"full"``; None picks upstream's ``"multiple"`` for VQ
            checkpoints and ``"full"`` for plain Whisper encoders (:meth:`load` passes a
            codebook file's own padding).
        max_batch_windows: windows per encoder call (memory bound; results never depend on it).
        device: torch device string.
        model_id: the id recorded in provenance.
    """

    #: The encoder's attention kernel (``F.scaled_dot_product_attention``), named in run records.
    attention = "sdpa"

    def __init__(
        self,
        encoder: WhisperVQEncoder,
        *,
        padding: PaddingMode | None = None,
        max_batch_windows: int = 8,
        device: str = "cpu",
        model_id: str = "whisper-vq",
        pack_gap_s: float | None = None,
    ) -> None:
        self.encoder = encoder.to(device).eval()
        if encoder.external_codebook is not None:
            encoder.external_codebook = encoder.external_codebook.to(device)
        is_vq = not encoder.branch_tokens and encoder.codebook is not None
        self.padding: PaddingMode = padding or ("multiple" if is_vq else "full")
        self.max_batch_windows = max_batch_windows
        self.device = device
        self.model_id = model_id
        # Packing applies to "full" padding only: "multiple" pads a window just to its length.
        self.pack_gap = None
        if pack_gap_s is not None and self.padding == "full":
            self.pack_gap = tokens_in_window(int(round(pack_gap_s * 16000))) * SAMPLES_PER_TOKEN

    @property
    def dtype(self) -> torch.dtype:
        """The encoder's weight dtype: float32 as loaded, on every device (nothing casts it)."""
        return next(self.encoder.parameters()).dtype

    @classmethod
    def load(
        cls,
        model_path: str | Path,
        codebook_path: str | Path | None = None,
        *,
        model_id: str | None = None,
        **kwargs: Any,
    ) -> WhisperVQTokenizer:
        """Load an upstream VQ directory, or a Whisper checkpoint plus (optionally) our codebook.

        With ``padding=None`` a codebook file decides the padding (the one it was fitted
        with), so its tokens mean what the fit meant; an explicit padding that differs from
        the codebook's is refused.
        """
        enc = load_encoder(model_path)
        if codebook_path is not None:
            cb = CodebookFile.load(codebook_path)
            pool = cb.pool_layer if cb.pool_layer is not None else enc.num_layers
            enc.set_codebook(torch.from_numpy(cb.codebook), pool, cb.pooling_type)
            asked = kwargs.get("padding")
            if asked is not None and asked != cb.padding:
                raise CheckpointError(
                    f"{codebook_path}: fitted with padding {cb.padding!r}; tokenizing with {asked!r} would give "
                    "tokens the codebook was not fitted on (leave padding on auto)"
                )
            kwargs["padding"] = cb.padding
        return cls(enc, model_id=model_id or Path(model_path).name, **kwargs)

    # -- windows ---------------------------------------------------------------------------
    def _prepare(self, window: np.ndarray) -> tuple[np.ndarray, int]:
        n = len(window)
        if self.padding == "full":
            padded = WINDOW_SAMPLES
        else:
            padded = tokens_in_window(n) * SAMPLES_PER_TOKEN
        out = np.zeros(padded, np.float32)
        out[:n] = window
        return out, n

    def __call__(
        self,
        audios: Sequence[np.ndarray],
        *,
        tokens: bool = True,
        features: bool = False,
        feature_layer: int | None = None,
        pooled: bool = False,
        groups: Sequence[str] | None = None,
    ) -> list[TokenizerOutput]:
        """Tokenize 16 kHz mono waveforms (any lengths, including 0).

        With ``pack_gap_s`` set (and ``"full"`` padding), utterances of one group (a
        recording) that fit in a window share 30 s windows: each starts on the token grid
        (a multiple of 1280 samples) after ``pack_gap_s`` of silence, and takes the tokens and
        features at its own positions. The encoder then runs once per shared window instead
        of once per padded utterance; what changes for an utterance is only that attention
        also sees its neighbours (its own samples, and the zeros after them up to the next
        utterance, are the same). Utterances of different groups never share a window.

        Args:
            audios: float waveforms at 16 kHz.
            tokens: compute token ids (needs a codebook).
            features: compute continuous features ``[T, 4 D]`` after ``feature_layer``.
            feature_layer: layer for features (None = last layer, with final LayerNorm).
            pooled: also return the 12.5 Hz pre-VQ vectors ``[T, D]`` (for codebook fitting).
        """
        enc = self.encoder
        if tokens and not enc.has_tokens:
            raise CheckpointError("this encoder has no codebook: pass a codebook file to tokenize")
        layer = (enc.num_layers if feature_layer is None else feature_layer) if features else None
        # A job is one encoder window: (padded audio, [(item, window index, token offset, length)]).
        jobs: list[tuple[np.ndarray, list[tuple[int, int, int, int]]]] = []
        packable: dict[str, list[tuple[int, np.ndarray]]] = {}
        for i, audio in enumerate(audios):
            a = np.asarray(audio, dtype=np.float32)
            if a.ndim != 1:
                raise ValueError(f"audio {i} must be mono 1-D, got shape {a.shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"audio {i} contains NaN or infinite samples")
            if self.pack_gap is not None and 0 < len(a) <= WINDOW_SAMPLES:
                packable.setdefault(groups[i] if groups is not None else "", []).append((i, a))
                continue
            for w, (s, e) in enumerate(window_bounds(len(a))):
                padded, n = self._prepare(a[s:e])
                jobs.append((padded, [(i, w, 0, n)]))
        for members in packable.values():
            jobs += self._packed_jobs(members)
        parts: dict[tuple[int, int], TokenizerOutput] = {}
        # Equal padded lengths only: a window then sees exactly the shapes it would alone.
        by_len: dict[int, list[tuple[np.ndarray, list[tuple[int, int, int, int]]]]] = {}
        for job in jobs:
            by_len.setdefault(len(job[0]), []).append(job)
        for plen in sorted(by_len):
            group = by_len[plen]
            for start in range(0, len(group), self.max_batch_windows):
                chunk = group[start : start + self.max_batch_windows]
                self._run_chunk(chunk, parts, tokens=tokens, layer=layer, pooled=pooled)
        results = []
        d = enc.d_model
        for i, audio in enumerate(audios):
            n_win = len(window_bounds(len(audio)))
            pieces = [parts[(i, w)] for w in range(n_win)]
            out = TokenizerOutput()
            if tokens:
                out.tokens = np.concatenate([p.tokens for p in pieces]) if pieces else np.zeros(0, np.int32)
            if layer is not None:
                out.features = (
                    np.concatenate([p.features for p in pieces]) if pieces else np.zeros((0, POOL * d), np.float32)
                )
            if pooled:
                out.pooled = np.concatenate([p.pooled for p in pieces]) if pieces else np.zeros((0, d), np.float32)
            results.append(out)
        return results

    def _packed_jobs(self, members: list[tuple[int, np.ndarray]]) -> list[tuple[np.ndarray, list[tuple[int, int, int, int]]]]:
        """Greedy, in input order: an utterance that does not fit after the last one opens a window."""
        assert self.pack_gap is not None
        jobs: list[tuple[np.ndarray, list[tuple[int, int, int, int]]]] = []
        buf, placed, used = np.zeros(WINDOW_SAMPLES, np.float32), [], 0
        for i, a in members:
            slot = tokens_in_window(len(a)) * SAMPLES_PER_TOKEN
            start = used + self.pack_gap if placed else 0
            if placed and start + len(a) > WINDOW_SAMPLES:
                jobs.append((buf, placed))
                buf, placed, start = np.zeros(WINDOW_SAMPLES, np.float32), [], 0
            buf[start : start + len(a)] = a
            placed.append((i, 0, start // SAMPLES_PER_TOKEN, len(a)))
            used = start + slot
        if placed:
            jobs.append((buf, placed))
        return jobs

    def _run_chunk(
        self,
        chunk: list[tuple[np.ndarray, list[tuple[int, int, int, int]]]],
        parts: dict[tuple[int, int], TokenizerOutput],
        *,
        tokens: bool,
        layer: int | None,
        pooled: bool,
    ) -> None:
        enc = self.encoder
        wav = torch.from_numpy(np.stack([c[0] for c in chunk])).to(self.device)
        mel = enc.mel(wav)
        frame_mask = None
        if self.padding == "multiple":
            # Real 100 Hz frames: ceil(L / 160), the HF extractor's sample mask subsampled by hop.
            n_frames = mel.shape[-1]
            lengths = torch.tensor([-(-c[1][0][3] // HOP_LENGTH) for c in chunk], device=self.device)
            frame_mask = torch.arange(n_frames, device=self.device)[None, :] < lengths[:, None]
        res = enc.encode(mel, frame_mask, feature_layer=layer, want_pooled=pooled, want_tokens=tokens)
        for b, (_, members) in enumerate(chunk):
            for item, w, k, n in members:
                t = tokens_in_window(n)
                out = TokenizerOutput()
                if tokens:
                    out.tokens = res.tokens[b, k : k + t].cpu().numpy().astype(np.int32)
                if layer is not None:
                    f = res.features[b, POOL * k : POOL * (k + t)]
                    out.features = f.reshape(t, POOL * f.shape[-1]).float().cpu().numpy()
                if pooled:
                    out.pooled = res.pooled[b, k : k + t].float().cpu().numpy()
                parts[(item, w)] = out

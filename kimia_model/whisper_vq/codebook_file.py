"""Codebook files of ours: a ``[K, D]`` codebook fitted on pooled Whisper features, with the
pool layer, pooling and window padding it was fitted at (written by :mod:`kimia_model.codebook`,
read by the tokenizer).

The padding matters as much as the layer: Whisper's encoder attends over the whole window, so
a segment encoded alone (``multiple``: padded to the next 1280 samples only) and the same
segment padded with zeros to 30 s (``full``) give different features. A codebook only means
something for features made the way it was fitted, so the tokenizer reads the padding from
the file. Files written before the padding was recorded were fitted with ``full``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kimia_model.whisper_vq.model import CheckpointError

CODEBOOK_FORMAT = "kimia-codebook-v1"
PADDINGS = ("multiple", "full")


@dataclass
class CodebookFile:
    """A codebook fitted on pooled Whisper features (written by :mod:`kimia_model.codebook`).

    Stored as safetensors: tensor ``codebook`` ``[K, D]`` float32, metadata (strings) ``format``,
    ``whisper_model``, ``pool_layer``, ``pooling_type``, ``padding``, ``d_model`` and fitting
    statistics. A bare ``[K, D]`` ``.npy`` is accepted too (pool layer then defaults to the last
    layer, padding to ``full``).
    """

    codebook: np.ndarray
    pool_layer: int | None = None
    pooling_type: str = "avg"
    meta: dict[str, str] = field(default_factory=dict)
    padding: str = "full"

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        meta = dict(self.meta)
        meta.update(
            format=CODEBOOK_FORMAT,
            pooling_type=self.pooling_type,
            padding=self.padding,
            d_model=str(self.codebook.shape[1]),
            size=str(self.codebook.shape[0]),
        )
        if self.pool_layer is not None:
            meta["pool_layer"] = str(self.pool_layer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"codebook": np.ascontiguousarray(self.codebook, dtype=np.float32)}, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> CodebookFile:
        p = Path(path).expanduser()
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
            if arr.ndim != 2:
                raise CheckpointError(f"{p}: codebook must be [K, D], got shape {arr.shape}")
            return cls(arr.astype(np.float32))
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="numpy") as st:
                meta = dict(st.metadata() or {})
                if "codebook" not in st.keys():
                    raise CheckpointError(f"{p}: no 'codebook' tensor")
                arr = st.get_tensor("codebook")
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
            raise CheckpointError(f"{p}: unreadable codebook ({exc})") from exc
        if meta.get("format") != CODEBOOK_FORMAT:
            raise CheckpointError(f"{p}: format {meta.get('format')!r} is not {CODEBOOK_FORMAT}")
        if arr.ndim != 2:
            raise CheckpointError(f"{p}: codebook must be [K, D], got shape {arr.shape}")
        pool = int(meta["pool_layer"]) if "pool_layer" in meta else None
        padding = meta.get("padding", "full")
        if padding not in PADDINGS:
            raise CheckpointError(f"{p}: padding {padding!r} is not one of {', '.join(PADDINGS)}")
        return cls(arr.astype(np.float32), pool, meta.get("pooling_type", "avg"), meta, padding)

"""Whisper encoder checkpoints in every layout we read, loaded into :class:`WhisperVQEncoder`.

An upstream ``WhisperVQEncoder`` or Hugging Face Whisper directory (``config.json`` +
safetensors), an openai-whisper ``.pt`` and a CTranslate2 (faster-whisper) directory, whose
``model.bin`` is parsed here. Nothing executes checkpoint code, and every tensor name and shape
is checked before it loads.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kimia_model.checkpoint import load_state_checked
from kimia_model.whisper_vq.model import CheckpointError, WhisperVQConfig, WhisperVQEncoder


def _strict_load(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load with every key and shape checked; EMA statistics only matter for training the
    codebook, so a checkpoint may leave them out."""
    load_state_checked(model, state, source, optional=lambda k: k in ("ema_count", "ema_weight"),
                       error=CheckpointError)


def _read_safetensors_dir(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Read the encoder tensors of every ``*.safetensors`` in ``path``, prefixes stripped."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                for p in prefixes:
                    if key.startswith(p):
                        state[key[len(p) :]] = st.get_tensor(key)
                        break
    return state


def load_hf_dir(path: Path) -> WhisperVQEncoder:
    """Load an upstream ``WhisperVQEncoder`` directory or a Hugging Face Whisper directory.

    The upstream tokenizer stores un-prefixed names (``conv1.weight``, ``codebook.weight``);
    GLM full-model checkpoints prefix ``model.encoder.`` and HF Whisper models ``model.encoder.``
    or ``encoder.``. For a plain Whisper model (no ``quantize_vocab_size``) decoder weights are
    skipped. Nothing executes checkpoint code: the config is read as JSON.
    """
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path} has no config.json")
    raw = json.loads(cfg_file.read_text())
    if raw.get("model_type") not in (None, "whisper", "whisper_vq"):
        raise CheckpointError(f"{cfg_file}: model_type {raw.get('model_type')!r} is not a Whisper encoder")
    cfg = WhisperVQConfig.from_dict(raw)
    model = WhisperVQEncoder(cfg)
    from safetensors import safe_open

    first = sorted(path.glob("*.safetensors"))
    if not first:
        raise CheckpointError(f"{path} has no *.safetensors weights")
    keys: list[str] = []
    for f in first:  # key listing only; a sharded checkpoint may hold the encoder in any shard
        with safe_open(str(f), framework="pt") as st:
            keys.extend(st.keys())
    prefixed = any(k.startswith(("model.encoder.", "encoder.")) for k in keys)
    prefixes = ("model.encoder.", "encoder.") if prefixed else ("",)
    state = _read_safetensors_dir(path, prefixes)
    if prefixes != ("",):
        # Full Whisper/GLM models: keep what this encoder builds (GLM's load_quantize_encoder drops
        # layer_norm and layers >= quantize_position for an encoder-only tokenizer).
        want = set(model.state_dict())
        state = {k: v for k, v in state.items() if k in want or not k.startswith(("layers.", "layer_norm."))}
    _strict_load(model, state, str(path))
    return model.eval()


def load_openai_whisper(path: Path) -> WhisperVQEncoder:
    """Load the encoder of an openai-whisper ``.pt`` checkpoint (``dims`` + ``model_state_dict``)."""
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an openai-whisper checkpoint (needs 'dims' and 'model_state_dict')")
    dims = ckpt["dims"]
    cfg = WhisperVQConfig(
        num_mel_bins=int(dims["n_mels"]),
        d_model=int(dims["n_audio_state"]),
        encoder_layers=int(dims["n_audio_layer"]),
        encoder_attention_heads=int(dims["n_audio_head"]),
        encoder_ffn_dim=4 * int(dims["n_audio_state"]),
        max_source_positions=int(dims["n_audio_ctx"]),
    )
    names = {
        "attn.query": "self_attn.q_proj",
        "attn.key": "self_attn.k_proj",
        "attn.value": "self_attn.v_proj",
        "attn.out": "self_attn.out_proj",
        "attn_ln": "self_attn_layer_norm",
        "mlp.0": "fc1",
        "mlp.2": "fc2",
        "mlp_ln": "final_layer_norm",
    }
    state: dict[str, torch.Tensor] = {}
    for key, value in ckpt["model_state_dict"].items():
        if not key.startswith("encoder."):
            continue
        k = key[len("encoder.") :]
        if k == "positional_embedding":
            k = "embed_positions.weight"
        elif k.startswith("ln_post."):
            k = "layer_norm." + k[len("ln_post.") :]
        elif k.startswith("blocks."):
            _, idx, rest = k.split(".", 2)
            for old, new in names.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            k = f"layers.{idx}.{rest}"
        state[k] = value
    model = WhisperVQEncoder(cfg)
    _strict_load(model, state, str(path))
    return model.eval()


_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2_variables(model_bin: Path, prefix: str = "encoder/") -> dict[str, np.ndarray]:
    """Parse a CTranslate2 ``model.bin`` (binary version 6) and return the variables under ``prefix``.

    Layout: uint32 version, string name, uint32 revision, uint32 count, then per variable a
    string name, uint8 rank, uint32 dims, uint8 dtype id, uint32 byte count and the raw bytes;
    strings are uint16 length (with NUL) + bytes. bfloat16 is widened to float32.
    """
    data = memoryview(model_bin.read_bytes())
    off = 0

    def unpack(fmt: str) -> Any:
        nonlocal off
        (v,) = struct.unpack_from("<" + fmt, data, off)
        off += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal off
        n = unpack("H")
        s = bytes(data[off : off + n - 1]).decode()
        off += n
        return s

    version = unpack("I")
    if version < 5 or version > 6:
        raise CheckpointError(f"{model_bin}: CTranslate2 binary version {version} unsupported (5-6)")
    spec = string()
    if spec != "WhisperSpec":
        raise CheckpointError(f"{model_bin} holds a {spec}, not a Whisper model")
    unpack("I")  # spec revision
    out: dict[str, np.ndarray] = {}
    for _ in range(unpack("I")):
        name = string()
        rank = unpack("B")
        dims = [unpack("I") for _ in range(rank)]
        dtype_id = unpack("B")
        nbytes = unpack("I")
        if name.startswith(prefix):
            raw = bytes(data[off : off + nbytes])
            if dtype_id == 5:  # bfloat16: the high half of a float32
                arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif dtype_id in _CT2_DTYPES:
                arr = np.frombuffer(raw, _CT2_DTYPES[dtype_id])
            else:
                raise CheckpointError(f"{model_bin}: unknown dtype id {dtype_id} for {name}")
            out[name[len(prefix) :]] = arr.reshape(dims).copy()
        off += nbytes
    return out


def load_ct2_dir(path: Path) -> WhisperVQEncoder:
    """Load the encoder of a CTranslate2 (faster-whisper) Whisper directory.

    CTranslate2 fuses q/k/v into ``self_attention/linear_0`` (k's bias stored as zeros) and may
    store int8 weights with a per-row ``weight_scale`` (float = int8 / scale).
    """
    var = read_ct2_variables(path / "model.bin")

    def t(name: str) -> torch.Tensor:
        if name not in var:
            raise CheckpointError(f"{path}/model.bin lacks encoder/{name}")
        arr = var[name]
        scale = var.get(name + "_scale") if name.endswith("weight") else None
        if arr.dtype == np.int8 and scale is not None:
            arr = arr.astype(np.float32) / scale.reshape(-1, *([1] * (arr.ndim - 1)))
        return torch.from_numpy(np.ascontiguousarray(arr.astype(np.float32)))

    idx = {k.split("/")[0][len("layer_") :] for k in var if k.startswith("layer_")}
    n_layers = 1 + max((int(i) for i in idx if i.isdigit()), default=-1)
    if n_layers == 0:
        raise CheckpointError(f"{path}/model.bin has no encoder layers")
    conv1 = t("conv1/weight")
    d, n_mels = conv1.shape[0], conv1.shape[1]
    heads = int(var["num_heads"]) if "num_heads" in var else max(1, d // 64)
    ffn = t("layer_0/ffn/linear_0/weight").shape[0]
    cfg = WhisperVQConfig(
        num_mel_bins=n_mels,
        d_model=d,
        encoder_layers=n_layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        max_source_positions=t("position_encodings/encodings").shape[0],
    )
    state = {
        "conv1.weight": conv1,
        "conv1.bias": t("conv1/bias"),
        "conv2.weight": t("conv2/weight"),
        "conv2.bias": t("conv2/bias"),
        "embed_positions.weight": t("position_encodings/encodings"),
        "layer_norm.weight": t("layer_norm/gamma"),
        "layer_norm.bias": t("layer_norm/beta"),
    }
    for i in range(n_layers):
        p = f"layer_{i}"
        qkv_w = t(f"{p}/self_attention/linear_0/weight")
        qkv_b = t(f"{p}/self_attention/linear_0/bias")
        q_w, k_w, v_w = qkv_w.split(d, dim=0)
        q_b, _, v_b = qkv_b.split(d, dim=0)
        state.update(
            {
                f"layers.{i}.self_attn.q_proj.weight": q_w,
                f"layers.{i}.self_attn.q_proj.bias": q_b,
                f"layers.{i}.self_attn.k_proj.weight": k_w,
                f"layers.{i}.self_attn.v_proj.weight": v_w,
                f"layers.{i}.self_attn.v_proj.bias": v_b,
                f"layers.{i}.self_attn.out_proj.weight": t(f"{p}/self_attention/linear_1/weight"),
                f"layers.{i}.self_attn.out_proj.bias": t(f"{p}/self_attention/linear_1/bias"),
                f"layers.{i}.self_attn_layer_norm.weight": t(f"{p}/self_attention/layer_norm/gamma"),
                f"layers.{i}.self_attn_layer_norm.bias": t(f"{p}/self_attention/layer_norm/beta"),
                f"layers.{i}.fc1.weight": t(f"{p}/ffn/linear_0/weight"),
                f"layers.{i}.fc1.bias": t(f"{p}/ffn/linear_0/bias"),
                f"layers.{i}.fc2.weight": t(f"{p}/ffn/linear_1/weight"),
                f"layers.{i}.fc2.bias": t(f"{p}/ffn/linear_1/bias"),
                f"layers.{i}.final_layer_norm.weight": t(f"{p}/ffn/layer_norm/gamma"),
                f"layers.{i}.final_layer_norm.bias": t(f"{p}/ffn/layer_norm/beta"),
            }
        )
    model = WhisperVQEncoder(cfg)
    _strict_load(model, state, str(path))
    return model.eval()


def load_encoder(path: str | Path) -> WhisperVQEncoder:
    """Load any supported checkpoint: upstream VQ dir, HF Whisper dir, CTranslate2 dir, ``.pt``."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "model.bin").exists() and not list(p.glob("*.safetensors")):
            return load_ct2_dir(p)
        return load_hf_dir(p)
    if p.is_file() and p.suffix in (".pt", ".pth"):
        return load_openai_whisper(p)
    raise CheckpointError(
        f"{p}: not a Whisper checkpoint (expected an HF/WhisperVQ directory, a CTranslate2 directory or a .pt file)"
    )

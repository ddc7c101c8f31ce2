"""Kimi-Audio's dual-stream language model, natively on transformers' Qwen2 building blocks.

Kimi-Audio (MoonshotAI) is a Qwen2.5-7B decoder that reads and writes two parallel token
streams (as in upstream's ``modeling_kimia.py``):

* every position carries an **audio-stream** id and a **text-stream** id; both are looked
  up in one shared embedding table and summed;
* inside user audio spans (between ``<|im_media_begin|>`` and ``<|im_media_end|>``) the
  audio-stream embedding of the 12.5 Hz semantic token is mixed with a continuous Whisper
  feature (4 stacked 50 Hz frames = 5120 dims) passed through a small adaptor MLP:
  ``(E[token] + adaptor(feature)) * sqrt(2)``;
* the trunk's hidden state after layer ``kimia_mimo_transformer_from_layer_index`` is
  cloned into an extra stack of ``kimia_mimo_layers`` decoder layers (the "MIMO" audio
  branch, ``mimo_norm`` + ``mimo_output``) that predicts the audio stream, while the trunk
  continues to ``norm`` + ``lm_head`` and predicts the text stream.

Upstream ships this as remote code that needs flash-attn and CUDA. This module loads the same
checkpoint layout (``config.json`` + ``*.safetensors`` [+ ``model.safetensors.index.json``],
the tensor names of ``MoonshotKimiaForCausalLM``) without ``trust_remote_code``, runs with
PyTorch SDPA by default (flash-attn only when importable and asked for), and uses one code
path for CPU, one GPU, or layers spread over several GPUs.

Example:
    >>> from kimia_model.kimia_lm import KimiaLM
    >>> lm = KimiaLM.from_pretrained("/models/Kimi-Audio-7B-Instruct", device="cuda")  # doctest: +SKIP
    >>> out = lm(audio_ids, text_ids, whisper_features=[feats], continuous_mask=mask)  # doctest: +SKIP
    >>> out.text_logits.shape  # [batch, 1, vocab] (last position only by default)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
)

#: Keys of ``config.json`` that only Kimi-Audio has, with the values used when a config lacks
#: them. These are the ``KimiAudioConfig`` class defaults except the audio
#: delay: the class default is 5, but the technical report and the first public inference code
#: (which hard-coded it) use 6, so a config that omits the key gets 6.
KIMIA_DEFAULTS: dict[str, Any] = {
    "kimia_mimo_layers": 6,
    "kimia_mimo_transformer_from_layer_index": 21,
    "kimia_mimo_audiodelaytokens": 6,
    "kimia_audio_output_vocab": 16896,
    "kimia_text_output_vocab": 152064,
    "num_audio_special_tokens": 512,
    "num_base_tokens": 151643,
    "kimia_token_offset": 152064,
    "use_whisper_feature": True,
    "kimia_adaptor_input_dim": 5120,
    "kimia_media_begin": 151661,
    "kimia_media_end": 151663,
}

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")

#: Parameter names that a checkpoint may carry but that we recompute (RoPE tables).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(RuntimeError):
    """A model directory does not match the upstream Kimi-Audio layout (names listed)."""


def flash_attn_available() -> bool:
    """True when the optional flash-attn package can be imported."""
    return importlib.util.find_spec("flash_attn") is not None


def load_config(model_dir: str | Path) -> Qwen2Config:
    """Read ``config.json`` of a Kimi-Audio directory into a ``Qwen2Config``.

    The Kimi keys become plain attributes (Qwen2Config keeps unknown kwargs), filled with
    :data:`KIMIA_DEFAULTS` when absent, so the rest of the code reads ``config.kimia_*``.

    Raises:
        CheckpointError: ``config.json`` missing, unreadable, or inconsistent.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"Kimi-Audio config not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Qwen2Config:
    """Build the config from a ``config.json`` dict (see :func:`load_config`)."""
    raw = dict(raw)
    # Remote-code bookkeeping that must not steer a native load.
    for key in ("auto_map", "architectures", "model_type", "_name_or_path", "transformers_version"):
        raw.pop(key, None)
    for key, value in KIMIA_DEFAULTS.items():
        raw.setdefault(key, value)
    raw.setdefault("num_key_value_heads", raw.get("num_attention_heads"))
    # Qwen2Config turns on sliding windows only when asked; Kimi never uses them.
    raw["use_sliding_window"] = False
    config = Qwen2Config(**raw)
    _validate_config(config)
    return config


def _validate_config(c: Qwen2Config) -> None:
    problems = []
    if not 0 <= c.kimia_mimo_transformer_from_layer_index < c.num_hidden_layers:
        problems.append(
            f"kimia_mimo_transformer_from_layer_index={c.kimia_mimo_transformer_from_layer_index} "
            f"is not a trunk layer (num_hidden_layers={c.num_hidden_layers})"
        )
    if c.kimia_mimo_layers < 1:
        problems.append(f"kimia_mimo_layers={c.kimia_mimo_layers} (the audio branch needs >= 1 layer)")
    if c.kimia_token_offset >= c.vocab_size:
        problems.append(f"kimia_token_offset={c.kimia_token_offset} >= vocab_size={c.vocab_size}")
    if c.hidden_size % c.num_attention_heads:
        problems.append(f"hidden_size={c.hidden_size} not divisible by num_attention_heads={c.num_attention_heads}")
    if c.num_attention_heads % c.num_key_value_heads:
        problems.append(
            f"num_attention_heads={c.num_attention_heads} not divisible by num_key_value_heads={c.num_key_value_heads}"
        )
    if c.kimia_mimo_audiodelaytokens < 0:
        problems.append(f"kimia_mimo_audiodelaytokens={c.kimia_mimo_audiodelaytokens} < 0")
    if problems:
        raise CheckpointError("invalid Kimi-Audio config: " + "; ".join(problems))


class KVCache:
    """Key/value cache for the trunk and the audio branch, in upstream order.

    Layer slots ``0 .. N-1`` are the trunk layers, ``N .. N+M-1`` the audio-branch layers
    (upstream's 28 + 6 = 34 entries). Buffers grow by doubling and are written in place,
    so a decode step copies one position instead of re-concatenating the whole history
    (which would make generation quadratic in memory traffic).

    It implements the one method transformers' ``Qwen2Attention`` calls on a cache,
    ``update(key, value, layer_idx)``.
    """

    def __init__(self) -> None:
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self._len: dict[int, int] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any):
        """Append ``[B, H, n, D]`` keys/values of one layer; return the full history."""
        n = key.shape[2]
        used = self._len.get(layer_idx, 0)
        buf_k = self._k.get(layer_idx)
        if buf_k is None or used + n > buf_k.shape[2]:
            cap = max(256, used + n, 2 * (buf_k.shape[2] if buf_k is not None else 0))
            new_k = key.new_empty(key.shape[0], key.shape[1], cap, key.shape[3])
            new_v = value.new_empty(value.shape[0], value.shape[1], cap, value.shape[3])
            if buf_k is not None and used:
                new_k[:, :, :used] = buf_k[:, :, :used]
                new_v[:, :, :used] = self._v[layer_idx][:, :, :used]
            self._k[layer_idx], self._v[layer_idx] = new_k, new_v
        self._k[layer_idx][:, :, used : used + n] = key
        self._v[layer_idx][:, :, used : used + n] = value
        self._len[layer_idx] = used + n
        return self._k[layer_idx][:, :, : used + n], self._v[layer_idx][:, :, : used + n]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions cached so far (of trunk layer 0 by default)."""
        return self._len.get(layer_idx, 0)

    def num_layers(self) -> int:
        return len(self._len)


@dataclass
class KimiaOutput:
    """Logits of both heads and the cache.

    Attributes:
        text_logits: ``[B, T, vocab]`` float32 from the trunk head (text stream).
        audio_logits: ``[B, T, vocab]`` float32 from the audio branch, or None when the
            branch was skipped (text-only generation never needs it).
        cache: the updated :class:`KVCache`.
    """

    text_logits: torch.Tensor
    audio_logits: torch.Tensor | None
    cache: KVCache


class VQAdaptor(nn.Module):
    """Whisper features (12.5 Hz, 4x1280) to the LM width: Linear, SiLU, Linear, LayerNorm.

    Kept as an ``nn.Sequential`` with upstream's slot order (0 Linear, 1 SiLU, 2 Dropout(0),
    3 Linear, 4 LayerNorm) so tensor names match the checkpoint (``vq_adaptor.layers.0.weight``).
    """

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(config.kimia_adaptor_input_dim, config.hidden_size, bias=True),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Linear(config.hidden_size, config.hidden_size, bias=True),
            # Upstream uses rms_norm_eps as the LayerNorm eps too.
            nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class KimiaBackbone(nn.Module):
    """The ``model.*`` part of the checkpoint: embeddings, trunk, audio branch, adaptor."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        mimo = []
        for i in range(config.kimia_mimo_layers):
            # Built with a trunk index (Qwen2Attention reads config.layer_types[idx]) and then
            # given its cache slot after the trunk, as upstream orders its 34 cache entries.
            layer = Qwen2DecoderLayer(config, 0)
            layer.self_attn.layer_idx = config.num_hidden_layers + i
            mimo.append(layer)
        self.mimo_layers = nn.ModuleList(mimo)
        self.mimo_norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.use_whisper_feature:
            self.vq_adaptor = VQAdaptor(config)


class KimiaLM(nn.Module):
    """Kimi-Audio's dual-stream LM (``MoonshotKimiaForCausalLM`` tensor layout).

    Build with :meth:`from_pretrained` for real or test checkpoints, or directly from a
    config for random weights (the tests' factories save such a model as a checkpoint).
    """

    def __init__(self, config: Qwen2Config, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        config._attn_implementation = _pick_attention(attn_implementation, torch.device("cpu"), torch.float32)
        self.config = config
        self.model = KimiaBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mimo_output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary_emb = Qwen2RotaryEmbedding(config)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device | Sequence[str | torch.device] = "cpu",
        dtype: torch.dtype | str = "auto",
        attn_implementation: str = "sdpa",
        allow_unexpected: Sequence[str] = (),
    ) -> KimiaLM:
        """Load a Kimi-Audio directory in the upstream layout, natively.

        Args:
            model_dir: directory with ``config.json`` and ``model.safetensors`` or sharded
                ``*.safetensors`` + ``model.safetensors.index.json``.
            device: one device, or a list of devices to spread the layers over (the trunk
                and branch are split into contiguous blocks; hidden states hop between
                devices, which is how a 7B model fits on several small GPUs).
            dtype: ``"auto"`` = bfloat16 on CUDA (what upstream ships) and float32 on CPU
                (CPU bfloat16 matmuls are slow on most hosts); or a torch dtype / its name.
            attn_implementation: ``"sdpa"`` (default), ``"eager"``, ``"flash_attention_2"``
                (needs flash-attn and a CUDA half-precision model) or ``"auto"`` (flash-attn
                when it can run, else SDPA).
            allow_unexpected: name prefixes of extra checkpoint tensors to ignore (e.g.
                ``("whisper_model.",)`` for an un-exported fine-tuning directory).

        Raises:
            CheckpointError: missing files, missing/unexpected tensors or shape mismatches,
                with the offending names listed.
        """
        model_dir = Path(model_dir)
        config = load_config(model_dir)
        devices = [torch.device(d) for d in ([device] if isinstance(device, (str, torch.device)) else device)]
        if not devices:
            raise ValueError("device list is empty")
        for d in devices:
            if d.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError(f"device {d} requested but CUDA is not available")
        torch_dtype = _resolve_dtype(dtype, devices[0])
        attn = _pick_attention(attn_implementation, devices[0], torch_dtype)
        with torch.device("meta"):
            lm = cls(config, attn_implementation="sdpa")
        config._attn_implementation = attn
        placement = lm._placement(devices)
        lm._load_weights(model_dir, placement, torch_dtype, tuple(allow_unexpected))
        # RoPE tables are not in the checkpoint: rebuild them for real on the first device.
        lm.rotary_emb = Qwen2RotaryEmbedding(config).to(devices[0])
        lm.eval()
        lm.requires_grad_(False)
        return lm

    def _placement(self, devices: list[torch.device]) -> dict[str, torch.device]:
        """Map each top-level block name to a device (contiguous split of the layer stack)."""
        c = self.config
        order = [f"model.layers.{i}" for i in range(c.num_hidden_layers)]
        mimo = [f"model.mimo_layers.{i}" for i in range(c.kimia_mimo_layers)]
        # Trunk then branch, split into equal contiguous blocks: balances memory, and a
        # decode step crosses each device boundary once per stack.
        order += mimo
        per = math.ceil(len(order) / len(devices))
        where = {name: devices[min(i // per, len(devices) - 1)] for i, name in enumerate(order)}
        where["model.embed_tokens"] = devices[0]
        where["model.vq_adaptor"] = devices[0]
        last_trunk = where[f"model.layers.{c.num_hidden_layers - 1}"]
        where["model.norm"] = last_trunk
        where["lm_head"] = last_trunk
        last_mimo = where[mimo[-1]]
        where["model.mimo_norm"] = last_mimo
        where["mimo_output"] = last_mimo
        return where

    def _load_weights(
        self,
        model_dir: Path,
        placement: dict[str, torch.device],
        dtype: torch.dtype,
        allow_unexpected: tuple[str, ...],
    ) -> None:
        from safetensors import safe_open

        files = _weight_files(model_dir)
        expected = {name: tuple(p.shape) for name, p in self.named_parameters()}
        present: dict[str, tuple[Path, tuple[int, ...]]] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for name in sf.keys():
                        present[name] = (f, tuple(sf.get_slice(name).get_shape()))
            except Exception as exc:  # noqa: BLE001 - any reader failure means a bad file
                raise CheckpointError(f"cannot read safetensors file {f}: {exc}") from exc
        # Tied heads are declared upstream (_tied_weights_keys) with tie_word_embeddings=False;
        # honour the flag if a config sets it and the head tensor is absent.
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        missing_names = [n for n in expected if n not in present and not (tied and n == "lm_head.weight")]
        unexpected = [
            n
            for n in present
            if n not in expected and not n.endswith(_IGNORED_SUFFIXES) and not n.startswith(allow_unexpected)
        ]
        mismatched = [
            f"{n}: checkpoint {list(present[n][1])} vs model {list(shape)}"
            for n, shape in expected.items()
            if n in present and present[n][1] != shape
        ]
        if missing_names or unexpected or mismatched:
            parts = [f"{model_dir} does not match the Kimi-Audio layout of its config.json"]
            if missing_names:
                parts.append(f"missing {len(missing_names)} tensor(s): {_names(missing_names)}")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} tensor(s): {_names(unexpected)}")
            if mismatched:
                parts.append(f"shape mismatch in {len(mismatched)} tensor(s): {_names(mismatched)}")
            raise CheckpointError("; ".join(parts))
        by_file: dict[Path, list[str]] = {}
        for n in expected:
            if n in present:
                by_file.setdefault(present[n][0], []).append(n)
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt") as sf:
                for n in names:
                    dev = _device_of(n, placement)
                    _assign(self, n, sf.get_tensor(n).to(device=dev, dtype=dtype))
        if tied and "lm_head.weight" not in present:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- forward ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def attn_implementation(self) -> str:
        """The attention kernel :func:`_pick_attention` settled on at load, for run records."""
        return self.config._attn_implementation

    def embed(
        self,
        audio_ids: torch.Tensor,
        text_ids: torch.Tensor | None,
        whisper_features: Sequence[torch.Tensor] | None = None,
        continuous_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings of the two streams with Whisper features mixed in.

        Args:
            audio_ids / text_ids: ``[B, L]`` ids of the two streams.
            whisper_features: per batch row, the continuous features of all its continuous
                positions in order (``[N_b, kimia_adaptor_input_dim]``), several audio spans
                simply concatenated. (Upstream only ever reads the first audio's features,
                its issue #92/#123; consuming them in mask order lifts that limit.)
            continuous_mask: ``[B, L]`` bool, True where a feature is mixed in. When None and
                features are given, it is derived as upstream does: every position strictly
                between a ``media_begin`` and the next ``media_end`` on the audio stream.

        Raises:
            ValueError: feature count or width does not fit the mask.
        """
        emb = self.model.embed_tokens(audio_ids)
        if whisper_features is not None and self.config.use_whisper_feature:
            if continuous_mask is None:
                continuous_mask = media_span_mask(
                    audio_ids, self.config.kimia_media_begin, self.config.kimia_media_end
                )
            continuous_mask = continuous_mask.to(emb.device, torch.bool)
            if len(whisper_features) != audio_ids.shape[0]:
                raise ValueError(
                    f"got whisper features for {len(whisper_features)} rows, batch has {audio_ids.shape[0]}"
                )
            want_dim = self.config.kimia_adaptor_input_dim
            mixed = emb.clone()
            scale = math.sqrt(2.0)
            for b, feats in enumerate(whisper_features):
                pos = continuous_mask[b].nonzero().squeeze(-1)
                if feats is None or feats.numel() == 0:
                    if pos.numel():
                        raise ValueError(f"row {b}: {pos.numel()} continuous positions but no whisper features")
                    continue
                if feats.ndim != 2 or feats.shape[-1] != want_dim:
                    raise ValueError(
                        f"row {b}: whisper features must be [N, {want_dim}], got {list(feats.shape)}"
                    )
                if feats.shape[0] != pos.numel():
                    raise ValueError(
                        f"row {b}: {feats.shape[0]} whisper feature frames for {pos.numel()} continuous positions"
                    )
                adapted = self.model.vq_adaptor(feats.to(emb.device, emb.dtype))
                # sqrt(2) keeps the variance of a sum of two unit-scale embeddings at one.
                mixed[b, pos] = (emb[b, pos] + adapted) * scale
            emb = mixed
        if text_ids is not None:
            # Upstream skips this sum when the whole text input sums to zero, which only
            # happens at a decode step whose sampled text token is id 0; training never sees
            # that case, so we always add it (it also keeps incremental == full forward).
            emb = emb + self.model.embed_tokens(text_ids.to(emb.device))
        return emb

    def forward(
        self,
        audio_ids: torch.Tensor,
        text_ids: torch.Tensor | None = None,
        *,
        whisper_features: Sequence[torch.Tensor] | None = None,
        continuous_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        compute_audio: bool = True,
        all_logits: bool = False,
    ) -> KimiaOutput:
        """Run both streams through the trunk and (optionally) the audio branch.

        Args:
            audio_ids, text_ids: ``[B, L]`` long tensors (new positions only when ``cache``
                already holds earlier ones).
            whisper_features, continuous_mask: see :meth:`embed` (prefill only).
            position_ids: ``[B, L]``; default continues after the cached length.
            cache: a :class:`KVCache` to extend (a new one is made when None).
            compute_audio: run the audio branch and head. Text logits never depend on the
                branch, so text-only generation skips it (and never fills its cache slots).
            all_logits: return logits for every position instead of the last only
                (the heads project onto the full ~168k vocabulary, so this is costly).
        """
        if audio_ids.ndim != 2:
            raise ValueError(f"audio_ids must be [batch, length], got {list(audio_ids.shape)}")
        if text_ids is not None and text_ids.shape != audio_ids.shape:
            raise ValueError(f"text_ids {list(text_ids.shape)} and audio_ids {list(audio_ids.shape)} differ")
        cache = cache if cache is not None else KVCache()
        first = self.device
        audio_ids = audio_ids.to(first)
        text_ids = text_ids.to(first) if text_ids is not None else None
        past = cache.get_seq_length(0)
        length = audio_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=first).unsqueeze(0).expand(audio_ids.shape[0], -1)
        position_ids = position_ids.to(first)
        h = self.embed(audio_ids, text_ids, whisper_features, continuous_mask)
        cos, sin = self.rotary_emb(h, position_ids)
        masks = _MaskCache(self.config._attn_implementation, length, past, h.dtype)
        rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {first: (cos, sin)}
        branch_at = self.config.kimia_mimo_transformer_from_layer_index
        branch_h: torch.Tensor | None = None
        for i, layer in enumerate(self.model.layers):
            h = _run_layer(layer, h, rope, masks, position_ids, cache)
            if i == branch_at and compute_audio:
                branch_h = h
        h = h.to(self.lm_head.weight.device)
        h = self.model.norm(h)
        if not all_logits:
            h = h[:, -1:]
        text_logits = self.lm_head(h).float()
        audio_logits = None
        if compute_audio:
            assert branch_h is not None
            g = branch_h
            for layer in self.model.mimo_layers:
                g = _run_layer(layer, g, rope, masks, position_ids, cache)
            g = self.model.mimo_norm(g.to(self.mimo_output.weight.device))
            if not all_logits:
                g = g[:, -1:]
            audio_logits = self.mimo_output(g).float().to(text_logits.device)
        return KimiaOutput(text_logits=text_logits, audio_logits=audio_logits, cache=cache)


# -- helpers -----------------------------------------------------------------------------------


class _MaskCache:
    """The additive causal mask a layer needs, built once per device and forward call.

    SDPA and flash-attn apply causality themselves when no mask is passed; that is right for
    a prefill (no past) and for one-token decode steps. Only a multi-token chunk on top of a
    cache needs an explicit mask, because SDPA's built-in causal mask is top-left aligned.
    """

    def __init__(self, attn: str, q_len: int, past: int, dtype: torch.dtype) -> None:
        self.need = q_len > 1 and (past > 0 or attn == "eager") and attn != "flash_attention_2"
        self.q_len, self.past, self.dtype = q_len, past, dtype
        self._by_dev: dict[torch.device, torch.Tensor] = {}

    def get(self, device: torch.device) -> torch.Tensor | None:
        if not self.need:
            return None
        if device not in self._by_dev:
            q = torch.arange(self.q_len, device=device).unsqueeze(1) + self.past
            k = torch.arange(self.past + self.q_len, device=device).unsqueeze(0)
            m = torch.zeros(self.q_len, self.past + self.q_len, device=device, dtype=self.dtype)
            m.masked_fill_(k > q, torch.finfo(self.dtype).min)
            self._by_dev[device] = m[None, None]
        return self._by_dev[device]


def _run_layer(
    layer: Qwen2DecoderLayer,
    h: torch.Tensor,
    rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]],
    masks: _MaskCache,
    position_ids: torch.Tensor,
    cache: KVCache,
) -> torch.Tensor:
    dev = layer.input_layernorm.weight.device
    if h.device != dev:
        h = h.to(dev)
    if dev not in rope:
        first = next(iter(rope.values()))
        rope[dev] = (first[0].to(dev), first[1].to(dev))
    return layer(
        h,
        attention_mask=masks.get(dev),
        position_ids=position_ids.to(dev),
        past_key_values=cache,
        use_cache=True,
        position_embeddings=rope[dev],
    )


def media_span_mask(audio_ids: torch.Tensor, begin_id: int, end_id: int) -> torch.Tensor:
    """Bool mask of positions strictly inside ``begin_id ... end_id`` spans of each row."""
    is_begin = (audio_ids == begin_id).long()
    is_end = (audio_ids == end_id).long()
    # Depth after each position: +1 after a begin, -1 at an end; inside = depth 1 and not a marker.
    depth = torch.cumsum(is_begin - is_end, dim=-1)
    return (depth > 0) & (is_begin == 0) & (is_end == 0)


def _pick_attention(name: str, device: torch.device, dtype: torch.dtype) -> str:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={name!r}; expected one of {ATTN_IMPLEMENTATIONS}")
    flash_ok = flash_attn_available() and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    if name == "flash_attention_2" and not flash_ok:
        why = "flash-attn is not installed" if not flash_attn_available() else "it needs a CUDA fp16/bf16 model"
        raise RuntimeError(f"attn_implementation=flash_attention_2 unavailable: {why}; use 'sdpa'")
    return name


def _resolve_dtype(dtype: torch.dtype | str, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    named = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in named:
        raise ValueError(f"dtype={dtype!r}; expected auto or one of {sorted(named)}")
    return named[dtype]


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"cannot read {index}: {exc}") from exc
        files = sorted({model_dir / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index.name} lists shard(s) missing from {model_dir}: {_names(absent)}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    loose = sorted(model_dir.glob("*.safetensors"))
    if loose:
        return loose
    raise CheckpointError(
        f"no safetensors weights in {model_dir} (expected model.safetensors or shards + "
        "model.safetensors.index.json, as the Kimi-Audio release ships them)"
    )


def _device_of(name: str, placement: dict[str, torch.device]) -> torch.device:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        key = ".".join(parts[:cut])
        if key in placement:
            return placement[key]
    return next(iter(placement.values()))


def _assign(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    mod = root
    for p in path:
        mod = getattr(mod, p)
    setattr(mod, leaf, nn.Parameter(tensor, requires_grad=False))


def _names(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")

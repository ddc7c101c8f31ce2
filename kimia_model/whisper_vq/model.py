"""The Whisper+VQ encoder: Whisper's log-mel front-end, its configuration and the native
GLM-4-Voice ``WhisperVQEncoder`` (inference), with upstream parameter names.

Reading checkpoints is :mod:`kimia_model.whisper_vq.loaders`; turning audio into tokens
(windows, padding, batching) is :mod:`kimia_model.whisper_vq.tokenizer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from kimia_model.checkpoint import CheckpointError as BaseCheckpointError
from kimia_model.whisper_vq.timing import POOL, SAMPLE_RATE

N_FFT = 400
HOP_LENGTH = 160


class CheckpointError(BaseCheckpointError):
    """A checkpoint or codebook does not fit the configuration it is loaded with."""


# -- log-mel front-end ------------------------------------------------------------------------


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney's auditory-toolbox scale (librosa's default, which Whisper's filters were made with):
    # linear below 1 kHz, logarithmic above.
    f = np.asarray(f, dtype=np.float64)
    mel = f / (200.0 / 3)
    log_region = f >= 1000.0
    mel[log_region] = 15.0 + np.log(f[log_region] / 1000.0) / (np.log(6.4) / 27.0)
    return mel


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f = m * (200.0 / 3)
    log_region = m >= 15.0
    f[log_region] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m[log_region] - 15.0))
    return f


def mel_filters(n_mels: int, sr: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-normalised triangular mel filterbank ``[n_mels, n_fft // 2 + 1]`` (float32).

    The same construction as ``librosa.filters.mel(sr, n_fft, n_mels)``, from which Whisper's
    ``mel_filters.npz`` and HF's ``WhisperFeatureExtractor`` filters were made; computed here so
    that 80- and 128-bin front-ends need no data file.
    """
    fft_freqs = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)
    mel_pts = _mel_to_hz(np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([sr / 2.0]))[0], n_mels + 2))
    widths = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_pts[2:] - mel_pts[:-2]))[:, None]  # equal area per filter
    return weights.astype(np.float32)


class LogMel(nn.Module):
    """Whisper's log-mel spectrogram: 25 ms Hann frames every 10 ms, log10, 8-decade floor, rescale.

    ``forward`` takes ``[B, N]`` waveforms (already padded) and returns ``[B, n_mels, N // 160]``:
    ``torch.stft`` with centre reflect padding gives ``N // 160 + 1`` frames and the last one is
    dropped, exactly as Whisper and ``WhisperFeatureExtractor`` do. The floor ``max - 8`` is taken
    per example over the padded window, as upstream computes it on the padded waveform.
    """

    def __init__(self, n_mels: int) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.register_buffer("filters", torch.from_numpy(mel_filters(n_mels)), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(audio, N_FFT, HOP_LENGTH, window=self.window, center=True, return_complex=True)
        power = spec[..., :-1].abs() ** 2
        mel = self.filters @ power
        log = torch.clamp(mel, min=1e-10).log10()
        floor = log.amax(dim=(-2, -1), keepdim=True) - 8.0
        return (torch.maximum(log, floor) + 4.0) / 4.0


# -- configuration ----------------------------------------------------------------------------


@dataclass
class WhisperVQConfig:
    """The keys of GLM-4-Voice's ``WhisperVQConfig`` that change the inference graph.

    Defaults are the plain-Whisper behaviour; the upstream ``config.json`` sets the VQ keys.
    Unknown keys of an upstream config are ignored on purpose:
    they are training or decoder settings.
    """

    num_mel_bins: int = 80
    d_model: int = 512
    encoder_layers: int = 6
    encoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    scale_embedding: bool = False
    encoder_causal_convolution: bool = False
    encoder_causal_attention: bool = False
    quantize_causal_encoder: bool = False
    quantize_causal_block_size: int | None = None
    pooling_kernel_size: int | None = None
    pooling_type: str = "max"
    pooling_position: int | None = 0
    quantize_position: int = 16
    quantize_vocab_size: int | None = None
    quantize_encoder_only: bool = False
    quantize_ema_decay: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WhisperVQConfig:
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Reject configurations this encoder cannot run, with the offending key named."""
        if self.d_model % self.encoder_attention_heads:
            raise CheckpointError(
                f"d_model {self.d_model} is not divisible by encoder_attention_heads {self.encoder_attention_heads}"
            )
        if self.activation_function not in ("gelu",):
            raise CheckpointError(f"activation_function {self.activation_function!r} unsupported (Whisper uses gelu)")
        if self.scale_embedding:
            raise CheckpointError("scale_embedding=true is not supported (Whisper encoders never scale)")
        if self.pooling_kernel_size is not None:
            if self.pooling_type not in ("avg", "max"):
                raise CheckpointError(f"pooling_type {self.pooling_type!r} unsupported (avg or max)")
            if self.pooling_kernel_size != POOL:
                raise CheckpointError(
                    f"pooling_kernel_size {self.pooling_kernel_size} != 4: tokens would not be 12.5 Hz"
                )
        if self.quantize_vocab_size is not None:
            if self.pooling_kernel_size is None:
                raise CheckpointError("quantize_vocab_size set but pooling_kernel_size is null: tokens would be 50 Hz")
            if self.pooling_position is not None and self.quantize_position < self.pooling_position:
                raise CheckpointError("quantize_position must be >= pooling_position")
            if self.quantize_position > self.encoder_layers:
                raise CheckpointError(
                    f"quantize_position {self.quantize_position} > encoder_layers {self.encoder_layers}"
                )
        if self.quantize_causal_block_size is not None and self.pooling_kernel_size:
            if self.quantize_causal_block_size % self.pooling_kernel_size:
                raise CheckpointError("quantize_causal_block_size must be a multiple of pooling_kernel_size")

    @property
    def built_layers(self) -> int:
        """Layers that exist in the checkpoint: only those before VQ for an encoder-only model."""
        if self.quantize_encoder_only and self.quantize_vocab_size is not None:
            return self.quantize_position
        return self.encoder_layers

    def layer_is_causal(self, idx: int) -> bool:
        # Upstream: causal layers ignore the padding/block mask and use plain causal attention.
        if self.encoder_causal_attention:
            return True
        if self.quantize_encoder_only:
            return self.quantize_causal_encoder
        return self.quantize_causal_encoder and idx < self.quantize_position


# -- the encoder ------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, causal: bool) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        if causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class _EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, causal: bool) -> None:
        super().__init__()
        self.self_attn = _Attention(d, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.causal = causal

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), bias, self.causal)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


@dataclass
class EncodeResult:
    """Outputs of one encoder pass over a batch of windows (all ``[B, ...]`` tensors)."""

    features: torch.Tensor | None = None  # [B, T50, D] at the feature layer
    pooled: torch.Tensor | None = None  # [B, T12, D] pre-VQ vectors
    tokens: torch.Tensor | None = None  # [B, T12] int64


class WhisperVQEncoder(nn.Module):
    """Native GLM-4-Voice ``WhisperVQEncoder`` (inference), parameter names as upstream.

    Parameters: ``conv1``, ``conv2``, ``embed_positions``, ``layers.{i}.{self_attn.{k,v,q,out}_proj,
    self_attn_layer_norm, fc1, fc2, final_layer_norm}``, ``layer_norm`` (full encoders),
    ``codebook``, ``embed_positions2`` and the EMA buffers (VQ checkpoints), so the upstream
    ``model.safetensors`` loads strictly into it.

    Layer numbering: "after layer ``n``" means after ``n`` encoder layers (0 = conv stem plus
    positions). The output after the last layer of a full encoder has the final LayerNorm
    applied, like Hugging Face's ``last_hidden_state`` that Kimi-Audio uses.

    Args:
        config: the encoder configuration.
        branch_tokens: False for upstream VQ checkpoints, whose pooling transforms the main
            stream (layers after ``pooling_position`` run at 12.5 Hz). True for a plain Whisper
            encoder plus our codebook: the 12.5 Hz vectors are pooled from a copy of the stream
            so later layers still give 50 Hz continuous features.
    """

    def __init__(self, config: WhisperVQConfig, branch_tokens: bool = False) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.branch_tokens = branch_tokens
        d = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2)
        self.embed_positions = nn.Embedding(config.max_source_positions, d)
        self.layers = nn.ModuleList(
            _EncoderLayer(d, config.encoder_attention_heads, config.encoder_ffn_dim, config.layer_is_causal(i))
            for i in range(config.built_layers)
        )
        self.layer_norm = nn.LayerNorm(d) if config.built_layers == config.encoder_layers and not (
            config.quantize_encoder_only and config.quantize_vocab_size is not None
        ) else None
        self.codebook: nn.Embedding | None = None
        self.embed_positions2: nn.Embedding | None = None
        if config.quantize_vocab_size is not None:
            self.codebook = nn.Embedding(config.quantize_vocab_size, d)
            self.embed_positions2 = nn.Embedding(math.ceil(config.max_source_positions / POOL), d)
            if config.quantize_ema_decay is not None:
                self.register_buffer("ema_count", torch.ones(config.quantize_vocab_size))
                self.register_buffer("ema_weight", torch.zeros(config.quantize_vocab_size, d))
        self.mel = LogMel(config.num_mel_bins)
        # A codebook of ours (branch mode) and where its vectors are taken.
        self.external_codebook: torch.Tensor | None = None
        self.external_pool_layer: int | None = None

    # -- helpers ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def _conv(self, conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        # Causal: left pad dilation*(k-1)=2 so frame t never sees t+1 (streaming input); else
        # Whisper's symmetric padding of 1. Both give ceil(n / stride) output frames.
        pad = (2, 0) if self.config.encoder_causal_convolution else (1, 1)
        return conv(F.pad(x, pad))

    def _bias(self, mask: torch.Tensor | None, block: int | None, t: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive attention bias: block-causal (if configured) AND key padding."""
        if block is None and mask is None:
            return None
        dev = self.conv1.weight.device
        if block is not None:
            i = torch.arange(t, device=dev)
            allowed = (i[None, :] <= i[:, None]) | ((i[None, :] // block) == (i[:, None] // block))
            allowed = allowed[None, None]
            if mask is not None:
                allowed = allowed & mask[:, None, None, :]
        else:
            allowed = mask[:, None, None, :]
        bias = torch.zeros(allowed.shape, dtype=dtype, device=dev)
        return bias.masked_fill(~allowed, torch.finfo(dtype).min)

    @staticmethod
    def _pool(x: torch.Tensor, kind: str) -> torch.Tensor:
        x = x.transpose(1, 2)
        if x.shape[-1] % POOL:
            x = F.pad(x, (0, POOL - x.shape[-1] % POOL))  # zeros count in the mean, as upstream
        x = F.avg_pool1d(x, POOL) if kind == "avg" else F.max_pool1d(x, POOL)
        return x.transpose(1, 2)

    @staticmethod
    def vector_quantize(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code by squared L2 distance ``|x|^2 + |c|^2 - 2 x.c`` (as upstream)."""
        flat = x.reshape(-1, x.shape[-1]).to(codebook.dtype)
        dist = torch.addmm(
            (codebook * codebook).sum(1)[None, :] + (flat * flat).sum(1, keepdim=True), flat, codebook.t(), alpha=-2.0
        )
        return dist.argmin(dim=1).reshape(x.shape[:-1])

    def set_codebook(self, codebook: torch.Tensor, pool_layer: int, pooling_type: str = "avg") -> None:
        """Attach a codebook of ours read at ``pool_layer`` (branch mode)."""
        if codebook.ndim != 2 or codebook.shape[1] != self.d_model:
            raise CheckpointError(
                f"codebook shape {tuple(codebook.shape)} does not fit encoder width d_model={self.d_model}"
            )
        if not 0 <= pool_layer <= self.num_layers:
            raise CheckpointError(f"codebook pooling layer {pool_layer} outside 0..{self.num_layers}")
        self.branch_tokens = True
        self.external_codebook = codebook.float().to(self.conv1.weight.device)
        self.external_pool_layer = pool_layer
        self._branch_pool_type = pooling_type

    def set_pool_layer(self, pool_layer: int, pooling_type: str = "avg") -> None:
        """Read 12.5 Hz vectors at ``pool_layer`` without a codebook (codebook fitting)."""
        if not 0 <= pool_layer <= self.num_layers:
            raise CheckpointError(f"pooling layer {pool_layer} outside 0..{self.num_layers}")
        self.branch_tokens = True
        self.external_pool_layer = pool_layer
        self._branch_pool_type = pooling_type

    @property
    def has_tokens(self) -> bool:
        return self.external_codebook is not None or (not self.branch_tokens and self.codebook is not None)

    def default_pool_layer(self) -> int:
        if self.external_pool_layer is not None:
            return self.external_pool_layer
        if self.config.pooling_kernel_size is not None and self.config.pooling_position is not None:
            return self.config.pooling_position
        return self.num_layers

    # -- forward ---------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(
        self,
        mel: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
        *,
        feature_layer: int | None = None,
        want_pooled: bool = False,
        want_tokens: bool = True,
    ) -> EncodeResult:
        """Run the encoder on ``[B, n_mels, F]`` log-mel frames (``F`` even, ``F / 2 <= 1500``).

        Args:
            mel: log-mel features.
            frame_mask: ``[B, F]`` bool, True on real (not padded) 100 Hz frames; None = no mask.
            feature_layer: return the 50 Hz hidden state after this many layers (None = none).
            want_pooled: return the 12.5 Hz pre-VQ vectors.
            want_tokens: return token ids (needs a codebook).
        """
        cfg = self.config
        if mel.shape[1] != cfg.num_mel_bins:
            raise CheckpointError(f"got {mel.shape[1]} mel bins, the encoder expects {cfg.num_mel_bins}")
        t50 = (mel.shape[-1] + 1) // 2
        if t50 > cfg.max_source_positions:
            raise CheckpointError(f"{t50} frames exceed max_source_positions {cfg.max_source_positions}")
        want_tokens = want_tokens and self.has_tokens
        if feature_layer is not None and not 0 <= feature_layer <= self.num_layers:
            raise CheckpointError(f"feature layer {feature_layer} outside 0..{self.num_layers}")
        pool_at = self.default_pool_layer()
        need_pool = want_tokens or want_pooled
        quant_at = cfg.quantize_position if (not self.branch_tokens and self.codebook is not None) else pool_at
        if not self.branch_tokens and feature_layer is not None and need_pool and feature_layer > pool_at:
            raise CheckpointError(
                f"feature layer {feature_layer} lies after pooling (layer {pool_at}): it would be 12.5 Hz"
            )
        last = max(
            feature_layer if feature_layer is not None else 0,
            (max(pool_at, quant_at) if need_pool else 0),
        )

        x = F.gelu(self._conv(self.conv1, mel))
        x = F.gelu(self._conv(self.conv2, x)).transpose(1, 2)
        x = x + self.embed_positions.weight[: x.shape[1]]
        mask = frame_mask[:, ::2] if frame_mask is not None else None
        block = cfg.quantize_causal_block_size
        bias = self._bias(mask, block, x.shape[1], x.dtype)
        out = EncodeResult()
        pool_type = getattr(self, "_branch_pool_type", "avg") if self.branch_tokens else cfg.pooling_type

        def hidden_after(n: int, h: torch.Tensor) -> torch.Tensor:
            if n == self.num_layers and self.layer_norm is not None:
                return self.layer_norm(h)
            return h

        def tap(n: int, h: torch.Tensor) -> torch.Tensor:
            nonlocal x, mask, bias
            if feature_layer == n:
                out.features = hidden_after(n, h)
            if need_pool and n == pool_at:
                pooled = self._pool(hidden_after(n, h), pool_type)
                if self.branch_tokens:
                    out.pooled = pooled
                    if want_tokens:
                        out.tokens = self.vector_quantize(pooled, self.external_codebook)
                else:
                    # Upstream: the main stream continues at 12.5 Hz with a rebuilt mask.
                    h = pooled
                    mask = mask[:, ::POOL] if mask is not None else None
                    bias = self._bias(mask, block // POOL if block else None, h.shape[1], h.dtype)
                    out.pooled = pooled
            if need_pool and not self.branch_tokens and n == quant_at and self.codebook is not None:
                out.pooled = h
                if want_tokens:
                    out.tokens = self.vector_quantize(h, self.codebook.weight)
            return h

        x = tap(0, x)
        for i in range(last):
            x = self.layers[i](x, bias)
            x = tap(i + 1, x)
        if not want_pooled:
            out.pooled = None
        return out

"""Whisper+VQ semantic tokenizer (GLM-4-Voice ``WhisperVQEncoder``) at exactly 12.5 Hz.

Kimi-Audio's discrete audio tokens come from GLM-4-Voice's ``WhisperVQEncoder``: the first 16
layers of a fine-tuned whisper-large-v3 encoder, average pooling by 4 (50 Hz -> 12.5 Hz) and a
nearest-neighbour lookup in a 16384 x 1280 codebook (GLM-4-Voice's speech tokenizer). This module
re-implements that encoder natively so that:

* the upstream Hugging Face directory (``config.json`` + ``model.safetensors``) loads with its
  own parameter names and **without** ``trust_remote_code``;
* any plain Whisper checkpoint (openai-whisper ``.pt``, Hugging Face Whisper directory, or a
  CTranslate2/faster-whisper directory, whose ``model.bin`` we parse ourselves) plus a codebook
  fitted by :mod:`kimia_model.codebook` gives the same kind of tokens offline;
* the continuous Whisper features Kimi-Audio feeds its LLM (§1.7) come out of the same pass,
  grouped by 4 frames so that they line up one-to-one with the tokens.

Timing contract (documented once, relied on by the stage, the writer and the export):

    Audio is 16 kHz mono. It is cut into consecutive 30 s windows of 480 000 samples (the last
    one shorter). A window of ``L`` samples yields ``ceil(L / 1280)`` tokens. Since 480 000 is
    a multiple of 1280 (375 tokens), token ``k`` of an utterance always covers samples
    ``[1280 k, min(1280 (k + 1), N))`` and an utterance of ``N`` samples yields exactly
    ``ceil(N / 1280)`` tokens (0 for empty audio). Continuous features have the same length:
    row ``k`` concatenates the four 50 Hz encoder frames ``4k .. 4k+3`` (``[T, 4 D]``).

    >>> token_count(0), token_count(1), token_count(1280), token_count(1281), token_count(480001)
    (0, 1, 1, 2, 376)

Windows are padded in one of two ways, both independent of the other inputs of a batch so that
batched output equals one-by-one output:

* ``"multiple"`` (upstream GLM-4-Voice): pad the window to the next multiple of 1280 samples and
  mask the padded frames in attention. Windows of equal padded length are batched together, so a
  window is always computed with exactly the shapes it would have on its own.
* ``"full"`` (plain Whisper, and Kimi-Audio's continuous-feature path): pad every window to 30 s
  with no attention mask, the only input Whisper encoders were trained on.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from kimia_model.checkpoint import CheckpointError as BaseCheckpointError
from kimia_model.checkpoint import load_state_checked
from torch.nn import functional as F

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
#: conv1 stride (1) x conv2 stride (2) x pooling (4) x hop (160): audio samples per token.
SAMPLES_PER_TOKEN = 1280
WINDOW_SECONDS = 30
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE
TOKENS_PER_WINDOW = WINDOW_SAMPLES // SAMPLES_PER_TOKEN  # 375
TOKEN_RATE_HZ = SAMPLE_RATE / SAMPLES_PER_TOKEN  # 12.5
POOL = 4

PaddingMode = Literal["multiple", "full"]


class CheckpointError(BaseCheckpointError):
    """A checkpoint or codebook does not fit the configuration it is loaded with."""


# -- timing ------------------------------------------------------------------------------------


def window_bounds(n_samples: int) -> list[tuple[int, int]]:
    """``(start, end)`` sample bounds of the consecutive 30 s windows of ``n_samples`` samples.

    >>> window_bounds(480001)
    [(0, 480000), (480000, 480001)]
    """
    return [(s, min(s + WINDOW_SAMPLES, n_samples)) for s in range(0, max(n_samples, 0), WINDOW_SAMPLES)]


def tokens_in_window(length: int) -> int:
    """Tokens of one window of ``length`` samples: ``ceil(length / 1280)`` (upstream ``(L-1)//1280+1``)."""
    return -(-length // SAMPLES_PER_TOKEN) if length > 0 else 0


def token_count(n_samples: int) -> int:
    """Exact token count of an utterance of ``n_samples`` 16 kHz samples (sum over its windows)."""
    return sum(tokens_in_window(e - s) for s, e in window_bounds(n_samples))


def token_span(k: int, n_samples: int) -> tuple[int, int]:
    """Sample range ``[start, end)`` token ``k`` of an ``n_samples`` utterance stands for."""
    if not 0 <= k < token_count(n_samples):
        raise IndexError(f"token {k} out of range for {n_samples} samples")
    return k * SAMPLES_PER_TOKEN, min((k + 1) * SAMPLES_PER_TOKEN, n_samples)


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


# -- checkpoint loading ---------------------------------------------------------------------


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


# -- codebook files of ours -----------------------------------------------------------------

CODEBOOK_FORMAT = "kimia-codebook-v1"


@dataclass
class CodebookFile:
    """A codebook fitted on pooled Whisper features (written by :mod:`kimia_model.codebook`).

    Stored as safetensors: tensor ``codebook`` ``[K, D]`` float32, metadata (strings) ``format``,
    ``whisper_model``, ``pool_layer``, ``pooling_type``, ``d_model`` and fitting statistics. A
    bare ``[K, D]`` ``.npy`` is accepted too (pool layer then defaults to the last layer).
    """

    codebook: np.ndarray
    pool_layer: int | None = None
    pooling_type: str = "avg"
    meta: dict[str, str] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        meta = dict(self.meta)
        meta.update(
            format=CODEBOOK_FORMAT,
            pooling_type=self.pooling_type,
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
        return cls(arr.astype(np.float32), pool, meta.get("pooling_type", "avg"), meta)


# -- the tokenizer ----------------------------------------------------------------------------


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
            checkpoints and ``"full"`` for plain Whisper encoders.
        max_batch_windows: windows per encoder call (memory bound; results never depend on it).
        device: torch device string.
        model_id: the id recorded in provenance.
    """

    def __init__(
        self,
        encoder: WhisperVQEncoder,
        *,
        padding: PaddingMode | None = None,
        max_batch_windows: int = 8,
        device: str = "cpu",
        model_id: str = "whisper-vq",
    ) -> None:
        self.encoder = encoder.to(device).eval()
        if encoder.external_codebook is not None:
            encoder.external_codebook = encoder.external_codebook.to(device)
        is_vq = not encoder.branch_tokens and encoder.codebook is not None
        self.padding: PaddingMode = padding or ("multiple" if is_vq else "full")
        self.max_batch_windows = max_batch_windows
        self.device = device
        self.model_id = model_id

    @classmethod
    def load(
        cls,
        model_path: str | Path,
        codebook_path: str | Path | None = None,
        *,
        model_id: str | None = None,
        **kwargs: Any,
    ) -> WhisperVQTokenizer:
        """Load an upstream VQ directory, or a Whisper checkpoint plus (optionally) our codebook."""
        enc = load_encoder(model_path)
        if codebook_path is not None:
            cb = CodebookFile.load(codebook_path)
            pool = cb.pool_layer if cb.pool_layer is not None else enc.num_layers
            enc.set_codebook(torch.from_numpy(cb.codebook), pool, cb.pooling_type)
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
    ) -> list[TokenizerOutput]:
        """Tokenize 16 kHz mono waveforms (any lengths, including 0).

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
        jobs: list[tuple[int, int, np.ndarray, int]] = []  # (item, window index, padded, length)
        for i, audio in enumerate(audios):
            a = np.asarray(audio, dtype=np.float32)
            if a.ndim != 1:
                raise ValueError(f"audio {i} must be mono 1-D, got shape {a.shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"audio {i} contains NaN or infinite samples")
            for w, (s, e) in enumerate(window_bounds(len(a))):
                padded, n = self._prepare(a[s:e])
                jobs.append((i, w, padded, n))
        parts: dict[tuple[int, int], TokenizerOutput] = {}
        # Equal padded lengths only: a window then sees exactly the shapes it would alone.
        by_len: dict[int, list[tuple[int, int, np.ndarray, int]]] = {}
        for job in jobs:
            by_len.setdefault(len(job[2]), []).append(job)
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

    def _run_chunk(
        self,
        chunk: list[tuple[int, int, np.ndarray, int]],
        parts: dict[tuple[int, int], TokenizerOutput],
        *,
        tokens: bool,
        layer: int | None,
        pooled: bool,
    ) -> None:
        enc = self.encoder
        wav = torch.from_numpy(np.stack([c[2] for c in chunk])).to(self.device)
        mel = enc.mel(wav)
        frame_mask = None
        if self.padding == "multiple":
            # Real 100 Hz frames: ceil(L / 160), the HF extractor's sample mask subsampled by hop.
            n_frames = mel.shape[-1]
            lengths = torch.tensor([-(-c[3] // HOP_LENGTH) for c in chunk], device=self.device)
            frame_mask = torch.arange(n_frames, device=self.device)[None, :] < lengths[:, None]
        res = enc.encode(mel, frame_mask, feature_layer=layer, want_pooled=pooled, want_tokens=tokens)
        for b, (item, w, _, n) in enumerate(chunk):
            t = tokens_in_window(n)
            out = TokenizerOutput()
            if tokens:
                out.tokens = res.tokens[b, :t].cpu().numpy().astype(np.int32)
            if layer is not None:
                f = res.features[b, : POOL * t]
                out.features = f.reshape(t, POOL * f.shape[-1]).float().cpu().numpy()
            if pooled:
                out.pooled = res.pooled[b, :t].float().cpu().numpy()
            parts[(item, w)] = out

"""Kimi-Audio detokenizer: 12.5 Hz semantic tokens -> 50 Hz mel (flow matching) -> 24 kHz audio.

Two parts, both in the layout upstream ships inside a Kimi-Audio model directory:

* ``audio_detokenizer/config.yaml`` + ``model.pt``: :class:`DiTPrefix`, a DiT (adaLN-Zero
  blocks, qkv-bias attention, tanh-GELU MLP) that predicts the flow-matching velocity of an
  80-bin mel frame sequence conditioned on the semantic tokens (each repeated 4x to 50 Hz)
  and the flow time. Weights live under ``state_dict`` with a ``speech_model.`` prefix.
* ``vocoder/``: BigVGAN (see :mod:`kimia_model.bigvgan`).

Streaming (what ``KimiAudio.detokenize_audio`` does, reproduced by :class:`Detokenizer`):
tokens are cut into chunks of 30 (2.4 s). Each chunk's mel is sampled by a 30-point Euler ODE
while attending, through a KV cache, to the clean mel of everything already emitted (the
"prefix"). The last 12 tokens (48 frames) of every non-final chunk are withheld and
re-generated at the front of the next chunk, so each emitted frame has seen 12 tokens of
right context (look-ahead). After a chunk, the network runs once at t = 0.999 on the emitted
clean mel to write its keys/values into the cache. BigVGAN then vocodes the held-back mel
tail together with the new mel, and the overlap is cross-faded, so chunk seams are smooth.

Deviations from upstream, each for a measured or stated reason:

* Runs on CPU or GPU with PyTorch SDPA; no flash-attn, no hard-coded ``cuda`` device, float32
  by default on CPU (bf16 is upstream's choice and slow on CPU).
* Initial noise is drawn per absolute frame from one seeded generator (upstream draws fresh
  noise per chunk, also for re-generated look-ahead frames). Same seed -> same audio, and the
  streaming result is comparable frame for frame with the whole-sequence result.
* The default cross-fade is a raised-cosine pair that sums to exactly 1. Upstream's halves of
  a periodic Hamming window sum to 1.08 everywhere in the overlap and start/end at 0.08,
  which puts an 8 % amplitude step at both ends of every overlap; ``crossfade="hamming"``
  reproduces it. The final chunk is cross-faded too (upstream replaces the held tail there
  without a fade), and seam bookkeeping is done in whole frames (upstream's half-window
  split can misalign by 240 samples when a window has an odd number of frames).
* Tokens may arrive incrementally (an iterator, e.g. straight from the LM): a chunk is
  processed as soon as it is complete and one more token proves it is not the last.

Example (``MODEL_DIR`` holds the release's ``audio_detokenizer/`` and ``vocoder/``):
    >>> det = Detokenizer.from_pretrained(MODEL_DIR)  # doctest: +SKIP
    >>> wav = det.detokenize([1, 2, 3, 4, 5] * 8, seed=0)  # doctest: +SKIP
    >>> wav.shape[0] == 40 * 4 * 480  # 40 tokens, 4 mel frames each, 480 samples a frame  # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kimia_model.bigvgan import BigVGAN, load_bigvgan, load_state_strict, save_bigvgan

MEL_BINS = 80
SAMPLE_RATE = 24000
FRAME_SAMPLES = 480  # 24 kHz / 50 Hz
TOKEN_UPSAMPLE = 4  # 12.5 Hz tokens -> 50 Hz mel frames
_CLEAN_T = 0.999  # flow time at which the emitted (clean) mel is written into the cache


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTConfig:
    """``model.dit`` of upstream's ``audio_detokenizer/config.yaml``.

    Defaults are the third-party-reported Kimi-Audio sizes; the real yaml overrides them.
    ``semantic_vocab_size`` excludes the extra classifier-free-guidance id upstream appends
    (the embedding table has ``semantic_vocab_size + 1`` rows).
    """

    input_size: int = MEL_BINS
    semantic_vocab_size: int = 16384
    hidden_size: int = 2304
    depth: int = 16
    num_heads: int = 18
    mlp_ratio: float = 4.0
    ffn_type: str = "vanilla_mlp"
    use_rope: bool = True
    rope_max_position_embeddings: int = 4096
    rope_base: float = 10000.0
    rope_interpolation_factor: float = 1.0
    position_embedding_type: Literal["learnable", "sincos", "skip"] = "skip"
    max_seq_len: int = 4096
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.ffn_type != "vanilla_mlp":
            raise ValueError(
                f"detokenizer config: ffn_type {self.ffn_type!r} is not supported; upstream's inference "
                "code implements only 'vanilla_mlp'"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError("detokenizer config: hidden_size must be divisible by num_heads")
        if self.use_rope and (self.hidden_size // self.num_heads) % 2:
            raise ValueError("detokenizer config: RoPE needs an even head dimension")
        if self.position_embedding_type not in ("learnable", "sincos", "skip"):
            raise ValueError(f"detokenizer config: unknown position_embedding_type {self.position_embedding_type!r}")


@dataclass(frozen=True)
class FlowConfig:
    """The whole ``config.yaml``: the DiT plus the mel normalisation it was trained with."""

    dit: DiTConfig = field(default_factory=DiTConfig)
    normalize_mel: bool = False
    mel_mean: float | tuple[float, ...] | None = None
    mel_std: float | tuple[float, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowConfig:
        try:
            d = dict(data["model"]["dit"])
        except (KeyError, TypeError) as exc:
            raise ValueError("detokenizer config.yaml lacks model.dit") from exc
        need = ["input_size", "semantic_vocab_size", "hidden_size", "depth", "num_heads", "mlp_ratio",
                "position_embedding_type", "max_seq_len"]
        absent = [k for k in need if k not in d]
        if absent:
            raise ValueError(f"detokenizer config.yaml model.dit lacks {absent}")
        rope = d.pop("rope_params", None) or {}
        known = {f for f in DiTConfig.__dataclass_fields__ if f != "extra"}
        kw = {k: d.pop(k) for k in list(d) if k in known}
        dit = DiTConfig(
            **kw,
            rope_max_position_embeddings=int(rope.get("max_position_embeddings", 4096)),
            rope_base=float(rope.get("rope_base", 10000.0)),
            rope_interpolation_factor=float(rope.get("rope_interpolation_factor", 1.0)),
            extra=d,
        )
        norm = bool(data.get("normalize_mel", False))
        mean, std = data.get("mel_mean"), data.get("mel_std")
        if norm and (mean is None or std is None):
            raise ValueError("detokenizer config.yaml: normalize_mel is true but mel_mean/mel_std are missing")
        as_t = (lambda v: tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (None if v is None else float(v)))
        return cls(dit=dit, normalize_mel=norm, mel_mean=as_t(mean), mel_std=as_t(std),
                   extra={k: v for k, v in data.items() if k not in ("model", "normalize_mel", "mel_mean", "mel_std")})

    def to_dict(self) -> dict[str, Any]:
        dit = {k: getattr(self.dit, k) for k in DiTConfig.__dataclass_fields__
               if k not in ("extra",) and not k.startswith("rope_")}
        dit["rope_params"] = {
            "max_position_embeddings": self.dit.rope_max_position_embeddings,
            "rope_base": self.dit.rope_base,
            "rope_interpolation_factor": self.dit.rope_interpolation_factor,
        }
        dit.update(self.dit.extra)
        as_l = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
        return {**self.extra, "model": {"dit": dit}, "normalize_mel": self.normalize_mel,
                "mel_mean": as_l(self.mel_mean), "mel_std": as_l(self.mel_std)}


@dataclass(frozen=True)
class StreamingConfig:
    """How :class:`Detokenizer` chunks and smooths (defaults: ``KimiAudio.detokenize_audio``)."""

    first_chunk_tokens: int = 30
    chunk_tokens: int = 30
    look_ahead_tokens: int = 12
    ode_steps: int = 30
    max_kv_cache_frames: int = 900
    max_positions: int = 4096
    crossfade: Literal["raised-cosine", "hamming"] = "raised-cosine"

    def __post_init__(self) -> None:
        if self.ode_steps < 2:
            raise ValueError("ode_steps must be >= 2 (Euler over linspace(0, 1, ode_steps))")
        if min(self.first_chunk_tokens, self.chunk_tokens) <= self.look_ahead_tokens:
            raise ValueError("chunk sizes must exceed look_ahead_tokens (a chunk must emit something)")
        if self.look_ahead_tokens < 0:
            raise ValueError("look_ahead_tokens must be >= 0")
        if self.max_kv_cache_frames < self.chunk_tokens * TOKEN_UPSAMPLE:
            raise ValueError("max_kv_cache_frames must hold at least one chunk")
        if self.crossfade not in ("raised-cosine", "hamming"):
            raise ValueError(f"unknown crossfade {self.crossfade!r}")


# -- the flow-matching network -----------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos | sin]`` of integer flow times (0..999), as upstream."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class SincosPositionEmbedding(nn.Module):
    """Fixed tensor2tensor-style table, indexed the way upstream indexes it.

    Upstream derives positions as the running count of non-zero position ids *within the
    call*, so every streamed chunk after the first restarts at 1 (the first starts at 0,
    which is the zeroed padding row). The trained weights expect exactly that, so it is kept.
    ``_float_tensor`` is a 1-element buffer upstream checkpoints carry; it is kept for layout.
    """

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        half = dim // 2
        scale = math.log(10000.0) / (half - 1)
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -scale)
        ang = torch.arange(size, dtype=torch.float32)[:, None] * freqs[None]
        table = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)
        if dim % 2:
            table = F.pad(table, (0, 1))
        table[0] = 0.0
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("_float_tensor", torch.zeros(1), persistent=True)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        mask = position_ids.ne(0).long()
        ranks = torch.cumsum(mask, dim=1) * mask
        if int(ranks.max()) >= self.table.shape[0]:
            raise ValueError(f"sequence longer than the sincos table ({self.table.shape[0] - 1} frames)")
        return self.table[ranks]


def rope_tables(head_dim: int, cfg: DiTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[positions, head_dim / 2]`` (positions capped at ``max_seq_len``)."""
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32)[: head_dim // 2] / head_dim))
    pos = torch.arange(cfg.rope_max_position_embeddings, dtype=torch.float32) / float(cfg.rope_interpolation_factor)
    ang = torch.outer(pos, inv)[: cfg.max_seq_len]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of ``x [B, T, H, D]`` (upstream's complex layout)."""
    xf = x.float()
    a, b = xf[..., 0::2], xf[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


KV = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Full (non-causal) self-attention over [cached prefix ; current frames]."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                past: KV | None, attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, KV]:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), (k, v)


class Mlp(nn.Module):
    """timm's ``Mlp`` (fc1 -> tanh-GELU -> fc2) with its parameter names."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """adaLN-Zero block: per-frame shift/scale/gate for attention and MLP from the condition."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                past: KV | None, attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, KV]:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        a, kv = self.attn(_modulate(self.norm1(x), sh_a, sc_a), rope, past, attn_mask)
        x = x + g_a * a
        x = x + g_m * self.mlp(_modulate(self.norm2(x), sh_m, sc_m))
        return x, kv


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DiTPrefix(nn.Module):
    """Velocity network ``v(x_t, tokens, t)`` with a per-layer KV cache of earlier frames.

    Parameter names match upstream's ``DiTPrefix`` so ``speech_model.*`` tensors load 1:1.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.t_embedder = TimestepEmbedder(h)
        self.semantic_token_embedding = nn.Embedding(cfg.semantic_vocab_size + 1, h)
        self.input_linear = nn.Linear(cfg.input_size, h)
        if cfg.position_embedding_type == "learnable":
            self.position_embedding: nn.Module | None = nn.Embedding(cfg.max_seq_len + 1, h)
        elif cfg.position_embedding_type == "sincos":
            self.position_embedding = SincosPositionEmbedding(h, cfg.max_seq_len + 1)
        else:
            self.position_embedding = None
        if cfg.use_rope:
            cos, sin = rope_tables(h // cfg.num_heads, cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(h, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(h, cfg.input_size)

    @property
    def max_position(self) -> int:
        """Largest usable absolute frame position (exclusive)."""
        limits = [self.cfg.max_seq_len + 1]
        if self.cfg.use_rope:
            limits.append(int(self.rope_cos.shape[0]))
        return min(limits)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor,
                past: list[KV] | None = None, attn_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[KV]]:
        """Predict the velocity for ``x [B, T, 80]``.

        Args:
            x: noisy (normalised) mel frames at flow time ``t``.
            tokens: ``[B, T]`` frame-rate semantic ids (already repeated 4x).
            t: ``[B]`` integer flow time, ``int(t * 1000)``.
            position_ids: ``[B, T]`` absolute frame positions (continuing after the cache).
            past: per-layer cached ``(k, v)`` of earlier frames, ``[B, T_past, H, D]``.
            attn_mask: optional boolean ``[T, T_past + T]`` (True = may attend).

        Returns:
            The velocity ``[B, T, 80]`` and each layer's ``(k, v)`` over past + current frames.
        """
        if int(position_ids.max()) >= self.max_position:
            raise ValueError(f"frame position {int(position_ids.max())} exceeds the model's limit {self.max_position}")
        h = self.input_linear(x)
        if self.position_embedding is not None:
            h = h + self.position_embedding(position_ids).to(h.dtype)
        rope = None
        if self.cfg.use_rope:
            ids = position_ids[0]  # one stream per call: all rows share positions
            rope = (self.rope_cos[ids], self.rope_sin[ids])
        c = self.t_embedder(t)[:, None, :] + self.semantic_token_embedding(tokens)
        present: list[KV] = []
        for i, block in enumerate(self.blocks):
            h, kv = block(h, c, rope, past[i] if past else None, attn_mask)
            present.append(kv)
        return self.final_layer(h, c), present


def flow_time_index(t: torch.Tensor | float) -> int:
    """The integer time the network sees: ``int(t * 1000)`` in float32, as upstream casts it."""
    return int((torch.as_tensor(t, dtype=torch.float32) * 1000).long())


# -- loading / saving ------------------------------------------------------------------------


def load_flow_model(detok_dir: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[DiTPrefix, FlowConfig]:
    """Load ``detok_dir/config.yaml`` + ``detok_dir/model.pt`` (upstream layout).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the config is malformed or tensors do not match (names listed).
    """
    import yaml

    detok_dir = Path(detok_dir)
    cfg_path, ckpt_path = detok_dir / "config.yaml", detok_dir / "model.pt"
    for p in (cfg_path, ckpt_path):
        if not p.is_file():
            raise FileNotFoundError(f"detokenizer file missing: {p}")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = FlowConfig.from_dict(yaml.safe_load(f))
    model = DiTPrefix(cfg.dit)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{ckpt_path}: expected a dict with a 'state_dict' entry")
    prefix = "speech_model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{ckpt_path}: no 'speech_model.*' tensors in state_dict")
    load_state_strict(model, state, str(ckpt_path), optional_suffixes=("_float_tensor",))
    return model.to(device=device, dtype=dtype).eval(), cfg


def save_flow_model(model: DiTPrefix, cfg: FlowConfig, detok_dir: str | Path) -> Path:
    """Write ``config.yaml`` + ``model.pt`` the way upstream ships them."""
    import yaml

    detok_dir = Path(detok_dir)
    detok_dir.mkdir(parents=True, exist_ok=True)
    with open(detok_dir / "config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    state = {f"speech_model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, detok_dir / "model.pt")
    return detok_dir


# -- streaming ---------------------------------------------------------------------------------


class _NoiseTape:
    """Initial ODE noise indexed by absolute mel frame: frame i gets the same draw whether the
    sequence is processed whole or in chunks, and a re-generated look-ahead frame reuses its draw."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.gen = torch.Generator(device="cpu").manual_seed(int(seed))
        self.device = device
        self.start = 0
        self.frames = torch.empty(0, MEL_BINS)

    def take(self, a: int, b: int) -> torch.Tensor:
        end = self.start + self.frames.shape[0]
        if b > end:
            extra = torch.randn(b - end, MEL_BINS, generator=self.gen)
            self.frames = torch.cat([self.frames, extra])
        if a > self.start:  # frames before `a` are never asked for again
            self.frames = self.frames[a - self.start:]
            self.start = a
        return self.frames[a - self.start: b - self.start].to(self.device)


@dataclass
class _FlowState:
    """Everything that carries from one chunk to the next."""

    noise: _NoiseTape
    kv: list[KV] | None = None
    position: int = 0  # next absolute frame position
    emitted: int = 0  # frames emitted so far (index into the noise tape)
    reserved: int = 0  # prompt frames that cache trimming must keep
    withheld: torch.Tensor | None = None  # frame tokens re-generated with the next chunk
    backup: tuple[list[KV] | None, int] | None = None  # state right after the (optional) prompt


def _fade_pair(n: int, kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rise, fall) weights of length n for the new and the previous waveform."""
    if kind == "hamming":  # upstream: halves of a periodic Hamming window of 2n
        w = torch.hamming_window(2 * n, periodic=True, device=device)
        return w[:n], w[n:]
    # sin^2 rise and cos^2 fall: sums to 1 at every sample and has zero slope at both ends.
    rise = torch.sin(0.5 * math.pi * (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n) ** 2
    return rise, 1.0 - rise


class _VocoderStitcher:
    """Vocode mel chunks with a held-back tail and cross-fade the overlap (upstream's scheme).

    The first chunk emits its first half and holds the second half (mel and audio). Every later
    chunk is vocoded together with the held mel, so the held region gets vocoded again, now
    with right context; the two versions are cross-faded, the held length plus as much new
    audio is emitted, and the rest is held. The final chunk emits everything.
    """

    def __init__(self, vocode, crossfade: str) -> None:  # noqa: ANN001 - a callable mel -> wav
        self.vocode = vocode
        self.kind = crossfade
        self.pre_mel: torch.Tensor | None = None
        self.pre_wav: torch.Tensor | None = None

    def push(self, mel: torch.Tensor, final: bool) -> torch.Tensor:
        if self.pre_mel is None:
            wav = self.vocode(mel)
            if final:
                return wav
            hold = mel.shape[0] // 2
            self.pre_mel, self.pre_wav = mel[mel.shape[0] - hold:], wav[wav.shape[0] - hold * FRAME_SAMPLES:]
            return wav[: wav.shape[0] - hold * FRAME_SAMPLES]
        held = self.pre_mel.shape[0]
        cat = torch.cat([self.pre_mel, mel])
        wav = self.vocode(cat).clone()
        total = cat.shape[0]
        out_frames = total if final else (2 * held if total > 2 * held else total // 2)
        xf = min(held, out_frames) * FRAME_SAMPLES
        if xf:
            rise, fall = _fade_pair(xf, self.kind, wav.device)
            wav[:xf] = self.pre_wav[:xf].to(wav.dtype) * fall.to(wav.dtype) + wav[:xf] * rise.to(wav.dtype)
        out = wav[: out_frames * FRAME_SAMPLES]
        if final:
            self.pre_mel = self.pre_wav = None
        else:
            self.pre_mel, self.pre_wav = cat[out_frames:], wav[out_frames * FRAME_SAMPLES:]
        return out


def _as_token_tensor(tokens: Sequence[int] | np.ndarray | torch.Tensor, vocab: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1:
        raise ValueError(f"semantic tokens must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() and (t.dtype.is_floating_point or t.dtype == torch.bool):
        raise ValueError(f"semantic tokens must be integers, got {t.dtype}")
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise ValueError(
            f"semantic token ids must lie in [0, {vocab}); got min {int(t.min())}, max {int(t.max())} "
            "(pass unshifted ids: LM audio ids minus the audio offset)"
        )
    return t


class Detokenizer:
    """Semantic tokens -> 24 kHz waveform, whole or streamed chunk by chunk.

    Args:
        flow: the velocity network.
        flow_cfg: its config (mel normalisation).
        vocoder: BigVGAN; ``None`` gives a mel-only detokenizer.
        streaming: chunking and smoothing parameters.
        device: where to run; ``dtype`` of the networks (float32 on CPU, bf16 works on GPU).
    """

    #: The DiT's attention kernel (``F.scaled_dot_product_attention``), named in run records.
    attention = "sdpa"

    def __init__(self, flow: DiTPrefix, flow_cfg: FlowConfig, vocoder: BigVGAN | None,
                 streaming: StreamingConfig | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.flow = flow.to(device=self.device, dtype=dtype).eval()
        self.flow_cfg = flow_cfg
        self.vocoder = vocoder.to(device=self.device, dtype=dtype).eval() if vocoder is not None else None
        self.streaming = streaming or StreamingConfig()
        if vocoder is not None:
            vc = vocoder.cfg
            if vc.num_mels != flow_cfg.dit.input_size or vc.hop_size != FRAME_SAMPLES:
                raise ValueError(
                    f"vocoder ({vc.num_mels} mels, hop {vc.hop_size}) does not fit the flow model "
                    f"({flow_cfg.dit.input_size} mels, hop {FRAME_SAMPLES} at 24 kHz)"
                )
        self._mean = self._std = None
        if flow_cfg.normalize_mel:
            self._mean = torch.as_tensor(flow_cfg.mel_mean, dtype=torch.float32, device=self.device)
            self._std = torch.as_tensor(flow_cfg.mel_std, dtype=torch.float32, device=self.device)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, streaming: StreamingConfig | None = None,
                        with_vocoder: bool = True) -> Detokenizer:
        """Load ``model_dir/audio_detokenizer`` and ``model_dir/vocoder`` (a Kimi-Audio model dir)."""
        model_dir = Path(model_dir)
        dev = torch.device(device)
        dt = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        flow, cfg = load_flow_model(model_dir / "audio_detokenizer", dev, dt)
        voc = load_bigvgan(model_dir / "vocoder", dev, dt) if with_vocoder else None
        return cls(flow, cfg, voc, streaming, dev, dt)

    # -- the ODE ---------------------------------------------------------------------------
    def _velocity(self, x: torch.Tensor, tokens: torch.Tensor, t_index: int, positions: torch.Tensor,
                  past: list[KV] | None) -> tuple[torch.Tensor, list[KV]]:
        t = torch.full((1,), t_index, dtype=torch.long, device=self.device)
        return self.flow(x, tokens[None], t, positions[None], past)

    def _solve(self, noise: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
               past: list[KV] | None) -> torch.Tensor:
        """Fixed-step Euler from t=0 (noise) to t=1 (mel) on ``linspace(0, 1, ode_steps)``.

        This is torchdyn's Euler solver over that grid, which upstream uses by default:
        ``ode_steps - 1`` network evaluations at the grid points before 1.
        """
        grid = torch.linspace(0, 1, self.streaming.ode_steps)
        x = noise.to(self.dtype)[None]
        for i in range(len(grid) - 1):
            v, _ = self._velocity(x, tokens, flow_time_index(grid[i]), positions, past)
            x = x + (grid[i + 1] - grid[i]).item() * v
        return x[0]

    def _denorm(self, mel: torch.Tensor) -> torch.Tensor:
        mel = mel.float()
        if self._mean is not None:
            mel = mel * self._std + self._mean
        return mel

    # -- whole sequence ---------------------------------------------------------------------
    @torch.inference_mode()
    def mel_whole(self, tokens: Sequence[int] | np.ndarray | torch.Tensor, seed: int = 0) -> torch.Tensor:
        """All frames in one ODE solve, no chunking: the reference the streaming path approximates."""
        tok = _as_token_tensor(tokens, self.flow_cfg.dit.semantic_vocab_size).to(self.device)
        if tok.numel() == 0:
            raise ValueError("no semantic tokens to detokenize")
        frames = tok.repeat_interleave(TOKEN_UPSAMPLE)
        noise = _NoiseTape(seed, self.device).take(0, frames.numel())
        pos = torch.arange(frames.numel(), device=self.device)
        return self._denorm(self._solve(noise, frames, pos, None))

    @torch.inference_mode()
    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        """``[frames, 80]`` mel -> ``[frames * 480]`` float32 waveform at 24 kHz."""
        if self.vocoder is None:
            raise RuntimeError("this detokenizer was built without a vocoder")
        return self.vocoder.decode(mel.to(self.device)).float()

    # -- streaming ---------------------------------------------------------------------------
    def _new_state(self, seed: int) -> _FlowState:
        st = _FlowState(noise=_NoiseTape(seed, self.device))
        st.backup = (None, 0)
        return st

    def _flow_chunk(self, st: _FlowState, chunk_frames: torch.Tensor, final: bool) -> torch.Tensor:
        """Sample one chunk's mel, update the cache, return the emitted (denormalised) frames."""
        s = self.streaming
        toks = chunk_frames if st.withheld is None else torch.cat([st.withheld, chunk_frames])
        n = toks.numel()
        positions = torch.arange(st.position, st.position + n, device=self.device)
        x = self._solve(st.noise.take(st.emitted, st.emitted + n), toks, positions, st.kv)
        look = 0 if final else s.look_ahead_tokens * TOKEN_UPSAMPLE
        emit = x[: n - look]
        if not final:
            # Write the clean emitted mel into the cache, as the prefix of every later chunk.
            _, present = self._velocity(emit[None], toks[: n - look], flow_time_index(_CLEAN_T),
                                        positions[: n - look], st.kv)
            st.kv = self._trim(present, st.reserved)
            st.withheld = toks[n - look:] if look else None
        st.position += emit.shape[0]
        st.emitted += emit.shape[0]
        if not final and st.position + 2 * emit.shape[0] > min(s.max_positions, self.flow.max_position):
            # Out of positions: go back to the post-prompt state (upstream does the same).
            st.kv, st.position = st.backup if st.backup else (None, 0)
        return self._denorm(emit)

    def _trim(self, kv: list[KV], reserved: int) -> list[KV]:
        cap = self.streaming.max_kv_cache_frames
        if kv[0][0].shape[1] <= cap:
            return kv
        keep_recent = cap - reserved
        return [
            (torch.cat([k[:, :reserved], k[:, -keep_recent:]], 1), torch.cat([v[:, :reserved], v[:, -keep_recent:]], 1))
            for k, v in kv
        ]

    def _token_chunks(self, tokens: Iterable[int] | Iterable[Sequence[int]] | torch.Tensor | np.ndarray
                      ) -> Iterator[tuple[torch.Tensor, bool]]:
        """Cut an (incrementally arriving) token stream into (chunk, is_final) pairs."""
        s = self.streaming
        vocab = self.flow_cfg.dit.semantic_vocab_size
        if isinstance(tokens, (torch.Tensor, np.ndarray)):
            source: Iterable[Any] = [_as_token_tensor(tokens, vocab)]
        else:
            source = tokens
        buf = torch.empty(0, dtype=torch.long)
        size = s.first_chunk_tokens
        seen = False
        for piece in source:
            part = _as_token_tensor([piece] if isinstance(piece, (int, np.integer)) else piece, vocab)
            buf = torch.cat([buf, part])
            seen = seen or part.numel() > 0
            # Strictly more than a chunk: the extra token proves this chunk is not the last.
            while buf.numel() > size:
                yield buf[:size], False
                buf = buf[size:]
                size = s.chunk_tokens
        if not seen:
            raise ValueError("no semantic tokens to detokenize")
        if buf.numel():
            yield buf, True

    @torch.inference_mode()
    def stream_mel(self, tokens: Iterable[int] | Iterable[Sequence[int]] | torch.Tensor | np.ndarray,
                   seed: int = 0) -> Iterator[torch.Tensor]:
        """Yield ``[frames, 80]`` mel pieces as soon as each token chunk is complete."""
        st = self._new_state(seed)
        for chunk, final in self._token_chunks(tokens):
            frames = chunk.to(self.device).repeat_interleave(TOKEN_UPSAMPLE)
            yield self._flow_chunk(st, frames, final)

    @torch.inference_mode()
    def stream(self, tokens: Iterable[int] | Iterable[Sequence[int]] | torch.Tensor | np.ndarray,
               seed: int = 0) -> Iterator[np.ndarray]:
        """Yield float32 24 kHz waveform pieces as token chunks arrive (concatenate them to get all)."""
        stitcher = _VocoderStitcher(self.vocode, self.streaming.crossfade)
        st = self._new_state(seed)
        for chunk, final in self._token_chunks(tokens):
            frames = chunk.to(self.device).repeat_interleave(TOKEN_UPSAMPLE)
            mel = self._flow_chunk(st, frames, final)
            yield stitcher.push(mel, final).cpu().numpy().astype(np.float32, copy=False)

    def detokenize(self, tokens: Sequence[int] | np.ndarray | torch.Tensor, seed: int = 0) -> np.ndarray:
        """The whole streamed waveform (float32, 24 kHz, ``len(tokens) * 1920`` samples)."""
        return np.concatenate(list(self.stream(tokens, seed)))

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE


def stitch_mel_and_vocode(det: Detokenizer, mel_chunks: Iterable[torch.Tensor]) -> np.ndarray:
    """Vocode pre-computed mel chunks with the streaming stitcher (for tests of the seams)."""
    chunks = list(mel_chunks)
    stitcher = _VocoderStitcher(det.vocode, det.streaming.crossfade)
    out = [stitcher.push(m, i == len(chunks) - 1) for i, m in enumerate(chunks)]
    return torch.cat(out).cpu().numpy()


def save_pretrained(det: Detokenizer, model_dir: str | Path) -> Path:
    """Write ``audio_detokenizer/`` and ``vocoder/`` under ``model_dir`` (upstream layout)."""
    model_dir = Path(model_dir)
    save_flow_model(det.flow, det.flow_cfg, model_dir / "audio_detokenizer")
    if det.vocoder is not None:
        save_bigvgan(det.vocoder, model_dir / "vocoder")
    return model_dir

"""BigVGAN vocoder (mel at 50 Hz -> waveform at 24 kHz) in the layout Kimi-Audio ships.

Kimi-Audio's detokenizer ends in NVIDIA's BigVGAN generator (``<model>/vocoder/config.json``
and ``<model>/vocoder/model.pt``, weights under the ``"generator"`` key, convolutions stored
weight-normalised as ``weight_g`` / ``weight_v``). This module rebuilds that generator with
plain convolutions: weight norm is a training-time re-parametrisation, so the two factors are
fused into one weight when the checkpoint is read (``w = g * v / ||v||``), which is what
upstream's ``remove_weight_norm`` does before inference anyway.

Upstream compiles a CUDA kernel (ninja, on first use) for the anti-aliased activation; here
the same operation (2x upsample with a Kaiser-windowed sinc, Snake/SnakeBeta, low-pass and 2x
downsample) is written in PyTorch, so it runs on CPU and on any GPU without a build step.

Example:
    >>> cfg = BigVGANConfig(upsample_rates=(5, 4, 4, 3, 2), upsample_kernel_sizes=(9, 8, 8, 5, 4),
    ...                     upsample_initial_channel=64, resblock_kernel_sizes=(3,),
    ...                     resblock_dilation_sizes=((1, 3),))  # a tiny generator with the real hop (480)
    >>> voc = BigVGAN(cfg).eval()
    >>> voc(torch.zeros(1, cfg.num_mels, 5)).shape[-1] == 5 * cfg.hop_size
    True
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kimia_model.checkpoint import load_state_checked

#: Keys of upstream's config.json that the generator reads; the rest (training settings,
#: segment sizes, discriminator options) are carried along untouched.
_GENERATOR_KEYS = (
    "num_mels",
    "upsample_rates",
    "upsample_kernel_sizes",
    "upsample_initial_channel",
    "resblock",
    "resblock_kernel_sizes",
    "resblock_dilation_sizes",
    "activation",
    "snake_logscale",
    "use_tanh_at_final",
    "use_bias_at_final",
    "sampling_rate",
    "hop_size",
    "n_fft",
    "win_size",
    "fmin",
    "fmax",
)


@dataclass(frozen=True)
class BigVGANConfig:
    """The generator hyper-parameters of upstream's ``vocoder/config.json``.

    Defaults are the values reported for Kimi-Audio's vocoder by third-party ports (24 kHz,
    hop 480 = product of the upsample rates, 80 mels); the real file always overrides them.
    ``use_tanh_at_final`` / ``use_bias_at_final`` default to BigVGAN's own defaults (True),
    as upstream code does when the keys are absent.
    """

    num_mels: int = 80
    upsample_rates: tuple[int, ...] = (5, 2, 2, 2, 2, 3, 2)
    upsample_kernel_sizes: tuple[int, ...] = (9, 4, 4, 4, 4, 5, 4)
    upsample_initial_channel: int = 1024
    resblock: str = "1"
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    activation: str = "snakebeta"
    snake_logscale: bool = True
    use_tanh_at_final: bool = True
    use_bias_at_final: bool = True
    sampling_rate: int = 24000
    hop_size: int = 480
    n_fft: int = 1920
    win_size: int = 1920
    fmin: float = 0.0
    fmax: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError("vocoder config: upsample_rates and upsample_kernel_sizes differ in length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("vocoder config: resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if math.prod(self.upsample_rates) != self.hop_size:
            raise ValueError(
                f"vocoder config: product of upsample_rates {self.upsample_rates} = "
                f"{math.prod(self.upsample_rates)} must equal hop_size {self.hop_size}"
            )
        if self.resblock not in ("1", "2"):
            raise ValueError(f"vocoder config: resblock must be '1' or '2', got {self.resblock!r}")
        if self.activation not in ("snake", "snakebeta"):
            raise ValueError(f"vocoder config: activation must be snake or snakebeta, got {self.activation!r}")
        if self.upsample_initial_channel % (2 ** len(self.upsample_rates)):
            raise ValueError("vocoder config: upsample_initial_channel must halve cleanly at every upsample")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BigVGANConfig:
        """Read upstream's config.json dict (unknown keys are kept in ``extra``)."""
        missing_keys = [k for k in ("num_mels", "upsample_rates", "upsample_kernel_sizes",
                                    "upsample_initial_channel", "resblock_kernel_sizes",
                                    "resblock_dilation_sizes") if k not in data]
        if missing_keys:
            raise ValueError(f"vocoder config.json lacks {missing_keys}")
        kw: dict[str, Any] = {}
        for k in _GENERATOR_KEYS:
            if k in data:
                v = data[k]
                if k == "resblock_dilation_sizes":
                    v = tuple(tuple(int(x) for x in d) for d in v)
                elif isinstance(v, list):
                    v = tuple(v)
                elif k == "resblock":
                    v = str(v)
                kw[k] = v
        if "hop_size" not in kw:
            kw["hop_size"] = math.prod(kw["upsample_rates"])
        return cls(**kw, extra={k: v for k, v in data.items() if k not in _GENERATOR_KEYS})

    @classmethod
    def from_json(cls, path: str | Path) -> BigVGANConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        d = json.loads(json.dumps(d))  # tuples -> lists, as upstream's JSON has them
        return {**self.extra, **d}

# -- anti-aliased activation -----------------------------------------------------------------


def kaiser_sinc_lowpass(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """Kaiser-windowed sinc low-pass taps, shape ``[1, 1, kernel_size]``, unit DC gain.

    The Kaiser ``beta`` follows Kaiser's empirical formula for the attenuation ``A`` a
    transition band of ``2 * half_width`` allows (as in alias-free GAN / julius). Taps are
    normalised to sum to 1 so a constant input passes unchanged (no DC leak).
    """
    half = kernel_size // 2
    delta_f = 4.0 * half_width
    attenuation = 2.285 * (half - 1) * math.pi * delta_f + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21.0) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, periodic=False, beta=beta)
    if kernel_size % 2 == 0:  # even length: taps sit half-way between samples
        n = torch.arange(-half, half, dtype=torch.float32) + 0.5
    else:
        n = torch.arange(kernel_size, dtype=torch.float32) - half
    if cutoff == 0:
        taps = torch.zeros_like(n)
    else:
        taps = 2.0 * cutoff * window * torch.sinc(2.0 * cutoff * n)
        taps = taps / taps.sum()
    return taps.view(1, 1, kernel_size)


class UpSample1d(nn.Module):
    """Band-limited ``ratio``x upsampling (zero-stuffing + sinc low-pass) per channel."""

    def __init__(self, ratio: int = 2, kernel_size: int | None = None) -> None:
        super().__init__()
        self.ratio = ratio
        self.kernel_size = kernel_size or int(6 * ratio // 2) * 2
        self.pad = self.kernel_size // ratio - 1
        # Crop what the replicate padding and the transposed convolution's tails add.
        self.crop_left = self.pad * ratio + (self.kernel_size - ratio) // 2
        self.crop_right = self.pad * ratio + (self.kernel_size - ratio + 1) // 2
        self.register_buffer(
            "filter", kaiser_sinc_lowpass(0.5 / ratio, 0.6 / ratio, self.kernel_size), persistent=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        # Zero-stuffing divides the energy by `ratio`; the gain restores the amplitude.
        x = self.ratio * F.conv_transpose1d(
            x, self.filter.to(x.dtype).expand(channels, -1, -1), stride=self.ratio, groups=channels
        )
        return x[..., self.crop_left : x.shape[-1] - self.crop_right]


class LowPassFilter1d(nn.Module):
    """Depthwise sinc low-pass with optional decimation (``stride``)."""

    def __init__(self, cutoff: float, half_width: float, stride: int, kernel_size: int) -> None:
        super().__init__()
        if not 0.0 <= cutoff <= 0.5:
            raise ValueError(f"low-pass cutoff must lie in [0, 0.5], got {cutoff}")
        self.stride = stride
        self.pad_left = kernel_size // 2 - int(kernel_size % 2 == 0)
        self.pad_right = kernel_size // 2
        self.register_buffer("filter", kaiser_sinc_lowpass(cutoff, half_width, kernel_size), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        return F.conv1d(x, self.filter.to(x.dtype).expand(channels, -1, -1), stride=self.stride, groups=channels)


class DownSample1d(nn.Module):
    """Low-pass then keep every ``ratio``-th sample."""

    def __init__(self, ratio: int = 2, kernel_size: int | None = None) -> None:
        super().__init__()
        k = kernel_size or int(6 * ratio // 2) * 2
        self.lowpass = LowPassFilter1d(0.5 / ratio, 0.6 / ratio, ratio, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x)


class Snake(nn.Module):
    """``x + sin^2(alpha x) / alpha`` per channel (periodic inductive bias for audio)."""

    def __init__(self, channels: int, logscale: bool = True) -> None:
        super().__init__()
        self.logscale = logscale
        self.alpha = nn.Parameter(torch.zeros(channels) if logscale else torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.view(1, -1, 1)
        if self.logscale:
            alpha = alpha.exp()
        return x + torch.sin(x * alpha).pow(2) / (alpha + 1e-9)


class SnakeBeta(nn.Module):
    """Snake with separate frequency (``alpha``) and magnitude (``beta``) per channel."""

    def __init__(self, channels: int, logscale: bool = True) -> None:
        super().__init__()
        self.logscale = logscale
        init = torch.zeros(channels) if logscale else torch.ones(channels)
        self.alpha = nn.Parameter(init.clone())
        self.beta = nn.Parameter(init.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.view(1, -1, 1)
        beta = self.beta.view(1, -1, 1)
        if self.logscale:
            alpha, beta = alpha.exp(), beta.exp()
        return x + torch.sin(x * alpha).pow(2) / (beta + 1e-9)


class Activation1d(nn.Module):
    """Anti-aliased activation: the nonlinearity runs at twice the rate, then is band-limited.

    A periodic nonlinearity creates harmonics above Nyquist; evaluating it on a 2x upsampled
    signal and low-passing before decimation keeps them from aliasing into the audio band.
    """

    def __init__(self, activation: nn.Module, up_ratio: int = 2, down_ratio: int = 2,
                 up_kernel_size: int = 12, down_kernel_size: int = 12) -> None:
        super().__init__()
        self.act = activation
        self.upsample = UpSample1d(up_ratio, up_kernel_size)
        self.downsample = DownSample1d(down_ratio, down_kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))


def _padding(kernel: int, dilation: int) -> int:
    return (kernel * dilation - dilation) // 2


def _activation(cfg: BigVGANConfig, channels: int) -> nn.Module:
    cls = Snake if cfg.activation == "snake" else SnakeBeta
    return Activation1d(cls(channels, logscale=cfg.snake_logscale))


class AMPBlock1(nn.Module):
    """Residual block: per dilation, act -> dilated conv -> act -> conv (``convs1``/``convs2``)."""

    def __init__(self, cfg: BigVGANConfig, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, 1, dilation=d, padding=_padding(kernel, d)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, 1, dilation=1, padding=_padding(kernel, 1)) for _ in dilations
        )
        self.activations = nn.ModuleList(_activation(cfg, channels) for _ in range(2 * len(dilations)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
            y = c1(self.activations[2 * i](x))
            y = c2(self.activations[2 * i + 1](y))
            x = x + y
        return x


class AMPBlock2(nn.Module):
    """Residual block without the second (dilation 1) convolution (``convs``)."""

    def __init__(self, cfg: BigVGANConfig, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, 1, dilation=d, padding=_padding(kernel, d)) for d in dilations
        )
        self.activations = nn.ModuleList(_activation(cfg, channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, act in zip(self.convs, self.activations):
            x = x + conv(act(x))
        return x


class BigVGAN(nn.Module):
    """The BigVGAN generator: ``[B, num_mels, T] -> [B, 1, T * hop_size]`` in [-1, 1].

    Module names equal upstream's (``conv_pre``, ``ups.{i}.0``, ``resblocks.{k}``,
    ``activation_post``, ``conv_post``) so a checkpoint loads key for key.
    """

    def __init__(self, cfg: BigVGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.num_mels, ch, 7, 1, padding=3)
        self.ups = nn.ModuleList()
        for i, (rate, kernel) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            self.ups.append(
                nn.ModuleList(
                    [nn.ConvTranspose1d(ch // 2**i, ch // 2 ** (i + 1), kernel, rate, padding=(kernel - rate) // 2)]
                )
            )
        block = AMPBlock1 if cfg.resblock == "1" else AMPBlock2
        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            c = ch // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(block(cfg, c, k, d))
        c_out = ch // 2 ** len(self.ups)
        self.activation_post = _activation(cfg, c_out)
        self.conv_post = nn.Conv1d(c_out, 1, 7, 1, padding=3, bias=cfg.use_bias_at_final)
        self._init_random()

    def _init_random(self) -> None:
        """Upstream's init (N(0, 0.01) convolutions): only matters for random test models."""
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
                nn.init.normal_(m.weight, 0.0, 0.01)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(mel)
        n_k = len(self.cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up[0](x)
            # Multi-receptive-field fusion: average of the parallel residual blocks.
            acc = self.resblocks[i * n_k](x)
            for j in range(1, n_k):
                acc = acc + self.resblocks[i * n_k + j](x)
            x = acc / n_k
        x = self.conv_post(self.activation_post(x))
        return torch.tanh(x) if self.cfg.use_tanh_at_final else x.clamp(-1.0, 1.0)

    @torch.inference_mode()
    def decode(self, mel: torch.Tensor) -> torch.Tensor:
        """``[T, num_mels]`` mel (50 Hz frames) -> ``[T * hop_size]`` waveform."""
        if mel.ndim != 2 or mel.shape[1] != self.cfg.num_mels:
            raise ValueError(f"vocoder expects a [frames, {self.cfg.num_mels}] mel, got {tuple(mel.shape)}")
        p = next(self.parameters())
        wav = self(mel.to(device=p.device, dtype=p.dtype).t().unsqueeze(0))
        return wav.reshape(-1)


# -- checkpoint layout -------------------------------------------------------------------------


def fuse_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace ``X.weight_g`` / ``X.weight_v`` pairs by ``X.weight = g * v / ||v||``.

    torch's ``weight_norm`` (dim 0) keeps one norm per slice along dim 0 (output channels
    of a Conv1d, input channels of a ConvTranspose1d); the norm runs over all other dims.
    """
    out: dict[str, torch.Tensor] = {}
    g_parts: dict[str, torch.Tensor] = {}
    v_parts: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith(".weight_g"):
            g_parts[k[: -len(".weight_g")]] = v
        elif k.endswith(".weight_v"):
            v_parts[k[: -len(".weight_v")]] = v
        else:
            out[k] = v
    for prefix in sorted(set(g_parts) | set(v_parts)):
        if prefix not in g_parts or prefix not in v_parts:
            raise ValueError(f"vocoder checkpoint has only one half of weight_g/weight_v for {prefix!r}")
        v = v_parts[prefix].float()
        norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.ndim - 1)))
        out[f"{prefix}.weight"] = (g_parts[prefix].float() * v / norm).to(v_parts[prefix].dtype)
    return out


def split_weight_norm(state: dict[str, torch.Tensor], model: BigVGAN) -> dict[str, torch.Tensor]:
    """Inverse of :func:`fuse_weight_norm` for every convolution (how upstream checkpoints store them)."""
    conv_prefixes = {
        name for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))
    }
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        prefix = k[: -len(".weight")] if k.endswith(".weight") else None
        if prefix in conv_prefixes:
            out[f"{prefix}.weight_g"] = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.ndim - 1)))
            out[f"{prefix}.weight_v"] = v.clone()
        else:
            out[k] = v
    return out


def load_bigvgan(vocoder_dir: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> BigVGAN:
    """Load ``vocoder_dir/config.json`` + ``vocoder_dir/model.pt`` (upstream layout).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the checkpoint does not match the config; the message lists the names.
    """
    vocoder_dir = Path(vocoder_dir)
    cfg_path, ckpt_path = vocoder_dir / "config.json", vocoder_dir / "model.pt"
    for p in (cfg_path, ckpt_path):
        if not p.is_file():
            raise FileNotFoundError(f"vocoder file missing: {p}")
    cfg = BigVGANConfig.from_json(cfg_path)
    model = BigVGAN(cfg)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = ckpt.get("generator", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{ckpt_path}: expected a dict with a 'generator' state dict")
    state = fuse_weight_norm(state)
    load_state_strict(model, state, str(ckpt_path), optional_suffixes=(".filter",))
    return model.to(device=device, dtype=dtype).eval()


def save_bigvgan(model: BigVGAN, vocoder_dir: str | Path) -> Path:
    """Write ``config.json`` + ``model.pt`` exactly as upstream ships them (weight-norm factors)."""
    vocoder_dir = Path(vocoder_dir)
    vocoder_dir.mkdir(parents=True, exist_ok=True)
    (vocoder_dir / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2), encoding="utf-8")
    state = split_weight_norm({k: v.detach().cpu() for k, v in model.state_dict().items()}, model)
    torch.save({"generator": state}, vocoder_dir / "model.pt")
    return vocoder_dir


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                      optional_suffixes: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped tensor is an error.

    Keys ending in ``optional_suffixes`` (derived buffers such as fixed filters) may be absent:
    the freshly computed values are kept.
    """
    load_state_checked(model, state, source, optional=lambda k: k.endswith(optional_suffixes) if optional_suffixes else False)

"""Band-Split RNN (BSRNN) speech enhancement at 48 kHz.

Follows "High fidelity speech enhancement with band-split RNN" (Yu et al., arXiv 2212.00406):

1. STFT (20 ms square-root-Hann window, 10 ms hop at 48 kHz by default);
2. **band split**: the spectrum is cut into sub-bands that are narrow where speech carries
   detail (100 Hz below 1 kHz) and wide where it does not (4 kHz above 20 kHz); each band's
   real/imaginary bins are normalised (LayerNorm) and projected to a common width ``N``, so
   the rest of the network sees a ``[time, band, N]`` tensor whatever the band widths;
3. **band-and-time modelling**: a stack of blocks, each an LSTM across time per band
   (unidirectional in the causal model, bidirectional otherwise) followed by a
   bidirectional LSTM across bands per frame, both residual;
4. **mask estimation** per band: LayerNorm, an MLP with a GLU output, giving a complex mask
   for that band's bins;
5. complex masking and inverse STFT by overlap-add.

Every normalisation acts on one frame at a time, so the causal variant depends on past
frames only and can run as a stream (:class:`StreamState`); chunked inference of the causal
model then equals whole-file inference up to float rounding. The non-causal variant is run
on overlapping chunks with complementary linear cross-fades.

Checkpoints are a directory holding ``model.safetensors`` and ``config.json`` (see
:func:`save_checkpoint` / :func:`load_checkpoint`); loading checks every tensor name and
shape against the config and fails with one line naming what is wrong.

Example:
    >>> cfg = BSRNNConfig(feature_dim=8, hidden_dim=8, num_layers=1,
    ...                   band_scheme=((4000.0, 1000.0), (24000.0, 10000.0)))
    >>> model = BSRNN(cfg).eval()
    >>> out = model.enhance(np.zeros(4800, np.float32), 48000)
    >>> out.shape
    (4800,)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_TAG = "kimia-bsrnn"
FORMAT_VERSION = 1

#: The paper's band layout at 48 kHz: (upper edge Hz, band width Hz) pairs read left to
#: right. 10 bands of 100 Hz to 1 kHz, 12 of 250 Hz to 4 kHz, 8 of 500 Hz to 8 kHz, 8 of
#: 1 kHz to 16 kHz, 2 of 2 kHz to 20 kHz and one last band up to Nyquist: 41 bands.
DEFAULT_BAND_SCHEME: tuple[tuple[float, float], ...] = (
    (1000.0, 100.0),
    (4000.0, 250.0),
    (8000.0, 500.0),
    (16000.0, 1000.0),
    (20000.0, 2000.0),
    (24000.0, 4000.0),
)


class CheckpointError(ValueError):
    """A BSRNN checkpoint is missing, corrupt, or does not match its config."""


class SampleRateError(ValueError):
    """Audio at a rate the model was not trained for."""


@dataclass(frozen=True)
class BSRNNConfig:
    """Hyper-parameters of one BSRNN; stored as ``config.json`` beside the weights.

    Attributes:
        sample_rate: the rate the model was trained at; inference at any other rate is an
            error because band edges are fixed in Hz.
        n_fft: STFT window length in samples (960 = 20 ms at 48 kHz).
        hop_length: STFT hop; ``n_fft`` must be a multiple of it so the square-root-Hann
            analysis/synthesis pair reconstructs exactly (constant overlap-add).
        band_scheme: ``(upper_hz, width_hz)`` pairs, increasing; see
            :data:`DEFAULT_BAND_SCHEME`. Bins above the last ``upper_hz`` join the last band.
        feature_dim: ``N``, the width every band is projected to.
        hidden_dim: LSTM hidden size (per direction).
        num_layers: number of band-and-time blocks.
        causal: unidirectional LSTM across time (streamable) when True.
        mask_mult: hidden width of the mask MLP as a multiple of ``N``.
    """

    sample_rate: int = 48000
    n_fft: int = 960
    hop_length: int = 480
    band_scheme: tuple[tuple[float, float], ...] = field(default=DEFAULT_BAND_SCHEME)
    feature_dim: int = 128
    hidden_dim: int = 256
    num_layers: int = 6
    causal: bool = True
    mask_mult: int = 4

    def __post_init__(self) -> None:
        # JSON round-trips tuples as lists; normalise so configs compare equal.
        object.__setattr__(
            self, "band_scheme", tuple((float(u), float(w)) for u, w in self.band_scheme)
        )
        if self.sample_rate <= 0 or self.n_fft <= 0 or self.hop_length <= 0:
            raise ValueError("sample_rate, n_fft and hop_length must be positive")
        if self.n_fft % self.hop_length or self.n_fft // self.hop_length < 2:
            raise ValueError(
                f"n_fft ({self.n_fft}) must be a multiple >= 2 of hop_length ({self.hop_length}) "
                "for exact overlap-add reconstruction"
            )
        for name in ("feature_dim", "hidden_dim", "num_layers", "mask_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        self.band_edges()  # validates the scheme

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1

    def band_edges(self) -> list[tuple[int, int]]:
        """``[start_bin, end_bin)`` of every band, covering all ``n_freqs`` bins."""
        bin_hz = self.sample_rate / self.n_fft
        nyquist = self.sample_rate / 2
        edges = [0]
        prev_upper = 0.0
        for upper, width in self.band_scheme:
            if upper <= prev_upper or width <= 0:
                raise ValueError(f"band_scheme must have increasing upper edges and positive widths: {self.band_scheme}")
            if upper > nyquist + 1e-6:
                raise ValueError(f"band_scheme edge {upper} Hz is above Nyquist ({nyquist} Hz)")
            # At least one bin per band; rounding to bins keeps edges on the FFT grid.
            step = max(1, int(round(width / bin_hz)))
            stop = int(round(upper / bin_hz))
            while edges[-1] + step <= stop:
                edges.append(edges[-1] + step)
            if edges[-1] < stop:
                edges.append(stop)
            prev_upper = upper
        # Leftover bins (at least the Nyquist bin) join the last band rather than form a
        # one-bin band that would carry little but cost a full projection.
        edges[-1] = self.n_freqs
        bands = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
        if not bands:
            raise ValueError("band_scheme produced no bands")
        return bands

    def to_json(self) -> str:
        d = asdict(self)
        d["band_scheme"] = [list(p) for p in self.band_scheme]
        return json.dumps({"format": FORMAT_TAG, "version": FORMAT_VERSION, **d}, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BSRNNConfig:
        """Build from a dict, rejecting unknown keys (a typo must not silently fall back)."""
        data = {k: v for k, v in data.items() if k not in ("format", "version")}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown BSRNN config keys: {', '.join(unknown)}")
        if "band_scheme" in data:
            data["band_scheme"] = tuple(tuple(p) for p in data["band_scheme"])
        return cls(**data)


# -- building blocks ------------------------------------------------------------------------


class BandSplit(nn.Module):
    """Per-band LayerNorm over the band's (real, imag) bins, then a projection to ``N``."""

    def __init__(self, bands: list[tuple[int, int]], feature_dim: int) -> None:
        super().__init__()
        self.bands = bands
        self.norms = nn.ModuleList(nn.LayerNorm(2 * (b - a)) for a, b in bands)
        self.projs = nn.ModuleList(nn.Linear(2 * (b - a), feature_dim) for a, b in bands)

    def forward(self, spec_ri: torch.Tensor) -> torch.Tensor:
        """``[B, T, F, 2]`` -> ``[B, T, K, N]``."""
        b, t = spec_ri.shape[:2]
        outs = []
        for (lo, hi), norm, proj in zip(self.bands, self.norms, self.projs):
            x = spec_ri[:, :, lo:hi, :].reshape(b, t, 2 * (hi - lo))
            outs.append(proj(norm(x)))
        return torch.stack(outs, dim=2)


class BandTimeBlock(nn.Module):
    """One residual time-LSTM (per band) + band-LSTM (per frame) pair.

    LayerNorm over the feature axis of a single (frame, band) cell is used instead of the
    paper's group norm over time so that nothing looks at future frames in the causal model.
    """

    def __init__(self, feature_dim: int, hidden_dim: int, causal: bool) -> None:
        super().__init__()
        dirs = 1 if causal else 2
        self.time_norm = nn.LayerNorm(feature_dim)
        self.time_rnn = nn.LSTM(feature_dim, hidden_dim, batch_first=True, bidirectional=not causal)
        self.time_fc = nn.Linear(dirs * hidden_dim, feature_dim)
        self.band_norm = nn.LayerNorm(feature_dim)
        self.band_rnn = nn.LSTM(feature_dim, hidden_dim, batch_first=True, bidirectional=True)
        self.band_fc = nn.Linear(2 * hidden_dim, feature_dim)

    def forward(
        self, z: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``z``: ``[B, T, K, N]``; ``state``: the time-LSTM's (h, c) carried between chunks."""
        b, t, k, n = z.shape
        y = z.permute(0, 2, 1, 3).reshape(b * k, t, n)
        y, new_state = self.time_rnn(self.time_norm(y), state)
        z = z + self.time_fc(y).reshape(b, k, t, n).permute(0, 2, 1, 3)
        y = z.reshape(b * t, k, n)
        y, _ = self.band_rnn(self.band_norm(y))
        z = z + self.band_fc(y).reshape(b, t, k, n)
        return z, new_state


class MaskEstimator(nn.Module):
    """Per band: LayerNorm, MLP with tanh, GLU output -> complex mask for the band's bins."""

    def __init__(self, bands: list[tuple[int, int]], feature_dim: int, mult: int) -> None:
        super().__init__()
        self.bands = bands
        self.norms = nn.ModuleList(nn.LayerNorm(feature_dim) for _ in bands)
        self.fc1 = nn.ModuleList(nn.Linear(feature_dim, mult * feature_dim) for _ in bands)
        # GLU halves the last axis: 2 (gate) x 2 (re/im) x bins.
        self.fc2 = nn.ModuleList(nn.Linear(mult * feature_dim, 4 * (b - a)) for a, b in bands)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, T, K, N]`` -> mask ``[B, T, F, 2]``."""
        b, t = z.shape[:2]
        masks = []
        for i, (lo, hi) in enumerate(self.bands):
            h = torch.tanh(self.fc1[i](self.norms[i](z[:, :, i])))
            m = F.glu(self.fc2[i](h), dim=-1)
            masks.append(m.reshape(b, t, hi - lo, 2))
        return torch.cat(masks, dim=2)


# -- streaming state ------------------------------------------------------------------------


@dataclass
class StreamState:
    """What a causal BSRNN carries from one chunk to the next.

    Attributes:
        in_buf: padded input samples not yet consumed by a full frame (``[B, n]``).
        ola_tail: synthesised samples still waiting for the next frames' overlap-add.
        rnn: the time-LSTM (h, c) of every block.
    """

    in_buf: torch.Tensor
    ola_tail: torch.Tensor
    rnn: list[tuple[torch.Tensor, torch.Tensor] | None]


# -- the model ------------------------------------------------------------------------------


class BSRNN(nn.Module):
    """Band-split RNN enhancer; :meth:`forward` for training, :meth:`enhance` for inference."""

    def __init__(self, config: BSRNNConfig) -> None:
        super().__init__()
        self.config = config
        self.bands = config.band_edges()
        self.band_split = BandSplit(self.bands, config.feature_dim)
        self.blocks = nn.ModuleList(
            BandTimeBlock(config.feature_dim, config.hidden_dim, config.causal) for _ in range(config.num_layers)
        )
        self.mask = MaskEstimator(self.bands, config.feature_dim, config.mask_mult)
        # sqrt-Hann analysis and synthesis: their product is a Hann window, whose shifted
        # copies at hop = n_fft / r sum to r / 2, so dividing by that gives perfect
        # reconstruction when the mask is 1.
        self.register_buffer("window", torch.hann_window(config.n_fft, periodic=True).sqrt(), persistent=False)
        self.ola_gain = config.n_fft / (2 * config.hop_length)

    # -- geometry ----------------------------------------------------------------------------
    @property
    def latency(self) -> int:
        """Algorithmic latency of the stream in samples (one window minus one hop)."""
        return self.config.n_fft - self.config.hop_length

    def num_frames(self, length: int) -> int:
        """Frames needed so that every one of ``length`` samples gets its full overlap-add."""
        hop = self.config.hop_length
        return max(1, math.ceil((length + self.latency) / hop))

    # -- core --------------------------------------------------------------------------------
    def _frames_to_spec(self, frames: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(frames * self.window, dim=-1)

    def _process_spec(
        self, spec: torch.Tensor, rnn_state: list[tuple[torch.Tensor, torch.Tensor] | None] | None
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor] | None]]:
        """Masked spectrum ``[B, T, F]`` and the new per-block time-LSTM states."""
        spec_ri = torch.view_as_real(spec)
        z = self.band_split(spec_ri)
        states = rnn_state or [None] * len(self.blocks)
        new_states: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for block, st in zip(self.blocks, states):
            z, ns = block(z, st if self.config.causal else None)
            new_states.append(ns if self.config.causal else None)
        mask = torch.view_as_complex(self.mask(z).float().contiguous())
        return spec * mask, new_states

    def _overlap_add(self, spec: torch.Tensor) -> torch.Tensor:
        """``[B, T, F]`` -> ``[B, (T - 1) * hop + n_fft]`` by windowed overlap-add."""
        n_fft, hop = self.config.n_fft, self.config.hop_length
        frames = torch.fft.irfft(spec, n=n_fft, dim=-1) * (self.window / self.ola_gain)
        b, t, _ = frames.shape
        r = n_fft // hop
        out = frames.new_zeros(b, (t + r - 1) * hop)
        for j in range(r):
            out[:, j * hop : j * hop + t * hop] += frames[:, :, j * hop : (j + 1) * hop].reshape(b, t * hop)
        return out

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """Enhance a batch of whole waveforms ``[B, L]`` -> ``[B, L]`` (sample-aligned).

        The input is padded by one window minus one hop on the left (the stream's latency)
        and to a whole number of frames on the right, so the output lines up with the input
        exactly and has the same length.
        """
        if wave.dim() == 1:
            return self.forward(wave[None])[0]
        length = wave.shape[-1]
        n_fft, hop = self.config.n_fft, self.config.hop_length
        t = self.num_frames(length)
        pad_right = (t - 1) * hop + n_fft - self.latency - length
        padded = F.pad(wave, (self.latency, pad_right))
        spec = self._frames_to_spec(padded.unfold(-1, n_fft, hop))
        spec, _ = self._process_spec(spec, None)
        out = self._overlap_add(spec)
        return out[:, self.latency : self.latency + length]

    # -- streaming (causal) -----------------------------------------------------------------
    def init_stream(self, batch: int = 1) -> StreamState:
        """A fresh stream: zero history, as if the audio were preceded by silence."""
        dev = self.window.device
        return StreamState(
            in_buf=torch.zeros(batch, self.latency, device=dev),
            ola_tail=torch.zeros(batch, self.latency, device=dev),
            rnn=[None] * len(self.blocks),
        )

    def stream(self, chunk: torch.Tensor, state: StreamState) -> tuple[torch.Tensor, StreamState]:
        """Push ``[B, n]`` samples; returns the samples completed so far (``latency`` behind).

        Only the causal model can stream: a bidirectional time-LSTM needs the future.
        """
        if not self.config.causal:
            raise RuntimeError("only a causal BSRNN can be run as a stream")
        n_fft, hop = self.config.n_fft, self.config.hop_length
        buf = torch.cat([state.in_buf, chunk], dim=-1)
        t = (buf.shape[-1] - n_fft) // hop + 1 if buf.shape[-1] >= n_fft else 0
        if t == 0:
            return chunk.new_zeros(chunk.shape[0], 0), StreamState(buf, state.ola_tail, state.rnn)
        spec = self._frames_to_spec(buf[:, : (t - 1) * hop + n_fft].unfold(-1, n_fft, hop))
        spec, rnn = self._process_spec(spec, state.rnn)
        out = self._overlap_add(spec)
        out[:, : self.latency] += state.ola_tail
        done = out[:, : t * hop]
        return done, StreamState(buf[:, t * hop :], out[:, t * hop :].clone(), rnn)

    # -- inference over long audio ----------------------------------------------------------
    @torch.no_grad()
    def enhance(
        self,
        audio: np.ndarray,
        sample_rate: int,
        *,
        chunk_seconds: float = 10.0,
        overlap_seconds: float = 1.0,
    ) -> np.ndarray:
        """Enhance one mono recording of any length with bounded memory.

        The causal model streams chunk by chunk (its output does not depend on the chunk
        size). The non-causal model enhances chunks that overlap by ``overlap_seconds`` on
        each side and blends neighbours with complementary linear fades centred on the
        chunk boundary, so no seam is audible and every sample's weights sum to one.

        Args:
            audio: float32 mono at ``sample_rate``.
            sample_rate: must equal the rate the model was trained at.
            chunk_seconds: audio per forward pass (memory grows with it).
            overlap_seconds: context on each side of a non-causal chunk.

        Returns:
            float32 array of the same length, sample-aligned with the input.
        """
        if sample_rate != self.config.sample_rate:
            raise SampleRateError(
                f"BSRNN was trained at {self.config.sample_rate} Hz but got audio at {sample_rate} Hz; "
                f"resample to {self.config.sample_rate} Hz first"
            )
        x = np.asarray(audio, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"expected mono audio (1-D), got shape {x.shape}")
        length = x.shape[0]
        if length == 0:
            return x.copy()
        dev = self.window.device
        chunk = max(self.config.hop_length, int(round(chunk_seconds * sample_rate)))
        if self.config.causal:
            return self._enhance_stream(x, chunk, dev)
        margin = min(chunk, int(round(overlap_seconds * sample_rate)))
        return self._enhance_crossfade(x, chunk, margin, dev)

    def _enhance_stream(self, x: np.ndarray, chunk: int, dev: torch.device) -> np.ndarray:
        length = x.shape[0]
        out = np.zeros(length, np.float32)
        state = self.init_stream(1)
        lat = self.latency
        written = -lat  # stream output position, in input coordinates
        # Zeros that complete the last frames, as forward() pads on the right.
        tail = (self.num_frames(length) - 1) * self.config.hop_length + self.config.n_fft - lat - length
        pos = 0
        while pos < length + tail:
            if pos < length:
                piece = torch.from_numpy(x[pos : pos + chunk]).to(dev)
            else:
                piece = torch.zeros(tail, device=dev)
            pos += piece.shape[0]
            y, state = self.stream(piece[None], state)
            y = y[0].cpu().numpy()
            lo, hi = written, written + y.shape[0]
            a, b = max(lo, 0), min(hi, length)
            if b > a:
                out[a:b] = y[a - lo : b - lo]
            written = hi
        return out

    def _enhance_crossfade(self, x: np.ndarray, chunk: int, margin: int, dev: torch.device) -> np.ndarray:
        length = x.shape[0]
        if length <= chunk + margin:
            return self(torch.from_numpy(x).to(dev)).cpu().numpy()
        out = np.zeros(length, np.float32)
        n_chunks = math.ceil(length / chunk)
        half = margin / 2.0
        for i in range(n_chunks):
            c0, c1 = i * chunk, min(length, (i + 1) * chunk)
            s0, s1 = max(0, c0 - margin), min(length, c1 + margin)
            y = self(torch.from_numpy(x[s0:s1]).to(dev)).cpu().numpy()
            # The fade spans [c0 - margin/2, c0 + margin/2): at least margin/2 of context
            # separates it from the processed segment's edge.
            t = np.arange(s0, s1, dtype=np.float64)
            w = np.ones_like(t)
            if i > 0 and margin > 0:
                w = np.minimum(w, np.clip((t - (c0 - half)) / margin, 0.0, 1.0))
            if i < n_chunks - 1 and margin > 0:
                w = np.minimum(w, np.clip(((c1 + half) - t) / margin, 0.0, 1.0))
            out[s0:s1] += (w * y).astype(np.float32)
        return out


# -- checkpoints ----------------------------------------------------------------------------


def _checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """Accept the checkpoint directory or its ``model.safetensors``."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p / MODEL_FILE, p / CONFIG_FILE
    return p, p.with_name(CONFIG_FILE)


def save_checkpoint(model: BSRNN, path: str | Path) -> Path:
    """Write ``path/model.safetensors`` and ``path/config.json``; returns the directory.

    Both files are written under temporary names and renamed, so a reader never sees half
    a checkpoint (training overwrites ``last/`` while a stage may be reading it).
    """
    from safetensors.torch import save_file

    out = Path(path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp_model, tmp_cfg = out / f".{MODEL_FILE}.tmp", out / f".{CONFIG_FILE}.tmp"
    save_file(state, str(tmp_model), metadata={"format": FORMAT_TAG, "version": str(FORMAT_VERSION)})
    tmp_cfg.write_text(model.config.to_json())
    tmp_model.replace(out / MODEL_FILE)
    tmp_cfg.replace(out / CONFIG_FILE)
    return out


def read_config(path: str | Path) -> BSRNNConfig:
    """Read and validate a checkpoint's ``config.json`` (cheap: no weights are read)."""
    _, cfg_path = _checkpoint_paths(path)
    if not cfg_path.is_file():
        raise CheckpointError(f"BSRNN checkpoint config missing: {cfg_path} (a checkpoint is {MODEL_FILE} + {CONFIG_FILE})")
    try:
        data = json.loads(cfg_path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("format", FORMAT_TAG) != FORMAT_TAG:
            raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT_TAG!r}")
        return BSRNNConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"invalid BSRNN config {cfg_path}: {exc}") from None


def _expected_shapes(config: BSRNNConfig) -> dict[str, tuple[int, ...]]:
    # The meta device builds the module graph without allocating weights.
    with torch.device("meta"):
        model = BSRNN(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _summarise(names: list[str], limit: int = 3) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def validate_checkpoint(path: str | Path) -> BSRNNConfig:
    """Check a checkpoint's tensor names and shapes against its config without loading it.

    Reads only the safetensors header, so it is cheap enough for a stage's ``check()``.

    Raises:
        CheckpointError: one line naming the first problems found.
    """
    from safetensors import safe_open

    model_path, _ = _checkpoint_paths(path)
    config = read_config(path)
    if not model_path.is_file():
        raise CheckpointError(f"BSRNN weights missing: {model_path}")
    try:
        with safe_open(str(model_path), framework="pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"corrupt BSRNN weights {model_path}: {first}") from None
    want = _expected_shapes(config)
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    problems = []
    if missing:
        problems.append(f"missing tensors: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_summarise(unexpected)}")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: checkpoint {list(got[k])} vs config {list(want[k])}")
    if problems:
        raise CheckpointError(f"BSRNN checkpoint {model_path} does not match its config: " + "; ".join(problems))
    return config


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> BSRNN:
    """Load a checkpoint written by :func:`save_checkpoint` (validated, safetensors only)."""
    from safetensors.torch import load_file

    config = validate_checkpoint(path)
    model_path, _ = _checkpoint_paths(path)
    try:
        state = load_file(str(model_path), device="cpu")
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"corrupt BSRNN weights {model_path}: {first}") from None
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"BSRNN weights {model_path} contain NaN/inf in {_summarise(sorted(bad))}")
    model = BSRNN(config)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def checkpoint_digest(path: str | Path) -> str:
    """Short sha256 of the weights file, recorded in provenance so a retrained model shows."""
    model_path, _ = _checkpoint_paths(path)
    h = hashlib.sha256()
    with open(model_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]

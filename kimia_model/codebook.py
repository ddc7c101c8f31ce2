"""Fit a semantic-token codebook on pooled Whisper features (``kimia-curate tokenizer fit``).

GLM-4-Voice's released codebook cannot be downloaded here, so an offline tokenizer needs a
codebook of its own: the 12.5 Hz vectors of any Whisper encoder (the same pooled vectors the
tokenizer quantises, read at the same layer) are clustered with k-means and the centres become
the codebook. The file it writes is exactly what :class:`kimia_model.whisper_vq.codebook_file.CodebookFile`
loads, so tokens at run time come from the same layer, pooling and distance as the fit.

The k-means is mini-batch (Sculley, 2010: per-centre learning rate ``1 / count``) after a
k-means++ seeding, because a few hours of audio already give millions of vectors. When Ray is
initialised and the sample is large, the per-iteration assignment statistics are computed by
Ray tasks over shards held in the object store; the driver only adds up ``K x D`` sums. The
update is the same either way, so a fit is reproducible for a given seed and shard count.

Example:
    >>> rng = np.random.default_rng(0)
    >>> blobs = [rng.normal(c, 0.05, size=(200, 2)) for c in ((0, 0), (5, 5), (0, 5))]
    >>> res = fit_kmeans(iter(blobs), 3, iterations=30, seed=0)
    >>> res.usage, round(res.perplexity, 2)
    (1.0, 3.0)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")


@dataclass
class KMeansResult:
    """Fitted centres and how the fitting sample uses them."""

    centers: np.ndarray  # [K, D] float32
    counts: np.ndarray  # [K] assignments over the sample
    n_samples: int
    inertia: float  # mean squared distance to the nearest centre
    distributed: bool

    @property
    def usage(self) -> float:
        """Fraction of codes that at least one sample vector maps to."""
        return float((self.counts > 0).mean())

    @property
    def perplexity(self) -> float:
        """``exp(entropy)`` of the code distribution: the number of equally used codes it equals."""
        p = self.counts[self.counts > 0] / max(self.counts.sum(), 1)
        return float(math.exp(-(p * np.log(p)).sum())) if p.size else 0.0


# -- sampling ---------------------------------------------------------------------------------


def reservoir(features: Iterable[np.ndarray], max_samples: int, seed: int) -> np.ndarray:
    """A uniform random sample of at most ``max_samples`` rows from a stream of ``[n, D]`` arrays.

    Priority sampling: every row gets a random key and the smallest keys are kept, so the sample
    is uniform whatever the order and sizes of the arrays, and memory stays ``O(max_samples)``.
    """
    rng = np.random.default_rng(seed)
    keep: np.ndarray | None = None
    keys = np.zeros(0)
    dim = None
    for arr in features:
        a = np.asarray(arr, dtype=np.float32)
        if a.ndim != 2 or a.shape[0] == 0:
            continue
        if dim is None:
            dim = a.shape[1]
        elif a.shape[1] != dim:
            raise ValueError(f"feature width changed from {dim} to {a.shape[1]}")
        k = rng.random(a.shape[0])
        keep = a if keep is None else np.concatenate([keep, a])
        keys = np.concatenate([keys, k])
        if keep.shape[0] > 2 * max_samples:
            idx = np.argpartition(keys, max_samples)[:max_samples]
            keep, keys = keep[idx], keys[idx]
    if keep is None:
        return np.zeros((0, 0), np.float32)
    if keep.shape[0] > max_samples:
        idx = np.sort(np.argpartition(keys, max_samples)[:max_samples])
        keep = keep[idx]
    return np.ascontiguousarray(keep)


# -- statistics (run locally or as Ray tasks) ---------------------------------------------------


def _nearest(x: np.ndarray, centers: np.ndarray, c_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre and squared distance, with the same expansion the tokenizer uses."""
    import torch

    xt = torch.from_numpy(x)
    ct = torch.from_numpy(centers)
    d = torch.addmm(torch.from_numpy(c_sq)[None, :] + (xt * xt).sum(1, keepdim=True), xt, ct.t(), alpha=-2.0)
    dist, idx = d.min(dim=1)
    return idx.numpy(), np.maximum(dist.numpy(), 0.0)


def _shard_stats(
    shard: np.ndarray, centers: np.ndarray, n_rows: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-centre sums and counts over ``n_rows`` random rows of a shard (all rows if None)."""
    if n_rows is not None and n_rows < shard.shape[0]:
        rows = np.random.default_rng(seed).choice(shard.shape[0], n_rows, replace=False)
        x = shard[rows]
    else:
        x = shard
    c_sq = (centers * centers).sum(1)
    sums = np.zeros_like(centers, dtype=np.float64)
    counts = np.zeros(centers.shape[0], np.int64)
    inertia = 0.0
    for s in range(0, x.shape[0], 8192):  # bounded [chunk, K] distance matrices
        xc = x[s : s + 8192]
        idx, dist = _nearest(xc, centers, c_sq)
        np.add.at(sums, idx, xc)
        counts += np.bincount(idx, minlength=centers.shape[0])
        inertia += float(dist.sum())
    return sums, counts, inertia


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: spread initial centres so few start in the same cluster."""
    centers = np.empty((k, x.shape[1]), np.float32)
    centers[0] = x[rng.integers(x.shape[0])]
    x_sq = (x * x).sum(1)
    d2 = np.maximum(x_sq - 2 * x @ centers[0] + centers[0] @ centers[0], 0)
    for i in range(1, k):
        total = d2.sum()
        j = rng.choice(x.shape[0], p=d2 / total) if total > 0 else rng.integers(x.shape[0])
        centers[i] = x[j]
        d2 = np.minimum(d2, np.maximum(x_sq - 2 * x @ centers[i] + centers[i] @ centers[i], 0))
    return centers


# -- the fit ----------------------------------------------------------------------------------


def fit_kmeans(
    features: Iterable[np.ndarray],
    size: int,
    *,
    batch_size: int = 4096,
    iterations: int = 100,
    max_samples: int = 500_000,
    seed: int = 0,
    use_ray: bool | None = None,
    ray_min_samples: int = 200_000,
    num_shards: int = 8,
    init_samples: int = 20_000,
) -> KMeansResult:
    """Mini-batch k-means over a stream of ``[n, D]`` feature arrays.

    Args:
        features: iterator of arrays (e.g. one per file); sampled uniformly up to ``max_samples``.
        size: number of codes ``K``.
        batch_size: vectors per mini-batch update (split over shards when distributed).
        iterations: mini-batch updates.
        max_samples: cap on the vectors kept for fitting.
        seed: makes seeding, batches and the sample reproducible.
        use_ray: True = Ray tasks (Ray must be initialised), False = local, None = Ray only if
            it is initialised and the sample has at least ``ray_min_samples`` vectors.
        num_shards: shards of the sample when distributed.
        init_samples: vectors the k-means++ seeding looks at.

    Raises:
        ValueError: fewer vectors than codes.
    """
    if size < 1:
        raise ValueError("codebook size must be >= 1")
    data = reservoir(features, max_samples, seed)
    n = data.shape[0]
    if n < size:
        raise ValueError(f"only {n} feature vectors for a codebook of {size}: give more audio or a smaller size")
    rng = np.random.default_rng(seed)
    init = data[rng.choice(n, min(n, max(init_samples, size)), replace=False)]
    centers = _kmeans_pp(init, size, rng)

    distributed = False
    if use_ray is None or use_ray:
        try:
            import ray

            ready = ray.is_initialized()
        except ImportError:  # pragma: no cover - ray is a dependency
            ready = False
        if use_ray and not ready:
            raise RuntimeError("use_ray=True but Ray is not initialised (call ray.init() first)")
        distributed = ready and (use_ray or n >= ray_min_samples)

    shards = np.array_split(data, min(num_shards, n)) if distributed else [data]
    if distributed:
        import ray

        refs = [ray.put(s) for s in shards]
        remote = ray.remote(_shard_stats)

        def stats(c: np.ndarray, rows: int | None, it: int) -> list[tuple[np.ndarray, np.ndarray, float]]:
            return ray.get([remote.remote(r, c, rows, seed * 100_003 + it * 101 + j) for j, r in enumerate(refs)])

    else:

        def stats(c: np.ndarray, rows: int | None, it: int) -> list[tuple[np.ndarray, np.ndarray, float]]:
            return [_shard_stats(s, c, rows, seed * 100_003 + it * 101 + j) for j, s in enumerate(shards)]

    per_shard = max(1, batch_size // len(shards))
    seen = np.zeros(size, np.float64)
    recent = np.zeros(size, np.int64)
    for it in range(iterations):
        parts = stats(centers, per_shard, it)
        sums = sum(p[0] for p in parts)
        counts = sum(p[1] for p in parts)
        hit = counts > 0
        seen[hit] += counts[hit]
        recent += counts
        # Sculley's update with per-centre rate 1/seen: a centre moves to the running mean of
        # every vector ever assigned to it, so it settles as its count grows.
        step = (sums[hit] - counts[hit, None] * centers[hit]) / seen[hit, None]
        centers[hit] = (centers[hit] + step).astype(np.float32)
        if (it + 1) % 10 == 0 and it + 1 < iterations:
            dead = np.flatnonzero(recent == 0)
            if dead.size:
                # Dead codes waste vocabulary: restart them on random sample vectors (as GLM's
                # EMA quantiser restarts codes whose count decays below a threshold).
                centers[dead] = data[rng.choice(n, dead.size, replace=False)]
                seen[dead] = 0
            recent[:] = 0
    final = stats(centers, None, iterations)
    counts = sum(p[1] for p in final)
    inertia = sum(p[2] for p in final) / n
    return KMeansResult(centers.astype(np.float32), counts, n, float(inertia), distributed)


# -- tokenizer fit from audio files -------------------------------------------------------------


def iter_audio_files(inputs: Iterable[Path]) -> Iterator[Path]:
    """Audio files named directly or found recursively in folders, in sorted order."""
    for p in inputs:
        p = Path(p).expanduser()
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
        elif p.is_file():
            yield p
        else:
            raise FileNotFoundError(f"no such audio file or folder: {p}")


def fit_codebook(
    inputs: list[Path],
    out: Path,
    model_ref: str,
    size: int,
    *,
    pool_layer: int | None = None,
    max_hours: float = 10.0,
    batch_size: int = 4096,
    iterations: int = 100,
    max_samples: int = 500_000,
    seed: int = 0,
    use_ray: bool | None = None,
    cache_dir: Path | None = None,
    max_batch_windows: int = 4,
    padding: str = "multiple",
) -> dict[str, Any]:
    """Learn a codebook from pooled features of a Whisper checkpoint over a sample of audio.

    Args:
        inputs: audio files or folders (searched recursively).
        out: the codebook file to write (``.safetensors``); the tokenizer loads it as is.
        model_ref: Whisper checkpoint reference (``pkg:whisper-base``, a CTranslate2 / HF
            directory or an openai-whisper ``.pt``); recorded in the file.
        size: number of codes.
        pool_layer: layer whose output is pooled (default: the last, after the final LayerNorm).
        max_hours: stop reading audio after this much.
        batch_size, iterations, max_samples, seed, use_ray: see :func:`fit_kmeans`.
        cache_dir: model cache for ``pkg:`` and bare names.
        max_batch_windows: 30 s windows per encoder call.
        padding: how each (at most 30 s) window is padded before the encoder, recorded in the
            file so the tokenizer pads the same way: ``multiple`` (to the next 1280 samples,
            padded frames masked; a 5 s segment costs a 5 s encoder pass) or ``full`` (zeros
            to 30 s, Whisper's training input; every segment costs a 30 s pass).

    Returns:
        A report: path, size, dim, pool layer, files, hours, vectors, usage, perplexity,
        inertia, distributed, seconds.
    """
    import soundfile as sf

    from kimia_model.refs import resolve
    from kimia_model.whisper_vq.codebook_file import PADDINGS, CodebookFile
    from kimia_model.whisper_vq.loaders import load_encoder
    from kimia_model.whisper_vq.timing import SAMPLE_RATE
    from kimia_model.whisper_vq.tokenizer import WhisperVQTokenizer
    from kimia_model.audio import downmix, resample

    t0 = time.perf_counter()
    path = resolve(
        model_ref,
        "tokenizer.fit --model",
        how="Pass a Whisper checkpoint: pkg:whisper-base, a CTranslate2/HF directory or an openai-whisper .pt.",
        cache_dir=cache_dir,
        cache_subdir="whisper",
        suffixes=(".pt",),
    )
    enc = load_encoder(path)
    layer = enc.num_layers if pool_layer is None else pool_layer
    enc.set_pool_layer(layer)
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, not {padding!r}")
    tok = WhisperVQTokenizer(enc, padding=padding, max_batch_windows=max_batch_windows, model_id=model_ref)
    files = list(iter_audio_files(inputs))
    if not files:
        raise ValueError(f"no audio files in {', '.join(map(str, inputs))}")
    budget = int(max_hours * 3600 * SAMPLE_RATE)
    stats = {"files": 0, "samples": 0}

    def feats() -> Iterator[np.ndarray]:
        for f in files:
            if stats["samples"] >= budget:
                return
            audio, sr = sf.read(str(f), dtype="float32", always_2d=True)
            audio = resample(downmix(audio), int(sr), SAMPLE_RATE)[: budget - stats["samples"]]
            stats["files"] += 1
            stats["samples"] += len(audio)
            yield tok([audio], tokens=False, pooled=True)[0].pooled

    res = fit_kmeans(
        feats(),
        size,
        batch_size=batch_size,
        iterations=iterations,
        max_samples=max_samples,
        seed=seed,
        use_ray=use_ray,
    )
    report: dict[str, Any] = {
        "path": str(out),
        "model": model_ref,
        "size": size,
        "dim": int(res.centers.shape[1]),
        "pool_layer": layer,
        "padding": padding,
        "files": stats["files"],
        "hours": stats["samples"] / SAMPLE_RATE / 3600,
        "vectors": res.n_samples,
        "usage": res.usage,
        "perplexity": res.perplexity,
        "inertia": res.inertia,
        "distributed": res.distributed,
    }
    meta = {k: str(v) for k, v in report.items() if k not in ("path",)}
    meta["whisper_model"] = model_ref
    CodebookFile(res.centers, layer, "avg", meta, padding).save(Path(out))
    report["seconds"] = time.perf_counter() - t0
    return report

"""Kimi-Audio's diarization post-processing as pure functions over turns and embeddings.

The Kimi-Audio technical report (data pipeline, diarization) cleans raw diarization in
three steps, and we add a fourth for overlapped speech:

1. **Speaker-cluster merging** (:func:`merge_clusters`): one centroid embedding per speaker;
   while some pair of centroids has cosine similarity ``> merge_threshold`` (0.6), merge the
   most similar pair and recompute. Repeating until none is left resolves chains (A~B, then
   AB~C) that a single pass would miss.
2. **Chunk re-assignment** (:func:`split_into_chunks`, :func:`reassign_chunks`): cut every
   turn into 1.5 s chunks; where two adjacent chunks of a turn have cosine similarity
   ``< reassign_threshold`` (0.5) the turn likely hides a speaker change, so each of those
   two chunks goes to the speaker whose centroid it is most similar to.
3. **Segment merging** (:func:`merge_segments`, :func:`split_long_turns`): join consecutive
   turns of one speaker while the joined turn stays within 27 s and the silence between them
   is at most 2 s; a single-speaker stretch longer than 27 s is cut at its longest pauses.
4. **Overlap** (:func:`overlap_seconds`, :func:`remove_overlaps`): overlapped speech is
   measured and flagged per turn, and can optionally be cut out.

Every threshold here is a **cosine similarity** (1 = same direction), never pyannote's
Euclidean/PLDA distances. The report's numbers belong to its (unstated, pyannote-style)
embedding model; embedders whose cosines live on another scale pass a calibrated ``similarity``
function (see :class:`stages.diarize.embedders.Calibration`), so 0.6 / 0.5 keep their meaning.

All functions are deterministic, never mutate their inputs, and accept empty input.

Example:
    >>> turns = [Turn(0.0, 3.0, 0), Turn(3.5, 6.0, 0), Turn(9.0, 10.0, 1)]
    >>> merge_segments(turns, max_len_s=27.0, max_gap_s=2.0)
    [Turn(start=0.0, end=6.0, speaker=0), Turn(start=9.0, end=10.0, speaker=1)]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

#: ``similarity(a, b)`` -> cosine-like score of two L2-normalised embeddings (a calibrated one
#: may be supplied by the embedder).
Similarity = Callable[[np.ndarray, np.ndarray], float]

_EPS = 1e-9


@dataclass(frozen=True, order=True)
class Turn:
    """One speaker's stretch of speech, in seconds from the start of the recording.

    Attributes:
        start: start time (s).
        end: end time (s), ``> start``.
        speaker: integer speaker label, stable within the recording.
    """

    start: float
    end: float
    speaker: int

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Chunk:
    """A piece of a turn, the unit of chunk re-assignment.

    Attributes:
        start, end: seconds.
        speaker: current label.
        turn: index of the turn it was cut from (adjacency is only checked within a turn).
    """

    start: float
    end: float
    speaker: int
    turn: int


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (0 when either is all zeros)."""
    na = float(np.linalg.norm(a))
    nb = float(np.linalg.norm(b))
    if na < _EPS or nb < _EPS:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation; all-zero rows stay zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, _EPS)


def cluster_centroids(embeddings: np.ndarray, labels: Sequence[int]) -> dict[int, np.ndarray]:
    """Centroid (mean of the L2-normalised members, re-normalised) per label.

    The mean of unit vectors, not of raw ones, so that a loud chunk with a large raw norm does
    not dominate its speaker's centroid.
    """
    labels_arr = np.asarray(labels)
    if len(labels_arr) == 0:
        return {}
    emb = l2_normalize(embeddings)
    return {int(k): l2_normalize(emb[labels_arr == k].mean(axis=0)) for k in np.unique(labels_arr)}


# -- 1. speaker-cluster merging -------------------------------------------------------------


def merge_clusters(
    embeddings: np.ndarray,
    labels: Sequence[int],
    threshold: float = 0.6,
    similarity: Similarity = cosine,
) -> tuple[list[int], list[tuple[int, int, float]]]:
    """Merge speaker clusters whose centroids are more similar than ``threshold``.

    Repeatedly takes the most similar pair of centroids; if their similarity is strictly
    greater than ``threshold`` the pair is merged (the smaller label survives) and the
    centroid is recomputed from all members of both. Stops when no pair exceeds the threshold,
    so chains of merges (A~B, then AB~C) resolve in order of similarity.

    Args:
        embeddings: ``[N, D]`` one embedding per item (chunk or window).
        labels: ``N`` speaker labels of the items.
        threshold: cosine similarity above which two clusters are one speaker.
        similarity: the (possibly calibrated) similarity of two centroids.

    Returns:
        ``(new_labels, merges)``: the relabelled items and the merges made, as
        ``(kept_label, absorbed_label, similarity)`` in the order they happened.

    >>> e = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> merge_clusters(e, [0, 1, 2], threshold=0.6)[0]
    [0, 0, 2]
    """
    out = [int(x) for x in labels]
    if len(out) == 0:
        return [], []
    emb = l2_normalize(embeddings)
    if emb.shape[0] != len(out):
        raise ValueError(f"{emb.shape[0]} embeddings for {len(out)} labels")
    merges: list[tuple[int, int, float]] = []
    while True:
        cents = cluster_centroids(emb, out)
        keys = sorted(cents)
        best: tuple[float, int, int] | None = None
        for i, a in enumerate(keys):
            for b in keys[i + 1 :]:
                s = similarity(cents[a], cents[b])
                if best is None or s > best[0]:
                    best = (s, a, b)
        if best is None or not best[0] > threshold:
            return out, merges
        s, keep, absorb = best
        out = [keep if x == absorb else x for x in out]
        merges.append((keep, absorb, float(s)))


# -- 2. chunk re-assignment -----------------------------------------------------------------


def split_into_chunks(turns: Sequence[Turn], chunk_s: float = 1.5) -> list[Chunk]:
    """Cut each turn into ``chunk_s`` chunks, in time order of the turns.

    A turn shorter than a chunk stays one (short) chunk. A trailing remainder shorter than
    half a chunk joins the previous chunk instead of becoming a sliver whose embedding would
    be noise; a longer remainder is a chunk of its own.

    >>> [(c.start, c.end) for c in split_into_chunks([Turn(0.0, 3.5, 0)], 1.5)]
    [(0.0, 1.5), (1.5, 3.5)]
    """
    if chunk_s <= 0:
        raise ValueError("chunk_s must be > 0")
    chunks: list[Chunk] = []
    for ti, t in enumerate(turns):
        bounds = [t.start]
        pos = t.start
        while t.end - pos >= chunk_s - _EPS:
            pos += chunk_s
            bounds.append(min(pos, t.end))
        if t.end - bounds[-1] > _EPS:
            if len(bounds) > 1 and t.end - bounds[-1] < chunk_s / 2:
                bounds[-1] = t.end
            else:
                bounds.append(t.end)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            if b - a > _EPS:
                chunks.append(Chunk(a, b, t.speaker, ti))
    return chunks


def reassign_chunks(
    chunks: Sequence[Chunk],
    embeddings: np.ndarray,
    threshold: float = 0.5,
    similarity: Similarity = cosine,
) -> list[Chunk]:
    """Re-assign chunks around within-turn dissimilarities to their most similar speaker.

    For every pair of adjacent chunks of the same turn whose similarity is strictly below
    ``threshold``, both chunks are flagged. Flagged chunks then take the label of the speaker
    centroid (computed once, from the labels before any change) most similar to them; ties go
    to the chunk's current speaker, then to the smaller label. Deciding all flags before
    changing any label keeps the result independent of scan order.

    Args:
        chunks: from :func:`split_into_chunks`, in time order.
        embeddings: ``[len(chunks), D]`` chunk embeddings.
        threshold: cosine similarity below which two adjacent chunks are different speakers.
        similarity: the (possibly calibrated) similarity function.

    Returns:
        New chunks with updated speakers (same order, same boundaries).
    """
    if len(chunks) == 0:
        return []
    emb = l2_normalize(embeddings)
    if emb.shape[0] != len(chunks):
        raise ValueError(f"{emb.shape[0]} embeddings for {len(chunks)} chunks")
    cents = cluster_centroids(emb, [c.speaker for c in chunks])
    flagged: set[int] = set()
    for i in range(len(chunks) - 1):
        if chunks[i].turn == chunks[i + 1].turn and similarity(emb[i], emb[i + 1]) < threshold:
            flagged.update((i, i + 1))
    out = list(chunks)
    for i in sorted(flagged):
        c = chunks[i]
        scores = {k: similarity(emb[i], v) for k, v in cents.items()}
        best = max(scores, key=lambda k: (scores[k], k == c.speaker, -k))
        out[i] = replace(c, speaker=best)
    return out


def chunks_to_turns(chunks: Sequence[Chunk]) -> list[Turn]:
    """Join consecutive chunks of the same turn and speaker back into turns."""
    turns: list[Turn] = []
    prev: Chunk | None = None
    for c in chunks:
        if prev is not None and prev.turn == c.turn and prev.speaker == c.speaker and turns:
            turns[-1] = replace(turns[-1], end=c.end)
        else:
            turns.append(Turn(c.start, c.end, c.speaker))
        prev = c
    return sorted(turns)


# -- 3. segment merging and splitting -------------------------------------------------------


def merge_segments(turns: Sequence[Turn], max_len_s: float = 27.0, max_gap_s: float = 2.0) -> list[Turn]:
    """Merge consecutive same-speaker turns while the result stays within ``max_len_s``.

    Turns are taken in time order; a turn joins the previous output turn when both have the
    same speaker, the silence between them is ``<= max_gap_s`` and the joined span (gap
    included, since the audio slice includes it) is ``<= max_len_s``. A turn of another
    speaker in between (including an overlapping one) blocks the merge. Turns already longer
    than ``max_len_s`` are left to :func:`split_long_turns`.
    """
    out: list[Turn] = []
    for t in sorted(turns):
        if out:
            last = out[-1]
            gap = t.start - last.end
            if (
                last.speaker == t.speaker
                and gap <= max_gap_s + _EPS
                and max(t.end, last.end) - last.start <= max_len_s + _EPS
            ):
                out[-1] = Turn(last.start, max(t.end, last.end), last.speaker)
                continue
        out.append(t)
    return out


def split_long_turns(
    turns: Sequence[Turn],
    pauses: Sequence[tuple[float, float]] = (),
    max_len_s: float = 27.0,
    min_piece_s: float = 1.0,
) -> list[Turn]:
    """Split turns longer than ``max_len_s`` at their longest pauses.

    A pause is a silence ``(start, end)`` strictly inside the turn (e.g. the gaps between VAD
    regions). For a turn that is too long, the longest pause that leaves both pieces within
    ``max_len_s`` is preferred (one cut then suffices); otherwise the longest pause leaving
    both pieces at least ``min_piece_s`` long; the pause itself is dropped and each piece is
    split again if still too long. With no usable pause the turn is cut hard every
    ``max_len_s`` seconds, so no output exceeds the limit.
    """
    out: list[Turn] = []
    ordered = sorted(pauses)
    stack = list(reversed(sorted(turns)))
    while stack:
        t = stack.pop()
        if t.duration <= max_len_s + _EPS:
            out.append(t)
            continue
        inside = [
            (a, b)
            for a, b in ordered
            if a - t.start >= min_piece_s - _EPS and t.end - b >= min_piece_s - _EPS and b > a
        ]
        fits = [(a, b) for a, b in inside if a - t.start <= max_len_s and t.end - b <= max_len_s]
        pool = fits or inside
        if pool:
            # Longest pause; among equals the one nearest the middle gives balanced pieces.
            mid = (t.start + t.end) / 2
            a, b = max(pool, key=lambda p: (p[1] - p[0], -abs((p[0] + p[1]) / 2 - mid)))
            stack.extend([Turn(b, t.end, t.speaker), Turn(t.start, a, t.speaker)])
        else:
            cut = t.start + max_len_s
            stack.extend([Turn(cut, t.end, t.speaker), Turn(t.start, cut, t.speaker)])
    return sorted(out)


# -- 4. overlap -----------------------------------------------------------------------------


def _union(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _others(turns: Sequence[Turn], i: int) -> list[tuple[float, float]]:
    t = turns[i]
    return _union(
        [(max(o.start, t.start), min(o.end, t.end)) for j, o in enumerate(turns)
         if j != i and o.speaker != t.speaker and o.start < t.end and o.end > t.start]
    )


def overlap_seconds(turns: Sequence[Turn]) -> list[float]:
    """Seconds of each turn during which another speaker also talks."""
    return [sum(b - a for a, b in _others(turns, i)) for i in range(len(turns))]


def remove_overlaps(turns: Sequence[Turn], min_piece_s: float = 0.0) -> list[Turn]:
    """Cut every span where two or more speakers talk out of all turns.

    Pieces shorter than ``min_piece_s`` that remain are dropped.
    """
    out: list[Turn] = []
    for i, t in enumerate(turns):
        pos = t.start
        for a, b in _others(turns, i):
            if a - pos > max(min_piece_s, _EPS):
                out.append(Turn(pos, a, t.speaker))
            pos = max(pos, b)
        if t.end - pos > max(min_piece_s, _EPS):
            out.append(Turn(pos, t.end, t.speaker))
    return sorted(out)


def relabel_by_first_appearance(turns: Sequence[Turn]) -> list[Turn]:
    """Renumber speakers 0, 1, ... in order of their first turn, so labels read naturally."""
    mapping: dict[int, int] = {}
    out = []
    for t in sorted(turns):
        mapping.setdefault(t.speaker, len(mapping))
        out.append(replace(t, speaker=mapping[t.speaker]))
    return out


# -- the whole chain ------------------------------------------------------------------------


@dataclass(frozen=True)
class PostprocessParams:
    """Switches and numbers of the post-processing chain (mirrors :class:`DiarizeConfig`)."""

    merge_clusters: bool = True
    merge_threshold: float = 0.6
    reassign_chunks: bool = True
    chunk_s: float = 1.5
    reassign_threshold: float = 0.5
    merge_segments: bool = True
    max_segment_s: float = 27.0
    max_gap_s: float = 2.0
    split_long: bool = True
    min_piece_s: float = 1.0


@dataclass
class PostprocessReport:
    """What the chain changed, for logs and benchmarks."""

    cluster_merges: list[tuple[int, int, float]]
    chunks: int = 0
    chunks_reassigned: int = 0
    #: Turns after merging and re-assignment but before segment merging: who speaks when,
    #: without the silences that segment merging bridges (what DER should score).
    speech_turns: list[Turn] = field(default_factory=list)
    #: The chunks after merging and re-assignment, with their embeddings (rows aligned): what
    #: the single-speaker check of each final segment reads, so nothing is embedded twice.
    final_chunks: list[Chunk] = field(default_factory=list)
    chunk_embeddings: np.ndarray | None = None


def postprocess(
    turns: Sequence[Turn],
    embed_chunks: Callable[[list[Chunk]], np.ndarray],
    params: PostprocessParams,
    similarity: Similarity = cosine,
    pauses: Sequence[tuple[float, float]] = (),
) -> tuple[list[Turn], PostprocessReport]:
    """Run merging, re-assignment, segment merging and long-turn splitting in that order.

    Args:
        turns: raw diarization turns.
        embed_chunks: returns ``[len(chunks), D]`` embeddings of the given chunks (the only
            access to audio; called once, so the caller can stream it in batches).
        params: the switches and numbers.
        similarity: calibrated cosine for the embedder in use.
        pauses: silences usable as split points for long turns.

    Returns:
        The processed turns (labels not yet renumbered) and a report of what changed.
    """
    report = PostprocessReport(cluster_merges=[])
    cur = sorted(t for t in turns if t.end > t.start)
    if not cur:
        return [], report
    if params.merge_clusters or params.reassign_chunks:
        chunks = split_into_chunks(cur, params.chunk_s)
        emb = np.asarray(embed_chunks(chunks))
        report.chunks = len(chunks)
        labels = [c.speaker for c in chunks]
        if params.merge_clusters:
            labels, report.cluster_merges = merge_clusters(emb, labels, params.merge_threshold, similarity)
            chunks = [replace(c, speaker=k) for c, k in zip(chunks, labels, strict=True)]
        if params.reassign_chunks:
            new = reassign_chunks(chunks, emb, params.reassign_threshold, similarity)
            report.chunks_reassigned = sum(a.speaker != b.speaker for a, b in zip(chunks, new, strict=True))
            chunks = new
        report.final_chunks, report.chunk_embeddings = list(chunks), emb
        cur = chunks_to_turns(chunks)
    report.speech_turns = list(cur)
    if params.merge_segments:
        cur = merge_segments(cur, params.max_segment_s, params.max_gap_s)
    if params.split_long:
        cur = split_long_turns(cur, pauses, params.max_segment_s, params.min_piece_s)
    return cur, report

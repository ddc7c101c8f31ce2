"""Clean cuts: every segment edge in a pause, and a check that a segment holds one voice.

Diarization turns come from 1.5 s windows and chunk re-assignment, so their edges sit on a
0.75 s grid, not where speech starts and stops: a turn may begin half a word in or end on
the next speaker's first syllable. A training sample cut there teaches the model words that
are not in its transcript. :func:`snap_turns_to_pauses` moves each edge into the nearest pause
(:func:`kimia_model.audio.quiet_runs`, levels relative to the recording so noisy audio has
pauses too) within ``reach_s``; an edge with no pause in reach goes to the quietest 30 ms
nearby, between words if not between sentences, and the segment is flagged.

:func:`speaker_purity` reads the chunk embeddings diarization already computed: per segment,
the lowest similarity of its chunks to their speaker's centroid, and whether some chunk is
closer to another speaker's centroid. A segment failing it carries ``single_speaker=False``,
and the filter drops it as ``mixed_speakers``.

    >>> sr = 100
    >>> x = np.concatenate([np.ones(100), np.zeros(50), np.ones(100)]).astype(np.float32)
    >>> turns = [Turn(0.0, 1.7, 0), Turn(1.7, 2.5, 1)]  # the change falls 0.2 s into speech
    >>> [(t.start, t.end, clean) for t, clean in snap_turns_to_pauses(turns, x, sr)]
    [(0.0, 1.47, True), (1.47, 2.5, True)]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from kimia_model.audio import frame_levels, quiet_runs
from stages.diarize.postprocess import Chunk, Turn

#: How far inside a pause an edge is put, so the cut sample itself is silence.
_INSET_S = 0.03


def _snap(t: float, runs: list[tuple[float, float]], reach: float, levels: np.ndarray, hop_s: float,
          direction: int) -> tuple[float, bool]:  # fmt: skip
    """One edge: kept if already in a pause, else moved into the nearest pause within ``reach``
    on the allowed side (``direction`` -1: earlier only, +1: later only, 0: either), else to
    the quietest frame there if it is clearly quieter (a gap between words), else kept."""
    for a, b in runs:
        if a <= t <= b:
            return t, True
    best: tuple[float, float] | None = None
    for a, b in runs:
        if b < t - reach or a > t + reach or (direction < 0 and a > t) or (direction > 0 and b < t):
            continue
        inside = min(max(t, a + _INSET_S), b - _INSET_S) if b - a > 2 * _INSET_S else (a + b) / 2
        dist = abs(inside - t)
        if best is None or dist < best[0]:
            best = (dist, inside)
    if best is not None:
        return round(best[1], 3), True
    here = min(max(int(t / hop_s), 0), len(levels) - 1)
    i0 = here if direction > 0 else max(0, int((t - reach) / hop_s))
    i1 = here + 1 if direction < 0 else min(len(levels), int((t + reach) / hop_s) + 1)
    if i1 <= i0 or len(levels) == 0:
        return t, False
    k = i0 + int(np.argmin(levels[i0:i1]))
    # Only a clearly quieter frame (6 dB) is a gap between words; else the edge stays put.
    if levels[k] > 0.5 * levels[here]:
        return t, False
    return round((k + 0.5) * hop_s, 3), False


def snap_turns_to_pauses(
    turns: Sequence[Turn], audio: np.ndarray, sr: int, reach_s: float = 0.5
) -> list[tuple[Turn, bool]]:
    """Each turn with its edges moved into pauses, and whether both edges found one.

    An edge already in a pause stays. Otherwise a start only moves earlier and an end only
    later (a turn grows into the silence around its words, never loses a word), except where
    two turns share the edge (a speaker change with no pause): that edge moves to the nearest
    pause on either side, the same point for both turns, so no speech is lost or given to
    both.

    Args:
        turns: sorted turns (seconds).
        audio: the recording at ``sr``.
        reach_s: how far an edge may move.
    """
    hop = max(1, int(0.01 * sr))
    levels = frame_levels(audio, sr, 0.01)
    runs = quiet_runs(audio, sr, min_s=0.06, levels=levels)
    duration = len(audio) / sr
    starts = {t.start for t in turns}
    ends = {t.end for t in turns}
    cache: dict[tuple[float, int], tuple[float, bool]] = {}
    out = []
    for t in turns:
        edges = []
        for edge, outward in ((t.start, -1), (t.end, 1)):
            if edge <= 0.0 or edge >= duration:  # the recording's own edges are not cuts
                edges.append((edge, True))
                continue
            direction = 0 if (edge in starts and edge in ends) else outward
            if (edge, direction) not in cache:
                cache[(edge, direction)] = _snap(edge, runs, reach_s, levels, hop / sr, direction)
            edges.append(cache[(edge, direction)])
        (start, c0), (end, c1) = edges
        if end - start < 0.5 * (t.end - t.start):  # a shared edge moved too far: keep the turn
            start, end, c0, c1 = t.start, t.end, False, False
        out.append((replace(t, start=min(max(start, 0.0), duration), end=min(max(end, 0.0), duration)), c0 and c1))
    return out


def speaker_purity(
    segments: Sequence[Turn],
    chunks: Sequence[Chunk],
    embeddings: np.ndarray,
    similarity: Callable[[np.ndarray, np.ndarray], float],
    threshold: float,
) -> list[tuple[float | None, bool]]:
    """Per segment: the lowest chunk-to-own-centroid similarity, and whether it is one voice.

    A segment is one voice unless one of its chunks is below ``threshold`` to its own
    speaker's centroid (the speaker's other chunks) *and* closer to another speaker's: a chunk merely unlike its speaker
    (a cough, a laugh) is no evidence of a second voice. Segments with no chunk inside get
    ``(None, True)``: nothing to judge them by.
    """
    if not chunks or len(embeddings) == 0:
        return [(None, True) for _ in segments]
    labels = np.array([c.speaker for c in chunks])
    sums = {int(k): embeddings[labels == k].sum(axis=0) for k in np.unique(labels)}
    counts = {int(k): int(np.sum(labels == k)) for k in np.unique(labels)}
    centroids = {k: v / counts[k] for k, v in sums.items()}
    out = []
    for seg in segments:
        inside = [i for i, c in enumerate(chunks) if c.start >= seg.start - 0.05 and c.end <= seg.end + 0.05]
        if not inside:
            out.append((None, True))
            continue
        worst, one_voice = 1.0, True
        for i in inside:
            k = int(labels[i])
            # Leave the chunk out of its own speaker's centroid: a stray chunk must not vouch for itself.
            mine = (sums[k] - embeddings[i]) / (counts[k] - 1) if counts[k] > 1 else centroids[k]
            own = similarity(embeddings[i], mine)
            worst = min(worst, own)
            others = [similarity(embeddings[i], c) for j, c in centroids.items() if j != k]
            if own < threshold and others and max(others) > own:
                one_voice = False
        out.append((float(worst), one_voice))
    return out

"""Kimi-Audio post-processing rules on hand-made embeddings (no models, no audio)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.diarize.postprocess import (
    Chunk,
    PostprocessParams,
    Turn,
    chunks_to_turns,
    cluster_centroids,
    cosine,
    merge_clusters,
    merge_segments,
    overlap_seconds,
    postprocess,
    reassign_chunks,
    relabel_by_first_appearance,
    remove_overlaps,
    split_into_chunks,
    split_long_turns,
)


def unit(deg: float) -> np.ndarray:
    """A 2-D unit vector at ``deg`` degrees: cosine between two is cos(angle difference)."""
    r = math.radians(deg)
    return np.array([math.cos(r), math.sin(r)])


# -- cluster merging --------------------------------------------------------------------------


def test_merge_clusters_empty_input():
    assert merge_clusters(np.zeros((0, 4)), []) == ([], [])


def test_merge_clusters_one_speaker_is_unchanged():
    emb = np.stack([unit(0), unit(5), unit(10)])
    labels, merges = merge_clusters(emb, [3, 3, 3], threshold=0.6)
    assert labels == [3, 3, 3] and merges == []


def test_merge_clusters_merges_similar_and_keeps_distinct():
    # clusters 0 and 1 are 10 degrees apart (cos 0.98), cluster 2 is orthogonal (cos 0).
    emb = np.stack([unit(0), unit(0), unit(10), unit(90)])
    labels, merges = merge_clusters(emb, [0, 0, 1, 2], threshold=0.6)
    assert labels == [0, 0, 0, 2]
    assert [(k, a) for k, a, _ in merges] == [(0, 1)]


def test_merge_clusters_chain_resolves_after_recomputing_centroids():
    # A at 0, B at 50, C at 100 degrees. cos(A,B)=cos(B,C)=0.643 > 0.6, cos(A,C)=-0.17.
    # After A+B merge (centroid at 25 deg), cos(AB, C)=cos(75)=0.26: only one merge.
    emb = np.stack([unit(0), unit(50), unit(100)])
    labels, merges = merge_clusters(emb, [0, 1, 2], threshold=0.6)
    assert len(merges) == 1 and len(set(labels)) == 2
    # With a lower threshold the chain continues: A~B, then AB~C (cos 75 deg = 0.259 > 0.2).
    labels, merges = merge_clusters(emb, [0, 1, 2], threshold=0.2)
    assert labels == [0, 0, 0] and len(merges) == 2
    # Merges happen in order of similarity, the most similar pair first.
    assert merges[0][2] >= merges[1][2]


def test_merge_clusters_exact_threshold_does_not_merge():
    emb = np.stack([unit(0), unit(53.0)])
    s = cosine(emb[0], emb[1])
    assert merge_clusters(emb, [0, 1], threshold=s)[0] == [0, 1]  # strictly greater needed
    assert merge_clusters(emb, [0, 1], threshold=math.nextafter(s, -1.0))[0] == [0, 0]


def test_merge_clusters_uses_the_given_similarity():
    emb = np.stack([unit(0), unit(80)])
    assert merge_clusters(emb, [0, 1], 0.6)[0] == [0, 1]
    assert merge_clusters(emb, [0, 1], 0.6, similarity=lambda a, b: 0.9)[0] == [0, 0]


def test_merge_clusters_length_mismatch_raises():
    with pytest.raises(ValueError):
        merge_clusters(np.zeros((2, 2)), [0])


def test_centroids_ignore_raw_norms():
    # A loud embedding (large norm) must not dominate the centroid.
    cents = cluster_centroids(np.array([[100.0, 0.0], [0.0, 1.0]]), [0, 0])
    assert np.allclose(cents[0], unit(45))


# -- chunking and re-assignment ----------------------------------------------------------------


def test_split_into_chunks_rules():
    chunks = split_into_chunks([Turn(0.0, 3.5, 0), Turn(4.0, 4.6, 1), Turn(5.0, 7.0, 0)], 1.5)
    spans = [(round(c.start, 6), round(c.end, 6), c.turn) for c in chunks]
    # 3.5 s -> 1.5 + 2.0 (a 0.5 s remainder, under half a chunk, joins the last chunk);
    # a 0.6 s turn, shorter than a chunk, is one chunk; 2.0 s -> one 2.0 s chunk (same rule).
    assert spans == [(0.0, 1.5, 0), (1.5, 3.5, 0), (4.0, 4.6, 1), (5.0, 7.0, 2)]
    long_rem = split_into_chunks([Turn(0.0, 4.0, 0)], 1.5)
    assert [(c.start, c.end) for c in long_rem] == [(0.0, 1.5), (1.5, 3.0), (3.0, 4.0)]
    assert split_into_chunks([], 1.5) == []
    with pytest.raises(ValueError):
        split_into_chunks([Turn(0, 1, 0)], 0.0)


def _chunks(labels: list[int], turn_of: list[int] | None = None) -> list[Chunk]:
    turn_of = turn_of or [0] * len(labels)
    return [Chunk(1.5 * i, 1.5 * (i + 1), k, t) for i, (k, t) in enumerate(zip(labels, turn_of, strict=True))]


def test_reassign_moves_dissimilar_tail_to_most_similar_speaker():
    # Speaker 0 lives near 0 deg, speaker 1 near 90 deg. Turn 0 was labelled 0 throughout,
    # but its last chunk is speaker 1's voice.
    chunks = _chunks([0, 0, 0, 1, 1], [0, 0, 0, 1, 1])
    emb = np.stack([unit(0), unit(2), unit(88), unit(90), unit(92)])
    out = reassign_chunks(chunks, emb, threshold=0.5)
    assert [c.speaker for c in out] == [0, 0, 1, 1, 1]
    turns = chunks_to_turns(out)
    assert [(t.start, t.end, t.speaker) for t in turns] == [(0.0, 3.0, 0), (3.0, 4.5, 1), (4.5, 7.5, 1)]


def test_reassign_both_flagged_chunks_can_keep_their_speaker():
    # A dip between chunks 1 and 2 but both are still closest to speaker 0's centroid.
    chunks = _chunks([0, 0, 0, 1])
    emb = np.stack([unit(0), unit(-30), unit(35), unit(90)])
    out = reassign_chunks(chunks, emb, threshold=0.5)
    assert [c.speaker for c in out] == [0, 0, 0, 1]


def test_reassign_exact_threshold_is_not_flagged():
    chunks = _chunks([0, 0, 1])
    emb = np.stack([unit(0), unit(66), unit(90)])
    s = cosine(emb[0], emb[1])
    # chunk 1 (66 deg) is nearer speaker 1's centroid (90 deg) than speaker 0's (33 deg, the
    # mean of 0 and 66): once flagged it moves; at exactly the threshold it is not flagged.
    assert [c.speaker for c in reassign_chunks(chunks, emb, threshold=s)] == [0, 0, 1]
    moved = reassign_chunks(chunks, emb, threshold=math.nextafter(s, 2.0))
    assert moved[1].speaker == 1


def test_reassign_one_speaker_and_single_chunk_turns_and_empty():
    one = _chunks([0, 0, 0])
    assert [c.speaker for c in reassign_chunks(one, np.stack([unit(0), unit(120), unit(240)]))] == [0, 0, 0]
    # Segments shorter than a chunk: each is a single chunk, no adjacent pair inside a turn.
    shorts = [Chunk(0.0, 0.4, 0, 0), Chunk(0.5, 0.9, 1, 1), Chunk(1.0, 1.3, 0, 2)]
    emb = np.stack([unit(0), unit(180), unit(10)])
    assert reassign_chunks(shorts, emb) == shorts
    assert reassign_chunks([], np.zeros((0, 2))) == []


def test_reassign_does_not_compare_across_turns():
    chunks = _chunks([0, 1], [0, 1])
    emb = np.stack([unit(0), unit(180)])  # cosine -1, but different turns
    assert reassign_chunks(chunks, emb) == chunks


# -- segment merging and splitting ---------------------------------------------------------------


def test_merge_segments_gap_and_length_limits():
    t = [Turn(0.0, 10.0, 0), Turn(12.0, 20.0, 0)]  # gap exactly 2.0 s: merges
    assert merge_segments(t, 27.0, 2.0) == [Turn(0.0, 20.0, 0)]
    assert merge_segments([Turn(0.0, 10.0, 0), Turn(12.01, 20.0, 0)], 27.0, 2.0) == [
        Turn(0.0, 10.0, 0), Turn(12.01, 20.0, 0)
    ]  # fmt: skip
    # merged length exactly 27 s merges; beyond it does not
    assert merge_segments([Turn(0.0, 13.0, 0), Turn(14.0, 27.0, 0)], 27.0, 2.0) == [Turn(0.0, 27.0, 0)]
    assert len(merge_segments([Turn(0.0, 13.0, 0), Turn(14.0, 27.5, 0)], 27.0, 2.0)) == 2


def test_merge_segments_chain_and_blockers():
    chain = [Turn(0, 5, 0), Turn(6, 11, 0), Turn(12, 17, 0), Turn(18, 23, 0), Turn(24, 29, 0)]
    # greedy left to right: 0-23 (23 s) then 24-29 cannot join (29 > 27)
    assert merge_segments(chain, 27.0, 2.0) == [Turn(0, 23, 0), Turn(24, 29, 0)]
    other = [Turn(0, 5, 0), Turn(5.5, 6, 1), Turn(6.5, 9, 0)]
    assert merge_segments(other, 27.0, 2.0) == other  # another speaker in between blocks it
    assert merge_segments([], 27.0, 2.0) == []


def test_split_long_turns_at_longest_pause():
    turn = Turn(0.0, 50.0, 0)
    pauses = [(10.0, 10.3), (24.0, 25.5), (40.0, 40.2)]
    out = split_long_turns([turn], pauses, 27.0)
    assert out == [Turn(0.0, 24.0, 0), Turn(25.5, 50.0, 0)]
    assert all(t.duration <= 27.0 for t in out)


def test_split_long_turns_recurses_and_hard_cuts_without_pauses():
    out = split_long_turns([Turn(0.0, 70.0, 1)], [(30.0, 31.0)], 27.0)
    assert all(t.duration <= 27.0 for t in out) and out[0].start == 0.0 and out[-1].end == 70.0
    hard = split_long_turns([Turn(0.0, 60.0, 0)], [], 27.0)
    assert hard == [Turn(0.0, 27.0, 0), Turn(27.0, 54.0, 0), Turn(54.0, 60.0, 0)]
    short = [Turn(0.0, 5.0, 0)]
    assert split_long_turns(short, [(1.0, 2.0)], 27.0) == short
    assert split_long_turns([], [], 27.0) == []


# -- overlap ------------------------------------------------------------------------------------


def test_overlap_flag_and_exclude():
    turns = [Turn(0.0, 5.0, 0), Turn(4.0, 8.0, 1), Turn(7.5, 9.0, 0)]
    assert overlap_seconds(turns) == pytest.approx([1.0, 1.5, 0.5])
    assert remove_overlaps(turns) == [Turn(0.0, 4.0, 0), Turn(5.0, 7.5, 1), Turn(8.0, 9.0, 0)]
    same = [Turn(0.0, 5.0, 0), Turn(4.0, 6.0, 0)]  # one speaker overlapping itself is not overlap
    assert overlap_seconds(same) == [0.0, 0.0]
    assert overlap_seconds([]) == [] and remove_overlaps([]) == []


def test_relabel_by_first_appearance():
    out = relabel_by_first_appearance([Turn(5, 6, 7), Turn(0, 1, 3), Turn(2, 3, 7)])
    assert [(t.start, t.speaker) for t in out] == [(0, 0), (2, 1), (5, 1)]


# -- the whole chain ----------------------------------------------------------------------------


def test_postprocess_chain_merges_split_speaker_and_fixes_tail():
    # The backend split speaker A into labels 0 and 2 and glued B's first words onto A's turn.
    turns = [Turn(0.0, 4.5, 0), Turn(5.0, 8.0, 1), Turn(8.5, 11.5, 2)]
    voice = {"A": unit(0), "B": unit(90)}
    truth = lambda t: "B" if 5.0 <= t < 8.0 or 3.0 <= t < 4.5 else "A"  # noqa: E731

    def embed(chunks: list[Chunk]) -> np.ndarray:
        return np.stack([voice[truth((c.start + c.end) / 2)] for c in chunks])

    out, report = postprocess(turns, embed, PostprocessParams(max_gap_s=2.0))
    assert report.cluster_merges and report.cluster_merges[0][:2] == (0, 2)
    assert report.chunks_reassigned == 1
    assert [(t.start, t.end, t.speaker) for t in report.speech_turns] == [
        (0.0, 3.0, 0), (3.0, 4.5, 1), (5.0, 8.0, 1), (8.5, 11.5, 0)
    ]  # fmt: skip
    # segment merging joins B's two pieces (gap 0.5 s)
    assert [(t.start, t.end, t.speaker) for t in out] == [(0.0, 3.0, 0), (3.0, 8.0, 1), (8.5, 11.5, 0)]


def test_postprocess_switches_and_empty():
    calls = []

    def embed(chunks):
        calls.append(len(chunks))
        return np.zeros((len(chunks), 2))

    off = PostprocessParams(merge_clusters=False, reassign_chunks=False, merge_segments=False, split_long=False)
    turns = [Turn(0, 1, 0), Turn(1.5, 2, 0)]
    assert postprocess(turns, embed, off)[0] == turns and calls == []
    assert postprocess([], embed, PostprocessParams())[0] == [] and calls == []

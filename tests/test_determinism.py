"""Same input, same labels: whatever the batch sizes, and for byte-identical copies in one run.

Two full local-profile runs over the same files, one with every batch as small as it goes
(one recording per model call, one per commit) and one with everything packed together,
must give every segment the same boundaries, speaker, language, text and verdict. Within a
run, two byte-identical copies of a conversation must come out the same, except that exactly
one copy of each segment that passes its checks is kept and the other is dropped as its
duplicate; which copy that is follows arrival order and may differ between runs. Equality
here is between two runs on one machine, never against a stored transcript.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from stages.filter import DUPLICATE_REASON
from stages.write.layout import OutLayout

ROOT = Path(__file__).resolve().parent.parent
COMPARED = ("start_s", "end_s", "speaker", "language", "text", "verdict", "drop_reasons", "labeller")


def _segments(out: Path) -> dict[tuple[str, int], dict]:
    """Per (file name, segment index): the compared index fields and the semantic tokens."""
    layout = OutLayout(out)
    tokens = {
        key: hashlib.sha256(members["tokens.npy"]).hexdigest()
        for shard in layout.committed_shards()
        for key, members in layout.iter_samples(shard)
        if "tokens.npy" in members
    }
    rows: dict[tuple[str, int], dict] = {}
    for root in (out, out / "dropped"):
        for p in sorted((root / "index").glob("*.parquet")):
            for r in pq.read_table(p).to_pylist():
                source = Path(r["source"].removeprefix("file://")).name
                row = {k: r.get(k) for k in COMPARED}
                row["tokens"] = tokens.get(r["key"])
                rows[(source, int(r["segment_index"]))] = row
    assert any(r["tokens"] for r in rows.values())  # the comparison covers the tokens
    return rows


def _without_duplicate(row: dict, copies: bool = False) -> dict:
    """The row as it would be with no other copy in the run: its verdict from its own checks.

    With ``copies`` (this segment or its copy was dropped as a duplicate in one of the runs
    compared), its tokens are left out: tokenize runs after the filter, so the copy dropped
    has none, and which copy that is depends on arrival order.
    """
    reasons = [r for r in (row["drop_reasons"] or []) if r != DUPLICATE_REASON]
    out = {**row, "drop_reasons": reasons, "verdict": "drop" if reasons else "keep"}
    if copies:
        out.pop("tokens")
    return out


def _dropped_as_copy(*rows: dict) -> bool:
    return any(DUPLICATE_REASON in (r["drop_reasons"] or []) for r in rows)


def _run(corpus: Path, out: Path, *overrides: str) -> dict[tuple[str, int], dict]:
    args = ["run", "--config", str(ROOT / "configs" / "local.yaml"), "--input", str(corpus),
            "--output", str(out), "--quiet", "--set", "filter.keep_dropped=true"]  # fmt: skip
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    return _segments(out)


ZH = ROOT / "tests" / "data" / "zh"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, espeak_conversation, pyannote_sample, english_clips) -> Path:
    d = tmp_path_factory.mktemp("det")
    shutil.copy(espeak_conversation, d / "a_conversation.wav")
    shutil.copy(espeak_conversation, d / "b_conversation_copy.wav")
    shutil.copy(pyannote_sample, d / "meeting.wav")
    for p, _ in english_clips[:2]:
        shutil.copy(p, d / p.name)
    shutil.copy(ZH / "zh_01.flac", d / "zh_01.flac")  # Mandarin in the same run (Whisper fallback)
    return d


@pytest.fixture(scope="module")
def runs(ray_local, corpus: Path, tmp_path_factory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("det-out")
    small = _run(corpus, tmp / "small", "ray.recordings_per_batch=1", "write.batch_size=1",
                 "transcribe.batch_size=1", "tokenize.batch_size=1", "quality.batch_size=1")  # fmt: skip
    large = _run(corpus, tmp / "large", "ray.recordings_per_batch=6", "write.batch_size=6",
                 "transcribe.batch_size=64", "tokenize.batch_size=64", "quality.batch_size=64")  # fmt: skip
    return small, large


def test_labels_do_not_depend_on_batching(runs: tuple[dict, dict]) -> None:
    small, large = runs
    assert small.keys() == large.keys() and len(small) >= 8
    differ = {k: {f: (small[k][f], large[k][f]) for f in small[k] if small[k][f] != large[k][f]}
              for k in small
              if _without_duplicate(small[k], c := _dropped_as_copy(small[k], large[k])) != _without_duplicate(large[k], c)}
    assert not differ, differ
    # Tokenize runs after the filter: tokens in every kept segment, in none the filter dropped.
    # (A copy is dropped by the filter or, when its twin was still on the way, by the writer,
    # after tokenize: that one has tokens.)
    def tokens_as_expected(r: dict) -> bool:
        if r["verdict"] == "keep":
            return r["tokens"] is not None
        return _dropped_as_copy(r) or r["tokens"] is None

    odd = [(k, r["verdict"], r["drop_reasons"]) for run in runs for k, r in run.items() if not tokens_as_expected(r)]
    assert not odd, odd
    assert any(r["verdict"] == "drop" and not _dropped_as_copy(r) for run in runs for r in run.values())
    # Which byte-identical copy keeps a segment is arrival order (the first to reach a writer);
    # that exactly one of them keeps it, whenever its other checks pass, is not.
    for run in (small, large):
        for (src, i), row in run.items():
            if src != "a_conversation.wav":
                continue
            pair = [row, run[("b_conversation_copy.wav", i)]]
            kept = [r for r in pair if r["verdict"] == "keep"]
            dup = [r for r in pair if DUPLICATE_REASON in (r["drop_reasons"] or [])]
            other = {tuple(r for r in (p["drop_reasons"] or []) if r != DUPLICATE_REASON) for p in pair}
            assert len(other) == 1, (i, pair)
            if other == {()}:
                assert len(kept) == 1 and len(dup) == 1, (i, pair)
            else:
                assert not kept, (i, pair)

    conv = {i: r for (src, i), r in large.items() if src == "a_conversation.wav"}
    copy = {i: r for (src, i), r in large.items() if src == "b_conversation_copy.wav"}
    assert conv.keys() == copy.keys() and conv
    for i in conv:
        a = {k: v for k, v in conv[i].items() if k not in ("verdict", "drop_reasons", "tokens")}
        b = {k: v for k, v in copy[i].items() if k not in ("verdict", "drop_reasons", "tokens")}
        assert a == b, (i, a, b)
        # The copy kept has the tokens the other copy would have had (same bytes, same tokens).
        kept = [r["tokens"] for run in runs for r in (run[("a_conversation.wav", i)],
                                                      run[("b_conversation_copy.wav", i)]) if r["tokens"]]
        assert len(set(kept)) <= 1, (i, kept)


def test_mandarin_in_the_same_run_is_punctuated_from_its_pauses(runs: tuple[dict, dict]) -> None:
    """zh_01 has a 0.7 s and a 1.4 s pause between its three sentences: comma, then period."""
    from stages.textnorm import cer

    _, large = runs
    clip = json.loads((ZH / "clips.json").read_text(encoding="utf-8"))["clips"][0]
    zh = [r for (src, _), r in sorted(large.items()) if src == "zh_01.flac"]
    assert zh and all(r["language"] == "zh" for r in zh)
    assert all(r["labeller"].endswith("+pauses") for r in zh)  # no Paraformer-zh staged: Whisper, timed
    text = "".join(r["text"] for r in zh if r["verdict"] == "keep")
    assert text.count("，") >= 1 and text.count("。") >= 1, text
    assert text.index("，") < text.index("。")
    assert cer(clip["text"], text) <= 0.3, text
    en = [r for (src, _), r in large.items() if src in ("counting.wav", "hello_world.wav")]
    assert sum(r["language"] == "en" for r in en) >= 1  # a rate: any CPU
    assert all(("+pauses" in r["labeller"]) == (r["language"] == "zh") for r in en)  # routed by language

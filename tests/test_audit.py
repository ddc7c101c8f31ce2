"""The audit on small outputs built here in the documented layout (README, Output; the writer's
conventions in stages/write.py), intact and corrupted on purpose, locally and on Ray, plus
the report opened in real headless Chromium."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from kimia_model.audio import encode_flac
from pipeline.audit import audit, main
from pipeline.audit.core import map_shards
from stages.filter import FilterConfig, FilterStage
from stages.quality import QualityConfig, QualityStage
from stages.rows import sample_key
from stages.write.layout import OutLayout

SR = 16000
CONFIG = {
    "transcribe": {"enabled": True, "model": "pkg:whisper-tiny.en"},
    "tokenize": {"enabled": True},
    "quality": {"enabled": True, "dnsmos": False},
    "filter": {"min_snr_db": 10.0, "keep_dropped": True},
}
WORDS = "we keep what is clean and we drop what is not clean enough for training".split()


def _voice(seconds: float, f0: float, snr_db: float, seed: int) -> np.ndarray:
    """A voiced, syllable-modulated harmonic signal plus white noise at a known SNR."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    env = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None) ** 2  # ~3 syllables per second
    speech = tone * env
    noise = rng.standard_normal(t.size)
    noise *= np.sqrt(np.mean(speech**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    x = speech + noise
    return (0.4 * x / np.abs(x).max()).astype(np.float32)


def _segment(rec: int, idx: int, count: int, *, snr_db: float = 30.0, seconds: float = 1.6,
             speaker: str = "S0", language: str = "en", source: str = "/data/corpusA") -> dict[str, Any]:
    audio = _voice(seconds, 110.0 + 20 * rec + 7 * idx, snr_db, 100 * rec + idx)
    n_words = 4
    return {
        "recording_id": f"rec{rec:04d}",
        "source": f"{source}/rec{rec}.wav",
        "status": "ok",
        "segment_index": idx,
        "segment_count": count,
        "start_s": 2.0 * idx,
        "end_s": 2.0 * idx + seconds,
        "duration_s": seconds,
        "recording_duration_s": 2.0 * count,
        "sample_rate": SR,
        "speaker": speaker,
        "audio": audio,
        "text": " ".join(WORDS[(idx * n_words) % 12 : (idx * n_words) % 12 + n_words]),
        "language": language,
        "language_prob": 0.95,
        "avg_logprob": -0.3,
        "no_speech_prob": 0.02,
        "compression_ratio": 1.2,
        # GLM-4-Voice framing: one token per 1280 samples at 16 kHz, i.e. 12.5 per second.
        "semantic_tokens": np.arange((int(seconds * SR) - 1) // 1280 + 1, dtype=np.int32),
    }


def _measure(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Real quality signals and verdicts (DNSMOS off: not what these tests are about)."""
    rows = QualityStage(QualityConfig(dnsmos=False))(rows)
    return FilterStage(FilterConfig(min_snr_db=10.0, min_words_per_s=None))(rows)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _write_shard(root: Path, number: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    name = f"shard-{number:06d}"
    (root / "shards").mkdir(parents=True, exist_ok=True)
    (root / "index").mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    index_rows = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for r in rows:
            key = sample_key(r["recording_id"], r["segment_index"])
            meta = {k: v for k, v in r.items() if k not in ("audio", "semantic_tokens", "audio_enhanced")}
            members = {"audio.flac": encode_flac(r["audio"], SR), "json": json.dumps(meta, sort_keys=True).encode()}
            if r.get("semantic_tokens") is not None:
                members["tokens.npy"] = _npy(np.asarray(r["semantic_tokens"], np.int32))
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(members[ext])
                tar.addfile(info, io.BytesIO(members[ext]))
            flat = {k: (json.dumps(v, sort_keys=True) if k in ("provenance", "timings") else v)
                    for k, v in meta.items()}
            index_rows.append({**flat, "key": key, "shard": f"{name}.tar", "members": sorted(members)})
    data = buf.getvalue()
    (root / "shards" / f"{name}.tar").write_bytes(data)
    pq.write_table(pa.Table.from_pylist(index_rows), root / "index" / f"{name}.parquet")
    import hashlib

    return {"name": f"{name}.tar", "index": f"{name}.parquet", "samples": len(rows), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "root": "" if root.name != "dropped" else "dropped"}


def build_output(out: Path, kept: list[list[dict]], dropped: list[list[dict]] | None = None,
                 config: dict | None = None) -> Path:
    """An output folder as the writer lays it out: shards, index, ledger, manifest, config, quarantine."""
    out.mkdir(parents=True, exist_ok=True)
    shards = [_write_shard(out, i, rows) for i, rows in enumerate(kept)]
    dropped_shards = [_write_shard(out / "dropped", i, rows) for i, rows in enumerate(dropped or [])]
    reasons: dict[str, int] = {}
    for rows in dropped or []:
        for r in rows:
            for reason in r["drop_reasons"]:
                reasons[reason] = reasons.get(reason, 0) + 1
    all_rows = [r for rows in kept + (dropped or []) for r in rows]
    summary = {
        "hours_in": sum({r["recording_id"]: r["recording_duration_s"] for r in all_rows}.values()) / 3600,
        "segments_kept": sum(len(s) for s in kept),
        "segments_dropped": sum(reasons.values()) and sum(len(s) for s in dropped or []),
        "drop_reasons": reasons,
    }
    manifest = {"shards": shards, "dropped_shards": dropped_shards, "summary": summary}
    OutLayout(out).commit("test", 0, shards + dropped_shards, [])  # the ledger names the dataset's shards
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "config.yaml").write_text(yaml.safe_dump(config or CONFIG))
    pq.write_table(pa.Table.from_pylist(
        [{"source": "/data/corpusB/broken.wav", "recording_id": None, "segment_index": None, "stage": "decode",
          "error": "StageError: cannot decode"}],
        schema=pa.schema([("source", pa.string()), ("recording_id", pa.string()), ("segment_index", pa.int64()),
                          ("stage", pa.string()), ("error", pa.string())])), out / "quarantine.parquet")
    return out


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    """Three recordings: clean ones kept, a noisy and a German segment dropped (real verdicts)."""
    rec0 = _measure([_segment(0, i, 3, speaker=f"S{i % 2}") for i in range(3)])
    rec1 = _measure([_segment(1, i, 3, source="/data/corpusB") for i in range(3)])
    rec2 = _measure([_segment(2, 0, 2, snr_db=0.0), _segment(2, 1, 2, language="de")])
    kept = [r for r in rec0 + rec1 + rec2 if r["verdict"] == "keep"]
    drop = [r for r in rec0 + rec1 + rec2 if r["verdict"] == "drop"]
    assert len(kept) == 6 and len(drop) == 2, [(r["recording_id"], r["drop_reasons"]) for r in drop]
    return {"kept": kept, "dropped": drop}


def _clean(tmp: Path, rows: dict[str, list[dict]]) -> Path:
    kept = rows["kept"]
    return build_output(tmp / "out", [kept[:3], kept[3:]], [rows["dropped"]])


def _status(doc: dict) -> dict[str, str]:
    return {k: v["status"] for k, v in doc["integrity"]["checks"].items()}


def _findings(doc: dict, check: str) -> list[dict]:
    return [f for f in doc["integrity"]["findings"] if f["check"] == check]


# -- an intact output --------------------------------------------------------------------------


def test_clean_output_passes_and_reports(tmp_path, rows) -> None:
    out = _clean(tmp_path, rows)
    doc = audit(out)
    st = _status(doc)
    assert doc["integrity"]["ok"], doc["integrity"]["findings"]
    for check in ("manifest", "shard_sha256", "shard_readable", "sample_count", "decode", "duration",
                  "tokens_rate", "transcript", "audio_fingerprint", "duplicate_keys", "index_match",
                  "verdict_consistency", "recording_contiguity", "duplicate_audio"):
        assert st[check] == "pass", (check, st[check])
    t = doc["totals"]
    assert t["samples_kept"] == 6 and t["samples_dropped"] == 2 and t["quarantined"] == 1
    assert t["hours_kept"] == pytest.approx(6 * 1.6 / 3600, abs=1e-4)
    assert t["hours_in"] == pytest.approx((6 + 6 + 4) / 3600, abs=1e-6)
    assert doc["drop_reasons"] == {"low_snr": 1, "language_not_allowed": 1}
    assert doc["languages"]["kept"] == {"en": 6}
    assert doc["speakers_per_recording"] == {"1": 1, "2": 1}
    assert {s["source"]: s["samples_kept"] for s in doc["sources"]} == {"/data/corpusA": 3, "/data/corpusB": 3}
    tps = doc["distributions"]["kept"]["tokens_per_s"]
    assert tps["n"] == 6 and 12.0 <= tps["p50"] <= 13.0
    for metric in ("duration_s", "snr_db", "words_per_s", "transcript_chars", "silence_ratio"):
        assert doc["distributions"]["kept"][metric]["n"] == 6
    assert {e["metric"] for e in doc["worst_examples"]} >= {"snr_db", "drop:low_snr", "drop:language_not_allowed"}
    on_disk = json.loads((out / "audit" / "audit.json").read_text())
    assert on_disk["totals"] == doc["totals"]
    html = (out / "audit" / "report.html").read_text()
    assert html.count("<svg") >= 6 and html.count("data:audio/flac;base64,") >= 3
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)  # nothing fetched: opens offline
    assert main([str(out)]) == 0


def test_output_from_the_project_writer_audits_clean(tmp_path, rows) -> None:
    from factories import recording_from_segments

    from stages.write import OutLayout, ShardWriter, WriteConfig, summarize

    out = tmp_path / "written"
    layout = OutLayout(out)
    segments = rows["kept"] + rows["dropped"]
    with ShardWriter(layout, WriteConfig(), keep_dropped=True) as writer:
        for rec in sorted({r["recording_id"] for r in segments}):
            writer.add(recording_from_segments(sorted(
                (dict(r) for r in segments if r["recording_id"] == rec), key=lambda r: r["segment_index"])))
    layout.write_quarantine(layout.quarantine_records())
    layout.write_manifest(summarize(layout.latest_outcomes()))
    (out / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    doc = audit(out)
    assert doc["integrity"]["ok"], doc["integrity"]["findings"]
    assert doc["totals"]["samples_kept"] == 6 and doc["totals"]["samples_dropped"] == 2
    assert _status(doc)["audio_fingerprint"] == "pass"


# -- corrupted on purpose ------------------------------------------------------------------------


def test_truncated_shard(tmp_path, rows) -> None:
    out = _clean(tmp_path, rows)
    shard = out / "shards" / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    doc = audit(out)
    st = _status(doc)
    assert not doc["integrity"]["ok"]
    assert st["shard_readable"] == "fail" and st["shard_sha256"] == "fail" and st["sample_count"] == "fail"
    f = _findings(doc, "shard_readable")[0]
    assert f["shard"] == "shard-000001.tar" and "truncated" in f["detail"]
    assert main([str(out)]) == 1


def test_deleted_index_row(tmp_path, rows) -> None:
    out = _clean(tmp_path, rows)
    index = out / "index" / "shard-000000.parquet"
    table = pq.read_table(index)
    victim = table.column("key")[1].as_py()
    pq.write_table(table.filter(pa.compute.not_equal(table.column("key"), victim)), index)
    doc = audit(out)
    assert _status(doc)["index_match"] == "fail"
    assert _status(doc)["shard_sha256"] == "pass"  # the shard itself is intact
    f = _findings(doc, "index_match")
    assert [x["key"] for x in f] == [victim] and "not in the index" in f[0]["detail"]


def _rewrite_member(tar_path: Path, key: str, ext: str, edit) -> None:
    """Rewrite one member of a shard in place, the way a hand edit would."""
    with tarfile.open(tar_path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as dst:
        for m, data in members:
            if m.name == f"{key}.{ext}":
                data = edit(data)
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))


def test_hand_edited_shard(tmp_path, rows) -> None:
    out = _clean(tmp_path, rows)
    shard = out / "shards" / "shard-000000.tar"
    k_text = sample_key(rows["kept"][0]["recording_id"], rows["kept"][0]["segment_index"])
    k_audio = sample_key(rows["kept"][2]["recording_id"], rows["kept"][2]["segment_index"])

    def new_text(data: bytes) -> bytes:
        meta = json.loads(data)
        meta["text"] = "an edited transcript"
        return json.dumps(meta).encode()

    def louder(data: bytes) -> bytes:
        import soundfile as sf

        audio, sr = sf.read(io.BytesIO(data), dtype="float32")
        return encode_flac(audio * 1.5, sr)

    _rewrite_member(shard, k_text, "json", new_text)
    _rewrite_member(shard, k_audio, "audio.flac", louder)
    doc = audit(out)
    st = _status(doc)
    assert st["shard_sha256"] == "fail" and st["index_match"] == "fail" and st["audio_fingerprint"] == "fail"
    text_f = _findings(doc, "index_match")
    assert text_f[0]["key"] == k_text and "text" in text_f[0]["detail"] and "edited" in text_f[0]["detail"]
    assert [f["key"] for f in _findings(doc, "audio_fingerprint")] == [k_audio]


def test_content_defects_each_named(tmp_path, rows) -> None:
    kept = [dict(r) for r in rows["kept"]]
    kept[0]["semantic_tokens"] = np.arange(5, dtype=np.int32)  # 5 tokens for 1.6 s: expected 20 +/- 1
    kept[1]["text"] = ""  # transcription ran, kept without a transcript
    kept[2]["verdict"] = "drop"  # a dropped sample in the kept set
    dup_key = dict(kept[3])  # the same key written again in another shard
    twin = {**kept[4], "segment_index": 7, "recording_id": kept[4]["recording_id"]}  # same audio, new key
    out = build_output(tmp_path / "bad", [kept[:3], kept[3:] + [twin], [dup_key]])
    doc = audit(out)
    st = _status(doc)
    key = lambda r: sample_key(r["recording_id"], r["segment_index"])  # noqa: E731
    assert [f["key"] for f in _findings(doc, "tokens_rate")] == [key(kept[0])]
    assert "5 tokens" in _findings(doc, "tokens_rate")[0]["detail"]
    assert [f["key"] for f in _findings(doc, "transcript")] == [key(kept[1])]
    assert [f["key"] for f in _findings(doc, "verdict_consistency")] == [key(kept[2])]
    assert _findings(doc, "duplicate_keys")[0]["key"] == key(dup_key)
    assert st["duplicate_audio"] == "fail" and st["recording_contiguity"] == "fail"
    assert st["decode"] == "pass" and st["shard_sha256"] == "pass"


def test_missing_manifest_and_stray_files(tmp_path, rows) -> None:
    out = _clean(tmp_path, rows)
    shutil.copy(out / "shards" / "shard-000000.tar", out / "shards" / "shard-000009.tar")
    (out / "index" / "shard-000042.parquet").write_bytes(b"not parquet")
    doc = audit(out)
    details = [f["detail"] for f in _findings(doc, "manifest")]
    assert any("not committed" in d for d in details)
    assert any("has no shard" in f["detail"] for f in _findings(doc, "index_match"))
    (out / "manifest.json").unlink()
    assert "manifest.json is missing" in _findings(audit(out), "manifest")[0]["detail"]


# -- two runs --------------------------------------------------------------------------------------


def test_against_explains_what_changed(tmp_path, rows) -> None:
    base = _clean(tmp_path / "a", rows)
    kept = [dict(r) for r in rows["kept"]]
    moved = kept.pop(1)
    moved.update(verdict="drop", drop_reasons=["low_snr"])
    strict = {**CONFIG, "filter": {**CONFIG["filter"], "min_snr_db": 40.0}}
    run = build_output(tmp_path / "b" / "out", [kept[:2], kept[2:]], [rows["dropped"] + [moved]], strict)
    doc = audit(run, against=base)
    cmp_ = doc["comparison"]
    t = cmp_["transitions"]["kept_to_dropped"]
    assert t["count"] == 1 and t["reasons"] == {"low_snr": 1}
    assert t["examples"] == [sample_key(moved["recording_id"], moved["segment_index"])]
    assert "filter.min_snr_db" in t["likely_causes"]
    assert {"key": "filter.min_snr_db", "baseline": 10.0, "run": 40.0} in cmp_["config_changes"]
    assert cmp_["totals"]["samples_kept"]["delta"] == -1
    assert cmp_["drop_reasons"]["low_snr"]["delta"] == 1
    assert cmp_["samples"] == {"common": 8, "only_in_run": 0, "only_in_baseline": 0}
    assert "Compared with" in (run / "audit" / "report.html").read_text()


# -- scale: bounded work in flight, and Ray --------------------------------------------------------


def test_map_shards_pulls_tasks_lazily() -> None:
    pulled = 0

    def tasks() -> Iterator[tuple[int]]:
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield (i,)

    def work(i: int) -> int:
        return i

    gen = map_shards(work, tasks(), workers=2)
    first = next(gen)
    assert pulled <= 2 * 2 + 1  # a 10,000-shard run never queues every shard at once
    assert sorted([first, *gen]) == list(range(1000))


def test_audit_on_ray_matches_local(tmp_path, rows, monkeypatch) -> None:
    import ray

    from pipeline.audit import core

    out = _clean(tmp_path, rows)
    monkeypatch.setattr(core, "_ray_ready", lambda: False)
    local_doc = json.loads(json.dumps(audit(out)))
    monkeypatch.undo()
    started = not ray.is_initialized()
    if started:
        # address="local": a Ray of our own, never another user's cluster on this shared machine.
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}})
    try:
        ray_doc = audit(out)
    finally:
        if started:
            ray.shutdown()
    assert local_doc["scan"] == {"backend": "local", "worker_processes": 1}
    assert ray_doc["scan"]["backend"] == "ray" and ray_doc["scan"]["driver_scanned"] is False
    assert ray_doc["totals"] == local_doc["totals"]
    assert _status(ray_doc) == _status(local_doc)
    assert ray_doc["distributions"] == local_doc["distributions"]


# -- the report in a real browser ------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_report_renders_in_headless_chromium(tmp_path, rows) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    base = _clean(tmp_path / "base", rows)
    out = _clean(tmp_path, rows)
    audit(out, against=base)
    report = out / "audit" / "report.html"
    shot_dir = Path(os.environ.get("KIMIA_AUDIT_SCREENSHOT_DIR", tmp_path))
    shot_dir.mkdir(parents=True, exist_ok=True)
    screenshot = shot_dir / "audit-report.png"
    console_errors: list[str] = []
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.new_page()
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: console_errors.append(str(e)))
            page.on("requestfailed", lambda r: console_errors.append(f"request failed: {r.url}"))
            page.goto(report.as_uri(), wait_until="load")
            plots = page.evaluate(
                """() => [...document.querySelectorAll('figure.plot')].map(f => {
                    const svg = f.querySelector('svg'); const b = svg ? svg.getBoundingClientRect() : null;
                    return {id: f.dataset.plot, w: b ? b.width : 0, h: b ? b.height : 0,
                            marks: svg ? svg.querySelectorAll('path, rect, use').length : 0}; })"""
            )
            # Each audio player must decode its embedded FLAC far enough to know its duration.
            page.wait_for_function(
                "() => [...document.querySelectorAll('audio')].every(a => a.readyState >= 1 || a.error)", timeout=15000
            )
            audio = page.evaluate(
                "() => [...document.querySelectorAll('audio')]"
                ".map(a => ({d: a.duration, err: a.error && a.error.code}))"
            )
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            context.close()
    print(f"report screenshot: {screenshot}")
    assert console_errors == []
    ids = {p["id"] for p in plots}
    assert {"drop_reasons", "duration_s", "snr_db", "words_per_s", "tokens_per_s", "transcript_chars",
            "languages", "speakers"} <= ids
    for p in plots:
        assert p["w"] > 200 and p["h"] > 100 and p["marks"] > 3, p
    assert audio and all(a["err"] is None and a["d"] > 0.5 for a in audio), audio
    assert screenshot.stat().st_size > 10_000

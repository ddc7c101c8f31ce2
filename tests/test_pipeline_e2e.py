"""The whole CLI on real speech and on broken files, and a kill-and-resume test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline.cli import main
from pipeline.inspect_output import inspect_output
from stages.filter import AUDIO_REASONS
from stages.textnorm import wer

ROOT = Path(__file__).resolve().parent.parent


def _index_rows(out: Path) -> list[dict]:
    rows: list[dict] = []
    for p in sorted((out / "index").glob("*.parquet")):
        rows.extend(pq.read_table(p).to_pylist())
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, english_clips, espeak_conversation, pyannote_sample) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for p, _ in english_clips:
        shutil.copy(p, d / p.name)
    (d / "nested").mkdir()
    shutil.copy(espeak_conversation, d / "nested" / "conversation.wav")
    shutil.copy(pyannote_sample, d / "nested" / "meeting.wav")
    (d / "broken").mkdir()
    (d / "broken" / "empty.wav").write_bytes(b"")
    (d / "broken" / "not_audio.flac").write_text("definitely not audio")
    (d / "broken" / "truncated.wav").write_bytes(pyannote_sample.read_bytes()[:30000])
    sf.write(d / "broken" / "silence.wav", [0.0] * 32000, 16000)
    return d


@pytest.fixture(scope="module")
def finished_run(ray_local, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "run"
    code = main(["run", "--config", str(ROOT / "configs" / "local.yaml"), "--input", str(corpus),
                 "--output", str(out), "--quiet"])
    assert code == 0
    return out


def test_output_layout_and_inspect(finished_run: Path) -> None:
    for name in ("config.yaml", "manifest.json", "quarantine.parquet"):
        assert (finished_run / name).is_file()
    report = inspect_output(finished_run)
    assert report["ok"], report["findings"]
    # 3 clips, the espeak conversation, the meeting: every one is in the kept or the dropped set
    # (the filter may drop a synthetic turn for a low language probability or DNSMOS).
    kept = {r["source"] for r in _index_rows(finished_run)}
    dropped = {r["source"] for r in _index_rows(finished_run / "dropped")}
    assert len(kept | dropped) == 5 and report["recordings"] == len(kept) >= 4
    assert main(["inspect", str(finished_run)]) == 0
    rows = _index_rows(finished_run)
    assert all({"audio.flac", "json"} <= set(r["members"]) for r in rows)
    # enhance.when=noisy: enhanced.flac exactly where the recording's WADA-SNR was under 20 dB.
    for r in rows:
        noisy = r["enhance_snr_db"] is not None and r["enhance_snr_db"] < 20.0
        assert ("enhanced.flac" in r["members"]) == noisy, (r["source"], r["enhance_snr_db"])
    assert all(set(json.loads(r["provenance"])) >= {"decode", "enhance", "diarize", "transcribe"} for r in rows)
    # Tokenize runs after the filter (tokenize.kept_only): tokens in every kept sample, in no dropped one.
    assert all("tokens.npy" in r["members"] and "tokenize" in json.loads(r["provenance"]) for r in rows)
    assert not any("tokens.npy" in r["members"] for r in _index_rows(finished_run / "dropped"))
    # Transcribe runs after the audio checks (transcribe.kept_only): every kept sample has a
    # transcript; a dropped one lacks it only when the audio checks dropped it, for their reasons.
    assert all(isinstance(r["text"], str) and "quality_text" in json.loads(r["provenance"]) for r in rows)
    for r in _index_rows(finished_run / "dropped"):
        prov = json.loads(r["provenance"])
        assert (r.get("text") is None) == ("transcribe" not in prov), r["key"]  # no column where none has one
        if r.get("text") is None:
            assert {"quality", "filter_audio", "filter"} <= set(prov), (r["key"], prov)
            assert set(r["drop_reasons"]) <= AUDIO_REASONS, (r["key"], r["drop_reasons"])


def test_commits_stream_in_write_batches(finished_run: Path) -> None:
    """Recordings are committed by the workers as write batches finish, not once at the end."""
    from stages.write import OutLayout, WriteConfig

    ledger = OutLayout(finished_run).ledger()
    per_commit = WriteConfig().batch_size
    sources = [r["source"] for entry in ledger for r in entry["recordings"]]
    assert len(sources) == len(set(sources)) == 9  # 5 good files and 4 broken ones, each committed once
    assert len(ledger) >= -(-9 // per_commit) and all(len(e["recordings"]) <= per_commit for e in ledger)
    # every shard is named after its writer, and each writer's shards are in one commit
    assert all(s["name"].startswith("shard-") and s["name"].count("-") == 2 for e in ledger for s in e["shards"])


def test_transcripts_match_references(finished_run: Path, english_clips) -> None:
    rows = _index_rows(finished_run)
    for path, ref in english_clips:
        text = " ".join(r["text"] for r in sorted(rows, key=lambda r: r["key"]) if r["source"].endswith("/" + path.name))
        assert wer(ref, text) <= 0.1, (path.name, ref, text)
    meeting = [r for r in rows if r["source"].endswith("meeting.wav")]
    assert len(meeting) >= 2 and all(r["duration_s"] <= 27.0 for r in meeting)
    assert {r["speaker"] for r in meeting} == {"S0", "S1"}  # the sample has two speakers
    assert all(r["language"] == "en" for r in rows)


def test_broken_files_are_quarantined_with_reasons(finished_run: Path) -> None:
    table = {Path(r["source"]).name: r for r in pq.read_table(finished_run / "quarantine.parquet").to_pylist()}
    assert set(table) == {"empty.wav", "not_audio.flac", "truncated.wav", "silence.wav"}
    assert "empty file" in table["empty.wav"]["error"]
    assert "not decodable" in table["not_audio.flac"]["error"]
    assert "truncated" in table["truncated.wav"]["error"]
    assert "silent" in table["silence.wav"]["error"]
    assert all(r["stage"] == "decode" for r in table.values())
    # Bad input is final: quarantined as such, and not a failure of the run (exit code 0).
    assert {r["kind"] for r in table.values()} == {"bad_input"}
    assert json.loads((finished_run / "manifest.json").read_text())["summary"]["failed"] == []


def test_manifest_summary(finished_run: Path) -> None:
    summary = json.loads((finished_run / "manifest.json").read_text())["summary"]
    assert summary["recordings_by_status"] == {"ok": 5, "quarantined": 4}
    assert 0 < summary["hours_kept"] <= summary["hours_in"]
    assert set(summary["stage_seconds"]) >= {"decode", "diarize", "transcribe", "quality", "filter"}
    assert summary["this_run"]["end_to_end_rtf"] > 0
    profile = summary["this_run"]["profile"]  # where the time went: every stage, and the framework's share
    assert set(profile["stages"]) >= {"decode", "diarize", "transcribe", "quality", "filter", "write"}
    assert all(0 <= s["share_of_wall"] for s in profile["stages"].values())
    assert profile["busiest"] in profile["stages"] and 0 <= profile["overhead_share"] <= 1
    wall = summary["this_run"]["wall_seconds"]
    assert 0 <= profile["ray_start_s"] < wall  # 0 when Ray was already up
    assert 0 < summary["this_run"]["first_commit_seconds"] <= wall
    # When each stage worked: inside the run, and a stage starts only once the one before it
    # has handed something on (write excepted: inputs quarantined at decode go straight to
    # it); nothing starts before Ray is up.
    spans = {k: (v["first_s"], v["last_s"]) for k, v in profile["stages"].items()}
    assert spans.keys() == profile["stages"].keys()
    assert all(0 <= a <= b <= wall + 0.5 for a, b in spans.values()), spans
    order = [spans[k][0] for k in ("decode", "diarize", "quality", "filter_audio", "transcribe", "quality_text", "filter")]
    assert order == sorted(order), spans
    assert spans["write"][1] >= spans["filter"][1], spans
    assert profile["ray_start_s"] <= profile["first_call_s"] == min(a for a, _ in spans.values())
    assert 0 <= profile["tail_s"] <= wall - profile["first_call_s"]
    # Each model stage's CPU: its worker processes', start-up included, so more than nothing and
    # no more than its workers' threads could burn in the run's wall time.
    cpus = os.cpu_count() or 1
    for name in ("diarize", "transcribe", "tokenize", "quality"):
        st = profile["stages"][name]
        assert 0 < st["cpu_s"] <= st["workers"] * cpus * wall and st["cpu_rtf"] > 0, (name, st)
    # A task stage's: its calls' only (its processes serve other stages too), so decoding and
    # writing cost something, and no more than the whole machine over their calls' time.
    for name in ("decode", "write"):
        st = profile["stages"][name]
        assert 0 < st["cpu_s"] <= cpus * (st["last_s"] - st["first_s"]) + 0.5 and st["cpu_rtf"] > 0, (name, st)
    # Clock times stay out of OUT: two runs of the same input write the same sample metadata.
    from stages.write import OutLayout

    layout = OutLayout(finished_run)
    _, members = next(layout.iter_samples(layout.committed_shards()[0]))
    for internal in ("spans", "cpu"):
        assert internal not in json.loads(members["json"])
        assert internal not in layout.index_columns(layout.committed_shards()[0])


def test_rerun_is_a_no_op(finished_run: Path, corpus: Path, capsys) -> None:
    before = sorted(p.name for p in (finished_run / "shards").iterdir())
    code = main(["run", "--config", str(ROOT / "configs" / "local.yaml"), "--input", str(corpus),
                 "--output", str(finished_run), "--quiet"])
    assert code == 0
    assert "9 of 9 inputs already committed" in capsys.readouterr().err
    assert sorted(p.name for p in (finished_run / "shards").iterdir()) == before
    assert inspect_output(finished_run)["ok"]


def test_bad_config_and_missing_model_fail_before_work(tmp_path: Path, corpus: Path, capsys) -> None:
    out = tmp_path / "o"
    code = main(["run", "--input", str(corpus), "--output", str(out), "--set", "transcribe.beam_size=0"])
    assert code == 2 and "transcribe.beam_size" in capsys.readouterr().err
    code = main(["run", "--input", str(corpus), "--output", str(out),
                 "--set", "transcribe.backend=openai-whisper", "--set", "transcribe.model=large-v3",
                 "--set", f"models.cache_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "large-v3.pt" in err and "transcribe.model" in err
    assert not out.exists()


def test_models_list_and_verify(capsys) -> None:
    assert main(["models", "verify", "--config", str(ROOT / "configs" / "local.yaml")]) == 0
    text = capsys.readouterr().out
    assert "transcribe.model" in text and "intact" in text and "pkg:silero-vad" in text


def _spawn(corpus: Path, out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--config", str(ROOT / "configs" / "local.yaml"),
         "--input", str(corpus), "--output", str(out), "--quiet",
         "--set", "write.shard_max_samples=1", "--set", "transcribe.beam_size=1"],
        cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def _kill_after(proc: subprocess.Popen, out: Path, commits: int, timeout: float = 240) -> None:
    """SIGKILL the whole process group (driver and its Ray) once ``commits`` commits exist."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "_state").glob("commit-*.json"))) >= commits:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_and_resume(corpus: Path, finished_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    _kill_after(_spawn(corpus, out, tmp_path / "1.log"), out, commits=1)
    first = len(list((out / "_state").glob("commit-*.json")))
    _kill_after(_spawn(corpus, out, tmp_path / "2.log"), out, commits=first + 2)
    proc = _spawn(corpus, out, tmp_path / "3.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "3.log").read_text()[-3000:]
    report = inspect_output(out)
    assert report["ok"], report["findings"]
    keys = [r["key"] for r in _index_rows(out) + _index_rows(out / "dropped")]
    assert len(keys) == len(set(keys)), "duplicate samples after resume"
    # Kept and dropped together: which segments the filter keeps depends on the transcripts,
    # and this run decodes with beam 1 (the reference with the profile's beam), so a verdict
    # may differ; the segments themselves (diarization, no ASR) may not.
    reference = [r["key"] for r in _index_rows(finished_run) + _index_rows(finished_run / "dropped")]
    assert sorted(keys) == sorted(reference), "missing or extra samples after resume"
    quarantined = pq.read_table(out / "quarantine.parquet").column("source").to_pylist()
    assert len(quarantined) == len(set(quarantined)) == 4


def test_resource_plan_that_would_deadlock_is_refused() -> None:
    from pipeline.config import load_config
    from pipeline.run import PreflightError, check_resources, plan_stages, size_pools
    from stages.base import StageContext

    cfg = load_config(ROOT / "configs" / "local.yaml", ["transcribe.num_cpus=2"])
    stages = plan_stages(cfg, StageContext())
    size_pools(stages, {"CPU": 2.0}, 2)  # as run() does before checking
    with pytest.raises(PreflightError, match=r"actor pools hold .* CPU .*transcribe=2x1.*cluster has 2"):
        check_resources(stages, {"CPU": 2.0})
    fits = plan_stages(load_config(ROOT / "configs" / "local.yaml"), StageContext())
    size_pools(fits, {"CPU": 2.0}, 2)
    check_resources(fits, {"CPU": 2.0})

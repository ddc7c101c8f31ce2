"""Typed failures: bad input is final, anything else is retried, a recording commits whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from stages.base import KIND_BAD_INPUT, KIND_TRANSIENT, STATUS_QUARANTINED, RetryPolicy, Stage, StageConfig, StageError
from stages.write import OutLayout, ShardWriter, WriteConfig


class Flaky(Stage):
    """Fails ``fail_times`` times on rows named "flaky" with ``exc``, then succeeds."""

    name = "flaky"
    uses_model = False

    def __init__(self, exc: BaseException, fail_times: int) -> None:
        super().__init__(StageConfig())
        self.exc, self.left, self.calls = exc, fail_times, 0
        self.retry = RetryPolicy(retries=2, backoff_s=0.0)

    def process_batch(self, rows):
        out = []
        for r in rows:
            if r["name"] == "flaky":
                self.calls += 1
                if self.left > 0:
                    self.left -= 1
                    raise self.exc
            out.append({**r, "done": True})
        return out


def _rows() -> list[dict]:
    return [{"status": "ok", "name": n, "source": f"/d/{n}.wav"} for n in ("good", "flaky")]


def test_a_transient_failure_is_retried_and_then_succeeds() -> None:
    stage = Flaky(OSError("stale file handle"), fail_times=2)
    out = {Path(r["source"]).stem: r for r in stage(_rows())}
    assert out["flaky"]["done"] and out["good"]["done"]
    assert stage.calls == 3  # the failed batch, then one failed and one good retry alone


def test_retries_run_out_into_a_transient_quarantine() -> None:
    stage = Flaky(MemoryError("out of memory"), fail_times=99)
    out = {Path(r["source"]).stem: r for r in stage(_rows())}
    assert out["good"]["done"]
    bad = out["flaky"]
    assert bad["status"] == STATUS_QUARANTINED and bad["error_kind"] == KIND_TRANSIENT
    assert bad["attempts"] == 3 and "MemoryError" in bad["error"]


def test_bad_input_is_quarantined_at_once_without_retry() -> None:
    stage = Flaky(StageError("not decodable audio"), fail_times=99)
    out = {Path(r["source"]).stem: r for r in stage(_rows())}
    bad = out["flaky"]
    assert bad["error_kind"] == KIND_BAD_INPUT and bad["attempts"] == 1
    assert stage.calls == 2  # the batch call, then the row alone once: no retry


def test_backoff_doubles() -> None:
    assert RetryPolicy(retries=4, backoff_s=0.25).delays() == [0.25, 0.5, 1.0, 2.0]
    assert RetryPolicy(retries=0).delays() == []


def _recording() -> dict:
    """A two-segment recording whose second segment is named "flaky" (see :class:`Flaky`)."""
    return {
        "status": "ok", "recording_id": "r1", "source": "/d/r1.wav", "sample_rate": 16000, "duration_s": 2.0,
        "audio": np.zeros(32000, np.float32),
        "segments": [{"segment_index": i, "start_s": float(i), "end_s": i + 1.0, "status": "ok", "name": name,
                      "verdict": "keep"} for i, name in enumerate(("good", "flaky"))],
    }


def test_a_recording_with_a_transient_segment_is_not_partly_committed(tmp_path: Path) -> None:
    (rec,) = Flaky(TimeoutError("slow"), fail_times=99)([_recording()])
    assert rec["status"] == STATUS_QUARANTINED and rec["error_kind"] == KIND_TRANSIENT
    assert rec["failed_stage"] == "flaky" and rec["segment_index"] == 1 and "segments" not in rec
    layout = OutLayout(tmp_path)
    with ShardWriter(layout, WriteConfig()) as w:
        outcome = w.add(rec)
    assert outcome.status == STATUS_QUARANTINED and outcome.kept == 0
    assert layout.committed_shards() == []  # no sample of r1 written
    layout.write_quarantine(layout.quarantine_records())
    q = pq.read_table(tmp_path / "quarantine.parquet").to_pylist()
    assert [(r["source"], r["kind"], r["stage"]) for r in q] == [("/d/r1.wav", KIND_TRANSIENT, "flaky")]
    # --retry-quarantined processes it again; the new outcome supersedes the quarantine.
    (rec,) = Flaky(TimeoutError("slow"), fail_times=1)([_recording()])
    assert rec["status"] == "ok" and [s["done"] for s in rec["segments"]] == [True, True]
    with ShardWriter(layout, WriteConfig()) as w:
        w.add(rec)
    (latest,) = layout.latest_outcomes()
    assert latest.status == "ok" and latest.kept == 2
    layout.write_quarantine(layout.quarantine_records())
    assert pq.read_table(tmp_path / "quarantine.parquet").num_rows == 0
    assert len(layout.committed_shards()) == 1


def test_a_bad_segment_is_quarantined_and_its_recording_kept() -> None:
    (rec,) = Flaky(StageError("empty audio"), fail_times=99)([_recording()])
    assert rec["status"] == "ok"
    good, bad = rec["segments"]
    assert good["done"] and bad["status"] == STATUS_QUARANTINED and bad["error_kind"] == KIND_BAD_INPUT
    assert bad["start_s"] == 1.0 and "audio" not in bad and "source" not in bad


def test_run_exits_3_when_inputs_failed_for_another_reason(monkeypatch, tmp_path: Path) -> None:
    import pipeline.run
    from pipeline.cli import EXIT_FAILED, main

    seen: dict = {}

    def fake_run(cfg, input_spec, output, **kw):
        seen.update(kw)
        failed = [{"source": "/d/x.wav", "stage": "transcribe", "error": "TimeoutError: slow"}] if kw["retry_quarantined"] else []
        this = {"recordings": 1, "recordings_by_status": {}, "hours_in": 0.0, "hours_kept": 0.0, "segments_kept": 0,
                "segments_dropped": 0, "wall_seconds": 1.0, "end_to_end_rtf": None, "stage_seconds": {},
                "stage_rtf": {}, "drop_reasons": {}, "quarantine_reasons": {}, "failed": failed}
        return {"recordings": 1, "this_run": this, "failed": failed}

    monkeypatch.setattr(pipeline.run, "run", fake_run)
    args = ["run", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 0
    assert main(args + ["--retry-quarantined"]) == EXIT_FAILED == 3
    assert seen["retry_quarantined"] is True

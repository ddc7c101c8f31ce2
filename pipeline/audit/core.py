"""The audit of one output folder: scan every shard, check integrity, aggregate, report.

Work is one task per shard (``scan.scan_shard``). With Ray initialised the tasks run on the
cluster, at most ``2 x CPUs`` in flight, and the driver merges each result as it arrives;
otherwise a small thread pool runs them here (libsndfile and zlib release the GIL). Either
way the driver holds aggregates plus 24 bytes per sample of hashes for the run-wide checks,
never the samples, so 10,000 shards stream through in bounded memory.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audit.agg import MAX_FINDINGS, SETS, Example, RunScan, TopK
from pipeline.audit.scan import CHECKS, ScanOptions, ShardResult, h64, scan_shard
from stages.write.layout import DROPPED, KEPT, OutLayout

# -- small readers ---------------------------------------------------------------------------


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not path.exists():
        return None, f"{path.name} is missing"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"{path.name} does not parse: {exc}"
    return (data, None) if isinstance(data, dict) else (None, f"{path.name} is not a JSON object")


def _stage_enabled(config: dict[str, Any] | None, stage: str) -> bool:
    """A stage counts as run when its section exists and is not ``enabled: false``."""
    if not config or not isinstance(config.get(stage), dict):
        return False
    return config[stage].get("enabled", True) is not False


def _quarantine_summary(layout: OutLayout) -> dict[str, Any]:
    if not layout.quarantine_path.exists():
        return {"count": 0, "by_stage": {}, "top_errors": []}
    try:
        rows = layout.read_quarantine().to_pylist()
    except Exception as exc:  # noqa: BLE001
        return {"count": None, "error": f"quarantine.parquet unreadable: {exc}"}
    by_stage = Counter(str(r.get("failed_stage") or r.get("stage")) for r in rows)
    errors = Counter(str(r.get("error"))[:200] for r in rows)
    return {
        "count": len(rows),
        "by_stage": dict(by_stage.most_common()),
        "top_errors": [{"error": e, "count": n} for e, n in errors.most_common(10)],
    }


# -- parallel map --------------------------------------------------------------------------


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a hard dependency
        return False
    return bool(ray.is_initialized())


def map_shards(
    fn: Callable[..., ShardResult], tasks: Iterable[tuple[Any, ...]], workers: int | None = None
) -> Iterator[ShardResult]:
    """Run ``fn(*task)`` for every task, yielding results as they finish (order not kept).

    On Ray (when initialised) each task is a ``num_cpus=1`` remote call; otherwise a thread
    pool. In both cases only a bounded window of tasks is in flight, so a 10,000-shard task
    list never becomes 10,000 pending results.
    """
    if _ray_ready():
        import ray

        remote = ray.remote(num_cpus=1, max_retries=2)(fn)
        window = workers or max(2, 2 * int(ray.available_resources().get("CPU", 1)))
        pending: list[Any] = []
        for task in tasks:
            if len(pending) >= window:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])
            pending.append(remote.remote(*task))
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
        return
    n = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures: set[Future[ShardResult]] = set()
        for task in tasks:
            if len(futures) >= 2 * n:
                done, futures = wait(futures, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)
            futures.add(pool.submit(fn, *task))
        while futures:
            done, futures = wait(futures, return_when=FIRST_COMPLETED)
            yield from (f.result() for f in done)


# -- the scan of a whole output ----------------------------------------------------------------


#: Where each set of samples lives in OUT.
ROOTS = {"kept": KEPT, "dropped": DROPPED}


def scan_run(out: Path, *, workers: int | None = None, worst_k: int = 3) -> RunScan:
    """Scan every committed shard of ``out`` (and ``out/dropped``) and run the run-wide checks.

    The ledger (``OUT/_state``) says which shards are the dataset; ``manifest.json`` must
    agree with it, and a shard on disk that no commit names is reported, not scanned.
    """
    out = Path(out)
    run = RunScan(out=out, topk=TopK(worst_k))
    if not out.is_dir():
        raise FileNotFoundError(f"audit: {out} is not a directory")
    layout = OutLayout(out)
    run.config = layout.read_config()
    options = ScanOptions(
        require_transcript=_stage_enabled(run.config, "transcribe"),
        require_tokens=_stage_enabled(run.config, "tokenize"),
        worst_k=worst_k,
    )
    run.quarantine = _quarantine_summary(layout)

    tasks: list[tuple[Any, ...]] = []
    expected: dict[tuple[str, str], dict[str, Any]] = {}
    manifest, manifest_err = _read_json(layout.manifest_path)
    run.manifest = manifest
    try:
        committed = layout.committed_shards()
    except (OSError, ValueError, KeyError) as exc:
        committed = []
        run.find("manifest", f"the ledger (_state/commit-*.json) does not read: {exc}")
    for set_name in SETS:
        root = ROOTS[set_name]
        shard_dir, index_dir = layout.shards_dir(root), layout.index_dir(root)
        if set_name == "dropped" and not shard_dir.exists():
            continue
        run.checked["manifest"] += 1
        on_disk = sorted(p.name for p in shard_dir.glob("*.tar")) if shard_dir.exists() else []
        listed = {s["name"]: s for s in committed if s.get("root", KEPT) == root}
        if manifest is None:
            run.find("manifest", manifest_err or "manifest.json is missing", set_name=set_name)
        else:
            # The driver lists kept shards under "shards" and OUT/dropped/ shards under
            # "dropped_shards", from the ledger, when a run ends.
            entries = manifest.get("shards" if set_name == "kept" else "dropped_shards") or []
            in_manifest = {Path(str(e["name"])).name for e in entries if isinstance(e, dict) and e.get("name")}
            if in_manifest != set(listed):
                run.find("manifest", f"manifest.json lists {len(in_manifest)} shards, the ledger commits "
                         f"{len(listed)} (a run was interrupted: run it again to finish)", set_name=set_name)
        for name in sorted(set(listed) - set(on_disk)):
            run.find("manifest", "committed shard is missing on disk", set_name=set_name, shard=name)
        for name in sorted(set(on_disk) - set(listed)):
            run.find("manifest", "shard on disk is not committed (an interrupted run's)", set_name=set_name, shard=name)
        for name, entry in listed.items():
            expected[(set_name, name)] = entry
        if index_dir.exists():
            stems = {Path(n).stem for n in on_disk}
            for p in sorted(index_dir.glob("*.parquet")):
                if p.stem not in stems:
                    run.find("index_match", "index file has no shard", set_name=set_name, shard=p.name)
        for name in on_disk:
            if name in listed:
                ref = listed[name]
                tasks.append((str(layout.shard_path(ref)), str(layout.index_path(ref)), set_name, options))

    # Run-wide hash columns: one small array per shard, concatenated once at the end.
    key_parts: list[tuple[np.ndarray, int]] = []
    rec_parts: dict[str, list[tuple[np.ndarray, int]]] = {s: [] for s in SETS}
    fp_parts: list[tuple[np.ndarray, int]] = []
    shard_names: list[tuple[str, str]] = []
    run.backend = "ray" if _ray_ready() else "local"
    for res in map_shards(scan_shard, tasks, workers):
        run.pids.add(res.pid)
        sid = len(shard_names)
        shard_names.append((res.set_name, res.shard))
        run.shards[res.set_name] += 1
        run.bytes += res.bytes
        run.aggs[res.set_name].merge(res.agg)
        run.topk.merge(res.topk)
        run.checked.update(res.checked)
        run.finding_counts.update(res.finding_counts)
        room = MAX_FINDINGS - len(run.findings)
        run.findings.extend(res.findings[: max(0, room)])
        key_parts.append((res.key_hashes, sid))
        rec_parts[res.set_name].append((res.rec_hashes, sid))
        fp_parts.append((res.fp_hashes, sid))
        entry = expected.get((res.set_name, res.shard))
        if entry is not None:
            run.checked["shard_sha256"] += 1
            run.checked["sample_count"] += 1
            if entry.get("sha256") and entry["sha256"] != res.sha256:
                run.find("shard_sha256", f"sha256 {res.sha256[:16]}... != committed {str(entry['sha256'])[:16]}...",
                         set_name=res.set_name, shard=res.shard)
            if entry.get("bytes") is not None and int(entry["bytes"]) != res.bytes:
                run.find("shard_sha256", f"{res.bytes} bytes != committed {entry['bytes']}",
                         set_name=res.set_name, shard=res.shard)
            if entry.get("samples") is not None and int(entry["samples"]) != res.samples:
                run.find("sample_count", f"{res.samples} samples read != committed {entry['samples']}",
                         set_name=res.set_name, shard=res.shard)

    _run_wide_checks(run, key_parts, rec_parts, fp_parts, shard_names)
    return run


def _dups(parts: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Hashes that occur more than once, and for each occurrence its shard id."""
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    hashes = np.concatenate([a for a, _ in parts]) if parts else np.zeros(0, np.uint64)
    sids = np.concatenate([np.full(a.shape[0], s, np.int64) for a, s in parts])
    order = np.argsort(hashes, kind="stable")
    hashes, sids = hashes[order], sids[order]
    same = hashes[1:] == hashes[:-1]
    mask = np.zeros(hashes.shape[0], bool)
    mask[1:] |= same
    mask[:-1] |= same
    return hashes[mask], sids[mask]


def _names_for(run: RunScan, shard_names: list[tuple[str, str]], sids: Iterable[int], column: str,
               wanted: set[int]) -> dict[int, str]:
    """Resolve a few 64-bit hashes back to the strings they hash, from the involved indexes."""
    layout = OutLayout(run.out)
    found: dict[int, str] = {}
    for sid in sorted(set(int(s) for s in sids)):
        set_name, shard = shard_names[sid]
        try:
            values = layout.read_index(layout.ref(shard, ROOTS[set_name]), [column]).column(column).to_pylist()
        except Exception:  # noqa: BLE001 - an unreadable index is already a finding
            continue
        for v in values:
            if v is not None and (h := h64(str(v))) in wanted:
                found[h] = str(v)
        if len(found) == len(wanted):
            break
    return found


def _run_wide_checks(
    run: RunScan,
    key_parts: list[tuple[np.ndarray, int]],
    rec_parts: dict[str, list[tuple[np.ndarray, int]]],
    fp_parts: list[tuple[np.ndarray, int]],
    shard_names: list[tuple[str, str]],
) -> None:
    total = sum(a.shape[0] for a, _ in key_parts)
    run.checked["duplicate_keys"] += total
    hashes, sids = _dups(key_parts)
    if hashes.size:
        uniq = set(int(h) for h in np.unique(hashes)[:20])
        names = _names_for(run, shard_names, sids, "key", uniq)
        for h in sorted(uniq):
            where = sorted({"/".join(shard_names[int(s)]) for s, hh in zip(sids, hashes, strict=True) if int(hh) == h})
            if len(where) > 1:  # same-shard repeats were reported by the shard scan
                run.find("duplicate_keys", f"key appears in several shards: {', '.join(where)}", key=names.get(h))

    for set_name, parts in rec_parts.items():
        run.checked["recording_contiguity"] += sum(a.shape[0] for a, _ in parts)
        hashes, sids = _dups(parts)
        if hashes.size:
            uniq = set(int(h) for h in np.unique(hashes)[:20])
            names = _names_for(run, shard_names, sids, "recording_id", uniq)
            for h in sorted(uniq):
                where = sorted({shard_names[int(s)][1] for s, hh in zip(sids, hashes, strict=True) if int(hh) == h})
                run.find("recording_contiguity", f"recording split over shards {', '.join(where)}",
                         set_name=set_name, key=names.get(h))

    run.checked["duplicate_audio"] += sum(a.shape[0] for a, _ in fp_parts)
    hashes, sids = _dups(fp_parts)
    if hashes.size:
        uniq, counts = np.unique(hashes, return_counts=True)
        repeats = int((counts - 1).sum())
        names = _names_for(run, shard_names, sids, "audio_fp", set(int(h) for h in uniq[:20]))
        example = next(iter(names.values()), "?")
        # One finding line, counted once per repeated sample (the first copy is legitimate).
        run.find(
            "duplicate_audio",
            f"{repeats} kept samples repeat the exact audio of another kept sample ({uniq.size} distinct "
            f"clips), e.g. audio_fp {example[:16]}...",
            set_name="kept",
        )
        run.finding_counts["duplicate_audio"] += repeats - 1


# -- the audit.json document -----------------------------------------------------------------


def _hours(seconds: float) -> float:
    return round(seconds / 3600.0, 4)


def _summary_value(summary: dict[str, Any], *names: str) -> Any:
    for n in names:
        if summary.get(n) is not None:
            return summary[n]
    return None


def check_table(run: RunScan) -> dict[str, dict[str, Any]]:
    """Per integrity check: pass / fail / skipped, with counts."""
    table: dict[str, dict[str, Any]] = {}
    for check in CHECKS:
        failures = int(run.finding_counts.get(check, 0))
        checked = int(run.checked.get(check, 0))
        status = "fail" if failures else ("pass" if checked else "skipped")
        table[check] = {"status": status, "checked": checked, "failures": failures}
    return table


def build_document(run: RunScan) -> dict[str, Any]:
    """The audit.json document for one run (without comparison)."""
    kept, dropped = run.aggs["kept"], run.aggs["dropped"]
    summary = (run.manifest or {}).get("summary") or {}
    hours_in = _summary_value(summary, "hours_in")
    hours_in_source = "manifest.summary.hours_in"
    if hours_in is None:
        hours_in = _hours(kept.recording_seconds + dropped.recording_seconds)
        hours_in_source = "recording_duration_s of the samples present (recordings whose every segment was " \
            "dropped without keep_dropped, or quarantined, are not counted)"
    reasons = Counter(dropped.drop_reasons)
    reasons_source = "dropped/ samples"
    summary_reasons = _summary_value(summary, "drop_reasons", "dropped_by_reason")
    if isinstance(summary_reasons, dict) and sum(int(v) for v in summary_reasons.values()) > sum(reasons.values()):
        reasons = Counter({str(k): int(v) for k, v in summary_reasons.items()})
        reasons_source = "manifest.summary"
    sources: dict[str, dict[str, Any]] = {}
    for set_name, agg in run.aggs.items():
        for group, (n, secs) in agg.sources.items():
            row = sources.setdefault(group, {"source": group, "samples_kept": 0, "hours_kept": 0.0,
                                             "samples_dropped": 0, "hours_dropped": 0.0})
            row[f"samples_{set_name}"] += int(n)
            row[f"hours_{set_name}"] = round(row[f"hours_{set_name}"] + secs / 3600.0, 4)
    source_rows = sorted(sources.values(), key=lambda r: -(r["hours_kept"] + r["hours_dropped"]))
    checks = check_table(run)
    worst = []
    for metric, examples in run.topk.sorted().items():
        for ex in examples:
            worst.append({"metric": metric, "key": ex.key, "shard": ex.shard, "set": ex.set_name,
                          "value": ex.value, **{k: v for k, v in ex.info.items() if v is not None}})
    return {
        "out": str(run.out),
        "totals": {
            "hours_in": hours_in,
            "hours_in_source": hours_in_source,
            "hours_kept": _hours(kept.seconds),
            "hours_dropped_written": _hours(dropped.seconds),
            "samples_kept": kept.samples,
            "samples_dropped_written": dropped.samples,
            "samples_dropped": max(int(summary.get("segments_dropped") or 0), dropped.samples),
            "quarantined": run.quarantine.get("count"),
            "shards": dict(run.shards),
            "bytes": run.bytes,
        },
        "drop_reasons": dict(reasons.most_common()),
        "drop_reasons_source": reasons_source,
        "distributions": {s: {m: h.summary() for m, h in run.aggs[s].hists.items() if h.n} for s in SETS},
        "languages": {s: dict(run.aggs[s].languages.most_common()) for s in SETS},
        "speakers_per_recording": {str(k): v for k, v in sorted(kept.speakers_per_recording.items())},
        "sources": source_rows,
        "worst_examples": worst,
        "integrity": {
            "ok": all(c["status"] != "fail" for c in checks.values()),
            "checks": checks,
            "findings": run.findings,
            "findings_total": int(sum(run.finding_counts.values())),
        },
        "quarantine": run.quarantine,
        "scan": {"backend": run.backend, "worker_processes": len(run.pids),
                 **({"driver_scanned": os.getpid() in run.pids} if run.backend == "ray" else {})},
        "provenance": {s: dict(run.aggs[s].provenance.most_common()) for s in SETS},
        "config": run.config,
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def audit(out: Path, against: Path | None = None, *, workers: int | None = None, worst_k: int = 3) -> dict[str, Any]:
    """Audit an output folder and write ``OUT/audit/report.html`` and ``OUT/audit/audit.json``.

    Args:
        out: the run's output folder (``OUT`` of ``kimia-curate run``).
        against: another run's output folder to compare with (the baseline: changes are
            reported as baseline -> ``out``).
        workers: shard scans in flight (default: 2 x Ray CPUs on Ray, else min(4, cores)).
        worst_k: examples per metric (and per drop reason) to list with audio players.

    Returns:
        The audit.json document. ``doc["integrity"]["ok"]`` is False when any check failed.
    """
    from pipeline.audit.compare import compare_runs
    from pipeline.audit.report import render_html

    out = Path(out)
    run = scan_run(out, workers=workers, worst_k=worst_k)
    doc = build_document(run)
    doc["comparison"] = None
    if against is not None:
        base = scan_run(Path(against), workers=workers, worst_k=worst_k)
        doc["comparison"] = compare_runs(run, base, doc, build_document(base))
    doc = _jsonable(doc)
    audit_dir = OutLayout(out).audit_dir
    audit_dir.mkdir(parents=True, exist_ok=True)
    html = render_html(doc, run)
    tmp = audit_dir / f".report.html.tmp{os.getpid()}"
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, audit_dir / "report.html")
    tmp = audit_dir / f".audit.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str), encoding="utf-8")
    os.replace(tmp, audit_dir / "audit.json")
    return doc


__all__ = ["Example", "RunScan", "audit", "build_document", "map_shards", "scan_run"]

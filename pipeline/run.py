"""The main job: discover inputs, check models, stream through Ray, commit shards, summarise.

Order of events, chosen so that a mistake costs seconds, not hours:

1. the config is validated and every enabled stage's ``check()`` runs in the driver: a
   missing weight file or an impossible device fails here, before Ray starts;
2. the output's prior commits are read: committed sources are skipped (resume);
3. the Ray Data graph streams one recording row per input through the stages; the write
   stage, on the workers, commits each batch of finished recordings to OUT as it goes, and
   only a small outcome per recording reaches the driver (no audio); the quarantine table
   and manifest are derived from the ledger at the end.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.inputs import discover
from pipeline.guard import OutputLock, check_config_compatible, output_fingerprint, save_fingerprint, saved_fingerprint
from pipeline.ray_local import init_ray
from stages.base import KIND_TRANSIENT, RetryPolicy, Stage, StageContext, merge_cpu, merge_spans, plan_workers
from stages.decode import DecodeStage
from stages.filter import AudioFilterStage, FilterStage
from stages.quality import QualityStage, TranscriptQualityStage
from stages.roundtrip import RoundtripStage
from stages.segment import SegmentStage
from stages.transcribe import TranscribeStage
from stages.write import OutLayout, RecordingOutcome, Summary, WriteStage, summarize

log = logging.getLogger("kimia_curate")


class PreflightError(RuntimeError):
    """The run cannot start; the message says what to fix."""


def plan_stages(cfg: RunConfig, context: StageContext, out: Path | None = None, duplicates: Any = None) -> list[Stage]:
    """The enabled stages in pipeline order (decode and write always run).

    Segmentation is diarization when ``diarize.enabled``, else Silero VAD (``segment``). Then,
    by default (:func:`transcribe_after_audio_checks`, :func:`tokenize_after_filter`)::

        quality -> filter_audio -> transcribe -> [roundtrip] -> quality_text -> filter -> tokenize

    so that neither model spends time on a segment that is dropped anyway; with
    ``transcribe.kept_only: false`` and ``tokenize.kept_only: false`` the order is
    transcribe -> tokenize -> [roundtrip] -> quality -> filter.
    """
    from stages.diarize import DiarizeStage
    from stages.enhance import EnhanceStage
    from stages.tokenize import TokenizeStage

    stages: list[Stage] = [DecodeStage(cfg.decode, context)]
    if cfg.enhance.enabled:
        stages.append(EnhanceStage(cfg.enhance, context))
    if cfg.diarize.enabled:
        stages.append(DiarizeStage(cfg.diarize, context))
    elif cfg.segment.enabled:
        stages.append(SegmentStage(cfg.segment, context))
    else:
        raise PreflightError("both diarize and segment are disabled: enable one of them to cut recordings into segments")
    tokenize = [(cfg.tokenize, TokenizeStage)]
    after_filter = tokenize_after_filter(cfg)
    audio_first = transcribe_after_audio_checks(cfg)
    # A section that two stages share is copied for the second, so that sizing its pool
    # (size_pools sets num_workers in place) cannot size the other's.
    optional: list[tuple[Any, type[Stage]]] = [
        *([(cfg.quality, QualityStage), (cfg.filter.model_copy(), AudioFilterStage)] if audio_first else []),
        (cfg.transcribe, TranscribeStage),
        *([] if after_filter else tokenize),
        (cfg.roundtrip, RoundtripStage),
        (cfg.quality.model_copy(), TranscriptQualityStage) if audio_first else (cfg.quality, QualityStage),
        (cfg.filter, FilterStage),
        *(tokenize if after_filter else []),
    ]
    stages += [cls(section, context) for section, cls in optional if section.enabled]
    stages.append(WriteStage(
        cfg.write, context, out=str(out) if out else None,
        keep_dropped=cfg.filter.enabled and cfg.filter.keep_dropped, duplicates=duplicates,
    ))
    retry = RetryPolicy(retries=cfg.failures.retries, backoff_s=cfg.failures.backoff_s)
    for s in stages:
        s.retry = retry
        if s.config.device == "auto" and cfg.device != "auto":
            s.config.device = cfg.device
    return stages


def tokenize_after_filter(cfg: RunConfig) -> bool:
    """Whether tokenize runs after the filter, on the segments it keeps (``tokenize.kept_only``).

    Not when the filter is off (nothing is dropped) or when the round trip resynthesizes the
    tokens themselves (``roundtrip.mode: tokens``): its verdict is one of the filter's inputs.

    >>> from pipeline.config import RunConfig
    >>> cfg = RunConfig()
    >>> cfg.tokenize.enabled = True
    >>> tokenize_after_filter(cfg)
    True
    >>> cfg.roundtrip.detokenizer_model = "/models/Kimi-Audio-7B"
    >>> cfg.roundtrip.enabled, cfg.roundtrip.mode = True, "tokens"
    >>> tokenize_after_filter(cfg)
    False
    """
    if not (cfg.tokenize.enabled and cfg.tokenize.kept_only and cfg.filter.enabled):
        return False
    return not (cfg.roundtrip.enabled and cfg.roundtrip.mode == "tokens")


def transcribe_after_audio_checks(cfg: RunConfig) -> bool:
    """Whether quality and the filter's audio checks run before transcribe (``transcribe.kept_only``),
    which then leaves the segments they drop alone; the transcript's own signals are measured
    after it (``quality_text``) and the full filter runs as usual.

    >>> from pipeline.config import RunConfig
    >>> cfg = RunConfig()
    >>> transcribe_after_audio_checks(cfg)
    True
    >>> cfg.quality.enabled = False
    >>> transcribe_after_audio_checks(cfg)
    False
    """
    return cfg.transcribe.enabled and cfg.transcribe.kept_only and cfg.quality.enabled and cfg.filter.enabled


def preflight(cfg: RunConfig, stages: list[Stage]) -> None:
    """Cross-stage checks and every stage's own ``check()``, before any work."""
    enhanced = any(s.name == "enhance" for s in stages)
    for s in stages:
        # Only a stage that reads a waveform can miss the enhanced one. Quality is not checked
        # either: it measures the original where no enhanced stream exists (what is written),
        # which is also what enhance.when=noisy relies on.
        if "audio" not in s.reads or isinstance(s, QualityStage):
            continue
        stream = getattr(s.config, "input_stream", None) or getattr(s.config, "audio_field", "audio")
        if stream in ("enhanced", "audio_enhanced") and not enhanced:
            raise PreflightError(f"{s.name} reads the enhanced stream but the enhance stage is disabled (enhance.enabled)")
    for s in stages:
        s.check()


def _biggest_node_cpus(ray: Any) -> int:
    cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return max([c for c in cpus if c > 0], default=1)


def size_pools(stages: list[Stage], cluster: dict[str, float], node_cpus: int) -> dict[str, int]:
    """Resolve every ``num_workers: 0`` to the pool :func:`stages.base.plan_workers` sizes for
    this cluster, in place, so the same config fills a laptop and a 64-core node, and set each
    stage's :attr:`~stages.base.Stage.concurrency` (calls per worker) from
    :meth:`~stages.base.Stage.concurrent_calls`.

    Returns ``{stage: workers}`` for the stages it sized; logged at start-up.
    """
    sized = {}
    said = []
    for s in stages:
        s.concurrency = s.concurrent_calls(node_cpus) if s.uses_model else 1
        if s.config.num_workers == 0:
            s.config.num_workers = plan_workers(s, float(cluster.get("CPU", 1.0)), float(cluster.get("GPU", 0.0)), node_cpus)
            sized[s.name] = s.config.num_workers
            said.append(f"{s.name}={s.config.num_workers}" + (f" x{s.concurrency} calls" if s.concurrency > 1 else ""))
    if said:
        log.info("machine-sized pools: %s", ", ".join(said))
    return sized


#: Recordings per call with GPUs in the cluster, for ``ray.recordings_per_batch: 0``. Larger calls
#: give a GPU's model batches more segments to fill them; 2 is what every profile used before the
#: value was derived, and no GPU run here has measured a better one.
GPU_RECORDINGS_PER_BATCH = 2


def batch_recordings(requested: int, cluster: dict[str, float]) -> int:
    """Recordings per call of the per-segment stages: ``requested``, or, when it is 0, the
    cluster's size.

    Without GPUs, 1. On CPU a stage's throughput does not grow with its batch (measured for
    Whisper's windows and DNSMOS), while every recording added to a call delays the next stage
    by that recording's work and lengthens the run's tail, when the last call crosses the
    stages after the busiest one alone: the full local run on 8 minutes of speech took 101.7 s at
    1 recording per call and 112.0 s at 2 (``benchmarks/bench_speed.py``, 2 cores). With GPUs,
    :data:`GPU_RECORDINGS_PER_BATCH`. A call never splits a recording and windows are packed
    within one recording, so outputs are the same at any value.

    >>> batch_recordings(0, {"CPU": 2.0}), batch_recordings(0, {"CPU": 64.0, "GPU": 8.0}), batch_recordings(6, {})
    (1, 2, 6)
    """
    if requested:
        return requested
    return GPU_RECORDINGS_PER_BATCH if float(cluster.get("GPU", 0.0)) > 0 else 1


def check_resources(stages: list[Stage], cluster: dict[str, float]) -> None:
    """Refuse a plan whose actor pools cannot all be placed next to a task.

    Actors hold their CPUs and GPUs for the whole run; if they take everything, the task
    stages (decode, encode) never get scheduled and Ray Data waits forever. Catch that up
    front with a message that says which knobs to turn.
    """
    for res, attr in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        held = sum(getattr(s.config, attr) * s.config.num_workers for s in stages if s.uses_model)
        task_need = max((getattr(s.config, attr) for s in stages if not s.uses_model), default=0.0)
        have = float(cluster.get(res, 0.0))
        if held + task_need > have + 1e-9 and (held > 0 or task_need > 0):
            pools = ", ".join(
                f"{s.name}={getattr(s.config, attr):g}x{s.config.num_workers}"
                for s in stages if s.uses_model and getattr(s.config, attr)
            )
            raise PreflightError(
                f"actor pools hold {held:g} {res} ({pools}) and tasks need {task_need:g} more, but the cluster has "
                f"{have:g}: lower <stage>.{attr} or <stage>.num_workers (a logical share; threads are set separately)"
            )


def run(
    cfg: RunConfig,
    input_spec: str,
    output: str | Path,
    *,
    address: str | None = None,
    config_path: str = "<config>",
    progress: bool = True,
    retry_quarantined: bool = False,
    allow_config_change: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run the pipeline; returns the summary also written to ``OUT/manifest.json``.

    Args:
        retry_quarantined: process again the inputs whose committed outcome is a quarantine.
        allow_config_change: resume into an OUT started with a config that changes outputs
            (the fingerprint of ``pipeline.guard.output_fingerprint``).
        verbose: let the embedded Ray's workers log to the terminal, at INFO.

    The summary's ``failed`` lists every input of this run that ended for a reason other
    than bad input (quarantined as transient after its retries, or lost by the graph); the
    CLI exits non-zero when it is not empty.
    """
    t_start = time.perf_counter()
    out = Path(output).expanduser().resolve()
    context = StageContext(cache_dir=Path(cfg.models.cache_dir).expanduser(), config_path=config_path)
    stages = plan_stages(cfg, context, out)
    preflight(cfg, stages)
    sources = discover(input_spec)
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):  # one run per OUT: a second one fails here, before touching anything
        fingerprint = output_fingerprint(cfg.model_dump(mode="json"))
        check_config_compatible(out, fingerprint, allow_config_change)
        if saved_fingerprint(out) != fingerprint:
            save_fingerprint(out, fingerprint)
        return _run_locked(cfg, sources, stages, out, address, t_start, progress, retry_quarantined, verbose)


def _run_locked(
    cfg: RunConfig, sources: list[Any], stages: list[Stage], out: Path, address: str | None,
    t_start: float, progress: bool, retry_quarantined: bool, verbose: bool,
) -> dict[str, Any]:
    layout = OutLayout(out)
    layout.write_config(cfg.to_yaml())
    removed = layout.sweep()  # remains of a killed run: shards no ledger entry names
    if removed:
        log.info("removed %d uncommitted files left by an interrupted run", len(removed))
    done = {o.source for o in layout.iter_latest_outcomes() if not (retry_quarantined and o.status == "quarantined")}
    todo = [s for s in sources if s.uri not in done]
    skipped = len(sources) - len(todo)
    if skipped:
        print(f"resume: {skipped} of {len(sources)} inputs already committed in {out}", file=sys.stderr)
    # Only sums, the failures and the sources seen are kept: driver memory stays flat.
    this_run = Summary()
    failed: list[dict[str, Any]] = []
    seen: set[str] = set()
    lost: list[dict[str, Any]] = []
    first_commit_s: float | None = None
    ray_start_s: float | None = None
    spans: dict[str, list[float]] = {}  # per stage: first call's start, last call's end (epoch s)
    cpu: dict[str, dict[str, float]] = {}  # per stage and worker process: CPU seconds
    if todo:
        t_ray = time.perf_counter()
        init_ray(cfg, address, verbose=verbose)
        ray_start_s = time.perf_counter() - t_ray
        import ray

        cluster = ray.cluster_resources()
        size_pools(stages, cluster, _biggest_node_cpus(ray))
        if not (address or cfg.ray.address or os.environ.get("RAY_ADDRESS")):
            check_resources(stages, cluster)  # an autoscaling cluster may grow: local only
        from pipeline.graph import build_dataset, duplicate_registry, iter_rows

        writer = stages[-1]
        assert isinstance(writer, WriteStage)
        writer.duplicates = duplicate_registry(str(out))
        items = [{"source": s.uri, "source_meta": s.meta, "status": "ok"} for s in todo]
        per_call = batch_recordings(cfg.ray.recordings_per_batch, cluster)
        if not cfg.ray.recordings_per_batch:
            log.info("machine-sized batches: %d recording(s) per call of a per-segment stage", per_call)
        ds = build_dataset(items, stages, parallelism=min(len(items), 200),
                           recordings_per_batch=per_call, verbose=verbose)
        bar = _progress(len(todo), progress)
        for row in iter_rows(ds):
            if first_commit_s is None:
                first_commit_s = time.perf_counter() - t_start
            outcome: RecordingOutcome = row["outcome"]
            spans = merge_spans(spans, row.get("spans"))
            cpu = merge_cpu(cpu, row.get("cpu"))
            this_run.add(outcome)
            seen.add(outcome.source)
            failed.extend(q for q in outcome.quarantine if q.get("kind") == KIND_TRANSIENT)
            bar.update(1)
        bar.close()
        lost = [{"source": s.uri, "stage": "pipeline", "error": "no output arrived"} for s in todo if s.uri not in seen]
        for item in lost:  # never committed, never silent: the next run redoes them
            log.error("no outcome for %s", item["source"])
    layout.write_quarantine(layout.quarantine_records())
    wall = time.perf_counter() - t_start
    summary = summarize(layout.iter_latest_outcomes())
    run_summary = this_run.result()
    run_summary["failed"] = lost + failed
    run_summary["wall_seconds"] = round(wall, 3)
    run_summary["first_commit_seconds"] = None if first_commit_s is None else round(first_commit_s, 3)
    audio_s = run_summary["hours_in"] * 3600
    run_summary["end_to_end_rtf"] = round(wall / audio_s, 5) if audio_s else None
    started = time.time() - wall  # the run's start on this clock, for the stages' spans
    run_summary["profile"] = stage_profile(run_summary["stage_seconds"], stages, wall, audio_s,
                                           {k: (a - started, b - started) for k, (a, b) in spans.items()},
                                           {k: sum(v.values()) for k, v in cpu.items()})
    # Part of the overhead, measured on its own: starting (or joining) Ray.
    run_summary["profile"]["ray_start_s"] = None if ray_start_s is None else round(ray_start_s, 3)
    summary["this_run"] = run_summary
    summary["failed"] = run_summary["failed"]
    summary["config_hash"] = cfg.config_hash()
    summary["profile"] = cfg.profile
    layout.write_manifest(summary)
    return summary


def stage_profile(
    stage_seconds: dict[str, float], stages: list[Stage], wall: float, audio_s: float,
    spans: dict[str, tuple[float, float]] | None = None, cpu: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Where the time of a run went: each stage's busy time, and what the framework added.

    A stage's *busy* time is the compute its workers spent on this run's recordings (a
    worker running several calls at once, :attr:`~stages.base.Stage.concurrency`, counts
    each). Stages run side by side, each on its pool of ``num_workers`` workers, so no run can
    be shorter than its busiest stage's busy time divided by its workers' calls at once: that
    is the *busiest path*.
    What the wall time adds to it (start-up, model loads, scheduling, waiting between
    stages) is reported as ``overhead_s``: the part a user can only win back from the
    framework, not from faster models.

    ``spans`` (seconds from the run's start: each stage's first call's start and last call's
    end) split the overhead into where it lies: ``first_call_s``, the time before any stage
    began (Ray start-up, worker processes, model loads), and ``tail_s``, the time after the
    busiest stage's last call (the stages behind it finishing the last batch, the commit).
    Spans come from each node's clock; on a cluster they are as good as its clock sync.

    ``cpu`` (seconds, per stage) is, for a model stage, the CPU time of its worker processes,
    their start-up and model loading included, and for a task stage, which shares its
    processes with other stages, the CPU time of its calls (:meth:`stages.base.Stage.cpu_reading`);
    reported as ``cpu_s`` and ``cpu_rtf``. Busy time also counts the time a call waited for a
    core, so on a machine the stages share, CPU time is the figure that says what a stage costs.

    >>> class S:  # a stand-in for a Stage: a name and a config with num_workers
    ...     def __init__(self, name, workers): self.name, self.config = name, type("C", (), {"num_workers": workers})
    >>> p = stage_profile({"decode": 2.0, "transcribe": 30.0}, [S("decode", 2), S("transcribe", 1)], 40.0, 200.0)
    >>> p["stages"]["transcribe"], p["busiest"], p["overhead_s"], p["overhead_share"]
    ({'busy_s': 30.0, 'workers': 1, 'rtf': 0.15, 'share_of_wall': 0.75}, 'transcribe', 10.0, 0.25)
    >>> p = stage_profile({"decode": 2.0, "transcribe": 30.0}, [S("decode", 2), S("transcribe", 1)], 40.0, 200.0,
    ...                   {"decode": (5.0, 8.0), "transcribe": (6.5, 37.0)})
    >>> p["stages"]["transcribe"]["first_s"], p["first_call_s"], p["tail_s"]
    (6.5, 5.0, 3.0)
    >>> p = stage_profile({"transcribe": 30.0}, [S("transcribe", 1)], 40.0, 200.0, cpu={"transcribe": 24.0})
    >>> p["stages"]["transcribe"]["cpu_s"], p["stages"]["transcribe"]["cpu_rtf"]
    (24.0, 0.12)
    """
    workers = {s.name: int(s.config.num_workers) for s in stages}
    calls = {s.name: int(getattr(s, "concurrency", 1)) for s in stages}
    out: dict[str, Any] = {"stages": {}}
    spans = spans or {}
    for name, busy in stage_seconds.items():
        out["stages"][name] = {
            "busy_s": round(busy, 3),
            "workers": workers.get(name, 1),
            "rtf": round(busy / audio_s, 5) if audio_s else None,
            "share_of_wall": round(busy / wall, 4) if wall else None,
        }
        if calls.get(name, 1) > 1:
            out["stages"][name]["calls_per_worker"] = calls[name]
        if name in spans:
            out["stages"][name].update(first_s=round(spans[name][0], 3), last_s=round(spans[name][1], 3))
        if cpu and name in cpu:
            out["stages"][name].update(cpu_s=round(cpu[name], 3), cpu_rtf=round(cpu[name] / audio_s, 5) if audio_s else None)
    path = {name: busy / max(1, workers.get(name, 1) * calls.get(name, 1)) for name, busy in stage_seconds.items()}
    busiest = max(path, key=path.__getitem__) if path else None
    overhead = max(0.0, wall - (path[busiest] if busiest else 0.0))
    out.update(busiest=busiest, overhead_s=round(overhead, 3), overhead_share=round(overhead / wall, 4) if wall else None)
    if spans:
        out["first_call_s"] = round(max(0.0, min(a for a, _ in spans.values())), 3)
    if busiest in spans:
        out["tail_s"] = round(max(0.0, wall - spans[busiest][1]), 3)
    return out


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="recordings committed", unit="rec", disable=not enabled, file=sys.stderr)


def overhead_parts(profile: dict[str, Any]) -> list[str]:
    """Where a run's overhead lies, in words: before the first stage call, and after the busiest.

    >>> overhead_parts({"ray_start_s": 4.4, "first_call_s": 11.7, "busiest": "transcribe",
    ...                 "stages": {"transcribe": {"first_s": 20.9}}, "tail_s": 6.8})
    ['Ray start-up 4.4 s of it', 'first stage call after 11.7 s, transcribe from 20.9 s', '6.8 s after its last call']
    """
    parts = []
    if profile.get("ray_start_s") is not None:
        parts.append(f"Ray start-up {profile['ray_start_s']:.1f} s of it")
    if profile.get("first_call_s") is not None:
        busiest = (profile.get("stages") or {}).get(profile.get("busiest") or "", {})
        parts.append(f"first stage call after {profile['first_call_s']:.1f} s"
                     + (f", {profile['busiest']} from {busiest['first_s']:.1f} s" if "first_s" in busiest else ""))
    if profile.get("tail_s") is not None:
        parts.append(f"{profile['tail_s']:.1f} s after its last call")
    return parts


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable end-of-run summary."""
    r = summary["this_run"]
    lines = [
        f"recordings: {r['recordings']} this run ({json.dumps(r['recordings_by_status'])}); "
        f"{summary['recordings']} in the output",
        f"hours in: {r['hours_in']:.4f}  hours kept: {r['hours_kept']:.4f}  "
        f"segments kept: {r['segments_kept']}  dropped: {r['segments_dropped']}",
        f"wall: {r['wall_seconds']:.1f} s  end-to-end RTF: {r['end_to_end_rtf']}"
        + (f"  first commit after {r['first_commit_seconds']:.1f} s" if r.get("first_commit_seconds") else ""),
    ]
    profile = r.get("profile") or {}
    if profile.get("stages"):
        lines.append("per stage (busy s, RTF, share of wall): " + ", ".join(
            f"{k} {v['busy_s']:.1f}s/{v['rtf']}/{100 * (v['share_of_wall'] or 0):.0f}%"
            for k, v in profile["stages"].items()
        ))
        used = {k: v for k, v in profile["stages"].items() if v.get("cpu_s") is not None}
        if used:
            lines.append("CPU (s, RTF; a model stage's worker processes, start-up included; a task stage's calls): " + ", ".join(
                f"{k} {v['cpu_s']:.1f}s/{v['cpu_rtf']}" for k, v in used.items()))
        lines.append(f"framework overhead: {profile['overhead_s']:.1f} s ({100 * (profile['overhead_share'] or 0):.0f}% "
                     f"of wall; wall minus the busiest stage, {profile['busiest']}, over its parallel calls"
                     + "".join(f"; {part}" for part in overhead_parts(profile)) + ")")
    if r["drop_reasons"]:
        lines.append("dropped by reason: " + ", ".join(f"{k}={v}" for k, v in r["drop_reasons"].items()))
    if r.get("failed"):
        lines.append(f"FAILED (not bad input; re-run with --retry-quarantined): {len(r['failed'])} inputs: " + ", ".join(
            f"{f['source']} [{f['stage']}: {f['error']}]" for f in r["failed"][:5]
        ) + (" ..." if len(r["failed"]) > 5 else ""))
    if r.get("runtimes"):
        lines.append("models ran as (stage: device dtype attention (segments)): " + ", ".join(
            f"{k} ({v})" for k, v in r["runtimes"].items()))
    if r.get("labellers"):
        lines.append("labelled by: " + ", ".join(f"{k}={v}" for k, v in r["labellers"].items()))
    if r["quarantine_reasons"]:
        lines.append("quarantined by reason: " + ", ".join(f"{k}={v}" for k, v in r["quarantine_reasons"].items()))
    return "\n".join(lines)

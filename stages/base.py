"""The stage contract every kimia-curate stage follows.

A stage is a small class that knows nothing of Ray: it declares the columns it reads and
writes, the resources one worker needs, loads its models once in :meth:`Stage.setup`, and
maps a batch of row dicts to a batch of row dicts in :meth:`Stage.process_batch`. The
pipeline (``pipeline/graph.py``) wraps it in a Ray Data actor pool or task; tests call it
on a plain list of rows.

Rows are plain ``dict`` objects (see ``stages/rows.py`` for the fields). A stage works at one
of two levels (:attr:`Stage.level`): ``"recording"`` stages (decode, enhance, segmentation,
write) map recording rows; ``"segment"`` stages (transcribe, tokenize, roundtrip, quality,
filter) are written against segment rows, and :meth:`Stage.__call__` hands them the
segments of the recordings it receives as views (slices of the recording's audio, no copy)
and folds their output back into each recording. Such a stage also accepts segment rows
directly (tests, tools). A batch of segments is always cut between recordings, never inside
one, so what a recording gets never depends on its neighbours in the batch.

Every row carries a ``status``:

* ``"ok"``: a recording or segment the stage should process;
* ``"quarantined"``: an input that failed; carries ``error`` and ``failed_stage``. Stages
  never see these rows: :meth:`Stage.__call__` passes them through untouched so the writer
  can record them;
* ``"empty"``: a recording that produced no segments (silence); passed through likewise.

:meth:`Stage.__call__` also isolates failures: when a batch raises, it retries the rows one
by one and quarantines only the rows that still fail, so one corrupt input never costs the
rest of its batch. It stamps provenance (model id, config hash and, for model stages, the
device, dtype and attention the model runs with) and per-stage compute time on every row
it returns.

Example:
    >>> class Upper(Stage):
    ...     name = "upper"
    ...     reads = ("text",)
    ...     writes = ("text",)
    ...     uses_model = False
    ...     def process_batch(self, rows):
    ...         return [{**r, "text": r["text"].upper()} for r in rows]
    >>> out = Upper(StageConfig())([{"recording_id": "r1", "status": "ok", "text": "hi"}])
    >>> out[0]["text"], out[0]["provenance"]["upper"]["model"]
    ('HI', 'none')
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
import traceback
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from stages.rows import fold_segments, segment_views

Row = dict[str, Any]

STATUS_OK = "ok"
STATUS_QUARANTINED = "quarantined"
STATUS_EMPTY = "empty"


class StageConfig(BaseModel):
    """Fields every stage section of the config has.

    Subclass per stage (``class TranscribeConfig(StageConfig)``) and add the stage's own
    parameters with their defaults and bounds in one place, the way pyannote declares its
    hyper-parameters: the YAML profile, ``--set`` overrides and docs all read from here.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    enabled: bool = Field(True, description="Run this stage at all.")
    batch_size: int = Field(
        8, ge=1, le=4096,
        description="Per-segment stages: segments per model call (cut between whole recordings; "
        "ray.recordings_per_batch sets recordings per call). Recording-level stages: recordings per call.",
    )
    num_workers: int = Field(
        0, ge=0, le=4096,
        description="Actors in this stage's pool (model stages) or task concurrency; 0 = sized to the "
        "cluster Ray sees (stages.base.plan_workers: GPUs / num_gpus on GPU, else the stage's share of the "
        "CPUs over its threads per worker). Never changes outputs.",
    )
    num_cpus: float = Field(1.0, gt=0, le=512, description="CPUs reserved per worker.")
    num_gpus: float = Field(
        0.0, ge=0, le=16, description="GPUs per worker; fractions pack several workers on one GPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = cuda when num_gpus > 0 and a GPU is visible, else cpu."
    )

    def config_hash(self) -> str:
        """A short, stable hash of this section, recorded in every sample's provenance."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


#: Most intra-op threads a ``0`` (machine-sized) thread setting resolves to: past this one
#: model call gains little, and a bigger node is better used by more workers.
MAX_AUTO_THREADS = 8


def node_cpus() -> int:
    """CPUs of this node as Ray sees them (its ``CPU`` resource), else the ones this process may use.

    Inside a Ray worker or a driver with Ray started, that is the node's ``CPU`` resource
    (``ray.num_cpus`` for the embedded Ray, the node's ``--num-cpus`` on a cluster); outside
    Ray it is the process's CPU affinity.
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            here = ray.get_runtime_context().get_node_id()
            for node in ray.nodes():
                if node.get("NodeID") == here and node.get("Resources", {}).get("CPU"):
                    return max(1, int(node["Resources"]["CPU"]))
        except Exception:  # noqa: BLE001 - a transient GCS hiccup: fall back to the OS view
            pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def machine_threads(requested: int, cpus: int | None = None) -> int:
    """Intra-op threads for one model worker: ``requested``, or for 0 the node's CPUs (<= 8).

    A thread count never changes what a stage outputs (batches and threads only change
    speed), so a config with ``0`` gives the same labels on any machine while using a
    2-core laptop and a 32-core node alike. ``cpus`` names the node's CPUs when they are
    known (the driver sizing pools); by default they are looked up (:func:`node_cpus`).

    >>> machine_threads(3), machine_threads(0, cpus=64), machine_threads(0, cpus=2)
    (3, 8, 2)
    >>> 1 <= machine_threads(0) <= MAX_AUTO_THREADS
    True
    """
    if requested > 0:
        return requested
    return min(node_cpus() if cpus is None else cpus, MAX_AUTO_THREADS)


def plan_workers(stage: Stage, cpus: float, gpus: float, node_cpus: int) -> int:
    """Workers for a stage whose ``num_workers`` is 0: the pool that fills its part of the cluster.

    * A GPU stage (``num_gpus > 0`` and GPUs present): as many workers as its GPU fraction
      fits, ``GPUs // num_gpus``.
    * A CPU model stage: its share of the cluster's CPUs (``Stage.cpu_share``, the part of a
      full run's CPU time it takes) divided by the threads one of its workers runs. The shares
      of the model stages add up to about 1, so on 2 cores every pool has one worker (more
      would only oversubscribe) and on 64 the pools together run about 64 threads.
    * A task stage (decode, filter, write): one task per CPU.

    Always at least 1: below about 16 CPUs every model stage keeps one worker, whose
    machine-sized threads (0 = the node's CPUs, at most 8) let whichever stage is busy use the
    whole machine. ``node_cpus`` is the biggest node's CPU count, which those thread settings
    resolve against.

    >>> class T:  # a stand-in: transcribe with 0 threads (= node CPUs, at most 8)
    ...     uses_model, cpu_share = True, 0.4
    ...     config = type("C", (), {"num_gpus": 0.0, "num_cpus": 0.5})()
    ...     def worker_threads(self, node_cpus): return min(node_cpus, MAX_AUTO_THREADS)
    >>> plan_workers(T(), 2, 0, 2), plan_workers(T(), 64, 0, 64), plan_workers(T(), 64, 0, 16)
    (1, 3, 3)
    """
    cfg = stage.config
    if cfg.num_gpus > 0 and gpus > 0:
        return max(1, int(gpus // cfg.num_gpus))
    if not stage.uses_model:
        return max(1, int(cpus))
    threads = max(1, stage.worker_threads(node_cpus))
    return max(1, int(cpus * stage.cpu_share / threads))


def merge_spans(*spans: dict[str, Any] | None) -> dict[str, list[float]]:
    """Per stage, the earliest start and latest end of several ``{stage: (start, end)}`` maps.

    >>> merge_spans({"asr": (5.0, 9.0)}, None, {"asr": (2.0, 6.0), "vad": (1.0, 2.0)})
    {'asr': [2.0, 9.0], 'vad': [1.0, 2.0]}
    """
    out: dict[str, list[float]] = {}
    for m in spans:
        for stage, (start, end) in (m or {}).items():
            have = out.get(stage)
            out[stage] = [float(start), float(end)] if have is None else [min(have[0], start), max(have[1], end)]
    return out


def merge_cpu(*maps: dict[str, dict[str, float]] | None) -> dict[str, dict[str, float]]:
    """Per stage and worker process, the largest of several CPU-seconds readings.

    A stage's worker stamps each row it returns with a reading that only grows
    (``{stage: {"host:pid": seconds}}``, :meth:`Stage.cpu_reading`); the largest reading of a worker
    is its total for the run, and a stage's CPU is the sum over its workers. Unlike busy
    time, it does not grow while a worker waits for a core.

    >>> merge_cpu({"asr": {"h:1": 5.0}}, None, {"asr": {"h:1": 9.0, "h:2": 4.0}, "vad": {"h:3": 1.0}})
    {'asr': {'h:1': 9.0, 'h:2': 4.0}, 'vad': {'h:3': 1.0}}
    """
    out: dict[str, dict[str, float]] = {}
    for m in maps:
        for stage, workers in (m or {}).items():
            have = out.setdefault(stage, {})
            for worker, seconds in workers.items():
                have[worker] = max(have.get(worker, 0.0), float(seconds))
    return out


#: CPU seconds this process has spent inside task stages' calls, per stage instance of a run
#: (:meth:`Stage.cpu_reading`).
_CALL_CPU: dict[str, float] = {}


def runtime_label(device: str, dtype: Any, attention: str) -> str:
    """How a model runs, in one provenance string: ``"cuda bfloat16 flash_attention_2"``.

    Precision and attention kernel are chosen per machine (bf16 and flash-attn where the GPU
    and packages allow, fp32 and SDPA on CPU), so one config can run with other numerics on
    two nodes; the string lets a run's summary and every sample say which ones ran.
    ``attention`` is ``"none"`` for models without attention (LSTMs, CNNs).

    >>> runtime_label("cuda:0", "torch.bfloat16", "sdpa")
    'cuda bfloat16 sdpa'
    """
    return f"{str(device).split(':')[0]} {str(dtype).removeprefix('torch.')} {attention}"


def joined_runtime(*labels: str | None) -> str | None:
    """One runtime for a stage that runs several models: their labels in order, each once.

    >>> joined_runtime("cpu float32 sdpa", None, "cpu float32 sdpa", "cpu int8 ctranslate2")
    'cpu float32 sdpa + cpu int8 ctranslate2'
    >>> joined_runtime(None) is None
    True
    """
    return " + ".join(dict.fromkeys(label for label in labels if label)) or None


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage asks the scheduler for."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class StageContext:
    """Run-wide facts a stage may need besides its own section.

    Attributes:
        cache_dir: where model references resolve and where derived weights are staged.
        config_path: the YAML the run was started with, named in error messages.
    """

    cache_dir: Path = Path.home() / ".cache" / "kimia-curate"
    config_path: str = "<config>"


class StageError(RuntimeError):
    """Bad input (undecodable, empty, unsupported): permanent, quarantined at once, never retried."""


class TransientError(RuntimeError):
    """A failure that may pass (a file briefly unreadable, a resource busy): retried with backoff.

    Any exception that is not a :class:`StageError` is treated the same way; this class only
    lets a stage say so explicitly while keeping its own message.
    """


#: Quarantine kinds: ``bad_input`` is final; ``transient`` ran out of retries and is re-run by
#: ``--retry-quarantined``.
KIND_BAD_INPUT = "bad_input"
KIND_TRANSIENT = "transient"


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how patiently, a row that failed for a non-input reason is tried again.

    Attributes:
        retries: further attempts after the first (0 = quarantine on the first failure).
        backoff_s: wait before the first retry; doubled before each later one.
    """

    retries: int = 2
    backoff_s: float = 0.5

    def delays(self) -> list[float]:
        """The waits before each retry.

        >>> RetryPolicy(retries=3, backoff_s=0.5).delays()
        [0.5, 1.0, 2.0]
        """
        return [self.backoff_s * 2**k for k in range(self.retries)]


class Stage(ABC):
    """Base class of all stages.

    Class attributes:
        name: the stage's name, its provenance key and, unless ``section`` says otherwise, its
            config section.
        section: the config section it reads, where a second stage shares another's
            (``filter_audio`` reads ``filter``, ``quality_text`` reads ``quality``).
        reads / writes: the row fields it consumes and produces (documentation and checks).
        fanout: True when one input row becomes zero or more output rows (recording to
            segments); the pipeline then never fuses it with a non-fan-out stage.
        uses_model: True for stages that load a model in :meth:`setup`; those run in an
            actor pool (one model load per worker), the rest as stateless tasks.
        level: ``"recording"``: :meth:`process_batch` gets recording rows;
            ``"segment"``: it gets segment views (see the module docstring).
        cpu_share: the part of a full local run's CPU time this stage takes (measured by
            ``benchmarks/bench_speed.py``); a machine-sized pool (``num_workers: 0``) gets
            that share of the cluster's CPUs (:func:`plan_workers`).

    Instance attribute:
        concurrency: calls one worker runs at once; 1 unless the pipeline, sizing the pools
            (``pipeline.run.size_pools``), set it from :meth:`concurrent_calls`. It travels
            with the stage to its workers, so :meth:`setup` can size its model for it.
    """

    name: ClassVar[str]
    section: ClassVar[str | None] = None
    level: ClassVar[Literal["recording", "segment"]] = "segment"
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    fanout: ClassVar[bool] = False
    uses_model: ClassVar[bool] = True
    cpu_share: ClassVar[float] = 0.1

    def __init__(self, config: StageConfig, context: StageContext | None = None) -> None:
        self.config = config
        self.context = context or StageContext()
        self.retry = RetryPolicy()
        self.concurrency = 1
        self._ready = False
        # Made in the driver and pickled with the stage to every worker: one run's calls of
        # this stage add up in a worker process, apart from any other run's (Ray reuses them).
        self._cpu_counter = f"{self.name}:{uuid.uuid4().hex}"

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self) -> None:
        """Load models once per worker. Called lazily before the first batch."""

    def check(self) -> None:
        """Fail fast, before any work, when the stage cannot run (missing weights, bad device).

        Runs in the driver at start-up, so it must be cheap: check files, not load models.
        """

    @abstractmethod
    def process_batch(self, rows: list[Row]) -> list[Row]:
        """Map ``status == "ok"`` rows to output rows.

        Raise :class:`StageError` (or any exception) for input-specific failures: the
        caller isolates the failing row and quarantines it.
        """

    @classmethod
    def config_section(cls) -> str:
        """The config section this stage reads (``section``, else ``name``)."""
        return cls.section or cls.name

    def takes(self, row: Row) -> bool:
        """Whether this stage works on ``row``, an ok row; every row unless a stage says otherwise.

        A row it does not take passes through as it came, with no provenance or time from this
        stage: how a stage placed after the filter leaves the segments it dropped alone
        (``tokenize.kept_only``), so no model time goes into samples that are never trained on.
        """
        return True

    def model_id(self) -> str:
        """The model this stage ran, as recorded in provenance ("none" for model-free stages)."""
        return "none"

    def worker_threads(self, node_cpus: int) -> int:
        """Threads one worker computes with on a node of ``node_cpus`` CPUs.

        Ray gives an actor ``OMP_NUM_THREADS = max(1, int(num_cpus))``; stages with their own
        thread setting (``cpu_threads``, ``torch_threads``, ``onnx_threads``) override this.
        """
        return max(1, int(self.config.num_cpus))

    def concurrent_calls(self, node_cpus: int) -> int:
        """Batches one worker should run at once on a node of ``node_cpus`` CPUs.

        1 for nearly every stage: its library spreads one batch over the worker's threads.
        A stage whose model gains more from a second batch beside the first than from a
        second thread on the same batch (CTranslate2's Whisper decoding) returns more; the
        pipeline then lets each of its actors run that many calls at once, and
        :meth:`setup` finds the number in :attr:`concurrency`. Each call is still one
        machine-independent batch, so outputs never depend on it.
        """
        return 1

    def runtime(self) -> str | None:
        """Device, dtype and attention of the loaded model (:func:`runtime_label`), or None.

        Recorded in provenance beside the model id, since the same weights give slightly
        different outputs in bf16 and fp32; None for model-free stages and before setup.
        """
        return None

    @property
    def resources(self) -> Resources:
        return Resources(num_cpus=self.config.num_cpus, num_gpus=self.config.num_gpus)

    def resolve_device(self) -> str:
        """The torch device string this worker should use."""
        if self.config.device != "auto":
            return self.config.device
        if self.config.num_gpus > 0:
            try:
                import torch

                if torch.cuda.is_available():
                    return "cuda"
            except ImportError:  # pragma: no cover - torch is a hard dependency
                pass
        return "cpu"

    # -- the call the pipeline makes ---------------------------------------------------------
    def __call__(self, rows: list[Row]) -> list[Row]:
        if len(rows) == 0:
            return []
        if not self._ready:
            self.setup()
            self._ready = True
        if self.level == "segment" and any("segments" in r for r in rows):
            return [self._recording_out(r, views) for r, views in self._segment_batches(rows)]
        return self._call_rows(rows)

    def _segment_batches(self, recordings: list[Row]) -> list[tuple[Row, list[Row]]]:
        """Run the segments of ``recordings`` in batches of whole recordings.

        A batch is closed once it holds ``batch_size`` segments or more, always between two
        recordings, so a recording's segments are processed together whatever the batch size.
        """
        pending: list[tuple[Row, list[Row]]] = []
        done: list[tuple[Row, list[Row]]] = []
        count = 0

        def flush() -> None:
            nonlocal count
            out = self._call_rows([v for _, views in pending for v in views])
            owner = {(rec.get("recording_id"), rec.get("source")): n for n, (rec, _) in enumerate(pending)}
            by_rec: dict[int, list[Row]] = {}
            for row in out:  # quarantine records keep recording_id and source too
                by_rec.setdefault(owner[(row.get("recording_id"), row.get("source"))], []).append(row)
            done.extend((rec, by_rec.get(n, [])) for n, (rec, _) in enumerate(pending))
            pending.clear()
            count = 0

        for rec in recordings:
            views = segment_views(rec) if rec.get("status", STATUS_OK) == STATUS_OK and "segments" in rec else []
            if not views:
                done.append((rec, []))
                continue
            pending.append((rec, views))
            count += len(views)
            if count >= self.config.batch_size:
                flush()
        if pending:
            flush()
        order = {id(rec): n for n, rec in enumerate(recordings)}
        return sorted(done, key=lambda item: order[id(item[0])])

    @staticmethod
    def _recording_out(rec: Row, views: list[Row]) -> Row:
        """Fold a recording's processed views back; a transient failure fails the recording.

        A recording is committed whole or not at all: when one of its segments ran out of
        retries for a passing reason, the recording becomes a transient quarantine record
        (re-run whole by ``--retry-quarantined``) instead of being written without it.
        """
        if not views:
            return rec
        out = fold_segments(rec, views)
        failed = next((s for s in out["segments"] if s.get("error_kind") == KIND_TRANSIENT), None)
        if failed is None:
            return out
        keep = ("recording_id", "source", "duration_s", "sample_rate", "source_meta", "timings", "provenance", "spans",
                "cpu")
        return {
            **{k: out[k] for k in keep if k in out},
            "status": STATUS_QUARANTINED,
            **{k: failed[k] for k in ("failed_stage", "error_kind", "attempts", "error", "error_detail") if k in failed},
            "segment_index": failed.get("segment_index"),
        }

    def _call_rows(self, rows: list[Row]) -> list[Row]:
        """The batch as given: failures isolated row by row, provenance and time stamped."""
        taken = [r.get("status", STATUS_OK) == STATUS_OK and self.takes(r) for r in rows]
        todo = [r for r, t in zip(rows, taken) if t]
        passthrough = [r for r, t in zip(rows, taken) if not t]
        if not todo:
            return rows
        t0, c0, started = time.perf_counter(), time.process_time(), time.time()
        try:
            out = self.process_batch(todo)
        except Exception:  # noqa: BLE001 - isolate the bad row(s) below
            out = []
            for row in todo:
                out.extend(self._process_one(row))
        elapsed = time.perf_counter() - t0
        self._stamp(out, started, elapsed, time.process_time() - c0)
        # Keep input order: pass-through rows go first; their order relative to processed
        # rows carries no meaning (they belong to other recordings).
        return passthrough + out

    def _process_one(self, row: Row) -> list[Row]:
        """One row alone: bad input is quarantined at once, anything else retried with backoff."""
        delays = self.retry.delays()
        for attempt in range(len(delays) + 1):
            try:
                return self.process_batch([row])
            except StageError as exc:
                return [self.quarantine(row, exc)]
            except Exception as exc:  # noqa: BLE001 - transient until retries run out
                if attempt == len(delays):
                    return [self.quarantine(row, exc, kind=KIND_TRANSIENT, attempts=attempt + 1)]
                time.sleep(delays[attempt])
        raise AssertionError("unreachable")  # pragma: no cover

    def quarantine(self, row: Row, exc: BaseException, *, kind: str = KIND_BAD_INPUT, attempts: int = 1) -> Row:
        """Turn a row into a quarantine record that keeps what identifies the input.

        ``kind`` is ``bad_input`` for a :class:`StageError` and ``transient`` for anything
        that still failed after ``attempts`` tries; the run's exit code and
        ``--retry-quarantined`` tell the two apart.
        """
        keep = ("recording_id", "source", "duration_s", "sample_rate", "segment_index")
        message = str(exc) if isinstance(exc, StageError) else f"{type(exc).__name__}: {exc}"
        rec: Row = {k: row[k] for k in keep if k in row}
        rec.update(
            status=STATUS_QUARANTINED,
            failed_stage=self.name,
            error_kind=kind,
            attempts=attempts,
            error=message.strip().splitlines()[0][:500] if message.strip() else type(exc).__name__,
            error_detail="".join(traceback.format_exception(exc))[-4000:],
        )
        return rec

    def cpu_reading(self, call_cpu: float = 0.0) -> dict[str, dict[str, float]]:
        """This worker process's CPU reading for the stage, in the form rows carry (:func:`merge_cpu`).

        A model stage owns its worker process (an actor), so its reading is the process's CPU
        time so far, start-up and model loading included. A task stage shares its process with
        other stages' tasks, so its reading is the CPU time this process has spent inside this
        run's calls of the stage, ``call_cpu`` (the call just made) included. Either reading
        only grows, so the largest one the driver sees per process is that process's total.
        """
        if self.uses_model:
            seconds = time.process_time()
        else:
            key = self._cpu_counter
            seconds = _CALL_CPU[key] = _CALL_CPU.get(key, 0.0) + call_cpu
        return {self.name: {f"{socket.gethostname()}:{os.getpid()}": seconds}}

    def _stamp(self, rows: list[Row], started: float, elapsed: float, call_cpu: float = 0.0) -> None:
        """Record provenance and apportion the batch's compute time over its output rows.

        ``started`` is when the call began on this node's clock (epoch seconds); ``call_cpu``
        is the CPU time the call took (:meth:`cpu_reading`). Each row
        keeps, per stage, the earliest start and latest end of the calls that touched it
        (``spans``): only the driver's run summary reads them (:func:`merge_spans`), to say
        when the first stage began and how long the run went on after its busiest stage.
        """
        ok = [r for r in rows if r.get("status", STATUS_OK) == STATUS_OK]
        cpu = self.cpu_reading(call_cpu)
        stamp = {"model": self.model_id(), "config_hash": self.config.config_hash()}
        runtime = self.runtime()
        if runtime:
            stamp["runtime"] = runtime
        total = sum(float(r.get("duration_s") or 0.0) for r in ok) or float(len(ok) or 1)
        for r in rows:
            timings = dict(r.get("timings") or {})
            if r.get("status", STATUS_OK) == STATUS_OK:
                share = (float(r.get("duration_s") or 0.0) or 1.0) / total if ok else 0.0
                timings[self.name] = timings.get(self.name, 0.0) + elapsed * share
                prov = dict(r.get("provenance") or {})
                prov[self.name] = stamp
                r["provenance"] = prov
                r["spans"] = merge_spans(r.get("spans"), {self.name: (started, started + elapsed)})
                r["cpu"] = merge_cpu(r.get("cpu"), cpu)
            r["timings"] = timings

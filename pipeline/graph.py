"""The Ray Data graph: stages wired into a streaming dataset.

Each row travels between operators as one pickled payload (``{"payload": bytes}``). Rows are
heterogeneous (a recording, a segment, a quarantine record) and carry nested metadata and
variable-length arrays; pickling them whole (protocol 5, arrays as raw buffers) keeps Ray's
Arrow blocks trivially uniform, so schema unification never fails half-way through a run.

One row per recording flows (``stages/rows.py``). A recording-level stage (decode, enhance,
diarize, write) takes its own ``batch_size`` recordings per call; a per-segment stage takes
``ray.recordings_per_batch`` recordings and cuts its model batches of ``batch_size`` segments
between them. Small recording batches let recordings stream through and commit early. The
write stage commits on the worker and returns one small outcome per recording, so the
driver receives no audio.

Model stages run in fixed-size actor pools (one model load per actor, ``num_gpus`` per actor);
model-free stages run as stateless tasks.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

from stages.base import Row, Stage

PAYLOAD = "payload"


def pack(rows: list[Row]) -> dict[str, list[bytes]]:
    return {PAYLOAD: [pickle.dumps(r, protocol=5) for r in rows]}


def unpack(batch: dict[str, Any]) -> list[Row]:
    return [pickle.loads(p) for p in batch[PAYLOAD]]


class StageActor:
    """A Ray Data callable class holding one stage instance (and its model) per actor.

    The model loads when the pool starts, not at the first call. Loading at the first call
    lets the first recordings reach the early stages sooner, but the full local run on the speed
    benchmark's seed 13 then took 77.5-79.6 s and 142-146 CPU-s, against 69.5-73.0 s and 125-134
    CPU-s (three runs each, 2 cores): each later stage's load lands among running stages.
    """

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        if not stage._ready:
            stage.setup()
            stage._ready = True

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[bytes]]:
        return pack(self.stage(unpack(batch)))


def run_task(batch: dict[str, Any], stage: Stage) -> dict[str, list[bytes]]:
    """Stateless task form of a model-free stage."""
    return pack(stage(unpack(batch)))


class DuplicateRegistry:
    """A Ray actor holding the run's exact-duplicate fingerprints (strings, never audio).

    Writers on every worker ask it, one call per recording, which of their samples repeat
    one already written. It seeds itself from the fingerprints OUT's ledger commits, so a
    registry restarted after its node died knows everything committed so far, this run's
    commits included; only duplicates between batches that were in flight at that moment
    can go unnoticed.
    """

    def __init__(self, out: str) -> None:
        from stages.write import LocalDuplicates, OutLayout

        self.local = LocalDuplicates()
        self.local.check_many([(k, fp) for k, fp in OutLayout(out).committed_fingerprints() if fp])

    def check_many(self, pairs: list[tuple[str, str | None]]) -> list[str | None]:
        return self.local.check_many(pairs)


class RayDuplicates:
    """The :class:`stages.write.Duplicates` interface over a :class:`DuplicateRegistry` actor."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def check_many(self, pairs: list[tuple[str, str | None]]) -> list[str | None]:
        import ray

        return ray.get(self.handle.check_many.remote(pairs)) if pairs else []


def duplicate_registry(out: str) -> RayDuplicates:
    """Start the run's duplicate registry for OUT (no CPU reserved: it only answers lookups).

    Every writer depends on it, so it must survive the loss of a node: it prefers the
    driver's node (soft affinity: placed freely, ``num_cpus=0`` fits on any worker node),
    is restarted elsewhere when its node dies, and calls made meanwhile are retried once it
    is back (it re-seeds itself from the ledger, see :class:`DuplicateRegistry`).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    actor = ray.remote(num_cpus=0, scheduling_strategy=here, max_restarts=-1, max_task_retries=-1)(
        DuplicateRegistry
    ).remote(str(out))
    return RayDuplicates(actor)


def _ray_data_output(verbose: bool) -> None:
    """Ray Data's own progress bars, execution plan and warnings only with ``-v``.

    A run draws one bar of committed recordings and prints its own summary; without a
    terminal Ray Data would instead log a progress line per operator every few seconds.
    """
    import logging
    import warnings

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    if not verbose:
        # Its notices (progress bars off, memory and hanging-task detectors) are for -v too.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ctx.issue_detectors_config.detectors = []
        warnings.filterwarnings("ignore", message=".*concurrent tasks.*", category=UserWarning)


def build_dataset(
    items: list[Row], stages: list[Stage], *, parallelism: int | None = None, recordings_per_batch: int = 2,
    verbose: bool = False,
) -> Any:
    """Lazily build the streaming dataset: ``items`` through every stage, in order."""
    import ray.data

    _ray_data_output(verbose)

    ds = ray.data.from_items([{PAYLOAD: pickle.dumps(i, protocol=5)} for i in items], override_num_blocks=parallelism)
    for stage in stages:
        cfg = stage.config
        common: dict[str, Any] = {
            "batch_size": cfg.batch_size if stage.level == "recording" else recordings_per_batch,
            "batch_format": "numpy",
            "num_cpus": cfg.num_cpus,
        }
        if stage.uses_model:
            # A stage that asks for several calls at once (Stage.concurrency) gets a threaded
            # actor: its model runs them in parallel (one copy of the weights per worker).
            calls = max(1, stage.concurrency)
            threaded = {"max_concurrent_calls_per_actor": calls, "enable_true_multi_threading": True} if calls > 1 else {}
            ds = ds.map_batches(
                StageActor,
                fn_constructor_args=(stage,),
                compute=ray.data.ActorPoolStrategy(size=cfg.num_workers, **threaded),
                num_gpus=cfg.num_gpus or None,
                **common,
            )
        else:
            ds = ds.map_batches(
                run_task,
                fn_kwargs={"stage": stage},
                compute=ray.data.TaskPoolStrategy(size=cfg.num_workers),
                **common,
            )
    return ds


def iter_rows(ds: Any) -> Iterator[Row]:
    """Stream the output rows to the driver as they complete."""
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        yield from unpack(batch)

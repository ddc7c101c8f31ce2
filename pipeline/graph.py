"""The Ray Data graph: stages wired into a streaming dataset.

Each row travels between operators as one pickled payload (``{"payload": bytes}``). Rows are
heterogeneous (a recording, a segment, a quarantine record) and carry nested metadata and
variable-length arrays; pickling them whole (protocol 5, arrays as raw buffers) keeps Ray's
Arrow blocks trivially uniform, so schema unification never fails half-way through a run.

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
    """A Ray Data callable class holding one stage instance (and its model) per actor."""

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


def build_dataset(items: list[Row], stages: list[Stage], *, parallelism: int | None = None) -> Any:
    """Lazily build the streaming dataset: ``items`` through every stage, in order."""
    import ray.data

    ds = ray.data.from_items([{PAYLOAD: pickle.dumps(i, protocol=5)} for i in items], override_num_blocks=parallelism)
    for stage in stages:
        cfg = stage.config
        common: dict[str, Any] = {
            "batch_size": cfg.batch_size,
            "batch_format": "numpy",
            "num_cpus": cfg.num_cpus,
        }
        if stage.uses_model:
            ds = ds.map_batches(
                StageActor,
                fn_constructor_args=(stage,),
                compute=ray.data.ActorPoolStrategy(size=cfg.num_workers),
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

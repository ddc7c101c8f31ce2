"""Machine-sized defaults: thread settings of 0 follow the CPUs, and never change outputs."""

from __future__ import annotations

import pytest

import stages.base as base
from pipeline.config import load_config
from pipeline.guard import output_fingerprint
from stages.base import MAX_AUTO_THREADS, machine_threads

ROOT = base.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("cpus,want", [(1, 1), (2, 2), (6, 6), (64, MAX_AUTO_THREADS)])
def test_zero_threads_follow_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch, cpus: int, want: int) -> None:
    monkeypatch.setattr(base.os, "sched_getaffinity", lambda _pid: set(range(cpus)))
    # Outside Ray: an embedded Ray another test left running would answer with its own CPUs.
    monkeypatch.delitem(base.sys.modules, "ray", raising=False)
    assert machine_threads(0) == want
    assert machine_threads(3) == 3  # an explicit setting wins on any machine


def test_local_profile_is_machine_sized_and_threads_do_not_change_outputs() -> None:
    cfg = load_config(str(ROOT / "configs" / "local.yaml"), [])
    assert cfg.transcribe.cpu_threads == 0 and cfg.tokenize.torch_threads == 0
    pinned = load_config(str(ROOT / "configs" / "local.yaml"),
                         ["transcribe.cpu_threads=4", "transcribe.cpu_decoders=1", "tokenize.torch_threads=3"])
    # The output fingerprint (what a resume compares) ignores threads: same config, same outputs.
    assert output_fingerprint(cfg.model_dump(mode="json")) == output_fingerprint(pinned.model_dump(mode="json"))


def _local_stages(sets: list[str] | None = None) -> list:
    from pipeline.run import plan_stages
    from stages.base import StageContext

    cfg = load_config(str(ROOT / "configs" / "local.yaml"), sets or [])
    return plan_stages(cfg, StageContext())


@pytest.mark.parametrize("cpus", [2, 8, 64])
def test_machine_sized_pools_fill_the_cpus_without_oversubscribing(cpus: int) -> None:
    """num_workers 0 (the local profile) gives one worker per model stage on 2 cores and pools
    that together run about as many threads as there are CPUs on a big node."""
    from pipeline.run import size_pools

    stages = _local_stages()
    assert all(s.config.num_workers == 0 for s in stages if s.name != "write")  # write: 2 writers
    sized = size_pools(stages, {"CPU": float(cpus)}, cpus)
    model = [s for s in stages if s.uses_model]
    threads = sum(s.config.num_workers * s.worker_threads(cpus) for s in model)
    if cpus < 16:  # every model stage keeps one worker, so no pool grows
        assert all(sized[s.name] == 1 for s in model)
    else:  # the pools together run about one thread per CPU
        assert sized["transcribe"] > 1 and sized["quality"] > 1
        assert cpus / 2 <= threads <= cpus * 1.25, (sized, threads)
    assert all(sized[s.name] == cpus for s in stages if not s.uses_model and s.name in sized)
    assert all(s.config.num_workers >= 1 for s in stages)


def test_gpu_stages_are_sized_by_their_gpu_fraction_and_explicit_pools_stay() -> None:
    from pipeline.run import size_pools

    stages = _local_stages(["transcribe.num_gpus=0.5", "tokenize.num_workers=3"])
    sized = size_pools(stages, {"CPU": 16.0, "GPU": 4.0}, 16)
    by_name = {s.name: s for s in stages}
    assert sized["transcribe"] == 8  # 4 GPUs / 0.5
    assert "tokenize" not in sized and by_name["tokenize"].config.num_workers == 3


@pytest.mark.parametrize("cpus,calls", [(1, 1), (2, 2), (8, 8), (64, MAX_AUTO_THREADS)])
def test_transcribe_decodes_one_batch_per_cpu_on_each_worker(cpus: int, calls: int) -> None:
    """faster-whisper on CPU: a worker runs one single-thread decoder per CPU (calls at once),
    so its threads, and so the pool sizes, are what one worker of machine-sized threads had."""
    from pipeline.run import size_pools

    stages = _local_stages()
    size_pools(stages, {"CPU": float(cpus)}, cpus)
    by_name = {s.name: s for s in stages}
    assert by_name["transcribe"].concurrency == calls
    assert by_name["transcribe"].worker_threads(cpus) == machine_threads(0, cpus)
    assert all(s.concurrency == 1 for s in stages if s.name != "transcribe")


@pytest.mark.parametrize("sets,calls", [
    (["transcribe.cpu_decoders=1"], 1),  # the old layout: one decoder on all the threads
    (["transcribe.cpu_threads=1"], 8),
    (["transcribe.cpu_threads=4"], 2),
    (["transcribe.num_gpus=1"], 1),  # a GPU decodes one batch at a time
    (["transcribe.backend=openai-whisper"], 1),
])
def test_transcribe_concurrency_follows_its_settings(sets: list[str], calls: int) -> None:
    from pipeline.run import size_pools

    stages = _local_stages(sets)
    size_pools(stages, {"CPU": 8.0, "GPU": 1.0}, 8)
    assert next(s for s in stages if s.name == "transcribe").concurrency == calls

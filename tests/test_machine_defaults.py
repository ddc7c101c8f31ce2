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
    pinned = load_config(str(ROOT / "configs" / "local.yaml"), ["transcribe.cpu_threads=4", "tokenize.torch_threads=3"])
    # The output fingerprint (what a resume compares) ignores threads: same config, same outputs.
    assert output_fingerprint(cfg.model_dump(mode="json")) == output_fingerprint(pinned.model_dump(mode="json"))

"""CPU time per stage: a model stage's worker processes, a task stage's own calls."""

from __future__ import annotations

import os
import socket
import time

from stages.base import Stage, StageConfig, merge_cpu


class Burner(Stage):
    """A model-free stage whose every call spends ``seconds`` of CPU."""

    name = "burner"
    uses_model = False

    def __init__(self, seconds: float) -> None:
        super().__init__(StageConfig())
        self.seconds = seconds

    def process_batch(self, rows):
        until = time.process_time() + self.seconds
        while time.process_time() < until:
            pass
        return [{**r, "burnt": True} for r in rows]


def test_a_task_stage_is_charged_its_calls_cpu_not_its_process() -> None:
    """A task stage shares its process with other stages, so its reading counts only the CPU
    spent inside its own calls, and grows call by call: the driver's largest reading per
    process is then the stage's total there."""
    me = f"{socket.gethostname()}:{os.getpid()}"
    stage = Burner(0.05)
    before = time.process_time()
    (first,) = stage([{"status": "ok", "source": "/a.wav", "duration_s": 1.0}])
    until = time.process_time() + 0.1  # CPU spent between the calls, by no stage
    while time.process_time() < until:
        pass
    (second,) = stage([{"status": "ok", "source": "/b.wav", "duration_s": 1.0}])
    a, b = first["cpu"]["burner"][me], second["cpu"]["burner"][me]
    assert b - a >= 0.05  # the second call's CPU is counted
    assert b - a < 0.1  # the 0.1 s between the calls is not
    assert b <= time.process_time() - before
    assert merge_cpu(first["cpu"], second["cpu"])["burner"][me] == b


def test_each_run_of_a_task_stage_counts_from_zero() -> None:
    """Ray reuses task worker processes between runs: a new run's stage (a new instance, made
    by the driver and pickled to the workers) starts its own count."""
    import pickle

    me = f"{socket.gethostname()}:{os.getpid()}"
    first_run = Burner(0.05)
    first_run([{"status": "ok", "source": "/a.wav"}])
    first_run([{"status": "ok", "source": "/b.wav"}])
    shipped = pickle.loads(pickle.dumps(Burner(0.05)))  # as a worker receives it
    (row,) = shipped([{"status": "ok", "source": "/c.wav"}])
    assert 0.05 <= row["cpu"]["burner"][me] < 0.1

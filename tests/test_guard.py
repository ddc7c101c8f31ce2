"""OUT guards: one run at a time (OUT/.lock) and one output-changing config per OUT."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.guard import (
    FINGERPRINT_FILE,
    LOCK_NAME,
    ConfigChangedError,
    OutputLock,
    OutputLockedError,
    check_config_compatible,
    output_fingerprint,
    save_fingerprint,
    saved_fingerprint,
)

ROOT = Path(__file__).resolve().parent.parent

_HOLD = """
import sys, time
from pathlib import Path
from pipeline.guard import OutputLock
with OutputLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""

# Every racer waits for the same start time, tries once, and reports; winners hold on a while
# so that a loser cannot win after the winner let go.
_RACE = """
import sys, time
from pathlib import Path
from pipeline.guard import OutputLock, OutputLockedError
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
lock = OutputLock(Path(sys.argv[1]))
try:
    lock.acquire()
except OutputLockedError:
    print("lost", flush=True)
else:
    print("won", flush=True)
    time.sleep(3)
    lock.release()
"""


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _plant(out: Path, pid: int, host: str | None = None) -> None:
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "x"}))


def test_a_lock_held_by_another_process_fails_at_once_with_one_line(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid} on host ") as err:
            with OutputLock(tmp_path):
                pytest.fail("took a lock another live process holds")
        message = str(err.value)
        assert time.monotonic() - t0 < 1.0
        assert "\n" not in message and "in use by another kimia-curate run" in message and "--output" in message
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid  # left as it was
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing (SIGKILL): its lock is now stale and taken over.
    with OutputLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_stale_lock_of_a_dead_pid_is_taken_over_and_release_removes_it(tmp_path: Path) -> None:
    pid = _dead_pid()
    _plant(tmp_path, pid)
    with OutputLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert not (tmp_path / LOCK_NAME).exists()
    assert not list(tmp_path.glob(f"{LOCK_NAME}.*.tmp"))  # no temporary file left behind


def test_a_corrupt_lock_is_taken_over_and_another_hosts_lock_is_not(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("{not json")
    t0 = time.monotonic()
    with OutputLock(tmp_path):
        pass
    assert time.monotonic() - t0 < 1.0
    _plant(tmp_path, _dead_pid(), host="elsewhere.example")  # cannot be checked from here
    with pytest.raises(OutputLockedError, match="elsewhere.example"):
        OutputLock(tmp_path).acquire()


def test_a_flock_held_on_the_lock_file_means_in_use_even_if_its_pid_looks_dead(tmp_path: Path) -> None:
    # E.g. the owner runs in another pid namespace (a container) on the same host.
    _plant(tmp_path, _dead_pid())
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(OutputLockedError):
            OutputLock(tmp_path).acquire()
    finally:
        os.close(fd)


def test_release_leaves_a_lock_it_no_longer_owns(tmp_path: Path) -> None:
    lock = OutputLock(tmp_path)
    lock.acquire()
    _plant(tmp_path, 1, host="elsewhere.example")  # someone replaced it (by hand, say)
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "elsewhere.example"
    lock.release()  # a second release is a no-op


def test_of_several_runs_taking_over_one_stale_lock_exactly_one_wins(tmp_path: Path) -> None:
    _plant(tmp_path, _dead_pid())
    start = str(time.time() + 1.5)
    racers = [
        subprocess.Popen([sys.executable, "-c", _RACE, str(tmp_path), start], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = sorted(r.communicate(timeout=60)[0].strip() for r in racers)
    assert results == ["lost", "lost", "lost", "won"], results
    assert not (tmp_path / LOCK_NAME).exists()


def test_fingerprint_ignores_speed_and_placement_but_not_what_is_written() -> None:
    from pipeline.config import load_config

    local = ROOT / "configs" / "local.yaml"
    base = load_config(str(local), [])
    faster = load_config(str(local), [
        "transcribe.batch_size=3", "transcribe.num_workers=2", "transcribe.cpu_threads=1", "quality.num_cpus=0.5",
        "decode.batch_size=64", "ray.num_cpus=1", "models.cache_dir=/elsewhere", "device=cpu",
        "write.num_workers=5", "roundtrip.asr.batch_size=2",
    ])
    assert output_fingerprint(base) == output_fingerprint(faster)
    assert output_fingerprint(base) == output_fingerprint(base.model_dump(mode="json"))  # a dump hashes the same
    for change in ("filter.min_snr_db=30", "filter.max_rt_wer=0.1", "segment.threshold=0.7", "decode.sample_rate=24000",
                   "transcribe.beam_size=1", "filter.keep_dropped=false"):
        assert output_fingerprint(base) != output_fingerprint(load_config(str(local), [change])), change


def test_config_check_refuses_a_changed_config_unless_allowed(tmp_path: Path) -> None:
    check_config_compatible(tmp_path, "aaaa", allow_change=False)  # nothing recorded yet: fine
    assert saved_fingerprint(tmp_path) is None
    save_fingerprint(tmp_path, "aaaa")
    assert json.loads((tmp_path / FINGERPRINT_FILE).read_text())["fingerprint"] == "aaaa"
    check_config_compatible(tmp_path, "aaaa", allow_change=False)
    with pytest.raises(ConfigChangedError, match="--allow-config-change") as err:
        check_config_compatible(tmp_path, "bbbb", allow_change=False)
    assert "\n" not in str(err.value) and "aaaa" in str(err.value) and "bbbb" in str(err.value)
    check_config_compatible(tmp_path, "bbbb", allow_change=True)
    assert saved_fingerprint(tmp_path) == "aaaa"  # checking never records
    (tmp_path / FINGERPRINT_FILE).write_text("{broken")
    check_config_compatible(tmp_path, "bbbb", allow_change=False)  # unreadable counts as none

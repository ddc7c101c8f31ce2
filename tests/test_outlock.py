"""One run per OUT: a second concurrent run fails at once, a dead run's lock is taken over."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.outlock import LOCK_NAME, OutputLock, OutputLockedError

ROOT = Path(__file__).resolve().parent.parent

_HOLD = """
import sys, time
from pathlib import Path
from pipeline.outlock import OutputLock
with OutputLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_run_on_a_held_out_fails_at_once(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid}") as err:
            OutputLock(tmp_path).acquire()
        assert time.monotonic() - t0 < 1.0 and "\n" not in str(err.value)
        # Through the CLI: one line, exit 2, and the holder's lock is left as it was.
        (tmp_path / "in").mkdir()
        cli = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "--config", str(ROOT / "configs" / "local.yaml"),
             "--input", str(ROOT / "examples" / "audio"), "--output", str(tmp_path), "--quiet"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        assert cli.returncode == 2, cli.stderr
        lines = [ln for ln in cli.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "in use by another kimia-curate run" in lines[0], cli.stderr
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
        assert not (tmp_path / "shards").exists()  # the second run wrote nothing
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_runs_lock_is_taken_over_and_released(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x"}))
    with OutputLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] != pid
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_corrupt_lock_is_taken_over_and_another_hosts_lock_is_not(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("{not json")
    with OutputLock(tmp_path):
        pass
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "x"}))
    with pytest.raises(OutputLockedError, match="elsewhere.example"):
        OutputLock(tmp_path).acquire()


def test_a_resume_with_an_output_changing_config_is_refused(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.outlock import FINGERPRINT_FILE, ConfigChangedError, check_fingerprint, output_fingerprint

    local = ROOT / "configs" / "local.yaml"
    base = load_config(str(local), []).model_dump(mode="json")
    faster = load_config(str(local), ["transcribe.batch_size=3", "ray.num_cpus=1"]).model_dump(mode="json")
    stricter = load_config(str(local), ["filter.min_snr_db=30"]).model_dump(mode="json")
    assert output_fingerprint(base) == output_fingerprint(faster)
    assert output_fingerprint(base) != output_fingerprint(stricter)
    check_fingerprint(tmp_path, output_fingerprint(base), allow_change=False)  # first use records it
    check_fingerprint(tmp_path, output_fingerprint(faster), allow_change=False)  # speed knobs: fine
    with pytest.raises(ConfigChangedError, match="--allow-config-change"):
        check_fingerprint(tmp_path, output_fingerprint(stricter), allow_change=False)
    check_fingerprint(tmp_path, output_fingerprint(stricter), allow_change=True)
    assert output_fingerprint(stricter) in (tmp_path / FINGERPRINT_FILE).read_text()
    # Through the CLI, before Ray starts: one line, exit 2.
    cli = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--config", str(local), "--input", str(ROOT / "examples" / "audio"),
         "--output", str(tmp_path), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    lines = [ln for ln in cli.stderr.splitlines() if ln.strip()]
    assert cli.returncode == 2 and len(lines) == 1 and "another config" in lines[0], cli.stderr
    assert not (tmp_path / LOCK_NAME).exists()  # released on the way out

"""The embedded Ray listens on loopback only, even when the caller did not ask for it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PROBE = """
import subprocess, time
from pipeline.config import RunConfig
from pipeline.run import _init_ray
_init_ray(RunConfig(), None)
import psutil  # Ray ships its own copy, importable once Ray is
time.sleep(2)  # let the dashboard agent and idle workers open their ports
pids = {psutil.Process().pid} | {p.pid for p in psutil.Process().children(recursive=True)}
for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines():
    if any(f"pid={p}," in line for p in pids):
        print("LISTEN", line.split()[3])
"""

LOOPBACK = ("127.", "[::ffff:127.", "[::1]")


def test_embedded_ray_binds_every_listener_to_loopback() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    probe = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=180)
    assert probe.returncode == 0, probe.stderr[-2000:]
    addresses = [ln.split()[1] for ln in probe.stdout.splitlines() if ln.startswith("LISTEN ")]
    assert len(addresses) >= 3, probe.stdout  # gcs, raylet, driver at least: the probe saw them
    assert all(a.startswith(LOOPBACK) for a in addresses), addresses

"""pipeline.ray_local: the embedded Ray listens on loopback only and keeps the terminal quiet."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Starts the embedded Ray the way a run does, makes a worker print (which must not reach the
# terminal), then reports its session name and waits to be killed.
_PROBE = """
import sys, time
from pipeline.config import RunConfig
from pipeline.ray_local import init_ray
init_ray(RunConfig(), None)
import ray
@ray.remote
def hello():
    print("WORKER-OUTPUT", flush=True)
    return 1
ray.get([hello.remote() for _ in range(2)])
node = ray._private.worker._global_node
print("SESSION", node.session_name, flush=True)
time.sleep(600)
"""



def _is_loopback(host: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (``::ffff:127.0.0.1``).

    Anything else is not, including ``ss``'s ``*`` (every interface).
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def _ppids() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    out: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            out[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # comm may hold spaces
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ray_pids(root: int, session: str | None) -> set[int]:
    """The probe and its descendants, plus any process of its Ray session that was reparented."""
    parents = _ppids()
    tree = {root}
    grew = True
    while grew:
        more = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return tree | ({p for p in parents if session in _cmdline(p)} if session else set())


def _socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _hex_address(hexaddr: str) -> str:
    """Decode an address of /proc/net/tcp{,6} (host-order 32-bit words) to text."""
    raw = bytes.fromhex(hexaddr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def _listeners_proc(pids: set[int]) -> list[str]:
    """Listening TCP addresses of ``pids``, from /proc/net/tcp and tcp6 (no tools needed)."""
    inodes = _socket_inodes(pids)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A = TCP_LISTEN
                host, port = local.split(":")
                found.append(f"{_hex_address(host)}:{int(port, 16)}")
    return found


def _listeners_ss(pids: set[int]) -> list[str]:
    """Listening TCP addresses of ``pids``, from ``ss -ltnp`` (iproute2)."""
    found = []
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+),", line)}
        if owners & pids:
            local = line.split()[3]
            host = local.rsplit(":", 1)[0].strip("[]").split("%")[0]
            found.append(f"{host}:{local.rsplit(':', 1)[1]}")
    return found


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_embedded_ray_binds_every_listener_to_loopback_and_stays_quiet() -> None:
    # The caller did not ask for loopback: init_ray must see to it itself.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")}
    probe = subprocess.Popen([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    pids: set[int] = {probe.pid}
    session: str | None = None
    try:
        assert probe.stdout is not None
        first = probe.stdout.readline()
        assert first.startswith("SESSION "), first + (probe.stderr.read() if probe.poll() is not None else "")
        session = first.split()[1]
        time.sleep(2)  # let the dashboard agent and idle workers open their ports
        pids = _ray_pids(probe.pid, session)
        names = {_cmdline(p).split(" ", 1)[0].rsplit("/", 1)[-1] for p in pids}
        assert any("raylet" in n for n in names) and any("gcs_server" in n for n in names), names
        views = {"/proc": _listeners_proc(pids)}
        if shutil.which("ss"):
            views["ss"] = _listeners_ss(pids)
        for source, addresses in views.items():
            assert len(addresses) >= 3, (source, addresses)  # gcs, raylet, workers at least
            outside = [a for a in addresses if not _is_loopback(a.rsplit(":", 1)[0])]
            assert not outside, f"{source}: listening beyond loopback: {outside}"
    finally:
        _kill(pids | _ray_pids(probe.pid, session))  # its own processes only, never `ray stop`
        _, err = probe.communicate(timeout=30)
        time.sleep(0.5)
        assert not [p for p in pids if Path(f"/proc/{p}").exists() and _cmdline(p)], "Ray processes left running"
    # Quiet: no Ray start-up lines, token notice or worker output on the terminal.
    noise = [ln for ln in err.splitlines() if ln.strip()]
    assert not noise, noise[:5]


class _FakeRay(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("ray")
        self.calls: list[dict] = []

    def is_initialized(self) -> bool:
        return bool(self.calls)

    def init(self, **kwargs: object) -> None:
        self.calls.append(kwargs)


def test_embedded_kwargs_and_a_cluster_join_leaves_the_node_address_alone(monkeypatch) -> None:
    from pipeline.config import RunConfig
    from pipeline.ray_local import init_ray

    for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")  # restored after the test
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    init_ray(RunConfig.model_validate({"ray": {"num_cpus": 2}}), None)
    (kw,) = fake.calls
    assert kw["_node_ip_address"] == "127.0.0.1" and kw["address"] == "local" and kw["include_dashboard"] is False
    # Workers inherit the project on PYTHONPATH; no job runtime_env (which would bar prestarted workers).
    root = str(Path(__file__).resolve().parent.parent)
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [root, "/elsewhere"] and "runtime_env" not in kw
    assert kw["log_to_driver"] is False and kw["num_cpus"] == 2
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    init_ray(RunConfig(), None)  # already initialised: nothing more
    assert len(fake.calls) == 1

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    monkeypatch.delenv("RAY_AUTH_MODE")
    joined = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", joined)
    init_ray(RunConfig(), "auto", verbose=True)
    assert joined.calls == [{"address": "auto", "log_to_driver": True}]
    # A driver joining a cluster must announce its real address, and the cluster's own auth mode applies.
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ and "RAY_AUTH_MODE" not in os.environ

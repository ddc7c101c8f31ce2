"""A real two-node Ray cluster on loopback: ``ray job submit``, a worker node killed mid-run.

The other tests run the pipeline on an embedded Ray, where every task shares one raylet and
nothing can die alone. On a cluster a node can vanish with tasks, actors and objects on it;
Ray then retries the tasks and restarts the actors elsewhere, and a write task that already
committed must find its commit instead of writing its recordings a second time
(``WriteStage.commit_name`` / ``OutLayout.find_commit``). This test shows it on a real
cluster, started the way docs/cluster.md tells an operator to:

* ``ray start --head`` and ``ray start --address`` as a second node, both with
  ``--node-ip-address 127.0.0.1`` and a private ``--temp-dir`` and ports, with token
  authentication on (its own token, in ``RAY_AUTH_TOKEN``: ``~/.ray/auth_token`` is left
  alone). Each node is stopped by its own processes, never with ``ray stop``, which would
  stop every Ray on the machine;
* the job goes in with ``ray job submit --working-dir . --runtime-env
  workflows/runtime_env.yaml -- <venv>/bin/python -m pipeline run ...``: the entrypoint names
  the venv's interpreter, because the head runs it with whatever ``python`` its shell finds;
* while the worker node runs pipeline work (an actor's batch, or any task once the first
  commit has landed), its raylet is SIGKILLed.

The output must equal an embedded run's on the same files: the same sample keys, the same
texts (WER <= 0.05 each: the same weights on the same machine), no duplicate sample and
``kimia-curate inspect`` clean. If the job fails because of the dead node, the same command
submitted again must resume and finish; either outcome is accepted and reported (``-s``
prints what happened). What it has shown here: the first submission finishes; the worker
node is marked dead after its missed heartbeats, Ray restarts its actors on the head and
retries their batches (``ACTOR_UNAVAILABLE`` attempts in ``ray list tasks``) and its tasks;
no sample is written twice. (When the run's duplicate registry, an actor every writer asks,
could only live on one node, a registry placed on the worker node died with it, every later
write failed and the job with them; the resubmission then resumed and finished, also without
duplicates. The registry now prefers the driver's node and is restarted elsewhere, re-seeded
from the ledger, when its node dies; both outcomes stay accepted, and the report says which.)

Last, the ``ray submit`` route on the same cluster: ``workflows/curate.py`` copied alone
into a home directory and run there with the venv's interpreter, as ``ray submit`` does on
the head.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import soundfile as sf

from conftest import espeak

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RAY = BIN / "ray"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not RAY.is_file(), reason=f"no ray CLI beside {sys.executable}"),
    pytest.mark.timeout(600),
]

#: A cheap profile that still transcribes, so texts can be compared. One commit per
#: recording, so the kill lands between commits; two transcribe actors, so both nodes
#: get one under Ray Data's SPREAD scheduling. Both runs use exactly these settings.
SETTINGS = (
    "enhance.enabled=false", "diarize.enabled=false", "quality.dnsmos=false",
    "transcribe.model=pkg:whisper-tiny.en", "transcribe.beam_size=1",
    "transcribe.num_workers=2", "transcribe.cpu_threads=1", "write.batch_size=1",
)

TEXTS = [
    ("en-us", "The weather was cold this morning, so we stayed inside and read the papers. Later the sun "
              "came out and we walked to the river. The water was high after the rain of the last few days."),
    ("en+f3", "Our team collects speech recordings from many different speakers. Each file is checked for "
              "noise and for long silences. Only the clean parts are kept for training the model."),
    ("en-gb+m3", "The train to the city leaves at half past eight every weekday. On Saturdays it runs every "
                 "hour, and on Sundays there is no service at all. Please check the timetable before you travel."),
    ("en-us+f2", "She planted tomatoes, beans and potatoes in the small garden behind the house. In August the "
                 "plants were taller than the fence. The neighbours came to help with the harvest."),
    ("en+m7", "Please remember to close the windows before you leave the office tonight. The cleaners arrive "
              "at seven and they need the keys from the front desk. Thank you for your help."),
    ("en-us+m2", "A good transcript must match the audio word for word. When two recognizers disagree, the "
                 "segment is sent for review. This keeps the error rate of the data set low."),
]


# -- processes ----------------------------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, int, int]]:
    """``pid -> (ppid, pgid, start time)`` of every process, read from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry)] = (int(fields[1]), int(fields[2]), int(fields[19]))
    return table


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    """One ``ray start`` of ours: its process group is the (new) session ``ray start`` led."""

    pgid: int
    head: bool


@dataclass
class LoopbackCluster:
    """Ray nodes on 127.0.0.1 that only this test owns, and the environment to reach them.

    Every process of the cluster carries ``marker`` in its environment (Ray passes the
    node's environment down to its workers and to the job's driver), so teardown finds
    them all, including workers Ray moved into sessions of their own, and nothing else.
    """

    temp_dir: Path
    env: dict[str, str]
    marker: bytes
    nodes: list[Node] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(RAY), *args], env=env or self.env, capture_output=True, text=True, timeout=timeout)

    def _start(self, args: list[str], head: bool, log: Path) -> Node:
        common = [
            "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.temp_dir), "--disable-usage-stats",
            "--object-store-memory", str(300 * 2**20), "--min-worker-port", "0", "--max-worker-port", "0",
            "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(RAY), "start", *args, *common], env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(pgid=proc.pid, head=head)
        self.nodes.append(node)  # before waiting: a failed start is still torn down
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        return node

    def start_head(self, num_cpus: int, log: Path) -> Node:
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        return self._start([
            "--head", "--port", str(self.gcs_port), "--num-cpus", str(num_cpus), "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(_free_port()),
        ], True, log)

    def add_worker(self, num_cpus: int, log: Path) -> Node:
        return self._start(["--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", str(num_cpus)], False, log)

    def node_processes(self, node: Node) -> dict[int, int]:
        """``pid -> start time`` of the node's processes: its group and all their descendants."""
        table = _proc_table()
        found = {pid for pid, (_, pgid, _) in table.items() if pgid == node.pgid}
        grew = True
        while grew:
            children = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
            found |= children
            grew = bool(children)
        return {pid: table[pid][2] for pid in found}

    def raylet(self, node: Node) -> int:
        pids = [p for p in self.node_processes(node) if _title(p).endswith("/raylet/raylet")]
        assert len(pids) == 1, pids
        return pids[0]

    def teardown(self) -> None:
        """SIGKILL every process of this cluster: the nodes' groups, their descendants, the marked.

        In rounds, until none is left: a raylet may fork a worker just before it dies, and
        that worker (marked, but in no snapshot yet) would otherwise live on and write into
        the temp dir after it is removed.
        """
        for _ in range(20):
            table = _proc_table()
            victims = {pid: st for pid, (_, _, st) in table.items() if _has_marker(pid, self.marker)}
            for node in self.nodes:
                victims.update(self.node_processes(node))
            victims.pop(os.getpid(), None)
            if not victims:
                break
            for pid, start in victims.items():
                if table.get(pid, (0, 0, -1))[2] == start:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _client_env(**extra: str) -> dict[str, str]:
    """This process's environment minus what would point Ray elsewhere or pin it to one node."""
    drop = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "PYTHONPATH", "RAY_AUTH_TOKEN",
            "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", **extra)
    return env


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LoopbackCluster]:
    """A head and nothing else yet; everything it starts is killed afterwards, pass or fail."""
    marker = f"KIMIA_TEST_CLUSTER={secrets.token_hex(8)}"
    # Unix socket paths (under the temp dir) are limited to ~107 bytes: tmp_path is too deep.
    temp_dir = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    key, value = marker.split("=")
    env = _client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), **{key: value})
    c = LoopbackCluster(temp_dir=temp_dir, env=env, marker=marker.encode())
    try:
        yield c
    finally:
        c.teardown()


# -- data ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six espeak-ng recordings of three sentences each, about 65 s in all."""
    d = tmp_path_factory.mktemp("cluster_corpus")
    for i, (voice, text) in enumerate(TEXTS):
        espeak(text, d / f"rec{i}.wav", voice)
    total = sum(sf.info(p).duration for p in d.glob("*.wav"))
    assert 50 < total < 100, total
    return d


def _samples(out: Path) -> list[tuple[str, str, str]]:
    """``(key, source file name, text)`` of every committed sample, kept and dropped, via the ledger."""
    from stages.write import OutLayout

    layout = OutLayout(out)
    rows: list[tuple[str, str, str]] = []
    for shard in layout.committed_shards():
        table = layout.read_index(shard, ["key", "source", "text"]).to_pydict()
        rows += zip(table["key"], [Path(s).name for s in table["source"]], table["text"])
    return rows


def _run_args(corpus: Path, out: Path) -> list[str]:
    args = ["-m", "pipeline", "run", "--config", "configs/local.yaml", "--input", str(corpus),
            "--output", str(out), "--quiet"]
    for s in SETTINGS:
        args += ["--set", s]
    return args


# -- the test -----------------------------------------------------------------------------------
def test_worker_node_killed_mid_run_output_equals_embedded_run(
    cluster: LoopbackCluster, cluster_corpus: Path, tmp_path: Path,
) -> None:
    t0 = time.time()
    # 1. The reference: the same files, the same settings, an embedded Ray. (Not while the
    # cluster starts: `ray start` gives a raylet 30 s to register, and a loaded machine
    # misses that.)
    out_a = tmp_path / "embedded"
    embedded = subprocess.run(
        [sys.executable, *_run_args(cluster_corpus, out_a)], cwd=ROOT, env=_client_env(PYTHONPATH=str(ROOT)),
        capture_output=True, text=True, timeout=400,
    )
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    reference = {k: (src, text) for k, src, text in _samples(out_a)}
    assert len(reference) >= len(TEXTS)
    t_embedded = time.time() - t0

    # 2. Two nodes on loopback, token auth on. Each can hold the whole plan alone (actors
    # 1.5 CPU + a 0.25 task), so the head can take over everything the worker node had.
    # `ray start --address` returns once the node is registered with the head.
    cluster.start_head(2, tmp_path / "head.log")
    worker = cluster.add_worker(2, tmp_path / "worker.log")
    t_up = time.time() - t0
    refused = cluster.ray("job", "list", "--address", cluster.dashboard,
                          env={k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")})
    assert refused.returncode != 0 and "Authentication" in refused.stderr, "the cluster accepted a client without token"

    # 3. The documented route: ship the repository, name the venv's interpreter.
    out_b = tmp_path / "cluster"
    submit = [
        "job", "submit", "--address", cluster.dashboard, "--working-dir", str(ROOT),
        "--runtime-env", str(ROOT / "workflows" / "runtime_env.yaml"),
    ]
    entrypoint = ["--", str(BIN / "python"), *_run_args(cluster_corpus, out_b)]
    job_log = tmp_path / "job1.log"
    with open(job_log, "wb") as log:
        job = subprocess.Popen([str(RAY), *submit, "--submission-id", "curate-1", *entrypoint], cwd=ROOT,
                               env=cluster.env, stdout=log, stderr=subprocess.STDOUT)

    # 4. Kill the worker node's raylet while it runs pipeline work: once one of its actors is
    # processing a batch ("ray::MapWorker(...).submit"), or once the first recording is
    # committed and it runs any task ("ray::MapBatches(...)"). On a quiet machine the cheap
    # stages finish early and every commit lands near the end, so waiting for a commit alone
    # could miss the run; either way the kill lands on work in flight, before the run is done.
    state = out_b / "_state"
    deadline = time.time() + 300
    busy: list[str] = []
    while True:
        assert job.poll() is None, f"the job ended before the kill: {job_log.read_text()[-3000:]}"
        assert time.time() < deadline, "no commit with work in flight on the worker node within 300 s"
        commits = len(list(state.glob("commit-*.json")))
        titles = {_title(p) for p in cluster.node_processes(worker)}
        busy = sorted(t for t in titles if t.startswith("ray::MapBatches") or
                      (t.startswith("ray::MapWorker") and t.endswith(".submit")))
        if busy and (commits >= 1 or any(t.endswith(".submit") for t in busy)):
            break
        time.sleep(0.1)
    on_worker = cluster.node_processes(worker)
    os.kill(cluster.raylet(worker), signal.SIGKILL)
    t_kill = time.time() - t0
    assert commits < len(TEXTS), "the run finished before the kill"

    # 5. The job either finishes on the head or fails; then the same command resumes it.
    first_rc = job.wait(timeout=420)
    t_job = time.time() - t0
    submissions = 1
    if first_rc != 0:
        submissions = 2
        with open(tmp_path / "job2.log", "wb") as log:
            again = subprocess.run([str(RAY), *submit, "--submission-id", "curate-2", *entrypoint], cwd=ROOT,
                                   env=cluster.env, stdout=log, stderr=subprocess.STDOUT, timeout=420)
        assert again.returncode == 0, (tmp_path / "job2.log").read_text()[-3000:]
    last = f"curate-{submissions}"
    status = cluster.ray("job", "status", "--address", cluster.dashboard, last)
    assert f"Job '{last}' succeeded" in status.stdout, status.stdout + status.stderr
    logs = cluster.ray("job", "logs", "--address", cluster.dashboard, last).stdout
    assert "recordings:" in logs, logs[-3000:]  # the run's summary, read back through the job API
    # What Ray saw: the worker node dead, and the attempts of tasks that were on it.
    nodes = json.loads(cluster.ray("list", "nodes", "--address", cluster.dashboard, "--format", "json").stdout)
    dead = [n["node_id"] for n in nodes if not n["is_head_node"]]
    assert [n["state"] for n in nodes if not n["is_head_node"]] == ["DEAD"], nodes
    # Where each submission's duplicate registry lived (it prefers its driver's node).
    actors = json.loads(cluster.ray("list", "actors", "--address", cluster.dashboard, "--detail", "--format", "json",
                                    "--limit", "10000").stdout)
    registry_on = ["worker" if a["node_id"] in dead else "head" for a in actors
                   if a.get("class_name") == "DuplicateRegistry"]
    tasks = json.loads(cluster.ray("list", "tasks", "--address", cluster.dashboard, "--detail", "--format", "json",
                                   "--limit", "10000").stdout or "[]")
    failed_on_worker = dict(Counter(
        f"{t['name']}: {t.get('error_type')}" for t in tasks if t.get("node_id") in dead and t.get("state") == "FAILED"
    ))

    # 6. The same output as the embedded run.
    samples = _samples(out_b)
    keys = [k for k, _, _ in samples]
    assert len(keys) == len(set(keys)), f"duplicate samples: {sorted(k for k in keys if keys.count(k) > 1)}"
    assert sorted(keys) == sorted(reference), "missing or extra samples"
    from stages.textnorm import wer

    worst = max(wer(reference[k][1], t) for k, _, t in samples)
    assert worst <= 0.05, [(reference[k][1], t) for k, _, t in samples if wer(reference[k][1], t) > 0.05]
    inspect = subprocess.run([sys.executable, "-m", "pipeline", "inspect", str(out_b)], cwd=ROOT,
                             env=_client_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0, inspect.stdout[-3000:] + inspect.stderr[-3000:]
    manifest = json.loads((out_b / "manifest.json").read_text())
    assert manifest["summary"]["recordings"] == len(TEXTS) and not manifest["summary"]["failed"]
    t_compared = time.time() - t0

    # 7. The `ray submit` route on the same cluster (now the head alone): workflows/curate.py
    # copied alone into a home directory and run there with the venv's interpreter, as
    # `ray submit` runs `python ~/curate.py ARGS` on the head. It finds the project through
    # $KIMIA_CURATE_HOME, works from it (a relative --config) and joins the cluster.
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(ROOT / "workflows" / "curate.py", home / "curate.py")
    out_c = tmp_path / "submitted"
    two = str(cluster_corpus / "rec[01].wav")
    args = _run_args(cluster_corpus, out_c)[3:]  # without "-m pipeline run"
    args[args.index(str(cluster_corpus))] = two
    env = {**cluster.env, "HOME": str(home), "KIMIA_CURATE_HOME": str(ROOT),
           "RAY_ADDRESS": f"127.0.0.1:{cluster.gcs_port}"}
    curate = subprocess.run([str(BIN / "python"), str(home / "curate.py"), *args], cwd=home, env=env,
                            capture_output=True, text=True, timeout=300)
    assert curate.returncode == 0, curate.stderr[-3000:]
    submitted = {k: text for k, _, text in _samples(out_c)}
    assert sorted(submitted) == sorted(k for k, (src, _) in reference.items() if src in ("rec0.wav", "rec1.wav"))
    assert all(wer(reference[k][1], t) <= 0.05 for k, t in submitted.items())

    alive = sorted({_title(p) for p in on_worker if p in _proc_table()})
    report = {
        "submissions": submissions, "first_job_rc": first_rc, "commits_at_kill": commits,
        "worker_node_work_at_kill": busy, "failed_attempts_on_worker_node": failed_on_worker,
        "worker_node_processes_left": alive, "registry_on": registry_on,
        "ledger_entries": len(list(state.glob("commit-*.json"))), "samples": len(keys), "worst_wer": worst,
        "embedded_s": round(t_embedded), "cluster_up_s": round(t_up), "kill_at_s": round(t_kill),
        "first_job_end_s": round(t_job), "compared_s": round(t_compared), "total_s": round(time.time() - t0),
    }
    print("cluster test:", json.dumps(report))

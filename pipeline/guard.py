"""What guards an OUT: one run at a time, and one output-changing config per OUT.

Two runs writing into one OUT would each believe their commits are the only ones, and a
resume could then read half of another run's shards. :class:`OutputLock` makes OUT
single-run with ``OUT/.lock``:

* created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and NFSv3+), holding the
  owner's pid, host and start time as JSON, so the message a second run prints says who
  holds it and since when;
* held with ``fcntl.flock`` on the open file for the whole run, a second guard on one
  host that does not depend on pids (the kernel drops it when the owner dies, even by
  SIGKILL, and it cannot be fooled by a reused pid in a flock-aware reader);
* a lock whose owner is a dead process on this host, or whose file is unreadable, is stale
  (a run killed with SIGKILL leaves one) and is taken over atomically: a new file is
  written under a temporary name and renamed over the old one while the old one's flock is
  held, and the result is read back, so of two runs taking over at once only one wins;
* a lock held from another host is never taken over, since its owner cannot be checked
  from here.

Resuming with a config that changes outputs (another threshold, another model) would mix
samples of two configs in one dataset without a trace. :func:`output_fingerprint` hashes
the parts of a config that change outputs, :func:`save_fingerprint` records it in
``OUT/_state/fingerprint.json``, and :func:`check_config_compatible` refuses a resume whose
fingerprint differs unless the user allows it (``--allow-config-change``).

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> with OutputLock(out):
    ...     (out / ".lock").is_file()
    True
    >>> (out / ".lock").exists()
    False
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import RunConfig

LOCK_NAME = ".lock"
FINGERPRINT_FILE = "_state/fingerprint.json"

#: An empty lock younger than this may be one another run has just created and not yet
#: written (microseconds, in practice): it is left alone rather than taken over.
_FRESH_S = 2.0
#: How long acquire() keeps looking while other runs create or take over the lock at the
#: same moment, before giving up. A lock held by a live run fails at once, not after this.
_CONTENDED_S = 5.0


class OutputLockedError(RuntimeError):
    """Another live run holds OUT; the message (one line) names it and says what to do."""


class ConfigChangedError(RuntimeError):
    """A resume with a config whose outputs would differ from those already in OUT."""


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not replaced or removed)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _parse(blob: bytes) -> dict[str, Any] | None:
    try:
        holder = json.loads(blob)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _write_fd(fd: int, blob: bytes) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, blob)
    os.fsync(fd)


class OutputLock:
    """Hold ``OUT/.lock`` for the duration of a ``with`` block (see the module docstring).

    Args:
        out: the output directory; created if missing.

    Raises:
        OutputLockedError: on entry, when a live run (or a run on another host) holds OUT.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.me: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *_: Any) -> None:
        self.release()

    def _read(self) -> dict[str, Any] | None:
        try:
            return _parse(self.path.read_bytes())
        except OSError:
            return None

    def _locked(self, holder: dict[str, Any] | None) -> OutputLockedError:
        who = (
            f"pid {holder['pid']} on host {holder.get('host')}, since {holder.get('started')}"
            if holder else "its owner is still writing the lock file"
        )
        return OutputLockedError(
            f"{self.out} is in use by another kimia-curate run ({who}): wait for it to finish, "
            f"or use another --output"
        )

    def acquire(self) -> None:
        """Take the lock, taking over a stale one.

        Raises:
            OutputLockedError: another live run holds it (at once), or other runs kept
                creating and taking it over for several seconds.
        """
        if self._fd is not None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + _CONTENDED_S
        while not (self._create() or self._take_over()):
            if time.monotonic() > deadline:
                raise self._locked(self._read())
            time.sleep(0.05)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return False
        # Blocking: only a reader probing the new file can hold its flock, for a moment.
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not _same_file(fd, self.path):
            os.close(fd)
            return False
        _write_fd(fd, json.dumps(self.me).encode())
        self._fd = fd
        return True

    def _take_over(self) -> bool:
        """Replace a stale lock; False to look again, :class:`OutputLockedError` if held."""
        try:
            old = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False  # released meanwhile: create it afresh
        try:
            try:
                fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read()
                if holder is None:
                    return False  # being written or taken over right now
                raise self._locked(holder) from None
            if not _same_file(old, self.path):
                return False
            blob = os.pread(old, 1 << 16, 0)
            holder = _parse(blob)
            if holder is None:
                if not blob and time.time() - os.fstat(old).st_mtime < _FRESH_S:
                    return False  # just created by another run, not written yet
            elif holder.get("host") != self.me["host"] or _alive(holder["pid"]):
                raise self._locked(holder)
            # Stale: the old file's flock is ours, so no other run can be replacing it now.
            tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _write_fd(fd, json.dumps(self.me).encode())
            os.replace(tmp, self.path)
            if self._read() != self.me or not _same_file(fd, self.path):
                os.close(fd)
                return False
            self._fd = fd
            return True
        finally:
            os.close(old)

    def release(self) -> None:
        """Remove the lock if this process still owns it; a no-op if it never took it."""
        if self._fd is None:
            return
        try:
            if self._read() == self.me and _same_file(self._fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


#: Keys, in any section (nested ones such as ``roundtrip.asr`` included), that change how
#: fast or where a stage runs, never what it writes.
SPEED_KEYS = frozenset({
    "batch_size", "num_workers", "num_cpus", "num_gpus", "device",
    "cpu_threads", "cpu_decoders", "torch_threads", "onnx_threads",
    "embed_batch_size", "pyannote_batch_size", "max_batch_windows",
    "token_env",  # names where a credential is read from, never what is written
})
#: Top-level entries that are not about outputs: cluster placement and read-ahead (``ray``),
#: where weights are cached (``models``), retry patience (``failures``), the default device
#: and the profile's name.
SPEED_SECTIONS = frozenset({"ray", "models", "failures", "device", "profile"})


def output_fingerprint(cfg: RunConfig | Mapping[str, Any]) -> str:
    """A short hash of the parts of a run config that change what a run writes.

    Left out, so that a resume on other hardware or with other throughput settings is
    allowed:

    * in every stage section (and nested sections): ``batch_size``, ``num_workers``,
      ``num_cpus``, ``num_gpus``, ``device``, the thread counts (``cpu_threads``,
      ``cpu_decoders``, ``torch_threads``, ``onnx_threads``), the inner batch sizes (``embed_batch_size``,
      ``pyannote_batch_size``, ``max_batch_windows``):
      stages are written so that results do not depend on batching or placement (up to
      floating-point noise between devices);
    * the ``ray`` section (cluster address, CPUs, object store, read-ahead), ``models``
      (``cache_dir`` only says where the same weights live: the model references
      themselves are in the stage sections and count), ``failures`` (retry patience),
      the top-level ``device`` default and the ``profile`` name;
    * ``diarize.token_env``, the name of the variable a credential is read from.

    Everything else counts, including every threshold, model, codebook, ``filter.keep_dropped``
    and the shard size limits of ``write`` (they change how samples are cut into files).

    Args:
        cfg: a :class:`pipeline.config.RunConfig`, or its ``model_dump(mode="json")``.

    Returns:
        16 hex digits.

    >>> a = {"ray": {"num_cpus": 2}, "filter": {"min_snr_db": 5, "batch_size": 8}}
    >>> b = {"ray": {"num_cpus": 64}, "filter": {"min_snr_db": 5, "batch_size": 256}}
    >>> output_fingerprint(a) == output_fingerprint(b)
    True
    >>> output_fingerprint(a) == output_fingerprint({**a, "filter": {"min_snr_db": 6}})
    False
    """
    config = dict(cfg) if isinstance(cfg, Mapping) else cfg.model_dump(mode="json")

    def strip(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: strip(v) for k, v in sorted(value.items()) if k not in SPEED_KEYS}
        if isinstance(value, (list, tuple)):
            return [strip(v) for v in value]
        return value

    kept = {k: strip(v) for k, v in config.items() if k not in SPEED_SECTIONS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def saved_fingerprint(out: Path) -> str | None:
    """The fingerprint an earlier run recorded in OUT, or None (none, or unreadable)."""
    try:
        value = json.loads((Path(out) / FINGERPRINT_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def save_fingerprint(out: Path, fingerprint: str) -> None:
    """Record ``fingerprint`` as OUT's, atomically (temporary file, then rename).

    Args:
        out: the output directory.
        fingerprint: from :func:`output_fingerprint`.
    """
    path = Path(out) / FINGERPRINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    os.replace(tmp, path)


def check_config_compatible(out: Path, fingerprint: str, allow_change: bool) -> None:
    """Refuse to resume OUT with a config whose outputs differ from the recorded one.

    An OUT with no recorded fingerprint (new, or written before fingerprints existed) is
    always compatible. This only checks; record the fingerprint with
    :func:`save_fingerprint` once the run is allowed to go on.

    Args:
        out: the output directory.
        fingerprint: this run's, from :func:`output_fingerprint`.
        allow_change: the user passed ``--allow-config-change``.

    Raises:
        ConfigChangedError: one line naming both fingerprints and ``--allow-config-change``.
    """
    before = saved_fingerprint(out)
    if before is not None and before != fingerprint and not allow_change:
        raise ConfigChangedError(
            f"{out} was written with another config (fingerprint {before}, this one {fingerprint}): "
            f"resume with the original config, use another --output, or pass --allow-config-change"
        )

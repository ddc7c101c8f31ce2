"""What guards an OUT: one run at a time, and one output-changing config per OUT.

Two runs writing into one OUT would each believe their commits are the only ones, and a
resume could then read half of another run's shards. The lock is ``OUT/.lock``, created with
``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ filesystems) and holding the owner's pid,
host and start time, so the message a second run prints says who holds it. A lock whose
owner is a dead process on this host is stale (a run killed with SIGKILL leaves one) and
is taken over; a lock held from another host is never taken over, since its owner cannot
be checked from here.

Resuming with a config that changes outputs (another threshold, another model) would mix
samples of two configs in one dataset without a trace. :func:`output_fingerprint` hashes
the parts of a config that change outputs; :func:`check_fingerprint` refuses a resume whose
fingerprint differs from the one OUT was started with, unless the user allows it.

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

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"


class OutputLockedError(RuntimeError):
    """Another live run holds OUT; the message names it and says what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputLock:
    """Hold ``OUT/.lock`` for the duration of a ``with`` block (see the module docstring)."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_NAME
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *_: Any) -> None:
        self.release()

    def _read(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise :class:`OutputLockedError` if held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        blob = json.dumps(self.me).encode()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is not None and (holder.get("host") != self.me["host"] or _alive(holder["pid"])):
                    raise OutputLockedError(
                        f"{self.path.parent} is in use by another kimia-curate run (pid {holder['pid']} on "
                        f"{holder.get('host')}, since {holder.get('started')}): wait for it to finish or use another "
                        f"--output"
                    ) from None
                # Stale (dead owner here) or unreadable: replace it atomically, then re-check
                # that we won, since another run may be taking it over at the same moment.
                tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
                tmp.write_bytes(blob)
                os.replace(tmp, self.path)
                if self._read() == self.me:
                    return
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            return
        raise OutputLockedError(f"{self.path.parent}: could not take the lock {self.path} (another run is taking it over)")

    def release(self) -> None:
        """Remove the lock if this process still owns it."""
        if self._read() == self.me:
            self.path.unlink(missing_ok=True)


#: Keys that change where and how fast a run goes, never what it writes: they are left out
#: of the fingerprint so that a resume on another machine or with other batch sizes is allowed.
SPEED_KEYS = frozenset({"batch_size", "num_workers", "num_cpus", "num_gpus", "device", "threads"})
#: Whole sections of the same kind: cluster placement, where weights are cached, retry patience.
SPEED_SECTIONS = frozenset({"ray", "models", "failures", "device", "profile"})
FINGERPRINT_FILE = "_state/fingerprint.json"


class ConfigChangedError(RuntimeError):
    """A resume with a config whose outputs would differ from those already in OUT."""


def output_fingerprint(config: dict[str, Any]) -> str:
    """A hash of the parts of a resolved config (``RunConfig.model_dump``) that change outputs.

    >>> a = {"ray": {"num_cpus": 2}, "filter": {"min_snr_db": 5, "batch_size": 8}}
    >>> b = {"ray": {"num_cpus": 64}, "filter": {"min_snr_db": 5, "batch_size": 256}}
    >>> output_fingerprint(a) == output_fingerprint(b)
    True
    >>> output_fingerprint(a) == output_fingerprint({**a, "filter": {"min_snr_db": 6}})
    False
    """
    import hashlib

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in sorted(value.items()) if k not in SPEED_KEYS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    kept = {k: strip(v) for k, v in config.items() if k not in SPEED_SECTIONS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_fingerprint(out: Path, fingerprint: str, *, allow_change: bool) -> None:
    """Record OUT's fingerprint on first use; refuse a different one unless ``allow_change``."""
    path = Path(out) / FINGERPRINT_FILE
    try:
        before = json.loads(path.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        before = None
    if before is not None and before != fingerprint and not allow_change:
        raise ConfigChangedError(
            f"{out} was written with another config (fingerprint {before}, this one {fingerprint}): "
            f"resume with the original config, use another --output, or pass --allow-config-change"
        )
    if before != fingerprint:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        os.replace(tmp, path)

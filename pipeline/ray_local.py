"""Start (or join) the Ray a run uses: an embedded one on loopback only, quiet unless asked.

An embedded Ray is a private cluster of one machine, yet by default Ray binds its GCS,
raylet, object manager, dashboard agent and workers to the machine's external address, so
anyone on the network could reach them (Ray's ports run arbitrary code). Two settings keep
every listener on 127.0.0.1:

* ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by Ray when ``ray`` is first imported
  (``ray._private.ray_constants.ENABLE_RAY_CLUSTER``): the node address it picks is then
  loopback. It is set here before the import; if ``ray`` was imported earlier, the constant
  is set as well, and the processes Ray spawns inherit the variable;
* ``_node_ip_address="127.0.0.1"`` passed to ``ray.init``, and no dashboard.

Both are applied only to the embedded Ray: a driver joining a real cluster must announce
its real address.

Ray also prints start-up lines, worker logs, a token-authentication notice and
usage-stats notices to the terminal; a run shows its own progress bar and summary instead.
By default workers do not log to the driver, Ray's loggers stay at WARNING, usage stats
are off and the embedded Ray's (default) token authentication is chosen explicitly, which
keeps it on without the notice; ``verbose=True`` (``kimia-curate run -v``) restores Ray's
INFO output and worker logs.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import RunConfig

LOOPBACK = "127.0.0.1"
#: Makes Ray pick loopback as the node address (see the module docstring).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: Set (unless the user set them) for every Ray this module starts or joins.
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage-stats notice, no phoning home
}


def _project_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _keep_on_loopback() -> None:
    """Make the embedded Ray choose 127.0.0.1, before or after ``ray`` was imported."""
    os.environ[LOOPBACK_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # imported already: the variable alone comes too late
        constants.ENABLE_RAY_CLUSTER = False


def init_ray(cfg: RunConfig, address: str | None, *, verbose: bool = False) -> None:
    """Join the Ray cluster at ``address``, or start a private embedded Ray on loopback.

    A no-op when Ray is already initialised in this process.

    Args:
        cfg: the run config; ``cfg.ray`` gives the address (when ``address`` is None) and
            the embedded Ray's ``num_cpus`` and ``object_store_memory_gb``.
        address: a cluster address (``auto``, ``ray://...``, ``HOST:PORT``); None falls
            back to ``cfg.ray.address``, then ``RAY_ADDRESS``; none of them means embedded.
        verbose: let Ray log at INFO and forward worker logs to the terminal.
    """
    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)

    if not address:
        _keep_on_loopback()
        # Ray 2.60 turns token authentication on for a cluster it starts, and says so on the
        # terminal unless the mode was chosen: choose it (the same mode), silently.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        return
    if address:
        # On a cluster the code reaches workers through the job's runtime_env (ray job
        # submit --working-dir) or an install on the nodes; adding a runtime_env here would
        # conflict with the job's own. Worker logs are the only trace of a remote failure.
        ray.init(address=address, log_to_driver=True)
        return
    # The workers find the project through PYTHONPATH, inherited from this process by the
    # raylet it spawns. Not through a job runtime_env: a job with one cannot use the workers
    # Ray pre-starts, so every first task and actor waited for a fresh worker (about 3 s
    # more on 2 cores before any stage ran).
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if _project_root() not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_project_root(), *paths) if p)
    kwargs: dict[str, Any] = {
        "_node_ip_address": LOOPBACK,
        # "local" always starts a private instance; a bare ray.init() would attach to any
        # cluster already running on this machine (someone else's, or a stale one).
        "address": "local",
        "include_dashboard": False,
        "log_to_driver": verbose,
        "configure_logging": True,
        "logging_level": logging.INFO if verbose else logging.WARNING,
    }
    if cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg.ray.object_store_memory_gb:
        kwargs["object_store_memory"] = int(cfg.ray.object_store_memory_gb * 1e9)
    ray.init(**kwargs)

"""Entrypoint for ``ray submit workflows/cluster.yaml workflows/curate.py -- ARGS``.

``ray submit`` copies only this file, to ``~/curate.py`` on the head node, and runs it
there as ``python ~/curate.py ARGS`` in a login shell (``~/.bashrc`` is sourced, which is
where ``workflows/cluster.yaml`` activates the project's venv). The project itself is
therefore not next to this file; it is found, in this order, at:

1. ``$KIMIA_CURATE_HOME``, if set;
2. the checkout this file sits in (``workflows/curate.py`` run from a clone);
3. ``~/kimia-curate``, where ``workflows/cluster.yaml`` mounts the repository;
4. the installed ``pipeline`` package (``pip install -e``), if its checkout has ``configs/``.

The script then works from that directory, so ``--config configs/kimi_audio.yaml`` and
other relative paths are relative to the project on the head node. It joins the running
cluster (``--address auto`` unless given) and runs the same job as ``kimia-curate run ARGS``.
Re-submitting the same command after a failure resumes from the output's last commit.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

#: Where workflows/cluster.yaml's file_mounts put the repository on every node.
MOUNTED = "~/kimia-curate"
HOME_ENV = "KIMIA_CURATE_HOME"


def _is_project(path: Path) -> bool:
    return (path / "pipeline" / "cli.py").is_file() and (path / "configs").is_dir()


def find_project() -> Path | None:
    """The kimia-curate checkout to run from (see the module docstring), or None."""
    candidates = []
    if os.environ.get(HOME_ENV):
        candidates.append(Path(os.environ[HOME_ENV]).expanduser())
    candidates += [Path(__file__).resolve().parent.parent, Path(MOUNTED).expanduser()]
    spec = importlib.util.find_spec("pipeline")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).resolve().parent.parent)
    return next((c.resolve() for c in candidates if _is_project(c)), None)


def main(argv: list[str]) -> int:
    """Find the project, work from it, and run ``kimia-curate run ARGV`` on the cluster."""
    root = find_project()
    if root is None:
        print(
            f"curate.py: cannot find the kimia-curate project on this node (looked at ${HOME_ENV}, "
            f"{Path(__file__).resolve().parent.parent}, {MOUNTED} and the installed `pipeline` package): "
            f"mount the repository at {MOUNTED} (workflows/cluster.yaml file_mounts) or set {HOME_ENV}",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(root))
    os.chdir(root)
    try:
        # The CLI imports most of its dependencies lazily: check the core ones up front.
        import numpy  # noqa: F401
        import pydantic  # noqa: F401
        import ray  # noqa: F401

        from pipeline.cli import main as cli_main
    except ImportError as exc:
        print(
            f"curate.py: found the project at {root} but {sys.executable} cannot import its dependencies "
            f"({exc}): run with the interpreter of the venv workflows/cluster.yaml sets up "
            f"(~/kimia-venv/bin/python; `source ~/kimia-venv/bin/activate` in ~/.bashrc)",
            file=sys.stderr,
        )
        return 2
    args = list(argv)
    if "--address" not in args:
        args += ["--address", os.environ.get("RAY_ADDRESS", "auto")]
    return cli_main(["run", *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

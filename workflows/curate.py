"""Entrypoint for ``ray submit workflows/cluster.yaml workflows/curate.py -- ARGS``.

``ray submit`` runs this file on the head node; it joins the running cluster
(``--address auto``) and runs the same job as ``kimia-curate run ARGS``. Re-submitting the
same command after a failure resumes from the output's last commit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parent.parent)
    args = sys.argv[1:]
    if "--address" not in args:
        args += ["--address", os.environ.get("RAY_ADDRESS", "auto")]
    sys.exit(main(["run", *args]))

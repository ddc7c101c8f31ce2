"""Audit of a kimia-curate output: integrity, distributions, drop reasons, run comparison.

``audit(OUT)`` writes ``OUT/audit/report.html`` (self-contained: inline SVG plots and base64
audio players, opens offline) and ``OUT/audit/audit.json``; ``audit(OUT, against=BASE)`` adds
what changed from run ``BASE`` to run ``OUT`` and why. Shards are scanned in parallel on
Ray when ``ray`` is initialised, else in a local thread pool, and stream through in bounded
memory (see :mod:`pipeline.audit.core`).

Example:
    >>> from pipeline.audit import audit                      # doctest: +SKIP
    >>> doc = audit(Path("OUT"))                            # doctest: +SKIP
    >>> doc["integrity"]["ok"], doc["totals"]["hours_kept"]  # doctest: +SKIP
"""

from __future__ import annotations

from pipeline.audit.cli import main
from pipeline.audit.core import audit, build_document, scan_run
from pipeline.audit.scan import CHECKS, scan_shard

__all__ = ["CHECKS", "audit", "build_document", "main", "scan_run", "scan_shard"]

"""``kimia-curate audit OUT [--against BASE]`` (also ``python -m pipeline.audit``).

The arguments are declared once, in :func:`add_arguments`, so the ``kimia-curate audit``
subcommand and ``python -m pipeline.audit`` accept (and ``--help`` shows) the same options.
Exit codes: 0 every integrity check passed, 1 one failed, 2 bad usage (one line on stderr),
so a CI job or a Ray job can gate on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.usage import OneLineParser, UsageError, existing_dir, report

DESCRIPTION = "Quality report of a run: OUT/audit/report.html (offline, plots, audio players) and OUT/audit/audit.json."


def _positive(value: str) -> int:
    """An argparse type: an integer >= 1 (a worker count)."""
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {n})")
    return n


def _non_negative(value: str) -> int:
    """An argparse type: an integer >= 0 (how many examples to show)."""
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {n})")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the audit's arguments on ``parser``."""
    parser.add_argument("out", metavar="OUT", help="output folder of a run")
    parser.add_argument("--against", default=None, metavar="BASE", help="baseline run to compare with")
    parser.add_argument("--workers", type=_positive, default=None, help="shard scans in flight")
    parser.add_argument("--worst-k", type=_non_negative, default=3, help="examples per metric with audio players")
    parser.add_argument("--address", default=None,
                        help="Ray address to scan shards on a cluster ('auto' joins the running one); "
                             "default: local threads")


def run(args: argparse.Namespace) -> int:
    """Audit ``args.out``; raises :class:`UsageError` before any work when a folder is missing."""
    out = existing_dir(args.out, "OUT", "pass the --output folder of a finished run")
    against = None
    if args.against is not None:
        against = existing_dir(args.against, "--against BASE", "pass the output folder of the run to compare with")
    from stages.write.layout import OutLayout

    if not OutLayout(out).is_output():
        # Likely an input folder passed by mistake: the report must not be written into it.
        raise UsageError(f"{args.out} is not the output of a run (no manifest.json, index/ or _state/): "
                         "pass the --output folder of kimia-curate run")
    from pipeline.audit.core import audit

    if args.address:
        import ray

        ray.init(address=args.address)
    doc = audit(out, against, workers=args.workers, worst_k=args.worst_k)
    t = doc["totals"]
    print(f"hours in {t['hours_in']}, kept {t['hours_kept']} ({t['samples_kept']} segments), "
          f"dropped {t['samples_dropped']}, quarantined {t['quarantined']}")
    for check, c in doc["integrity"]["checks"].items():
        if c["status"] == "fail":
            print(f"FAIL {check}: {c['failures']} finding(s)")
    print(f"report: {OutLayout(out).audit_dir / 'report.html'}")
    return 0 if doc["integrity"]["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.audit``: parse, run, and turn a usage mistake into one line, exit 2."""
    parser = OneLineParser(prog="python -m pipeline.audit", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        return report("audit", exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``kimia-curate audit OUT [--against BASE]`` (also ``python -m stages.audit``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Run the audit; exit code 0 when every integrity check passes, 1 when one fails, 2 on
    bad usage, so a CI job or a Ray job can gate on it."""
    parser = argparse.ArgumentParser(prog="kimia-curate audit", description=__doc__)
    parser.add_argument("out", type=Path, help="output folder of a run")
    parser.add_argument("--against", type=Path, default=None, help="baseline run to compare with")
    parser.add_argument("--workers", type=int, default=None, help="shard scans in flight")
    parser.add_argument("--worst-k", type=int, default=3, help="examples per metric with audio players")
    parser.add_argument("--address", default=None,
                        help="Ray address to scan shards on a cluster ('auto' joins the running one); "
                             "default: local threads")
    args = parser.parse_args(argv)
    from stages.audit.core import audit

    if not args.out.is_dir():
        print(f"audit: {args.out} is not a directory", file=sys.stderr)
        return 2
    if args.against is not None and not args.against.is_dir():
        print(f"audit: --against {args.against} is not a directory", file=sys.stderr)
        return 2
    if args.address:
        import ray

        ray.init(address=args.address)
    doc = audit(args.out, args.against, workers=args.workers, worst_k=args.worst_k)
    t = doc["totals"]
    print(f"hours in {t['hours_in']}, kept {t['hours_kept']} ({t['samples_kept']} segments), "
          f"dropped {t['samples_dropped']}, quarantined {t['quarantined']}")
    for check, c in doc["integrity"]["checks"].items():
        if c["status"] == "fail":
            print(f"FAIL {check}: {c['failures']} finding(s)")
    print(f"report: {args.out / 'audit' / 'report.html'}")
    return 0 if doc["integrity"]["ok"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

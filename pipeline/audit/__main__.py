"""``python -m pipeline.audit OUT [--against BASE]``."""

from __future__ import annotations

import sys

from pipeline.audit.cli import main

sys.exit(main())

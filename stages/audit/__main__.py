"""``python -m stages.audit OUT [--against BASE]``."""

from __future__ import annotations

import sys

from stages.audit.cli import main

sys.exit(main())

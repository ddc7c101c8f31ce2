"""``python -m pipeline`` is the same as the ``kimia-curate`` command."""

import sys

from pipeline.cli import main

sys.exit(main())

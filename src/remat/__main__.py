"""``python -m remat``: the ``remat`` command."""

import sys

from remat.app.cli import main

sys.exit(main())

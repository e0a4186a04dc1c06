"""``python -m embscale``: the same as the ``embscale`` command."""

import sys

from embscale.cli import main

sys.exit(main())

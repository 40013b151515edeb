"""``python -m care``: the same as the ``care`` command (DDP relaunches use this form too)."""

import sys

from care.cli import main

sys.exit(main())

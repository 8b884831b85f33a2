"""``python -m shoal``: the ``shoal`` command (``run``, ``exec``, ``status``, ``results``,
``info``, ``demo``); see :mod:`shoal.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

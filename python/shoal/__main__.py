"""``python -m shoal``: the demo and a short info command."""

import sys

from ._demo import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m cachescope``: the ``cachescope`` command."""

import sys

from cachescope.cli import main

if __name__ == "__main__":
    sys.exit(main())

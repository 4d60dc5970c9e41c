"""`python -m edgetune`: the same command as `edgetune`."""

import sys

from edgetune.cli import main

if __name__ == "__main__":
    sys.exit(main())

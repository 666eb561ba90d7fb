"""`python -m toolkit.bench ...`: the same as `python -m toolkit bench ...`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

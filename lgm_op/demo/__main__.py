"""``python -m lgm_op.demo [options]``: see ``python -m lgm_op.demo --help``."""
import sys

from .cli import main

# The guard keeps worker processes (which re-import this module) from starting the demo again.
if __name__ == "__main__":
    sys.exit(main())

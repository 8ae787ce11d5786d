"""``python -m benchmarks --quick | --full`` (from the repository root).

Kept free of imports at module level: spawn and forkserver children import this module as
``__mp_main__``, and their memory is part of what is measured.
"""

import sys

if __name__ == "__main__":
    from benchmarks._cli import main

    sys.exit(main())

"""``python -m benchmarks --quick | --full`` (from the repository root).

Kept free of imports at module level: spawn and forkserver children import this module as
``__mp_main__``, and their memory is part of what is measured.
"""

import os
import sys

if __name__ == "__main__":
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        # Measured as users run, with bytecode cached: some machines set this, and every
        # worker process (spawn passes it on as -B) would compile the modules it imports
        # lazily inside the timings, every time. Started again without it.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *sys.argv[1:]], env)
    from benchmarks._cli import main

    sys.exit(main())

"""``python -m mmcache``: the same command as ``mmcache``."""

import sys

from ._cli import main

sys.exit(main())

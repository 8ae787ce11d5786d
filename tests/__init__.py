"""mmcache's tests.

``MMCACHE_TEST_COW=1`` runs them with pandas 2's copy-on-write on (pandas 2 defaults to off;
pandas 3 always copies on write), in this process and in every worker process that imports
this package (they all do, to find their task functions); ``.ci/run`` runs both on pandas 2.
"""

import os

if os.environ.get("MMCACHE_TEST_COW") == "1":
    import pandas as pd

    if int(pd.__version__.split(".")[0]) < 3:
        pd.options.mode.copy_on_write = True

"""mmcache's tests.

``MMCACHE_TEST_COW=1`` runs them with pandas 2's copy-on-write on (pandas 2 defaults to off;
pandas 3 always copies on write), in this process and in every worker process that imports
this package (they all do, to find their task functions); ``.ci/run`` runs both on pandas 2.

``MMCACHE_EXAMPLES_SCALE`` (a number, default 1) scales every property test's hypothesis
example count (:func:`examples`): the default run keeps the full counts; ``.ci/run``'s version
matrix runs use fewer (they are there for what a pandas, numpy or pyarrow release changes, not
to search mmcache's own logic again), humans may ask for more.
"""

import os


def examples(full: int) -> int:
    """Hypothesis examples for a property test whose full count is ``full``, scaled by
    ``MMCACHE_EXAMPLES_SCALE`` (never below 1)."""
    return max(1, round(full * float(os.environ.get("MMCACHE_EXAMPLES_SCALE", "1"))))


if os.environ.get("MMCACHE_TEST_COW") == "1":
    import pandas as pd

    if int(pd.__version__.split(".")[0]) < 3:
        pd.options.mode.copy_on_write = True

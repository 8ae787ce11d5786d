"""Workarounds for pandas code that writes into the arrays it is given.

mmcache hands out columns over read-only memory maps. pandas copy-on-write copies a column
before an edit, so almost every operation works on them, but a few internal algorithms write
into their *input* buffers as scratch space, which raises "assignment destination is
read-only" on an opened frame (and on any frame built over read-only arrays).

Each workaround below names the pandas code it covers, acts only on read-only inputs (so a
plain frame takes pandas' own path, unchanged) and never makes a mapped buffer writable.
Differences between pandas versions that mmcache must bridge belong here too.

Audit (pandas 3.1, ``pandas/core/arrays/masked.py`` and ``array_algos``): of the masked-array
(``Int*``, ``UInt*``, ``Float*``, ``boolean``) operations, only the accumulations write into
their input. ``fillna``, ``pad_or_backfill``, ``interpolate``, ``clip``, ``round``, the
reductions (``masked_reductions``: sum, prod, min, max, mean, var, std, any, all), ufuncs,
arithmetic and groupby kernels copy first or take ``const`` views, and their ``copy=False``
paths are reached only after copy-on-write has copied the block (see
``tests/test_trust_codecs.py``, which runs them on an opened frame).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

_ACCUMULATIONS = ("cumsum", "cumprod", "cummin", "cummax")


def _copy_if_read_only(
    func: Callable[..., tuple[np.ndarray, np.ndarray]],
) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """Wrap one of pandas' masked accumulations so read-only inputs are copied first.

    ``pandas.core.array_algos.masked_accumulations._cum_func`` fills the masked slots of
    ``values`` in place (``values[mask] = fill_value``) before accumulating, and with
    ``skipna=True`` returns ``mask`` itself as the result's mask. ``BaseMaskedArray._accumulate``
    passes the column's own ``_data`` and ``_mask``, so ``Series.cumsum()`` (and cumprod,
    cummin, cummax, also via ``DataFrame``) fails on a read-only column. Copying a read-only
    ``values`` (and a read-only ``mask``, which the result would otherwise share and could not
    be edited through) costs what pandas' own result costs anyway.
    """

    @functools.wraps(func)
    def accumulate(values: np.ndarray, mask: np.ndarray, *args: Any,
                   **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        if not values.flags.writeable:
            values = values.copy()
        if not mask.flags.writeable:
            mask = mask.copy()
        return func(values, mask, *args, **kwargs)

    accumulate.__mmcache_wraps__ = func  # type: ignore[attr-defined]
    return accumulate


def install() -> None:
    """Apply the workarounds (idempotent; called when mmcache is imported)."""
    try:
        from pandas.core.array_algos import masked_accumulations
    except ImportError:  # pragma: no cover - a pandas without masked accumulations
        return
    # BaseMaskedArray._accumulate looks the function up by name at each call.
    for name in _ACCUMULATIONS:
        func = getattr(masked_accumulations, name, None)
        if func is not None and not hasattr(func, "__mmcache_wraps__"):
            setattr(masked_accumulations, name, _copy_if_read_only(func))

"""Modules that annotations name, imported only when something looks inside them."""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """Stands for module ``name`` until one of its attributes is read, which imports it.

    pandas and pyarrow load on first use (``mmcache ls`` and ``clean`` never need them), but
    the public API's annotations name them: with this in the module's globals, they resolve at
    run time (``typing.get_type_hints``: Sphinx, pydantic, beartype) like any annotation."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use>"


pd = LazyModule("pandas")
pa = LazyModule("pyarrow")

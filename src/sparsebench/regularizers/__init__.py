"""Regularizer plug-ins: every module in this package registers one by name.

Adding a regularizer is adding one file here; it is discovered on import.
"""

import importlib
import pkgutil

from sparsebench.regularizers.base import (
    Regularizer,
    UnknownRegularizerError,
    build,
    get,
    register,
    registered,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Regularizer", "UnknownRegularizerError", "build", "get", "register", "registered"]

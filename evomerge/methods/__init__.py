"""Merge methods: `METHODS` holds every family below once this package is imported.

One file per family; each registers its methods on import (see base.py for the contract).
"""

from __future__ import annotations

from evomerge.methods import generalized, linear, model_stock, passthrough, slerp
from evomerge.methods.base import METHODS, MergeInput, MergeMethod, Param, register_method

__all__ = [
    "METHODS",
    "MergeInput",
    "MergeMethod",
    "Param",
    "generalized",
    "linear",
    "model_stock",
    "passthrough",
    "register_method",
    "slerp",
]

"""Merge methods: one file per family, each defining its `MergeMethod`s (see base.py).

The entries below are lazy: a family's module is imported when one of its methods is first asked
for. The task-vector families (task arithmetic, TIES, DARE, breadcrumbs, DELLA) share
task_vectors.py; nuslerp and multislerp take base_model as the origin when one is set. A plugin adds a method with `register_method(MergeMethod(...))`, or from another
package through the `evomerge.methods` entry-point group.
"""

from __future__ import annotations

from evomerge.methods.base import METHODS, MergeInput, MergeMethod, Param, register_method

for _name, _ref in {
    "linear": "evomerge.methods.linear:LINEAR",
    "task_arithmetic": "evomerge.methods.task_arithmetic:TASK_ARITHMETIC",
    "ties": "evomerge.methods.ties:TIES",
    "dare_ties": "evomerge.methods.dare:DARE_TIES",
    "dare_linear": "evomerge.methods.dare:DARE_LINEAR",
    "breadcrumbs": "evomerge.methods.breadcrumbs:BREADCRUMBS",
    "breadcrumbs_ties": "evomerge.methods.breadcrumbs:BREADCRUMBS_TIES",
    "della": "evomerge.methods.della:DELLA",
    "della_linear": "evomerge.methods.della:DELLA_LINEAR",
    "slerp": "evomerge.methods.slerp:SLERP",
    "model_stock": "evomerge.methods.model_stock:MODEL_STOCK",
    "passthrough": "evomerge.methods.passthrough:PASSTHROUGH",
    "nuslerp": "evomerge.methods.nuslerp:NUSLERP",
    "multislerp": "evomerge.methods.multislerp:MULTISLERP",
    "karcher": "evomerge.methods.karcher:KARCHER",
    "sce": "evomerge.methods.sce:SCE",
    "nearswap": "evomerge.methods.nearswap:NEARSWAP",
    "arcee_fusion": "evomerge.methods.arcee_fusion:ARCEE_FUSION",
    "ram": "evomerge.methods.ram:RAM",
    "ramplus_tl": "evomerge.methods.ram:RAMPLUS_TL",
}.items():
    METHODS.register(_name, _ref)

__all__ = ["METHODS", "MergeInput", "MergeMethod", "Param", "register_method"]

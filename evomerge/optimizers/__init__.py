"""Search optimizers behind one ask/tell interface (see base.py for the contract).

| name            | what                                   | categoricals            | objectives |
| --------------- | -------------------------------------- | ----------------------- | ---------- |
| `cma`           | pycma CMA-ES, generation by generation | per-choice scores, argmax | 1        |
| `optuna_tpe`    | Optuna TPESampler                      | native                  | 1 or more  |
| `optuna_cmaes`  | Optuna CmaEsSampler                    | per-choice scores, argmax | 1        |
| `optuna_nsga2`  | Optuna NSGAIISampler                   | native                  | 1 or more  |
| `optuna_random` | Optuna RandomSampler (baseline)        | native                  | 1 or more  |

Entries are lazy: a module is imported when its optimizer is first asked for, and cma and Optuna
only when an optimizer is built. A new optimizer is one module with an `Optimizer` subclass and
one line here (or, from another package, an `evomerge.optimizers` entry point).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evomerge.optimizers.base import OPTIMIZERS, Dimension, Optimizer, Proposal, register_optimizer

for _name, _ref in {
    "cma": "evomerge.optimizers.cma_es:CMAOptimizer",
    "optuna_tpe": "evomerge.optimizers.optuna_samplers:TPEOptimizer",
    "optuna_cmaes": "evomerge.optimizers.optuna_samplers:OptunaCmaEsOptimizer",
    "optuna_nsga2": "evomerge.optimizers.optuna_samplers:NSGA2Optimizer",
    "optuna_random": "evomerge.optimizers.optuna_samplers:RandomOptimizer",
}.items():
    OPTIMIZERS.register(_name, _ref)


def create_optimizer(name: str, dims: Sequence[Dimension], **kw: Any) -> Optimizer:
    """Start a new search: `kw` are Optimizer's keyword arguments (state_dir is required)."""
    return OPTIMIZERS.get(name, where="optimizer.name")(dims, **kw)


def load_optimizer(name: str, dims: Sequence[Dimension], **kw: Any) -> Optimizer:
    """Continue the search whose state `save()` wrote into kw['state_dir']."""
    return OPTIMIZERS.get(name, where="optimizer.name").load(dims, **kw)


__all__ = [
    "OPTIMIZERS",
    "Dimension",
    "Optimizer",
    "Proposal",
    "create_optimizer",
    "load_optimizer",
    "register_optimizer",
]

"""Search optimizers behind one ask/tell interface (see base.py for the contract).

| name            | what                                   | categoricals            | objectives |
| --------------- | -------------------------------------- | ----------------------- | ---------- |
| `cma`           | pycma CMA-ES, generation by generation | per-choice scores, argmax | 1        |
| `optuna_tpe`    | Optuna TPESampler                      | native                  | 1 or more  |
| `optuna_cmaes`  | Optuna CmaEsSampler                    | per-choice scores, argmax | 1        |
| `optuna_nsga2`  | Optuna NSGAIISampler                   | native                  | 1 or more  |
| `optuna_random` | Optuna RandomSampler (baseline)        | native                  | 1 or more  |

cma and Optuna are imported only when an optimizer is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evomerge.optimizers import cma_es, optuna_samplers
from evomerge.optimizers.base import OPTIMIZERS, Dimension, Optimizer, Proposal, register_optimizer


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
    "cma_es",
    "create_optimizer",
    "load_optimizer",
    "optuna_samplers",
    "register_optimizer",
]

"""How lm-eval seeds and logs: the scorer seeds as simple_evaluate does and drops its CLI noise."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from evomerge.quiet import quiet_logger

if TYPE_CHECKING:
    import torch

# lm_eval.evaluator.simple_evaluate's defaults random_seed=0 and numpy_random_seed=1234: seeded
# like this, building tasks (few-shot samplers, shuffles) draws the numbers simple_evaluate draws
_PY_SEED, _NP_SEED = 0, 1234


@contextlib.contextmanager
def seeded(torch_seed: int, device: torch.device) -> Iterator[None]:
    """Seed python, numpy and torch as simple_evaluate does; restore the caller's RNG after,
    so scoring never shifts the optimizer's random stream."""
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        random.seed(_PY_SEED)
        np.random.seed(_NP_SEED)
        torch.manual_seed(torch_seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def quiet_hflm() -> AbstractContextManager[None]:
    """Silence the logger of lm_eval.models.huggingface below ERROR while an HFLM is built: its
    constructor warns "`pretrained` model kwarg is not of type `str`" for every in-memory model,
    which is exactly how we use it."""
    return quiet_logger("lm_eval.models.huggingface")


class _NoCustomDatasetHint(logging.Filter):
    """Drops the warning that `ConfigurableTask.download` (logger lm_eval.api.task) writes for
    every task with a `custom_dataset` ("Custom kwargs can be passed to `--metadata`..."):
    advice for lm-eval's own CLI, noise for ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


@contextlib.contextmanager
def without_custom_dataset_hint() -> Iterator[None]:
    log, hint = logging.getLogger("lm_eval.api.task"), _NoCustomDatasetHint()
    log.addFilter(hint)
    try:
        yield
    finally:
        log.removeFilter(hint)

"""The plain lm-eval path, as a naive search loop runs it per candidate: the scorer's reference.

`fresh_evaluate` wraps the model in a new HFLM, indexes the tasks anew and calls
`lm_eval.simple_evaluate`: public lm-eval API only, sharing nothing with the resident scorer but
the seeds and the quiet logs. The bench times the scorer against it; the tests compare their
numbers (they must be equal).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from evomerge.scoring import ScoringSettings
from evomerge.scoring.catalog import check_include_paths, normalize_metrics, task_manager
from evomerge.scoring.lm_eval_adapter.runtime import (
    quiet_hflm,
    seeded,
    without_custom_dataset_hint,
)
from evomerge.scoring.scorer import device_of


def fresh_evaluate(
    model: Any, tokenizer: Any, config: ScoringSettings
) -> dict[str, dict[str, float]]:
    """What a naive search loop does per candidate: wrap, index tasks, `simple_evaluate`."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    paths = check_include_paths(config.include_paths)
    local = task_manager(paths, False).task_index
    builtins = any(t not in local and not Path(t).is_file() for t in config.tasks)
    with (
        seeded(config.seed, device_of(model)),
        quiet_hflm(),
        without_custom_dataset_hint(),
        contextlib.redirect_stderr(io.StringIO()),  # lm-eval's own request bars
    ):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
        tm = TaskManager(include_path=list(paths) or None, include_defaults=builtins)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(config.tasks),
            task_manager=tm,
            limit=config.limit,
            num_fewshot=config.num_fewshot,
            batch_size=config.batch_size,
            apply_chat_template=config.apply_chat_template,
            fewshot_as_multiturn=config.apply_chat_template,
            fewshot_random_seed=config.fewshot_seed,
            torch_random_seed=config.seed,
            bootstrap_iters=0,
            log_samples=False,
        )
    return normalize_metrics(out["results"])

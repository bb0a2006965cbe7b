"""What a fitness value means in one run, fixed when the run starts.

Every trial of a run must be scored the same way, or "the best" is picked across two definitions.
`run` records the fields that decide a fitness in `RUN_DIR/fitness.json`; `resume` compares the
run's study.yaml against it before writing anything and refuses a change, naming the fields. The
fields: the tasks (search and held-out, where they are found, limit, few-shot), the objective, the
`fitness` section (fidelity, estimator), the models (names, paths, base), the dtype, the search
space, the seed and the optimizer (name and options). The budget, the executor, the device and the
batch size may change between runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evomerge.atomic import atomic_write
from evomerge.config import StudyConfig
from evomerge.errors import RunDirError

FITNESS = "fitness.json"
_FORMAT = 1


class FitnessChangedError(RunDirError):
    """The run's study.yaml no longer defines fitness as it did when the run started."""


def fitness_definition(config: StudyConfig) -> dict[str, Any]:
    """The canonical fields (plain JSON values) that decide what a trial's fitness is."""
    tasks = config.tasks
    definition = {
        "tasks": {
            "search": tasks.search,
            "heldout": tasks.heldout,
            "include_path": tasks.include_path,
            "limit": tasks.limit,
            "num_fewshot": tasks.num_fewshot,
            "apply_chat_template": tasks.apply_chat_template,
            "fewshot_seed": tasks.fewshot_seed,
        },
        "objective": config.objective.model_dump(mode="json"),
        "fitness": config.model_dump(mode="json").get("fitness"),  # fidelity, estimator
        "models": config.models.model_dump(mode="json"),
        "dtype": config.dtype,
        "search_space": config.search_space,
        "seed": config.seed,
        "optimizer": {"name": config.optimizer.name, **config.optimizer.options},
    }
    return json.loads(json.dumps(definition, default=str))


def record_fitness_definition(run_dir: Path, config: StudyConfig) -> None:
    """Write RUN_DIR/fitness.json (at the start of a run)."""
    data = {"evomerge_fitness": _FORMAT, **fitness_definition(config)}
    atomic_write(Path(run_dir) / FITNESS, json.dumps(data, indent=2, sort_keys=True) + "\n")


def check_fitness_definition(run_dir: Path, config: StudyConfig) -> None:
    """Refuse (FitnessChangedError) a config whose fitness fields differ from the recorded ones.

    A run started before fitness.json existed gets one now, from its own study.yaml."""
    path = Path(run_dir) / FITNESS
    if not path.exists():
        record_fitness_definition(run_dir, config)
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path}: cannot be read ({exc}); it is written at start") from None
    saved.pop("evomerge_fitness", None)
    changed = changed_fields(saved, fitness_definition(config))
    if changed:
        raise FitnessChangedError(
            f"{Path(run_dir)}: the study's fitness definition changed since it started "
            f"({', '.join(changed)}); resume with the study.yaml it started with, or start a new run"
        )


def changed_fields(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Dotted names of what differs, one level into sections (`tasks.search`, `dtype`). A field
    the record lacks (written by an evomerge that did not know it) is not compared, except in
    the sections whose keys are all the user's (search_space, optimizer)."""
    out: list[str] = []
    for key in _keys(now, before):
        if key not in before:
            continue
        old, new = before[key], now.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            users = key in _USERS_KEYS
            out.extend(
                f"{key}.{k}"
                for k in _keys(new, old)
                if (k in old or users) and old.get(k) != new.get(k)
            )
        else:
            out.append(key)
    return out


_USERS_KEYS = {"search_space", "optimizer"}


def _keys(now: dict[str, Any], before: dict[str, Any]) -> list[str]:
    return [*now, *(k for k in before if k not in now)]

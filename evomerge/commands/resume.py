"""`evomerge resume RUN_DIR`: continue an interrupted study where it stopped.

The run's lock comes first (a second process is refused before it reads anything), then every
check that can refuse (the fitness definition, the budget, the optimizer state), and only then
is anything written: a refused resume leaves the run as it was.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evomerge.config import StudyConfig
    from evomerge.runstore import RunStore, TrialRecord


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory made by `evomerge run`")
    p.add_argument(
        "--max-trials",
        type=int,
        help="new budget (at least the trials done): raise it to extend a finished study",
    )
    p.add_argument("--max-seconds", type=float, help="new wall-clock limit of this resume")
    p.add_argument(
        "--rebuild-state",
        action="store_true",
        help="rebuild a lost or unreadable optimizer state by replaying trials.jsonl",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def budgeted(
    config: StudyConfig, done: int, max_trials: int | None, max_seconds: float | None = None
) -> StudyConfig:
    """`config` with the budget the flags set (written to study.yaml only once the resume is
    sure to go ahead); the only changes a resume takes."""
    from evomerge.errors import RunDirError

    update: dict[str, object] = {}
    if max_trials is not None:
        if max_trials < max(done, 1):
            raise RunDirError(f"--max-trials {max_trials} is below the {done} trials already done")
        update["max_trials"] = max_trials
    if max_seconds is not None:
        if max_seconds <= 0:
            raise RunDirError(f"--max-seconds {max_seconds} must be positive")
        update["max_seconds"] = max_seconds
    if not update:
        return config
    return config.model_copy(update={"budget": config.budget.model_copy(update=update)})


def continue_run(
    store: RunStore,
    *,
    max_trials: int | None = None,
    max_seconds: float | None = None,
    rebuild_state: bool = False,
    quiet: bool = False,
) -> int:
    """Resume `store` (the caller holds its lock) to its budget; refusals come before writes."""
    from evomerge.atomic import atomic_write
    from evomerge.commands.run import drive
    from evomerge.fitness_definition import check_fitness_definition
    from evomerge.rebuild import open_optimizer
    from evomerge.runstore import STUDY, candidates_done
    from evomerge.study import load_run_config
    from evomerge.study_plan import build_plan

    config = load_run_config(store)
    check_fitness_definition(store.dir, config)
    records = store.read_trials()
    done = candidates_done(records)
    wanted = budgeted(config, done, max_trials, max_seconds)
    if done >= wanted.budget.max_trials:
        ensure_best(store, config, records)
        print(
            f"{store.dir}: all {done} trials of the budget are done; raise it with --max-trials N"
        )
        return 0
    plan = build_plan(wanted)
    optimizer = open_optimizer(plan, store, records, resume=True, rebuild=rebuild_state)
    if wanted != config:
        atomic_write(store.dir / STUDY, wanted.to_yaml())
    return drive(store, plan, resume=True, quiet=quiet, optimizer=optimizer)


def ensure_best(store: RunStore, config: StudyConfig, records: Sequence[TrialRecord]) -> None:
    """Rewrite best/ when it was deleted or is stale (a resume that runs does it in the loop)."""
    from evomerge.runstore import best_trial
    from evomerge.study_plan import build_plan

    best = best_trial(list(records))
    if best is not None and not store.best_is(best):
        space = build_plan(config).space  # seconds, only when best/ was lost
        store.write_best(best, space.decode(best.genome).to_yaml())


def run(args: argparse.Namespace) -> int:
    from evomerge.runstore import RunStore

    store = RunStore.open(args.run_dir, lock=True)
    return continue_run(
        store,
        max_trials=args.max_trials,
        max_seconds=args.max_seconds,
        rebuild_state=args.rebuild_state,
        quiet=args.quiet,
    )

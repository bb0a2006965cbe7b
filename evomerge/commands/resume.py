"""`evomerge resume RUN_DIR`: continue an interrupted study where it stopped."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory made by `evomerge run`")
    p.add_argument(
        "--max-trials",
        type=int,
        help="new budget (at least the trials done): raise it to extend a finished study",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def with_budget(store, config, max_trials: int | None):
    """`config` with its budget raised to `max_trials` (saved into the run's study.yaml)."""
    from evomerge.atomic import atomic_write
    from evomerge.errors import RunDirError
    from evomerge.runstore import STUDY

    if max_trials is None:
        return config
    done = len(store.read_trials())
    if max_trials < max(done, 1):
        raise RunDirError(f"--max-trials {max_trials} is below the {done} trials already done")
    config = config.model_copy(
        update={"budget": config.budget.model_copy(update={"max_trials": max_trials})}
    )
    atomic_write(store.dir / STUDY, config.to_yaml())
    return config


def run(args: argparse.Namespace) -> int:
    from evomerge.commands.run import drive
    from evomerge.errors import RunDirError
    from evomerge.runstore import RunStore
    from evomerge.study import load_run_config
    from evomerge.study_plan import build_plan

    store = RunStore.open(args.run_dir)
    state = store.state()
    if state.get("state") == "running":
        raise RunDirError(f"{store.dir} is being run by process {state.get('pid')}; stop it first")
    config = with_budget(store, load_run_config(store), args.max_trials)
    done = len(store.read_trials())
    if done >= config.budget.max_trials:
        print(
            f"{store.dir}: all {done} trials of the budget are done; raise it with --max-trials N"
        )
        return 0
    return drive(store, build_plan(config), resume=True, quiet=args.quiet)

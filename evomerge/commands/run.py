"""`evomerge run STUDY.yaml`: start a study in a new run directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import EXIT_NO_SUCCESS, ClusterLostError

if TYPE_CHECKING:
    from evomerge.config import StudyConfig
    from evomerge.optimizers import Optimizer
    from evomerge.runstore import RunStore
    from evomerge.study_plan import StudyPlan


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study YAML (see README: study config)")
    p.add_argument("--name", help="run name (default: the config's name)")
    p.add_argument("--runs-dir", default="runs", help="parent of run directories (default: runs)")
    p.add_argument("--max-trials", type=int, help="override budget.max_trials")
    p.add_argument("--max-seconds", type=float, help="override budget.max_seconds")
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument("--optimizer", help="override optimizer.name")
    p.add_argument("--executor", help="override executor.kind (local, ray, or a plugin's)")
    p.add_argument("--workers", type=int, help="override executor.workers")
    p.add_argument(
        "--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS, else a local Ray)"
    )
    p.add_argument("--device", help="override device (auto, cpu, cuda, cuda:N)")
    p.add_argument(
        "--task-search-path",
        action="append",
        help="folder of lm-eval task YAMLs, repeatable (mergekit-evolve's flag); sets tasks.include_path",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, print the genome size and the initial recipe, run nothing",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def overrides(args: argparse.Namespace) -> dict[str, object]:
    table = {
        "name": "name",
        "max_trials": "budget.max_trials",
        "max_seconds": "budget.max_seconds",
        "seed": "seed",
        "optimizer": "optimizer.name",
        "executor": "executor.kind",
        "workers": "executor.workers",
        "ray_address": "executor.ray_address",
        "device": "device",
    }
    return {
        key: getattr(args, attr)
        for attr, key in table.items()
        if getattr(args, attr, None) is not None
    }


def run(args: argparse.Namespace) -> int:
    from evomerge.mergekit_evolve import load_study  # a study YAML, or a mergekit-evolve config
    from evomerge.study_plan import build_plan

    config = load_study(args.study, overrides(args), getattr(args, "task_search_path", None))
    plan = build_plan(config)
    if args.dry_run:
        dims = plan.space.dimensions()
        cats = sum(1 for d in dims if d.choices)
        print(
            f"study {config.name}: {len(dims)} genes ({cats} method choices) over {plan.space.num_layers} layers, "
            f"{len(plan.space.groups)} groups; optimizer {config.optimizer.name}, budget {config.budget.max_trials} trials"
        )
        print("initial recipe:")
        print(plan.space.decode(plan.x0).to_yaml())
        if plan.memory is not None:
            plan.memory.print(sys.stdout)
            plan.memory.check()  # a study that cannot fit: one line, exit 2
        return 0
    if plan.memory is not None:
        plan.memory.check()  # before the run directory exists
    store = start_run(Path(args.runs_dir) / config.name, config)
    return drive(store, plan, resume=False, quiet=args.quiet)


def start_run(run_dir: Path, config: StudyConfig) -> RunStore:
    """Create and lock the run directory (RunStore.create) and record its fitness definition."""
    from evomerge.fitness_definition import record_fitness_definition
    from evomerge.runstore import RunStore

    store = RunStore.create(run_dir, config.to_yaml())
    record_fitness_definition(store.dir, config)
    if store.reused:
        print(f"starting {store.dir} again: its earlier start recorded no trial", file=sys.stderr)
    return store


def drive(
    store: RunStore,
    plan: StudyPlan,
    *,
    resume: bool,
    quiet: bool,
    optimizer: Optimizer | None = None,
) -> int:
    """Run to the budget; on Ctrl-C say how to resume (nothing finished is lost)."""
    from evomerge.study import Study

    if plan.memory is not None:  # the memory plan of this machine: shown, kept, enforced
        plan.memory.check()
        plan.memory.write(store.dir)
        if not quiet:
            plan.memory.print(sys.stderr)
    study = Study(store, plan, progress=not quiet)
    try:
        best = study.run(resume=resume, optimizer=optimizer)
    except ClusterLostError as exc:  # what finished is on disk: say how to continue
        n = len(study.records)
        raise ClusterLostError(
            f"{exc}; {n} trials on disk, continue with: evomerge resume {store.dir}"
        ) from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated): a scheduler's preemption
        from evomerge.errors import Terminated, interrupt_exit_code

        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        done = f"after {len(study.records)} trials" if study.records else "before the first trial"
        again = "" if study.records else "run the same command again, or "
        print(
            f"\n{what} {done}; {again}continue with: evomerge resume {store.dir}",
            file=sys.stderr,
        )
        return interrupt_exit_code(exc)
    n = len(study.records)
    failed = sum(1 for r in study.records if r.status == "failed")
    if best is None:
        print(
            f"finished {n} trials in {store.dir}; no candidate succeeded ({failed} failed): "
            f"see the errors with evomerge status {store.dir}",
            file=sys.stderr,
        )
        return EXIT_NO_SUCCESS
    print(f"finished {n} trials ({failed} failed) in {store.dir}")
    print(
        f"best: trial {best.trial}, fitness {best.fitness[0]:.4f}; recipe in {store.dir / 'best' / 'recipe.yaml'}"
    )
    print(f"next: evomerge export {store.dir} --out {store.dir / 'export'}")
    return 0

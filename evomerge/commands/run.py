"""`evomerge run STUDY.yaml`: start a study in a new run directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import EXIT_NO_SUCCESS

if TYPE_CHECKING:
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
    from evomerge.config import load_study_config
    from evomerge.runstore import RunStore
    from evomerge.study_plan import build_plan

    config = load_study_config(args.study, overrides(args))
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
        return 0
    run_dir = Path(args.runs_dir) / config.name
    store = RunStore.create(run_dir, config.to_yaml())
    return drive(store, plan, resume=False, quiet=args.quiet)


def drive(store: RunStore, plan: StudyPlan, *, resume: bool, quiet: bool) -> int:
    """Run to the budget; on Ctrl-C say how to resume (nothing finished is lost)."""
    from evomerge.study import Study

    study = Study(store, plan, progress=not quiet)
    try:
        best = study.run(resume=resume)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted after {len(study.records)} trials; continue with: evomerge resume {store.dir}",
            file=sys.stderr,
        )
        return 130
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

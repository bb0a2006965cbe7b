"""`evomerge convert EVOLVE.yml [--out study.yaml]`: a mergekit-evolve config as our study.yaml."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a mergekit-evolve config (genome: and tasks:)")
    p.add_argument("--out", help="write the study here (default: print it)")
    p.add_argument(
        "--task-search-path",
        action="append",
        help="folder of lm-eval task YAMLs, repeatable (mergekit-evolve's flag): tasks.include_path",
    )
    p.add_argument(
        "--max-trials", type=int, help="budget.max_trials (mergekit-evolve's --max-fevals)"
    )
    p.add_argument("--seed", type=int, help="seed (mergekit-evolve's --random-seed)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from evomerge.atomic import atomic_write
    from evomerge.config import parse_study
    from evomerge.errors import ConfigError
    from evomerge.mergekit_evolve import convert_file

    flags = {"budget.max_trials": args.max_trials, "seed": args.seed}
    study, text = convert_file(
        args.config,
        task_search_path=args.task_search_path or (),
        overrides={k: v for k, v in flags.items() if v is not None},
    )
    parse_study(study, str(args.config))  # what is printed is a study `evomerge run` accepts
    if args.out is None:
        print(text, end="")
        return 0
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"--out {out} exists; choose another file or pass --force")
    atomic_write(out, text)
    print(f"wrote {out}; run it with: evomerge run {out}")
    return 0

"""`evomerge export RUN_DIR --out DIR`: the winning checkpoint, recipes, model card, report, plots."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory made by `evomerge run`")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--trial", type=int, help="export this trial instead of the best one")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument(
        "--no-report",
        action="store_true",
        help="skip scoring the baselines on the search and held-out tasks "
        "(a table cached by `evomerge report` is still used)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from evomerge.export import export_run
    from evomerge.report_table import format_heldout_table

    result = export_run(
        args.run_dir,
        args.out,
        trial=args.trial,
        force=args.force,
        report=not args.no_report,
        progress=not args.quiet,
    )
    fitness = " / ".join(f"{v:.4f}" for v in result.fitness)
    print(
        f"exported trial {result.trial} (fitness {fitness}) to {result.out_dir}: "
        f"{result.tensors} tensors, {result.bytes_written / 1e6:.1f} MB in {result.seconds:.1f} s"
    )
    print(f"files: {', '.join(result.files)}")
    if result.mergekit_reason is None:
        print("mergekit.yaml: `mergekit-yaml mergekit.yaml OUT` reproduces these weights")
    else:
        print(f"no mergekit.yaml: {result.mergekit_reason}")
    if result.report.scored:
        print(format_heldout_table(result.report), end="")
    print(f"load it with AutoModelForCausalLM.from_pretrained({str(result.out_dir)!r})")
    return 0

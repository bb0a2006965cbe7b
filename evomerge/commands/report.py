"""`evomerge report RUN_DIR`: summary, held-out table and plots of a run, without exporting.

Writes RUN_DIR/report/ (report.json, fitness.png, coefficients.png, pareto.png with several
objectives, best_scores.png, generations.png, utilization.png). The held-out table is cached there; `export` reuses it.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory made by `evomerge run`")
    p.add_argument("--trial", type=int, help="report this trial instead of the best one")
    p.add_argument(
        "--no-heldout",
        action="store_true",
        help="skip scoring the evolved model and the baselines (a cached table is still shown)",
    )
    p.add_argument("--recompute", action="store_true", help="score again, ignoring the cache")
    p.add_argument("--json", action="store_true", help="print report.json instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from evomerge.report import build_report, open_run, report_plots
    from evomerge.report_cache import write_report_dir
    from evomerge.report_table import format_heldout_table, format_summary

    view = open_run(args.run_dir, args.trial)
    report = build_report(
        view, heldout=not args.no_heldout, progress=not args.quiet, use_cache=not args.recompute
    )
    plots = report_plots(view)
    folder = write_report_dir(view.store.dir, report, plots)
    if args.json:
        print(report.to_json(), end="")
        return 0
    print(format_summary(report), end="")
    print(format_heldout_table(report), end="")
    print(f"report.json and {', '.join(sorted(plots))} in {folder}")
    return 0

"""`evomerge fetch STUDY.yaml [--dry-run]`: download every model and lm-eval dataset the study
needs into the Hugging Face caches and check them, before booking GPUs (`evomerge.fetch`).

Importing this module stays light (no torch, no lm_eval): `evomerge --help` imports it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evomerge.fetch import FetchReport


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study YAML (or a mergekit-evolve config)")
    p.add_argument(
        "--task-search-path",
        action="append",
        help="folder of lm-eval task YAMLs, repeatable (mergekit-evolve's flag); sets tasks.include_path",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the models (with what is missing from the cache) and datasets; fetch nothing",
    )


def _print(report: FetchReport) -> None:
    from rich.console import Console
    from rich.table import Table

    from evomerge.fetch import human_size

    longest = max([len(m.ref) for m in report.models] + [len(t.data.dataset) for t in report.tasks])
    console = Console(width=max(100, longest + 85))  # never wrap a path or an id inside a cell
    models = Table(title="models", title_justify="left")
    for col in ("model", "source", "revision", "snapshot", "files", "size", "status"):
        models.add_column(col, justify="right" if col in ("files", "size") else "left")
    for m in report.models:
        source = m.ref.removesuffix(f"@{m.revision}") if m.revision else m.ref
        rev = "" if m.status == "local" else m.revision or "main"  # main: the default branch
        snap = m.snapshot[:12] if m.snapshot else "local folder"
        models.add_row(m.name, source, rev, snap, str(m.files), human_size(m.bytes), m.status)
    console.print(models)
    if report.tasks:
        tasks = Table(title="tasks", title_justify="left")
        for col in ("split", "task", "dataset", "docs", "status"):
            tasks.add_column(col, justify="right" if col == "docs" else "left")
        for t in report.tasks:
            docs = "" if t.data.docs is None else str(t.data.docs)
            tasks.add_row(t.split, t.data.task, t.data.dataset, docs, t.status)
        console.print(tasks)


def run(args: argparse.Namespace) -> int:
    from evomerge.fetch import fetch_study, summary
    from evomerge.mergekit_evolve import load_study

    config = load_study(args.study, {}, getattr(args, "task_search_path", None))
    report = fetch_study(config, dry_run=args.dry_run)
    _print(report)
    print(summary(report) + ("" if args.dry_run else f": evomerge run {args.study}"))
    return 0

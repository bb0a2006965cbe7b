"""What the trackers share: the study's tracker run ids, and the held-out table as rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.atomic import atomic_write

if TYPE_CHECKING:
    from evomerge.report_model import Report

RUN_IDS = "tracking.json"  # {"wandb": run id, "mlflow": run id}


def run_ids(run_dir: Path) -> dict[str, str]:
    """The trackers' run ids of this study (RUN_DIR/tracking.json): a resume and an export
    log to the run the study started."""
    path = run_dir / RUN_IDS
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def save_run_id(run_dir: Path, tracker: str, run_id: str) -> None:
    ids = {**run_ids(run_dir), tracker: run_id}
    atomic_write(run_dir / RUN_IDS, json.dumps(ids, indent=2, sort_keys=True) + "\n")


def heldout_table(report: Report) -> tuple[list[str], list[list[Any]]]:
    """The held-out rows as columns and data (model, kind, each task, mean)."""
    tasks = list(report.run.heldout_tasks)
    columns = ["model", "kind", *tasks, "mean"]
    rows = [[r.name, r.kind, *(r.tasks.get(t) for t in tasks), r.mean] for r in report.heldout]
    return columns, rows

"""RUN_DIR/report/: the report and plots of a run, and its report.json read back as the cache
of the held-out table.

Scoring the baselines is the expensive part of a report, so its result is reused while the
fingerprint of what determines it (the trial's recipe, the models, the tasks and their settings,
the dtype) is unchanged: `export` after `report`, or a second `report`, scores nothing again.
Beside it, `items.npz` keeps each row's per-item values of the primary metrics (a few KB, binary,
not JSON), so the confidence intervals of a cached table can be recomputed without scoring.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.atomic import atomic_write
from evomerge.items import ItemScores
from evomerge.recipe import Recipe
from evomerge.report_model import REPORT_FORMAT, Report, Split
from evomerge.scoring.config import ScoringSettings

REPORT_DIR = "report"
ITEMS = "items.npz"
RowItems = dict[Split, tuple[ItemScores | None, ...]]  # split -> per table row (None: failed)

# The scoring settings a study.yaml sets (the scorer's own `seed` is fixed), hashed as they have
# been since report format 1, so a table cached by an earlier version still counts.
_SCORING_FIELDS = (
    "tasks",
    "include_paths",
    "limit",
    "num_fewshot",
    "batch_size",
    "apply_chat_template",
    "fewshot_seed",
)


def _scoring_blob(settings: ScoringSettings | None) -> dict[str, Any] | None:
    return None if settings is None else {f: getattr(settings, f) for f in _SCORING_FIELDS}


def fingerprint(
    recipe: Recipe,
    scoring: ScoringSettings,
    heldout: ScoringSettings | None,
    dtype: str,
) -> str:
    """What the held-out table depends on; a cached table with another fingerprint is stale."""
    blob = {
        "format": REPORT_FORMAT,
        "recipe": recipe.content_hash(),
        "models": dict(recipe.models),
        "scoring": _scoring_blob(scoring),
        "heldout": _scoring_blob(heldout),
        "dtype": dtype,
    }
    text = json.dumps(blob, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_cached(run_dir: Path, fp: str) -> Report | None:
    """The scored report cached in RUN_DIR/report/ under fingerprint `fp`; None when there is
    none, it is stale, unscored, or not a report this version can read (it is then recomputed)."""
    try:
        report = Report.from_json((run_dir / REPORT_DIR / "report.json").read_bytes())
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return None
    if report.fingerprint != fp or not report.scored:
        return None
    return report


def write_report_dir(run_dir: Path, report: Report, plots: Mapping[str, bytes]) -> Path:
    """RUN_DIR/report/: report.json (also the cache of the held-out table) and the plots."""
    folder = run_dir / REPORT_DIR
    folder.mkdir(exist_ok=True)
    for name, data in plots.items():
        atomic_write(folder / name, data)
    atomic_write(folder / "report.json", report.to_json())
    return folder


def write_items(
    run_dir: Path, report: Report, items: Mapping[Split, Sequence[ItemScores | None]]
) -> Path:
    """RUN_DIR/report/items.npz: per split and task, the item ids and a (rows, items) matrix of
    each table row's primary-metric values (NaN: not scored), with the report's fingerprint and
    row names, so they are only ever read back for the table they belong to."""
    arrays: dict[str, np.ndarray] = {"fingerprint": np.array(report.fingerprint)}
    for split, per_row in items.items():
        arrays[f"names/{split}"] = np.array([r.name for r in report.rows(split)], dtype=str)
        for task, pm in report.primary_metrics.get(split, {}).items():
            scored = [(i, its) for i, its in enumerate(per_row) if its is not None]
            scored = [(i, its) for i, its in scored if pm.metric in its.values.get(task, {})]
            ids = np.unique(np.concatenate([its.ids[task] for _, its in scored] or [[]]))
            values = np.full((len(per_row), ids.size), np.nan)
            for i, its in scored:
                values[i, np.searchsorted(ids, its.ids[task])] = its.values[task][pm.metric]
            arrays[f"ids/{split}/{task}"] = ids.astype(np.int64)
            arrays[f"values/{split}/{task}"] = values
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    folder = run_dir / REPORT_DIR
    folder.mkdir(exist_ok=True)
    atomic_write(folder / ITEMS, buf.getvalue())
    return folder / ITEMS


def read_items(run_dir: Path, report: Report) -> RowItems | None:
    """The items written for `report` (its fingerprint and rows), per split and row (None: the
    row has no items); None when there are none, they belong to another table, or the file
    cannot be read."""
    out: RowItems = {}
    try:
        with np.load(run_dir / REPORT_DIR / ITEMS, allow_pickle=False) as z:
            if str(z["fingerprint"]) != report.fingerprint:
                return None
            for split in ("search", "heldout"):
                if f"names/{split}" not in z.files:
                    continue
                names = [r.name for r in report.rows(split)]
                if z[f"names/{split}"].tolist() != names:
                    return None
                per_task = {
                    (task, pm.metric): (z[f"ids/{split}/{task}"], z[f"values/{split}/{task}"])
                    for task, pm in report.primary_metrics.get(split, {}).items()
                }
                out[split] = tuple(_row_items(per_task, i) for i in range(len(names)))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing/torn/foreign
        return None
    return out


def _row_items(
    per_task: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]], row: int
) -> ItemScores | None:
    ids: dict[str, np.ndarray] = {}
    values: dict[str, dict[str, np.ndarray]] = {}
    for (task, metric), (all_ids, matrix) in per_task.items():
        scored = ~np.isnan(matrix[row])
        if scored.any():
            ids[task] = all_ids[scored]
            values[task] = {metric: matrix[row][scored]}
    return ItemScores(ids, values) if ids else None

"""RUN_DIR/report/: the report and plots of a run, and its report.json read back as the cache
of the held-out table.

Scoring the baselines is the expensive part of a report, so its result is reused while the
fingerprint of what determines it (the trial's recipe, the models, the tasks and their settings,
the dtype) is unchanged: `export` after `report`, or a second `report`, scores nothing again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evomerge.atomic import atomic_write
from evomerge.recipe import Recipe
from evomerge.report_model import REPORT_FORMAT, Report
from evomerge.scoring.config import ScoringSettings

REPORT_DIR = "report"

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

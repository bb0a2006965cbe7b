"""One trial as every sink shows it: Optuna user attributes, and tracker metrics.

Both are flat (`<task>.<metric>`, `seconds.<part>`), so the dashboard's trial table and a
tracker's charts get one column per value rather than a JSON blob.
"""

from __future__ import annotations

import math
from typing import Any

from evomerge.runstore import TrialRecord

#: the user attribute that keys a trial of an Optuna storage to its line of trials.jsonl
TRIAL_ATTR = "trial"
_ERROR_CHARS = 500  # Optuna's RDB stores user attributes as text; keep a traceback's head only


def user_attrs(rec: TrialRecord) -> dict[str, Any]:
    """The trial's bookkeeping as Optuna user attributes (JSON values)."""
    attrs: dict[str, Any] = {
        TRIAL_ATTR: rec.trial,
        "proposal": rec.proposal,
        "status": rec.status,
        "recipe_hash": rec.recipe_hash,
        "worker": rec.worker,
        "fidelity": rec.fidelity,
        "items": rec.items,
        "finished_at": rec.finished_at,
    }
    if started := getattr(rec, "started_at", 0.0):  # recorded by runs of this version on
        attrs["started_at"] = started
    for task, metrics in rec.scores.items():
        for metric, value in metrics.items():
            attrs[f"{task}.{metric}"] = _json_number(value)
    attrs.update({f"seconds.{part}": v for part, v in rec.seconds.items()})
    optional = {"rung": rec.rung, "ci": rec.ci, "duplicate_of": rec.duplicate_of}
    attrs.update({k: v for k, v in optional.items() if v is not None})
    if rec.error:
        attrs["error"] = rec.error[:_ERROR_CHARS]
    return attrs


def trial_metrics(rec: TrialRecord, best: TrialRecord | None) -> dict[str, float]:
    """What a tracker charts per trial (x axis: `trial`): fitness, best so far, per-task
    metrics, seconds; a failed trial logs `failed` 1 and its seconds only."""
    out: dict[str, float] = {"trial": float(rec.trial), "failed": 0.0 if rec.ok else 1.0}
    if rec.ok:
        for i, value in enumerate(rec.fitness or []):
            out["fitness" if i == 0 else f"fitness_{i}"] = value
        out["fidelity"] = rec.fidelity
        for task, metrics in rec.scores.items():
            for metric, value in metrics.items():
                if (number := _json_number(value)) is not None:
                    out[f"{task}/{metric}"] = number
    if best is not None and best.fitness:
        out["best_fitness"] = best.fitness[0]
    out.update({f"seconds/{part}": v for part, v in rec.seconds.items()})
    return out


def _json_number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None

"""The user attributes of an Optuna sampler's own trials (optimizer optuna_*: `RUN_DIR/optuna.db`).

There the sampler's study is already the run's Optuna storage: one trial per candidate (a
duplicate is a trial too), told its fitness or FAIL. This sink adds each candidate's
bookkeeping (records.user_attrs of its latest line of trials.jsonl: per-task metrics, seconds,
worker, fidelity, recipe hash, the evomerge `trial` number) so that the dashboard shows what
the cma mirror shows.

Optuna's API refuses user attributes on a finished trial, and the loop tells a candidate right
after its line is appended (and a resume tells a crashed candidate from its line before anything
else runs), so the attributes are written with Optuna's own RDB models in one transaction per
trial, whatever the trial's state: the same schema `OptunaOptimizer._delete_last_trial` relies
on. Writing is an upsert, so `start` can repair, idempotently, every trial whose attributes
are missing or older than its latest line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from evomerge.runstore import TrialRecord
from evomerge.tracking.records import TRIAL_ATTR, user_attrs

STUDY_NAME = "evomerge"  # optimizers/optuna_samplers.STUDY_NAME (that module imports numpy)


class OptunaAttrs:
    """The TrialSink that annotates the sampler's own study (module docstring)."""

    name = "the Optuna user attributes"

    def __init__(self, storage_url: str, trial_number: Callable[[int], int]) -> None:
        self.url = storage_url
        self.fix = f"that {storage_url} is writable"
        self.trial_number = trial_number  # proposal id -> Optuna trial number
        self._engine: Any = None

    def start(self, records: Sequence[TrialRecord]) -> None:
        import sqlalchemy

        self._engine = sqlalchemy.create_engine(self.url)
        latest = {r.proposal: r for r in records}  # racing: the last line of each candidate
        with self._session() as session:
            done = self._annotated(session)
            for rec in latest.values():
                if done.get(self._trial_id(session, rec)) != rec.trial:
                    self._write(session, rec)
            session.commit()

    def trial(self, record: TrialRecord, best: TrialRecord | None) -> None:
        with self._session() as session:
            self._write(session, record)
            session.commit()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # ------------------------------------------------------------------ Optuna's schema
    def _session(self) -> Any:
        from sqlalchemy import orm

        return orm.Session(self._engine)

    def _study_id(self, session: Any) -> int:
        from optuna.storages._rdb import models

        return session.query(models.StudyModel).filter_by(study_name=STUDY_NAME).one().study_id

    def _trial_id(self, session: Any, rec: TrialRecord) -> int:
        from optuna.storages._rdb import models

        if not hasattr(self, "_sid"):
            self._sid = self._study_id(session)
        number = self.trial_number(rec.proposal)
        row = session.query(models.TrialModel).filter_by(study_id=self._sid, number=number).one()
        return int(row.trial_id)

    def _annotated(self, session: Any) -> dict[int, int]:
        """Optuna trial id -> the evomerge trial whose attributes it holds."""
        from optuna.storages._rdb import models

        rows = session.query(models.TrialUserAttributeModel).filter_by(key=TRIAL_ATTR).all()
        return {int(r.trial_id): json.loads(r.value_json) for r in rows}

    def _write(self, session: Any, rec: TrialRecord) -> None:
        from optuna.storages._rdb import models

        trial_id = self._trial_id(session, rec)
        attrs = {k: json.dumps(v) for k, v in user_attrs(rec).items()}
        model = models.TrialUserAttributeModel
        existing = {r.key: r for r in session.query(model).filter_by(trial_id=trial_id).all()}
        for key, value in attrs.items():
            if key in existing:
                existing[key].value_json = value
            else:
                session.add(model(trial_id=trial_id, key=key, value_json=value))

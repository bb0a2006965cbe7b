"""An Optuna study that runs in memory and is mirrored into its SQLite file at every save.

Why. Optuna's RDBStorage commits every storage call on its own: one ask over 15 genes is about
20 transactions (a trial, each parameter, the sampler's attributes), each with SQLAlchemy's ORM
and SQLite's fsyncs, and every sampler re-reads the trials through it. Measured with
`evomerge bench --parts controller` (2 shared CPU cores): 70-170 ms per ask for every Optuna
sampler, random search included, against about 1.5 ms on Optuna's InMemoryStorage.

How. The sampler works on an `InMemoryStorage`; `flush()` (the optimizer's `save()`, which the
study loop calls after every ask and every tell) writes what changed since the last flush into
`optuna.db` in ONE transaction, as rows of Optuna's RDB schema (`optuna.storages._rdb.models`,
which `OptunaOptimizer._delete_last_trial` and evomerge.tracking use too): new trials whole,
and for trials that changed their new values, parameters, attributes and state. Study attributes that changed follow.
The file stays a plain Optuna SQLite storage, read by optuna-dashboard and anything else.

Exactness. `open()` rebuilds the in-memory study from the file, trial by trial in number order
through `create_new_trial(template)`: the same numbers, trial ids (0, 1, ... as the in-memory
storage gives them; NSGA-II keeps trial ids in study attributes), parameters, values, states and
attributes, so a sampler proposes after a resume exactly what it would have proposed without
one. Crash safety is the file's, as before: a flush is one SQLite transaction, so the file holds
the state of one save or the next, never a torn trial; a tell whose save did not happen leaves
the trial RUNNING in the file, and the loop tells it again from trials.jsonl.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any


class MirroredStorage:
    """`memory` is what Optuna reads and writes; `flush()` copies its changes into `rdb`."""

    def __init__(self, rdb: Any) -> None:
        from optuna.storages import InMemoryStorage

        self.rdb = rdb
        self.memory = InMemoryStorage()
        self.memory_id = -1
        self.rdb_id = -1
        self._rdb_trial_ids: list[int] = []  # trial number -> trial id in the file
        self._open: dict[int, Any] = {}  # number -> copy, as flushed, of a trial not finished
        self._study_attrs: tuple[dict[str, Any], dict[str, Any]] = ({}, {})

    def create(self, name: str, directions: Sequence[Any]) -> None:
        """A new study of that name, in memory and in the file."""
        self.rdb_id = self.rdb.create_new_study(list(directions), name)
        self.memory_id = self.memory.create_new_study(list(directions), name)

    def open(self, name: str) -> None:
        """The study `name` of the file, copied into memory (KeyError when there is none)."""
        from evomerge.optimizers.base import OptimizerStateError

        self.rdb_id = self.rdb.get_study_id_from_name(name)
        self.memory_id = self.memory.create_new_study(
            self.rdb.get_study_directions(self.rdb_id), name
        )
        for key, value in self.rdb.get_study_user_attrs(self.rdb_id).items():
            self.memory.set_study_user_attr(self.memory_id, key, value)
        for key, value in self.rdb.get_study_system_attrs(self.rdb_id).items():
            self.memory.set_study_system_attr(self.memory_id, key, value)
        trials = sorted(
            self.rdb.get_all_trials(self.rdb_id, deepcopy=False), key=lambda t: t.number
        )
        for expected, trial in enumerate(trials):
            if trial.number != expected:
                raise OptimizerStateError(
                    f"{self.rdb.url}: trial numbers are not 0, 1, 2, ... (trial {expected} is "
                    "missing)"
                )
            self.memory.create_new_trial(self.memory_id, template_trial=trial)
            self._rdb_trial_ids.append(trial._trial_id)
        self._open = {}
        self._snapshot(self.memory.get_all_trials(self.memory_id, deepcopy=False))
        self._study_attrs = (
            copy.deepcopy(self.memory.get_study_user_attrs(self.memory_id)),
            copy.deepcopy(self.memory.get_study_system_attrs(self.memory_id)),
        )

    def flush(self) -> None:
        """Write into the file what changed in memory since the last flush, in one transaction
        (module docstring)."""
        from optuna.storages._rdb.storage import _create_scoped_session

        trials = self.memory.get_all_trials(self.memory_id, deepcopy=False)
        first_new = len(self._rdb_trial_ids)
        user = self.memory.get_study_user_attrs(self.memory_id)
        system = self.memory.get_study_system_attrs(self.memory_id)
        changed = [n for n in sorted(self._open) if trials[n] != self._open[n]]
        attrs_changed = (user, system) != self._study_attrs
        if not changed and first_new == len(trials) and not attrs_changed:
            return
        with _create_scoped_session(self.rdb.scoped_session) as session:
            for number in changed:
                self._write(
                    session, self._rdb_trial_ids[number], self._open[number], trials[number]
                )
            for trial in trials[first_new:]:
                self._rdb_trial_ids.append(self._write(session, None, None, trial))
            if attrs_changed:
                self._write_study_attrs(session, user, system)
        if attrs_changed:
            self._study_attrs = (copy.deepcopy(user), copy.deepcopy(system))
        self._snapshot([trials[n] for n in changed] + list(trials[first_new:]))

    def _write(self, session: Any, trial_id: int | None, old: Any, new: Any) -> int:
        """Rows for a trial's changes since `old` (None: a new trial) in Optuna's schema: new
        rows are inserted as they are (a batch, no lookups), rows that exist are updated."""
        import json

        from optuna.distributions import distribution_to_json
        from optuna.storages._rdb import models

        if trial_id is None:
            row = models.TrialModel(study_id=self.rdb_id, number=new.number, state=new.state)
            session.add(row)
            session.flush()
            trial_id = int(row.trial_id)
        else:
            row = models.TrialModel.find_or_raise_by_id(trial_id, session)
        rows: list[Any] = []
        if new.values is not None and (old is None or old.values != new.values):
            if old is not None and old.values is not None:
                session.query(models.TrialValueModel).filter_by(trial_id=trial_id).delete()
            for objective, value in enumerate(new.values):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                rows.append(
                    models.TrialValueModel(
                        trial_id=trial_id, objective=objective, value=stored, value_type=kind
                    )
                )
        for name, value in new.params.items():
            if old is None or name not in old.params:
                dist = new.distributions[name]
                rows.append(
                    models.TrialParamModel(
                        trial_id=trial_id,
                        param_name=name,
                        param_value=dist.to_internal_repr(value),
                        distribution_json=distribution_to_json(dist),
                    )
                )
        for model, before, now in (
            (models.TrialUserAttributeModel, old.user_attrs if old else {}, new.user_attrs),
            (models.TrialSystemAttributeModel, old.system_attrs if old else {}, new.system_attrs),
        ):
            for key, value in _changed(before, now):
                if key in before:
                    session.query(model).filter_by(trial_id=trial_id, key=key).delete()
                rows.append(model(trial_id=trial_id, key=key, value_json=json.dumps(value)))
        session.add_all(rows)
        row.state = new.state
        row.datetime_start = new.datetime_start
        row.datetime_complete = new.datetime_complete
        return trial_id

    def _write_study_attrs(
        self, session: Any, user: dict[str, Any], system: dict[str, Any]
    ) -> None:
        import json

        from optuna.storages._rdb import models

        study = models.StudyModel.find_or_raise_by_id(self.rdb_id, session)
        for model, before, now in (
            (models.StudyUserAttributeModel, self._study_attrs[0], user),
            (models.StudySystemAttributeModel, self._study_attrs[1], system),
        ):
            for key, value in _changed(before, now):
                attr = model.find_by_study_and_key(study, key, session)
                if attr is None:
                    session.add(model(study_id=self.rdb_id, key=key, value_json=json.dumps(value)))
                else:
                    attr.value_json = json.dumps(value)

    def _snapshot(self, trials: Sequence[Any]) -> None:
        """Keep copies, as the file now has them, of the `trials` just written that may still
        change (not finished); a finished one is never written again."""
        for t in trials:
            if t.state.is_finished():
                self._open.pop(t.number, None)
            else:
                self._open[t.number] = copy.deepcopy(t)


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in new.items() if k not in old or old[k] != v]

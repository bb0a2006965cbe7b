"""An Optuna study that runs in memory and is mirrored into its SQLite file at every save.

Why. Optuna's RDBStorage commits every storage call on its own: one ask over 15 genes is about
20 transactions (a trial, each parameter, the sampler's attributes), each with SQLAlchemy's ORM
and SQLite's fsyncs, and every sampler re-reads the trials through it. Measured with
`evomerge bench --parts controller` (2 shared CPU cores): 70-170 ms per ask for every Optuna
sampler, random search included, against about 1.5 ms on Optuna's InMemoryStorage.

How. The sampler works on an `InMemoryStorage`; `flush()` (the optimizer's `save()`, which the
study loop calls after every ask and every tell) writes what changed since the last flush into
`optuna.db` in ONE transaction, as rows of Optuna's RDB schema (`optuna.storages._rdb.models`,
which `OptunaOptimizer._delete_last_trial` and evomerge.tracking use too), written as
SQLAlchemy Core statements: new trials whole, and for trials that changed their new values,
parameters, attributes and state; then the study attributes that changed. The file stays a
plain Optuna SQLite storage, read by optuna-dashboard and anything else.

Exactness. `open()` rebuilds the in-memory study from the file, trial by trial in number order
through `create_new_trial(template)`: the same numbers, trial ids (0, 1, ... as the in-memory
storage gives them; NSGA-II keeps trial ids in study attributes), parameters, values, states and
attributes, so a sampler proposes after a resume exactly what it would have proposed without
one. Crash safety is the file's, as before: a flush is one SQLite transaction, so the file holds
the state of one save or the next, never a torn trial; a tell whose save did not happen leaves
the trial RUNNING in the file, and the loop tells it again from trials.jsonl.

Journal. `use_wal` puts the file in SQLite's write-ahead-log mode with `synchronous=FULL`: a
commit appends to optuna.db-wal and fsyncs that one file, where the default rollback journal
writes, fsyncs and deletes a journal and fsyncs the database as well. Measured on the 2 shared
cores of the controller bench (ext4): 3.8-6.8 ms per commit against 30-44 ms (PERSIST or
TRUNCATE journals: 21-32 ms), with the same durability (every save is on disk when it returns).
Two saves a trial made that the largest part of an Optuna trial's controller time (60-78 of
75-150 ms at 2,000 trials). WAL needs every process that opens the file on the same host (no
network file system); the file stays readable by Optuna, optuna-dashboard and sqlite3, and
`optuna.db-wal`/`-shm` sit beside it while it is open (evomerge/rebuild.py moves them with it).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any


def use_wal(rdb: Any) -> None:
    """Every connection of `rdb` (an Optuna RDBStorage over SQLite) in WAL mode with
    synchronous=FULL (module docstring: Journal); connections already pooled are closed."""
    from sqlalchemy import event

    if rdb.engine.dialect.name != "sqlite":
        return

    def pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        # a checkpoint every 64 pages, and the -wal file cut back to 256 KiB after it: the log
        # would otherwise grow to SQLite's default 1,000 pages (4 MB) and stay that size, which
        # a nearly full disk (or a small quota) does not have
        cursor.execute("PRAGMA wal_autocheckpoint=64")
        cursor.execute("PRAGMA journal_size_limit=262144")
        cursor.close()

    event.listen(rdb.engine, "connect", pragmas)
    rdb.engine.dispose()


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
        trials = self.memory.get_all_trials(self.memory_id, deepcopy=False)
        first_new = len(self._rdb_trial_ids)
        user = self.memory.get_study_user_attrs(self.memory_id)
        system = self.memory.get_study_system_attrs(self.memory_id)
        changed = [n for n in sorted(self._open) if trials[n] != self._open[n]]
        attrs_changed = (user, system) != self._study_attrs
        if not changed and first_new == len(trials) and not attrs_changed:
            return
        new_ids: list[int] = []
        with self.rdb.engine.begin() as conn:  # one transaction: committed, or rolled back
            for number in changed:
                self._write(conn, self._rdb_trial_ids[number], self._open[number], trials[number])
            for trial in trials[first_new:]:
                new_ids.append(self._write(conn, None, None, trial))
            if attrs_changed:
                self._write_study_attrs(conn, user, system)
        self._rdb_trial_ids.extend(new_ids)
        if attrs_changed:
            self._study_attrs = (copy.deepcopy(user), copy.deepcopy(system))
        self._snapshot([trials[n] for n in changed] + list(trials[first_new:]))

    def _write(self, conn: Any, trial_id: int | None, old: Any, new: Any) -> int:
        """Rows for a trial's changes since `old` (None: a new trial) in Optuna's schema, as
        SQLAlchemy Core statements: one insert or update of the trial, one batch insert per
        table. (Through the ORM the same rows cost about 10 ms of CPU per trial, measured on
        the controller bench's 2 shared cores.) A row that exists is known from `old`, the
        trial as last flushed, so nothing is read back."""
        import json

        from optuna.distributions import distribution_to_json
        from optuna.storages._rdb import models
        from sqlalchemy import delete, insert, update

        trial = models.TrialModel.__table__
        row = {
            "state": new.state,
            "datetime_start": _utc(new.datetime_start),
            "datetime_complete": _utc(new.datetime_complete),
        }
        if trial_id is None:
            done = conn.execute(
                insert(trial).values(study_id=self.rdb_id, number=new.number, **row)
            )
            trial_id = int(done.inserted_primary_key[0])
        else:
            conn.execute(update(trial).where(trial.c.trial_id == trial_id).values(**row))
        rows: dict[Any, list[dict[str, Any]]] = {}
        if new.values is not None and (old is None or old.values != new.values):
            table = models.TrialValueModel.__table__
            if old is not None and old.values is not None:
                conn.execute(delete(table).where(table.c.trial_id == trial_id))
            rows[table] = []
            for objective, value in enumerate(new.values):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                rows[table].append(
                    {
                        "trial_id": trial_id,
                        "objective": objective,
                        "value": stored,
                        "value_type": kind,
                    }
                )
        rows[models.TrialParamModel.__table__] = [
            {
                "trial_id": trial_id,
                "param_name": name,
                "param_value": new.distributions[name].to_internal_repr(value),
                "distribution_json": distribution_to_json(new.distributions[name]),
            }
            for name, value in new.params.items()
            if old is None or name not in old.params
        ]
        for model, before, now in (
            (models.TrialUserAttributeModel, old.user_attrs if old else {}, new.user_attrs),
            (models.TrialSystemAttributeModel, old.system_attrs if old else {}, new.system_attrs),
        ):
            table = model.__table__
            rows[table] = []
            for key, value in _changed(before, now):
                if key in before:
                    cond = (table.c.trial_id == trial_id) & (table.c.key == key)
                    conn.execute(update(table).where(cond).values(value_json=json.dumps(value)))
                else:
                    rows[table].append(
                        {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                    )
        for table, batch in rows.items():
            if batch:
                conn.execute(insert(table), batch)
        return trial_id

    def _write_study_attrs(self, conn: Any, user: dict[str, Any], system: dict[str, Any]) -> None:
        import json

        from optuna.storages._rdb import models
        from sqlalchemy import insert, update

        for model, before, now in (
            (models.StudyUserAttributeModel, self._study_attrs[0], user),
            (models.StudySystemAttributeModel, self._study_attrs[1], system),
        ):
            table = model.__table__
            for key, value in _changed(before, now):
                if key in before:  # in the file since the last flush
                    cond = (table.c.study_id == self.rdb_id) & (table.c.key == key)
                    conn.execute(update(table).where(cond).values(value_json=json.dumps(value)))
                else:
                    conn.execute(
                        insert(table).values(
                            study_id=self.rdb_id, key=key, value_json=json.dumps(value)
                        )
                    )

    def _snapshot(self, trials: Sequence[Any]) -> None:
        """Keep copies, as the file now has them, of the `trials` just written that may still
        change (not finished); a finished one is never written again."""
        for t in trials:
            if t.state.is_finished():
                self._open.pop(t.number, None)
            else:
                self._open[t.number] = copy.deepcopy(t)


def _utc(value: Any) -> Any:
    """A naive local datetime as the naive UTC one Optuna's schema stores (what TrialModel's
    datetime setters do)."""
    import datetime

    if value is None:
        return None
    return value.astimezone(datetime.timezone.utc).replace(tzinfo=None)


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in new.items() if k not in old or old[k] != v]

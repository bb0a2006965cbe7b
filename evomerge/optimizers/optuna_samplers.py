"""Optuna samplers (TPE, CMA-ES, NSGA-II, random) behind ask/tell, over SQLite storage.

Storage. `state_dir/optuna.db`, study name "evomerge", every direction "maximize": open it with
`optuna-dashboard sqlite:///RUN_DIR/optuna.db`. The sampler works on an in-memory copy of it,
and `save()` (after every ask and tell) writes what changed into the file, a few transactions
per trial instead of Optuna's one per storage call, in SQLite's WAL mode: one fsync a save
(optuna_storage.py; `open` reads the file back into memory exactly). TPE samples from a
bounded window of the history (optuna_tpe.py, option `history`), so that a long study's asks
do not slow down. Proposal ids are Optuna trial numbers; `pending()` is the trials still
RUNNING (after a crash the loop evaluates them again and tells those same trial numbers). A
failed candidate is told as state FAIL, which every sampler here skips (the CMA-ES sampler
simply waits for enough successful trials to complete its generation).

Exact resume. A sampler's random state is not in the database, so the sampler is rebuilt before
every ask, seeded from (seed, number of trials asked so far). Everything else these samplers use
is read from the storage (TPE/random: the finished trials; CMA-ES: its pickled optimizer in the
trials' system attributes; NSGA-II: generations in system attributes), so the proposal for a
given history is the same in a run, after a resume, and after a crash at any point: nothing needs
to be pickled beside the database. A crash inside `ask`, between Optuna creating a trial and
suggesting its last parameter, leaves a RUNNING trial without all parameters, which the loop
never saw. `load()` deletes it (with what the sampler attached to it), so the next trial gets its
number again: CmaEsSampler seeds each trial with its number, so a kept torn trial would change
every later proposal. Only the last trial can be torn (one controller asks at a time); a torn
trial that is somehow not the last is marked FAIL instead. Proposal ids are the ranks of the
trials handed out whole (all parameters set), so they never depend on that repair.

Categoricals. TPE, NSGA-II and random sample them natively. CmaEsSampler does not (it falls back
to random sampling), so `optuna_cmaes` encodes each choice as a float score in [0, 1] named
`<dimension>[<choice>]` and decodes the argmax, like `cma`.

Rebuild (`resume --rebuild-state`, when optuna.db is lost or unreadable): `replay` runs the
sampler again over a fresh study, asking and telling in the order trials.jsonl recorded: when
every proposal comes back as recorded (always with one worker), the database is the run's, the
samplers' system attributes included (CmaEsSampler's search distribution, NSGA-II's
generations), and the search continues exactly. Otherwise (several workers, whose asks and tells
interleaved in an order trials.jsonl does not keep) the told history is added instead: the same
trial numbers, params and values (or FAIL), so TPE and random, which read only the trials,
propose from the same history; CmaEsSampler and NSGA-II start their generations afresh from
there, and `optuna_cmaes` sees each recorded method choice as the scores 0.6/0.4, not the scores
it drew. Either way, proposals in flight at the crash are asked again.

Warm start: `x0` is enqueued as the first trial (for `optuna_cmaes` the chosen option's score is
0.6, the others 0.4). Options are passed to the sampler's constructor (e.g. `n_startup_trials`,
`multivariate`, `popsize`, `population_size`); `seed` comes from the study.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import model_validator

from evomerge.optimizers.base import (
    X0_CHOSEN,
    X0_OTHER,
    Optimizer,
    OptimizerStateError,
    Params,
    Proposal,
    ReplayMismatchError,
    Told,
    argmax_choice,
    choice_scores,
    params_difference,
)
from evomerge.options import PluginOptions

STUDY_NAME = "evomerge"
_SIGNATURE_ATTR = "evomerge"


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the study loop reports progress
    return optuna


def score_name(dim_name: str, choice: str) -> str:
    """Name of the float parameter that scores `choice` (optuna_cmaes only)."""
    return f"{dim_name}[{choice}]"


class SamplerOptions(PluginOptions):
    """The keyword arguments of an Optuna sampler's constructor (`seed` comes from the study).

    Values are checked by building the sampler once (a plain object, no storage), so a bad value
    fails when the study config loads."""

    sampler_class: ClassVar[str]  # attribute of optuna.samplers
    reserved: ClassVar[dict[str, str]] = {"seed": "set the study's seed instead"}

    @classmethod
    def sampler(cls) -> Any:
        return getattr(_optuna().samplers, cls.sampler_class)

    @classmethod
    def extra_names(cls) -> list[str]:
        optuna_class = getattr(_optuna().samplers, cls.sampler_class)
        params = inspect.signature(optuna_class.__init__).parameters.values()
        return [
            p.name
            for p in params
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]

    @model_validator(mode="after")
    def _values(self) -> SamplerOptions:
        try:
            self.sampler()(**self.given(), seed=0)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad options {self.given()}: {exc}") from exc
        return self


class TPEOptions(SamplerOptions):
    """TPESampler's options, and `history` (evomerge/optimizers/optuna_tpe.py)."""

    sampler_class = "TPESampler"

    @classmethod
    def sampler(cls) -> Any:
        _optuna()
        from evomerge.optimizers.optuna_tpe import WindowedTPESampler

        return WindowedTPESampler

    @classmethod
    def extra_names(cls) -> list[str]:
        return [*super().extra_names(), "history"]


class CmaEsOptions(SamplerOptions):
    sampler_class = "CmaEsSampler"
    reserved: ClassVar[dict[str, str]] = {
        "seed": "set the study's seed instead",
        "x0": "the study's warm_start is enqueued as the first trial instead",
    }


class NSGAIIOptions(SamplerOptions):
    sampler_class = "NSGAIISampler"


class RandomOptions(SamplerOptions):
    sampler_class = "RandomSampler"


class OptunaOptimizer(Optimizer):
    """Shared ask/tell over an Optuna study; subclasses name the sampler (through Options)."""

    state_files = ("optuna.db",)
    Options: ClassVar[type[SamplerOptions]]
    encode_choices: ClassVar[bool] = False  # True where the sampler cannot sample categoricals
    multi_objective: ClassVar[bool] = True

    @classmethod
    def check_objectives(cls, n_objectives: int) -> None:
        if not cls.multi_objective:
            super().check_objectives(n_objectives)

    @property
    def db_path(self) -> Path:
        return self.state_dir / self.state_files[0]

    @property
    def storage_url(self) -> str:
        """The study's storage: what optuna-dashboard opens, and where evomerge.tracking writes
        each trial's user attributes."""
        return f"sqlite:///{self.db_path.resolve()}"

    def trial_number(self, proposal_id: int) -> int:
        """The Optuna trial number of a proposal handed out."""
        return self._numbers[proposal_id]

    def _open(self) -> Any:
        from evomerge.optimizers.optuna_storage import use_wal

        optuna = _optuna()
        self._space_cache: Any = None  # see _sampler_for
        self._sampler_cls = self.Options.sampler()
        self._dists = self._distributions()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._rdb = optuna.storages.RDBStorage(self.storage_url)
        use_wal(self._rdb)  # one fsync per save (optuna_storage.py: Journal)
        # closed when this optimizer goes, or at exit, if close() was not called: SQLite then
        # folds optuna.db-wal into optuna.db, which a copy of the file alone then holds
        weakref.finalize(self, self._rdb.engine.dispose)
        return optuna

    def _sampler_for(self, n_asked: int) -> Any:
        """The sampler for the next ask, seeded from (seed, asks so far). Its intersection
        search space (TPE, CmaEsSampler) is carried over from the previous one: an incremental
        cache of a pure function of the trials, which each new sampler would otherwise compute
        again over the whole history (the one Optuna internal used here)."""
        from optuna.search_space import IntersectionSearchSpace

        seed = int(np.random.SeedSequence([self.seed & 0xFFFFFFFF, n_asked]).generate_state(1)[0])
        sampler = self._sampler_cls(**self.settings.given(), seed=seed)
        if isinstance(getattr(sampler, "_search_space", None), IntersectionSearchSpace):
            if self._space_cache is None:
                self._space_cache = sampler._search_space
            sampler._search_space = self._space_cache
        return sampler

    def _distributions(self) -> dict[str, Any]:
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        out: dict[str, Any] = {}
        for d in self.dims:
            if d.choices is None:
                out[d.name] = FloatDistribution(d.low, d.high)
            elif self.encode_choices:
                for c in d.choices:
                    out[score_name(d.name, c)] = FloatDistribution(0.0, 1.0)
            else:
                out[d.name] = CategoricalDistribution(d.choices)
        return out

    def _start(self, x0: Params | None) -> None:
        from evomerge.optimizers.optuna_storage import MirroredStorage

        optuna = self._open()
        self._store = MirroredStorage(self._rdb)
        self._store.create(STUDY_NAME, [optuna.study.StudyDirection.MAXIMIZE] * self.n_objectives)
        self._study = optuna.load_study(
            study_name=STUDY_NAME, storage=self._store.memory, sampler=self._sampler_for(0)
        )
        self._study.set_user_attr(_SIGNATURE_ATTR, self.signature())
        self._x0 = x0  # for a replay that starts over (replay)
        if x0:
            self._study.enqueue_trial(self._encode(x0))
        self._numbers: list[int] = []  # proposal id -> Optuna trial number

    def _restore(self) -> None:
        try:
            self._restore_study()
        except BaseException:
            # a refused resume closes the file: SQLite then folds optuna.db-wal back into it
            # and removes the -wal and -shm files (optuna_storage.py: Journal)
            rdb = getattr(self, "_rdb", None)
            if rdb is not None:
                rdb.engine.dispose()
            raise

    def _restore_study(self) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        from evomerge.disk_full import full_disk_at, no_space

        try:
            optuna = self._open()
            self._study = optuna.load_study(study_name=STUDY_NAME, storage=self._rdb)
        except KeyError:
            raise OptimizerStateError(
                f"{self.db_path} holds no study named {STUDY_NAME!r}"
            ) from None
        except SQLAlchemyError as exc:  # "file is not a database", "disk image is malformed"
            full = full_disk_at(self.db_path.parent)
            if full is not None:  # SQLite's "disk I/O error" on a disk with no room for -shm
                raise no_space(
                    self.db_path, full, writing=f"the study's state in {self.db_path}"
                ) from exc
            why = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise OptimizerStateError(
                f"{self.db_path} is not a readable database ({why})"
            ) from None
        self.check_signature(self._study.user_attrs.get(_SIGNATURE_ATTR, {}), self.db_path)
        state = optuna.trial.TrialState
        trials = self._study.get_trials(deepcopy=False)
        torn = [t for t in trials if t.state == state.RUNNING and not self._whole(t)]
        if torn == trials[-1:] and self._delete_last_trial(trials[-1].number):
            self._study = optuna.load_study(study_name=STUDY_NAME, storage=self._rdb)
        else:
            for t in torn:
                self._study.tell(t.number, state=state.FAIL)
        from evomerge.optimizers.optuna_storage import MirroredStorage

        self._store = MirroredStorage(self._rdb)
        self._store.open(STUDY_NAME)  # the sampler works on an in-memory copy (save() mirrors)
        self._study = optuna.load_study(study_name=STUDY_NAME, storage=self._store.memory)
        handed_out = [
            t
            for t in self._study.get_trials(deepcopy=False)
            if t.state != state.WAITING and self._whole(t)
        ]
        self._numbers = sorted(t.number for t in handed_out)

    def replay(self, history: Sequence[Told]) -> None:
        """Rebuild this fresh study from `history` (module docstring: Rebuild). First the
        sampler's own asks and tells, in the recorded order: exact, the sampler's attributes
        included, whenever the proposals come back as recorded (always with one worker). If one
        does not (asks and tells of several workers interleaved otherwise), the study starts
        over and the history is added with each trial's params fixed (`_add_history`)."""
        try:
            super().replay(history)
        except ReplayMismatchError:
            optuna = _optuna()
            optuna.delete_study(study_name=STUDY_NAME, storage=self._rdb)
            self._rdb.engine.dispose()
            self._start(self._x0)
            self._add_history(history)

    def _add_history(self, history: Sequence[Told]) -> None:
        """In proposal order, each recorded proposal becomes a trial with its params fixed, told
        its values or FAIL; a proposal with no record (in flight at a crash) is asked afresh at
        its place and stays pending. The warm start, still enqueued, is proposal 0 and is
        checked against it. Samplers skip their own logic for a trial whose params are all
        fixed, so what CmaEsSampler and NSGA-II keep in system attributes starts afresh."""
        from optuna.trial import TrialState

        by_id: dict[int, Told] = {}
        for t in history:
            if t.proposal in by_id:
                raise ReplayMismatchError(f"proposal {t.proposal} is recorded twice")
            by_id[t.proposal] = t
        for pid in range(max(by_id, default=-1) + 1):
            t = by_id.get(pid)
            if t is None:
                self.ask()
                continue
            if not self._study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                self._study.enqueue_trial(self._encode(t.params))
            prop = self.ask()
            diff = params_difference(prop.params, t.params)
            if diff:
                raise ReplayMismatchError(f"proposal {pid}: {diff}")
            self.tell(pid, t.values)

    def _delete_last_trial(self, number: int) -> bool:
        """Remove trial `number` (the study's last) and everything attached to it, as if its ask
        never began. Uses Optuna's RDB schema (cascading deletes); False when that is not
        possible, and the caller marks the trial FAIL instead."""
        try:
            from optuna.storages._rdb import models
            from sqlalchemy import orm

            with orm.Session(self._rdb.engine) as session:
                study = session.query(models.StudyModel).filter_by(study_name=STUDY_NAME).one()
                row = (
                    session.query(models.TrialModel)
                    .filter_by(study_id=study.study_id, number=number)
                    .one()
                )
                session.delete(row)
                session.commit()
        except Exception:  # a schema this code does not know: keep the trial, as FAIL
            return False
        return True

    def _whole(self, trial: Any) -> bool:
        """Whether `trial` got every parameter (was handed out), not aborted inside `ask`."""
        return set(trial.params) == set(self._dists)

    def _proposal_id(self, number: int) -> int:
        return self._numbers.index(number)

    def _encode(self, params: Params) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for d in self.dims:
            if d.name not in params:
                continue
            if d.choices is not None and self.encode_choices:
                scores = choice_scores(d.choices, str(params[d.name]), X0_CHOSEN, X0_OTHER)
                out.update(
                    {score_name(d.name, c): s for c, s in zip(d.choices, scores, strict=True)}
                )
            else:
                out[d.name] = params[d.name]
        return out

    def _decode(self, params: dict[str, Any]) -> Params:
        out: Params = {}
        for d in self.dims:
            if d.choices is None:
                out[d.name] = min(d.high, max(d.low, float(params[d.name])))
            elif self.encode_choices:
                out[d.name] = argmax_choice(
                    d.choices, [params[score_name(d.name, c)] for c in d.choices]
                )
            else:
                out[d.name] = str(params[d.name])
        return out

    def _running(self) -> list[Any]:
        from optuna.trial import TrialState

        trials = self._study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return sorted(trials, key=lambda t: t.number)

    def ask(self) -> Proposal:
        self._study.sampler = self._sampler_for(len(self._numbers))
        trial = self._study.ask(fixed_distributions=self._dists)
        self._numbers.append(trial.number)
        return Proposal(len(self._numbers) - 1, self._decode(trial.params))

    def pending(self) -> list[Proposal]:
        return [
            Proposal(self._proposal_id(t.number), self._decode(t.params)) for t in self._running()
        ]

    def tell(self, proposal_id: int, values: Sequence[float] | None) -> None:
        from optuna.trial import TrialState

        vals = self._values(proposal_id, values)
        if not 0 <= proposal_id < len(self._numbers):
            raise ValueError(f"proposal {proposal_id} is not pending: it was never asked")
        number = self._numbers[proposal_id]
        try:  # Optuna refuses a trial that is not RUNNING (ValueError)
            if vals is None:
                self._study.tell(number, state=TrialState.FAIL)
            else:
                self._study.tell(number, list(vals))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"proposal {proposal_id} is not pending: {exc}") from None

    def save(self) -> None:
        """Mirror into optuna.db what the asks and tells since the last save changed."""
        self._store.flush()

    @property
    def best(self) -> tuple[Proposal, tuple[float, ...]] | None:
        from optuna.trial import TrialState

        done = self._study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            return None
        t = max(done, key=lambda t: (t.values[0], -t.number))
        return Proposal(self._proposal_id(t.number), self._decode(t.params)), tuple(t.values)

    @property
    def study(self) -> Any:
        """The underlying optuna.Study (for plots and the dashboard)."""
        return self._study

    def close(self) -> None:
        self._rdb.engine.dispose()


class TPEOptimizer(OptunaOptimizer):
    """optuna.samplers.TPESampler; native categoricals; several objectives supported."""

    name = "optuna_tpe"
    Options = TPEOptions


class OptunaCmaEsOptimizer(OptunaOptimizer):
    """optuna.samplers.CmaEsSampler; categoricals as per-choice scores (argmax); one objective."""

    name = "optuna_cmaes"
    Options = CmaEsOptions
    encode_choices = True
    multi_objective = False


class NSGA2Optimizer(OptunaOptimizer):
    """optuna.samplers.NSGAIISampler; native categoricals; several objectives (Pareto front)."""

    name = "optuna_nsga2"
    Options = NSGAIIOptions


class RandomOptimizer(OptunaOptimizer):
    """optuna.samplers.RandomSampler: the baseline every search should beat."""

    name = "optuna_random"
    Options = RandomOptions

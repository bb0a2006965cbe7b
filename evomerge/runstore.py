"""The run directory: everything a study has computed, durable and rebuildable.

- `study.yaml`: the resolved config.
- `trials.jsonl`: one JSON line per trial, appended with flush + fsync as each completes; a torn
  last line (crash mid-write) is ignored on read and cut off before the next append. Trials are
  counted by distinct trial number, never by lines.
- `state.json`: running / interrupted / finished, with the pid of the controller.
- `.lock`: flocked by the one process that runs the study (evomerge/run_lock.py).
- `fitness.json`: what a fitness means in this run, fixed at start (evomerge/fitness_definition.py).
- `items/<trial>.npz`: the items each evaluation scored and their values (evomerge/items.py).
- `items/parents/<model>.npz`: each parent on every fitness item (racing with the irt estimator:
  evomerge/parents.py); not trials, but their items count toward budget.max_items.
- `best/recipe.yaml`, `best/trial.json`: the best so far, replaced atomically on improvement.
- optimizer files (`optimizer.pkl`, `optuna.db`, `sampler.pkl`) are the optimizer's own.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from evomerge.atomic import atomic_write
from evomerge.errors import RunDirError
from evomerge.items import ItemScores
from evomerge.run_lock import LOCK, lock_holder, lock_run_dir

TRIALS = "trials.jsonl"
ITEMS = "items"  # items/<trial>.npz: each evaluation's per-item values (evomerge/items.py)
PARENTS = "parents"  # items/parents/<model>.npz: the parents' rows of the irt estimator
STATE = "state.json"
STUDY = "study.yaml"


@dataclass
class TrialRecord:
    """One line of trials.jsonl."""

    trial: int  # 0-based order of completion
    proposal: int  # the optimizer's proposal id
    status: str  # ok | failed | duplicate
    genome: dict[str, Any]
    recipe_hash: str
    fitness: list[float] | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    worker: str = ""
    duplicate_of: int | None = None
    finished_at: float = 0.0  # wall clock of the controller when the line was appended
    # wall clock of the worker when it began this evaluation, which then took seconds["total"]
    # (0.0: not recorded, as in runs from before; evomerge.run_metrics derives it then)
    started_at: float = 0.0
    # peak bytes per device the worker measured, on its first candidate (evomerge.memory_plan)
    memory: dict[str, int] | None = None
    # fidelity (evomerge/fidelity.py): with racing, one line per rung a candidate is scored on
    rung: int | None = None  # None: every item at once (fitness.fidelity full)
    items: int = 0  # items this evaluation scored (their values: items/<trial>.npz)
    fidelity: float = 1.0  # the candidate's items so far / all fitness items
    ci: list[float] | None = None  # confidence interval of fitness[0] (racing's estimate)

    @property
    def ok(self) -> bool:
        return self.fitness is not None and all(math.isfinite(v) for v in self.fitness)

    def to_json(self) -> str:
        data = asdict(self)
        if data["memory"] is None:  # only a worker's first line measures it
            del data["memory"]
        return json.dumps(data, sort_keys=True, allow_nan=False)


class TrialsFileError(RunDirError):
    """A line of trials.jsonl that is not a trial record (other than a torn last line)."""


class RunStore:
    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir).resolve()
        #: create() found a run that had recorded no trial and started it over
        self.reused = False

    @property
    def trials_path(self) -> Path:
        return self.dir / TRIALS

    @classmethod
    def create(cls, run_dir: str | Path, study_yaml: str) -> RunStore:
        """A new run directory, locked by this process for its life (run_lock), holding
        study.yaml, an empty trials.jsonl and state running.

        An existing directory is refused unless it is empty or a run that recorded no trial: a
        start that failed or was interrupted before its first trial (a bad model found by the
        workers, Ctrl-C while Ray starts, even SIGKILL) leaves such a run, and it is cleared and
        started again with the new config (`reused`), so it never blocks the next `run`. Nothing
        is lost by that, and reusing rather than deleting at the failure also covers a process
        that was killed without a chance to clean up."""
        store = cls(run_dir)
        store._check_new()  # before creating anything: a refused run leaves the folder as it was
        store.dir.mkdir(parents=True, exist_ok=True)
        lock_run_dir(store.dir)
        store.reused = store._check_new()  # again under the lock: another run may have begun
        if store.reused:
            for entry in store.dir.iterdir():
                if entry.name != LOCK and (entry.is_file() or entry.is_symlink()):
                    entry.unlink()
        atomic_write(store.dir / STUDY, study_yaml)
        store.trials_path.touch()
        store.set_state("running")
        return store

    def _check_new(self) -> bool:
        """Whether the folder holds a run to start over (no trial recorded); False when it is
        missing or empty; RunDirError when it holds trials or is not a run directory."""
        entries = (
            [p.name for p in self.dir.iterdir() if p.name != LOCK] if self.dir.is_dir() else []
        )
        if not entries:
            return False
        if (self.dir / STUDY).is_file() and self.trials_path.is_file():
            with open(self.trials_path, "rb") as fh:
                if not fh.readline().endswith(b"\n"):  # not one whole line: nothing recorded
                    return True
        raise RunDirError(
            f"run directory {self.dir} already exists; use `evomerge resume {self.dir}` or pick another --name"
        )

    @classmethod
    def open(cls, run_dir: str | Path, *, lock: bool = False) -> RunStore:
        """An existing run directory; `lock`: take its lock first (resume, demo), so that a
        second process is refused before it reads or writes anything."""
        store = cls(run_dir)
        if not store.dir.is_dir():
            raise RunDirError(f"run directory {store.dir} does not exist")
        if not (store.dir / STUDY).exists():
            raise RunDirError(
                f"{store.dir} holds no study ({STUDY} is missing); is this a run directory?"
            )
        if lock:
            lock_run_dir(store.dir)
        return store

    def read_trials(self) -> list[TrialRecord]:
        """Every recorded trial once, in file order: a trial number found on several lines (two
        controllers on one run, possible before runs were locked) counts once, from its first
        line, so counts are of distinct trials, never of lines. A torn last line is ignored;
        any other line that is not a trial raises TrialsFileError naming the file and line."""
        seen: set[int] = set()
        out: list[TrialRecord] = []
        for rec in self._iter_trials():
            if rec.trial not in seen:
                seen.add(rec.trial)
                out.append(rec)
        return out

    def _iter_trials(self) -> Iterator[TrialRecord]:
        if not self.trials_path.exists():
            return
        with open(self.trials_path, "rb") as fh:
            for number, line in enumerate(fh, 1):
                if not line.endswith(b"\n"):
                    break  # torn last line: the crash happened mid-append
                if line.strip():
                    yield _parse_trial(line, self.trials_path, number)

    def repair(self) -> None:
        """Cut a torn last line so the next append starts on a fresh line."""
        if not self.trials_path.exists():
            return
        data = self.trials_path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data[: data.rfind(b"\n") + 1]
            with open(self.trials_path, "r+b") as fh:
                fh.truncate(len(keep))
                os.fsync(fh.fileno())

    def append(self, record: TrialRecord) -> None:
        """One whole line, written and fsynced, or nothing: a write cut short (no space left,
        an error in fsync) is truncated away at once and raised (`DiskFullError` for a full
        disk), so trials.jsonl never keeps half a line and the trial counts as not recorded."""
        from evomerge.disk_full import FULL_ERRNOS, no_space

        record.finished_at = record.finished_at or time.time()
        line = (record.to_json() + "\n").encode()
        fd = os.open(self.trials_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException as exc:
                os.ftruncate(fd, start)  # frees what was written: works on a full disk
                os.fsync(fd)
                if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
                    raise no_space(self.trials_path, exc) from exc
                raise
        finally:
            os.close(fd)

    def set_state(self, state: str, **extra: Any) -> None:
        info = {"state": state, "pid": os.getpid(), "updated": time.time(), **extra}
        atomic_write(self.dir / STATE, json.dumps(info, indent=2) + "\n")

    def state(self) -> dict[str, Any]:
        """state.json, where "running" is believed only while its pid is alive and a process
        holds the run's lock: a controller killed without a chance to say so (SIGKILL, a lost
        node) reads as interrupted, even after its pid was reused."""
        path = self.dir / STATE
        info = json.loads(path.read_text()) if path.exists() else {"state": "interrupted"}
        if info.get("state") == "running":
            unlocked = (self.dir / LOCK).exists() and lock_holder(self.dir) is None
            if unlocked or not _pid_alive(int(info.get("pid", -1))):
                info["state"] = "interrupted"
        return info

    def items_path(self, trial: int) -> Path:
        return self.dir / ITEMS / f"{trial:06d}.npz"

    def write_items(self, trial: int, items: ItemScores) -> None:
        """The evaluation's item values, written (atomically) before its line is appended, so a
        line never names items that are not on disk."""
        items.save(self.items_path(trial))

    def read_items(self, trial: int) -> ItemScores | None:
        path = self.items_path(trial)
        return ItemScores.load(path) if path.exists() else None

    def parent_path(self, model: str) -> Path:
        return self.dir / ITEMS / PARENTS / f"{model}.npz"

    def write_parent_items(self, model: str, items: ItemScores) -> None:
        """A parent's items (atomically: a file that exists is whole, and it is the record)."""
        items.save(self.parent_path(model))

    def read_parent_items(self) -> dict[str, ItemScores]:
        """The parents scored so far, by model name."""
        folder = self.dir / ITEMS / PARENTS
        paths = sorted(folder.glob("*.npz")) if folder.is_dir() else []
        return {p.stem: ItemScores.load(p) for p in paths}

    def write_item_counts(self, counts: dict[str, int]) -> None:
        """Items per fitness task (racing's rungs are built from them on resume)."""
        atomic_write(self.dir / ITEMS / "counts.json", json.dumps(counts, sort_keys=True) + "\n")

    def read_item_counts(self) -> dict[str, int] | None:
        path = self.dir / ITEMS / "counts.json"
        return json.loads(path.read_text()) if path.exists() else None

    def write_best(self, record: TrialRecord, recipe_yaml: str) -> None:
        """best/recipe.yaml, then best/trial.json: trial.json last marks the pair complete."""
        best = self.dir / "best"
        best.mkdir(exist_ok=True)
        atomic_write(best / "recipe.yaml", recipe_yaml)
        atomic_write(best / "trial.json", json.dumps(json.loads(record.to_json()), indent=2) + "\n")

    def best_is(self, record: TrialRecord) -> bool:
        """Whether best/ holds `record` complete (false after a crash before or inside
        write_best, or when best/ was deleted)."""
        best = self.dir / "best"
        try:
            saved = json.loads((best / "trial.json").read_text())
        except (OSError, ValueError):
            return False
        same = saved.get("trial") == record.trial and saved.get("recipe_hash") == record.recipe_hash
        return same and (best / "recipe.yaml").is_file()


_REQUIRED = {
    f.name for f in fields(TrialRecord) if f.default is MISSING and f.default_factory is MISSING
}
_KNOWN = {f.name for f in fields(TrialRecord)}


def _parse_trial(line: bytes, path: Path, number: int) -> TrialRecord:
    """One line of trials.jsonl, or TrialsFileError naming the file, the line and the fault."""
    fix = "only a torn last line is repaired by itself: fix or remove that line"
    try:
        data = json.loads(line)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        what = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise TrialsFileError(f"{path}, line {number}: not valid JSON ({what}); {fix}") from None
    if not isinstance(data, dict):
        fault = f"a JSON {type(data).__name__}, not an object"
    elif missing := sorted(_REQUIRED - data.keys()):
        fault = f"no {', '.join(missing)}"
    elif unknown := sorted(data.keys() - _KNOWN):
        fault = f"unknown fields {', '.join(unknown)}"
    else:
        return TrialRecord(**data)
    raise TrialsFileError(f"{path}, line {number}: not a trial record ({fault}); {fix}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def best_trial(records: list[TrialRecord]) -> TrialRecord | None:
    """Highest first objective among successful evaluations on every fitness item (ties: the
    earliest); a racing estimate from a subset never becomes the best."""
    ok = [r for r in records if r.status == "ok" and r.ok and r.fidelity >= 1.0]
    return max(ok, key=lambda r: (r.fitness[0], -r.trial)) if ok else None


def parent_items(run_dir: Path) -> int:
    """Items the parents' files hold (budget.max_items counts them, though they are no trial)."""
    return sum(items.count for items in RunStore(run_dir).read_parent_items().values())


def candidates_done(records: list[TrialRecord]) -> int:
    """Candidates recorded, the unit of budget.max_trials: distinct proposals (a racing candidate
    has a line per rung; a plain study one line per candidate, duplicates included)."""
    return len({r.proposal for r in records})

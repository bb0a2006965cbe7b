"""The run directory: everything a study has computed, durable and rebuildable.

- `study.yaml`: the resolved config.
- `trials.jsonl`: one JSON line per trial, appended with flush + fsync as each completes; a torn
  last line (crash mid-write) is ignored on read and cut off before the next append.
- `state.json`: running / interrupted / finished, with the pid of the controller.
- `best/recipe.yaml`, `best/trial.json`: the best so far, replaced atomically on improvement.
- optimizer files (`optimizer.pkl`, `optuna.db`, `sampler.pkl`) are the optimizer's own.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evomerge.atomic import atomic_write
from evomerge.errors import RunDirError

TRIALS = "trials.jsonl"
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
    finished_at: float = 0.0

    @property
    def ok(self) -> bool:
        return self.fitness is not None and all(math.isfinite(v) for v in self.fitness)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)


class RunStore:
    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir).resolve()

    @property
    def trials_path(self) -> Path:
        return self.dir / TRIALS

    @classmethod
    def create(cls, run_dir: str | Path, study_yaml: str) -> RunStore:
        store = cls(run_dir)
        if store.dir.exists() and any(store.dir.iterdir()):
            raise RunDirError(
                f"run directory {store.dir} already exists; use `evomerge resume {store.dir}` or pick another --name"
            )
        store.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(store.dir / STUDY, study_yaml)
        store.trials_path.touch()
        store.set_state("running")
        return store

    @classmethod
    def open(cls, run_dir: str | Path) -> RunStore:
        store = cls(run_dir)
        if not store.dir.is_dir():
            raise RunDirError(f"run directory {store.dir} does not exist")
        if not (store.dir / STUDY).exists():
            raise RunDirError(
                f"{store.dir} holds no study ({STUDY} is missing); is this a run directory?"
            )
        return store

    def read_trials(self) -> list[TrialRecord]:
        return list(self._iter_trials())

    def _iter_trials(self) -> Iterator[TrialRecord]:
        if not self.trials_path.exists():
            return
        with open(self.trials_path) as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # torn last line: the crash happened mid-append
                yield TrialRecord(**json.loads(line))

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
        record.finished_at = record.finished_at or time.time()
        with open(self.trials_path, "a") as fh:
            fh.write(record.to_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def set_state(self, state: str, **extra: Any) -> None:
        info = {"state": state, "pid": os.getpid(), "updated": time.time(), **extra}
        atomic_write(self.dir / STATE, json.dumps(info, indent=2) + "\n")

    def state(self) -> dict[str, Any]:
        path = self.dir / STATE
        info = json.loads(path.read_text()) if path.exists() else {"state": "interrupted"}
        if info.get("state") == "running" and not _pid_alive(int(info.get("pid", -1))):
            info["state"] = "interrupted"  # killed without a chance to say so
        return info

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
    """Highest first objective among successful evaluations (ties: the earliest)."""
    ok = [r for r in records if r.status == "ok" and r.ok]
    return max(ok, key=lambda r: (r.fitness[0], -r.trial)) if ok else None

"""The run directory (evomerge/runstore.py): append-only trials, torn-line repair, state, best."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import evomerge.atomic
import evomerge.runstore
from evomerge.errors import RunDirError, UserError
from evomerge.run_lock import lock_holder, release_run_dir
from evomerge.runstore import RunStore, TrialRecord, TrialsFileError, best_trial

STUDY_YAML = "name: tiny\nseed: 0\n"


def record(
    trial: int, fitness: tuple[float, ...] | None = (1.0,), status: str = "ok", **kw
) -> TrialRecord:
    """A trial line; fitness None makes a failed trial with an error."""
    return TrialRecord(
        trial=trial,
        proposal=trial + 100,
        status=status,
        genome={"g0.linear.a.weight": 0.25 * trial, "g0.method": "linear"},
        recipe_hash=f"hash{trial}",
        fitness=list(fitness) if fitness is not None else None,
        scores={"task": {"acc,none": 0.5}} if fitness is not None else {},
        error=None if fitness is not None else "boom",
        seconds={"merge": 0.1, "score": 0.2},
        worker="host:1:cpu",
        **kw,
    )


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore.create(tmp_path / "run", STUDY_YAML)


# ---- create / open -------------------------------------------------------------------------


def test_create_writes_study_empty_trials_and_running_state(tmp_path):
    store = RunStore.create(tmp_path / "a" / "run", STUDY_YAML)
    assert store.dir == (tmp_path / "a" / "run").resolve()
    assert (store.dir / "study.yaml").read_text() == STUDY_YAML
    assert store.trials_path.read_text() == ""
    state = store.state()
    assert state["state"] == "running" and state["pid"] == os.getpid()
    assert store.read_trials() == []


def test_create_refuses_a_non_empty_run_dir_and_leaves_it_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    with pytest.raises(RunDirError, match="already exists") as info:
        RunStore.create(run, STUDY_YAML)
    assert "evomerge resume" in str(info.value) and isinstance(info.value, UserError)
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt"]


def test_create_refuses_a_finished_run(store):
    store.append(record(0))
    with pytest.raises(RunDirError, match="already exists"):
        RunStore.create(store.dir, "name: other\n")
    assert (store.dir / "study.yaml").read_text() == STUDY_YAML
    assert len(store.read_trials()) == 1


def test_create_accepts_an_empty_existing_folder(tmp_path):
    (tmp_path / "run").mkdir()
    store = RunStore.create(tmp_path / "run", STUDY_YAML)
    assert (store.dir / "study.yaml").exists() and not store.reused


def test_create_locks_the_run_for_this_process(tmp_path):
    store = RunStore.create(tmp_path / "run", STUDY_YAML)
    holder = lock_holder(store.dir)
    assert holder is not None and holder["pid"] == os.getpid()
    release_run_dir(store.dir)
    assert lock_holder(store.dir) is None


def _started_without_a_trial(tmp_path: Path, name: str = "run") -> Path:
    """What a start leaves when it fails or is killed before its first trial."""
    run = tmp_path / name
    run.mkdir()
    (run / "study.yaml").write_text("name: old\n")
    (run / "trials.jsonl").write_text('{"trial": 0, "propos')  # torn: not recorded
    (run / "state.json").write_text(json.dumps({"state": "running", "pid": 999999999}))
    (run / "optimizer.pkl").write_bytes(b"old state")
    (run / "fitness.json").write_text("{}")
    return run


def test_create_starts_over_a_run_that_recorded_no_trial(tmp_path):
    run = _started_without_a_trial(tmp_path)
    store = RunStore.create(run, STUDY_YAML)
    assert store.reused
    assert sorted(p.name for p in run.iterdir()) == [
        ".lock",
        "state.json",
        "study.yaml",
        "trials.jsonl",
    ]
    assert (run / "study.yaml").read_text() == STUDY_YAML and store.read_trials() == []


def test_create_never_reuses_a_folder_that_is_not_a_run(tmp_path):
    """A folder with a study.yaml of the user's own (no trials.jsonl) is not a run to clear."""
    run = tmp_path / "project"
    run.mkdir()
    (run / "study.yaml").write_text("name: mine\n")
    with pytest.raises(RunDirError, match="already exists"):
        RunStore.create(run, STUDY_YAML)
    assert sorted(p.name for p in run.iterdir()) == ["study.yaml"]


def test_open_needs_a_folder_with_a_study(tmp_path, store):
    with pytest.raises(RunDirError, match="does not exist"):
        RunStore.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="holds no study"):
        RunStore.open(tmp_path / "empty")
    assert RunStore.open(store.dir).dir == store.dir


# ---- trials.jsonl --------------------------------------------------------------------------


def test_append_is_one_json_line_per_trial_read_by_another_store(store):
    records = [record(0), record(1, None, status="failed"), record(2, (0.5, -1.0))]
    for r in records:
        store.append(r)
    lines = store.trials_path.read_text().splitlines()
    assert len(lines) == 3
    assert [json.loads(line)["trial"] for line in lines] == [0, 1, 2]
    again = RunStore.open(store.dir).read_trials()
    assert again == records  # every field survives the round trip
    assert again[1].fitness is None and again[1].error == "boom"


def test_append_flushes_before_fsync(store, monkeypatch):
    """What fsync makes durable must already be in the file: flush first, then fsync."""
    seen: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        seen.append(store.trials_path.read_text())
        real_fsync(fd)

    monkeypatch.setattr(evomerge.runstore.os, "fsync", spy)
    store.append(record(0))
    store.append(record(1))
    assert len(seen) == 2
    assert seen[0].count("\n") == 1 and seen[1].count("\n") == 2
    assert seen[1].endswith("\n")


def test_append_stamps_finished_at_unless_set(store):
    store.append(record(0))
    store.append(record(1, finished_at=123.5))
    first, second = store.read_trials()
    assert first.finished_at > 1e9  # a wall-clock time
    assert second.finished_at == 123.5


def test_non_finite_fitness_is_not_ok_and_never_written_as_nan(store):
    assert record(0, (1.0, 2.0)).ok
    assert not record(0, None, status="failed").ok
    bad = record(0, (float("nan"),))
    assert not bad.ok
    with pytest.raises(ValueError):
        store.append(bad)  # JSON has no NaN: a reader in another language would choke
    assert store.read_trials() == []


def _tear(store: RunStore) -> str:
    """A crash mid-append: half of the next line, no newline."""
    line = record(1).to_json()
    with open(store.trials_path, "a") as fh:
        fh.write(line[: len(line) // 2])
    return line


def test_torn_last_line_is_ignored_on_read(store):
    store.append(record(0))
    _tear(store)
    assert [r.trial for r in store.read_trials()] == [0]
    assert [r.trial for r in RunStore.open(store.dir).read_trials()] == [0]


def test_repair_cuts_the_torn_line_so_the_next_append_is_readable(store):
    store.append(record(0))
    good = store.trials_path.read_bytes()
    _tear(store)
    store.repair()
    assert store.trials_path.read_bytes() == good
    store.append(record(1))
    assert [r.trial for r in store.read_trials()] == [0, 1]


def test_without_repair_the_next_append_would_be_lost(store):
    """Why repair exists: appending after a torn line glues the new trial onto it."""
    store.append(record(0))
    _tear(store)
    store.append(record(1))
    with pytest.raises(TrialsFileError, match=r"trials.jsonl, line 2: not valid JSON"):
        store.read_trials()


@pytest.mark.parametrize(
    ("line", "fault"),
    [
        (b"garbage\n", "not valid JSON (Expecting value)"),
        (b"\xff\xfe{}\n", "not valid JSON"),
        (b"[1, 2]\n", "a JSON list, not an object"),
        (b'{"trial": 1}\n', "no genome, proposal, recipe_hash, status"),
        (record(1).to_json()[:-1].encode() + b', "extra": 1}\n', "unknown fields extra"),
    ],
)
def test_a_bad_line_that_is_not_the_torn_last_one_names_file_and_line(store, line, fault):
    store.append(record(0))
    with open(store.trials_path, "ab") as fh:
        fh.write(line)
    store.append(record(2))
    with pytest.raises(TrialsFileError) as info:
        store.read_trials()
    msg = str(info.value)
    assert msg.startswith(f"{store.trials_path}, line 2: ") and fault in msg, msg
    assert "\n" not in msg and "fix or remove that line" in msg
    assert isinstance(info.value, UserError)  # one line, exit 2, never a JSONDecodeError


def test_blank_lines_are_skipped(store):
    store.append(record(0))
    with open(store.trials_path, "a") as fh:
        fh.write("\n  \n")
    store.append(record(1))
    assert [r.trial for r in store.read_trials()] == [0, 1]


def test_a_trial_number_on_several_lines_counts_once_from_its_first_line(store):
    """Two controllers on one run (before runs were locked) wrote trial 1 twice: it is one
    trial, and every count (status, budget, resume) is of distinct trials."""
    store.append(record(0))
    store.append(record(1, (0.25,)))
    store.append(record(1, (0.75,)))
    store.append(record(2))
    assert store.trials_path.read_text().count("\n") == 4
    records = store.read_trials()
    assert [r.trial for r in records] == [0, 1, 2]
    assert records[1].fitness == [0.25]


def test_repair_of_a_torn_first_line_and_of_clean_files(store):
    _tear(store)
    store.repair()
    assert store.trials_path.read_bytes() == b""
    store.repair()  # nothing torn: nothing changes
    store.append(record(0))
    before = store.trials_path.read_bytes()
    store.repair()
    assert store.trials_path.read_bytes() == before
    store.trials_path.unlink()
    store.repair()  # no file yet: a no-op, and reading gives no trials
    assert store.read_trials() == []


# ---- state.json ----------------------------------------------------------------------------


def test_state_transitions_keep_pid_and_extra_fields(store):
    assert store.state()["state"] == "running"
    store.set_state("interrupted", reason="SIGINT")
    info = store.state()
    assert info["state"] == "interrupted" and info["reason"] == "SIGINT"
    assert info["pid"] == os.getpid() and info["updated"] > 1e9
    store.set_state("running")
    assert store.state()["state"] == "running" and "reason" not in store.state()
    store.set_state("finished", trials=6)
    on_disk = json.loads((store.dir / "state.json").read_text())
    assert on_disk["state"] == "finished" and on_disk["trials"] == 6


def test_running_with_a_dead_controller_reads_as_interrupted(store):
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = int(proc.stdout)
    (store.dir / "state.json").write_text(json.dumps({"state": "running", "pid": dead}))
    assert store.state()["state"] == "interrupted"
    (store.dir / "state.json").write_text(json.dumps({"state": "finished", "pid": dead}))
    assert store.state()["state"] == "finished"  # only "running" needs a live controller


def test_running_reads_as_interrupted_once_nobody_holds_the_lock(store):
    """A live pid is not enough (pids are reused): running needs the run's lock held."""
    store.set_state("running")  # our own, live pid
    assert store.state()["state"] == "running"
    release_run_dir(store.dir)
    assert store.state()["state"] == "interrupted"


def test_missing_state_reads_as_interrupted(store):
    (store.dir / "state.json").unlink()
    assert store.state() == {"state": "interrupted"}


def test_set_state_is_atomic(store, monkeypatch):
    before = (store.dir / "state.json").read_text()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(evomerge.atomic.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        store.set_state("finished")
    assert (store.dir / "state.json").read_text() == before
    assert sorted(p.name for p in store.dir.iterdir()) == [
        ".lock",
        "state.json",
        "study.yaml",
        "trials.jsonl",
    ]


# ---- best/ ---------------------------------------------------------------------------------


def test_write_best_writes_recipe_and_trial(store):
    rec = record(3, (0.75,))
    store.write_best(rec, "evomerge_recipe: 1\n")
    assert (store.dir / "best" / "recipe.yaml").read_text() == "evomerge_recipe: 1\n"
    trial = json.loads((store.dir / "best" / "trial.json").read_text())
    assert TrialRecord(**trial) == rec
    better = record(5, (0.9,))
    store.write_best(better, "evomerge_recipe: 1\nseed: 5\n")
    assert yaml.safe_load((store.dir / "best" / "recipe.yaml").read_text())["seed"] == 5
    assert json.loads((store.dir / "best" / "trial.json").read_text())["trial"] == 5


def test_write_best_failure_keeps_the_previous_best(store, monkeypatch):
    store.write_best(record(3, (0.75,)), "old\n")
    best = store.dir / "best"
    calls = {"n": 0}
    real_replace = os.replace

    def second_fails(src, dst):
        calls["n"] += 1
        if Path(dst).name == "trial.json":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(evomerge.atomic.os, "replace", second_fails)
    with pytest.raises(OSError, match="disk full"):
        store.write_best(record(5, (0.9,)), "new\n")
    # each file is whole, old or new, and no temp file is left beside them
    assert sorted(p.name for p in best.iterdir()) == ["recipe.yaml", "trial.json"]
    assert json.loads((best / "trial.json").read_text())["trial"] == 3
    assert (best / "recipe.yaml").read_text() in ("old\n", "new\n")


# ---- best_trial ----------------------------------------------------------------------------


def test_best_trial_is_the_highest_first_objective():
    records = [record(0, (0.2, 9.0)), record(1, (0.7, 0.0)), record(2, (0.5, 5.0))]
    assert best_trial(records).trial == 1


def test_best_trial_ties_go_to_the_earliest_trial():
    records = [record(4, (0.7,)), record(2, (0.7,)), record(3, (0.1,)), record(6, (0.7,))]
    assert best_trial(records).trial == 2


def test_best_trial_skips_failed_duplicates_and_non_finite():
    records = [
        record(0, (0.1,)),
        record(1, None, status="failed"),
        record(2, (5.0,), status="duplicate", duplicate_of=0),
        record(3, (float("inf"),)),
        record(4, (float("nan"),)),
    ]
    assert best_trial(records).trial == 0
    assert best_trial(records[1:]) is None
    assert best_trial([]) is None

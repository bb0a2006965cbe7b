"""The controller bench drives the real loop, and what makes Optuna's controller fast stays exact:
the SQLite mirror of an in-memory study, and TPE's bounded history."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.samplers import TPESampler
from optuna.samplers._tpe.sampler import _split_trials
from optuna.storages import RDBStorage

from evomerge.bench.controller_bench import run_controller_bench, windows
from evomerge.cli import main
from evomerge.config import load_study_config
from evomerge.optimizers.optuna_storage import MirroredStorage
from evomerge.optimizers.optuna_tpe import WindowedTPESampler, bounded
from evomerge.runstore import RunStore
from evomerge.study_plan import build_plan
from tests.study_factory import make_tiny_study

optuna.logging.set_verbosity(optuna.logging.WARNING)
DISTS = {f"g{i}": FloatDistribution(0.0, 1.2) for i in range(6)}


def test_the_bench_runs_the_real_loop_and_every_trial_is_on_disk(tmp_path) -> None:
    study = make_tiny_study(tmp_path / "study", preset="task_arithmetic")
    trials = 50
    report = run_controller_bench(
        tmp_path / "bench", optimizers=["cma", "optuna_tpe"], trials=trials, workers=4, study=study
    )
    assert [r["optimizer"] for r in report["rows"]] == ["cma", "optuna_tpe"]
    assert report["label"].startswith("controller microbenchmark")
    for row in report["rows"]:
        run_dir = Path(row["run_dir"])
        records = RunStore(run_dir).read_trials()
        lines = (run_dir / "trials.jsonl").read_text().splitlines()
        assert len(lines) == trials and [r.trial for r in records] == list(range(trials))
        assert len({r.proposal for r in records}) == trials and all(r.ok for r in records)
        assert json.loads((run_dir / "state.json").read_text())["state"] == "finished"
        # the state on disk is what the loop told: it loads, nothing is pending
        plan = build_plan(load_study_config(run_dir / "study.yaml"))
        opt = plan.optimizer(run_dir, resume=True)
        assert opt.pending() == []
        best = max(r.fitness[0] for r in records)
        assert opt.best[1][0] == pytest.approx(best, abs=1e-12)
        opt.close()
        # every trial measured; the numbers are ordered and positive
        assert row["measured"] == trials and row["gaps"] == trials and row["genes"] == 6
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert (
            list(row["windows_ms"])
            == ["0-5", "20-25", "45-50"]
            == [f"{a}-{b}" for a, b in windows(trials)]
        )
        assert all(v > 0 for v in row["windows_ms"].values()) and row["last_window_p95_ms"] > 0
        # the parts add up to the loop's time, the optimizer's and the store's parts are there
        parts = row["parts_ms"]
        assert sum(parts.values()) == pytest.approx(row["mean_ms"], abs=0.01)
        assert parts["save"] > 0 and parts["tell"] > 0 and parts["ask"] > 0
        assert parts["append"] > 0 and parts["other"] >= -0.01
        # the instant fitness is a real function the search improves on
        first = [r.fitness[0] for r in records[:8]]
        assert best > max(first)
    tpe = RunStore(Path(report["rows"][1]["run_dir"])).read_trials()
    db_path = Path(report["rows"][1]["run_dir"]) / "optuna.db"
    db = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{db_path}")
    told = {t.number: t.values[0] for t in db.get_trials() if t.state.name == "COMPLETE"}
    assert sorted(told.values()) == sorted(r.fitness[0] for r in tpe)
    with sqlite3.connect(db_path) as conn:  # the journal the saves were measured with
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_bench_controller_prints_the_table(tmp_path, capsys) -> None:
    code = main(
        [
            "bench",
            "--parts",
            "controller",
            "--controller-trials",
            "20",
            "--controller-workers",
            "2",
            "--optimizers",
            "optuna_random",
            "--work-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("controller (controller microbenchmark") and "20 trials" in out[0]
    assert out[1].split()[:4] == ["optimizer", "0-2", "8-10", "18-20"]
    assert out[1].split()[5:11] == ["last", "ask", "tell", "save", "append", "other"]
    row = out[2].split()
    assert row[0] == "optuna_random" and len(row) == 10 and all(float(v) >= 0 for v in row[1:])
    lines = (tmp_path / "controller/runs/optuna_random/trials.jsonl").read_text().splitlines()
    assert len(lines) == 20
    argv = ["bench", "--parts", "controller", "--optimizers", "optuna_tp", "--work-dir"]
    assert main([*argv, str(tmp_path)]) == 2  # a user error, before any study runs
    assert "did you mean" in capsys.readouterr().err


def _fill(study: optuna.Study, n: int, sampler_of, flush=None, running: int = 0) -> None:
    """`n` asks, each told 1 - sum((x - 0.4)^2) except the last `running`; flush after each."""
    for i in range(n):
        study.sampler = sampler_of(i)
        trial = study.ask(fixed_distributions=DISTS)
        if flush:
            flush()
        if i < n - running:
            study.tell(trial.number, 1.0 - sum((v - 0.4) ** 2 for v in trial.params.values()))
            if flush:
                flush()


@pytest.mark.parametrize(
    "sampler", [optuna.samplers.CmaEsSampler, optuna.samplers.NSGAIISampler, TPESampler]
)
def test_the_mirror_reads_back_the_study_it_wrote(tmp_path, sampler) -> None:
    """What a flush writes, `open` gives back trial for trial (the samplers' system attributes
    included), and Optuna's own RDBStorage reads the same file."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    live = MirroredStorage(RDBStorage(url))
    live.create("evomerge", [optuna.study.StudyDirection.MAXIMIZE])
    study = optuna.load_study(study_name="evomerge", storage=live.memory)
    study.enqueue_trial({"g0": 0.3})
    study.set_user_attr("sig", {"a": [1, 2]})
    _fill(study, 30, lambda i: sampler(seed=i), live.flush, running=3)
    # attributes that change after they were written: updated in place, not added twice
    running = study.get_trials(deepcopy=False)[-1]
    for value in (1, 2):
        live.memory.set_trial_user_attr(running._trial_id, "k", value)
        live.memory.set_trial_system_attr(running._trial_id, "s", [value])
        study.set_user_attr("sig", {"a": [1, 2], "v": value})
        live.flush()
    again = MirroredStorage(RDBStorage(url))
    again.open("evomerge")
    with sqlite3.connect(tmp_path / "optuna.db") as conn:
        for table in ("trial_user_attributes", "study_user_attributes"):
            rows = conn.execute(f"SELECT count(*) FROM {table} WHERE key IN ('k', 'sig')")
            assert rows.fetchone() == (1,), table

    def fields(trials):
        return [
            (
                t.number,
                t._trial_id,
                t.state,
                t.params,
                t.values,
                t.distributions,
                t.system_attrs,
                t.user_attrs,
                t.datetime_start,
                t.datetime_complete,
            )
            for t in trials
        ]

    mine = fields(live.memory.get_all_trials(live.memory_id))
    assert fields(again.memory.get_all_trials(again.memory_id)) == mine
    assert again.memory.get_study_user_attrs(again.memory_id) == {"sig": {"a": [1, 2], "v": 2}}
    assert mine[-1][7] == {"k": 2} and mine[-1][6]["s"] == [2]
    assert again.memory.get_study_system_attrs(again.memory_id) == (
        live.memory.get_study_system_attrs(live.memory_id)
    )
    plain = optuna.load_study(study_name="evomerge", storage=url).get_trials()
    assert [(t.number, t.state, t.params, t.values) for t in plain] == [
        m[:1] + m[2:5] for m in mine
    ]


def _tpe_study(n: int, running: int = 0) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    _fill(study, n, lambda i: optuna.samplers.RandomSampler(seed=i), running=running)
    return study


def test_the_window_keeps_tpes_below_group_and_the_recent_trials() -> None:
    study = _tpe_study(400, running=4)
    trials = study._get_trials(deepcopy=False, states=None)
    window = bounded(trials, 300, study.direction)
    complete = [t for t in window if t.state.name == "COMPLETE"]
    assert len(complete) == 300 and sum(t.state.name == "RUNNING" for t in window) == 4
    # Optuna's own split: the best 25 (TPE's below group at n >= 250) are the same trials
    done = [t for t in trials if t.state.name == "COMPLETE"]
    full_below, _ = _split_trials(study, done, 25)
    win_below, _ = _split_trials(study, complete, 25)
    assert {t.number for t in win_below} == {t.number for t in full_below}
    others = [t.number for t in complete if t.number not in {b.number for b in full_below}]
    assert (
        others == [t.number for t in done if t.number not in {b.number for b in full_below}][-275:]
    )
    assert bounded(trials, 400, study.direction) is trials  # nothing to bound


def test_windowed_tpe_is_optunas_tpe_until_the_history_is_longer_than_the_window() -> None:
    def asked(sampler) -> dict:
        study = _tpe_study(260)
        study.sampler = sampler
        return study.ask(fixed_distributions=DISTS).params

    assert asked(WindowedTPESampler(seed=3, history=300)) == asked(TPESampler(seed=3))
    assert asked(WindowedTPESampler(seed=3, history=None)) == asked(TPESampler(seed=3))
    # past the window TPE reads 250 complete trials (its candidates come from the below group,
    # which the window keeps, so a proposal often stays the same: the window only reweights)
    study = _tpe_study(260)
    seen = WindowedTPESampler(history=250)._window(study)._get_trials(deepcopy=False, states=None)
    assert len(seen) == 250
    with pytest.raises(ValueError, match="history"):
        WindowedTPESampler(history=100)

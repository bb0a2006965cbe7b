"""Racing studies end to end: rungs recorded per candidate, the optimizer told once per
candidate, the best only at full fidelity, fewer items than full fidelity, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.runstore import RunStore
from tests.study_factory import make_tiny_study, wait_for_lines, write_task

EVOMERGE = [sys.executable, "-m", "evomerge.cli"]


@pytest.fixture(scope="module")
def racing_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("racing")
    make_tiny_study(root)
    write_task(root / "tasks", "tiny_search", seed=1, n=90)  # enough items to race on
    return root


def study_file(root: Path, name: str, **changes) -> Path:
    data = yaml.safe_load((root / "study.yaml").read_text())
    data["fitness"] = {"fidelity": "racing", "rungs": 3, "eta": 3, "min_items": 4}
    for key, value in changes.items():
        data[key] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def lines(run_dir: Path) -> list[tuple]:
    return [
        (r.trial, r.proposal, r.rung, r.items, r.fitness, json.dumps(r.genome, sort_keys=True))
        for r in RunStore(run_dir).read_trials()
    ]


@pytest.mark.parametrize(
    "optimizer",
    [{"name": "cma", "popsize": 6, "sigma0": 0.3}, {"name": "optuna_tpe", "n_startup_trials": 4}],
)
def test_racing_study_records_rungs_and_spends_fewer_items(
    racing_root, tmp_path, optimizer, capsys
):
    path = study_file(racing_root, f"race-{optimizer['name']}", optimizer=optimizer)
    code = main(["run", str(path), "--runs-dir", str(tmp_path), "--quiet", "--max-trials", "12"])
    assert code == 0, capsys.readouterr().err
    store = RunStore(tmp_path / "tiny")
    records = store.read_trials()
    assert len({r.proposal for r in records}) == 12  # the budget counts candidates
    assert {r.rung for r in records} <= {0, 1, 2} and any(r.rung == 0 for r in records)
    for r in records:
        assert r.items == store.read_items(r.trial).count
    assert sum(r.items for r in records) <= 12 * 90  # an item is never scored twice
    best = json.loads((tmp_path / "tiny" / "best" / "trial.json").read_text())
    assert best["fidelity"] == 1.0 and best["rung"] == 2  # the best rests on every item
    full = [r for r in records if r.fidelity == 1.0]
    assert best["fitness"][0] == max(r.fitness[0] for r in full)
    for r in records:  # an estimate is the mean of the candidate's items so far
        per = [x for x in records if x.proposal == r.proposal and x.trial <= r.trial]
        count = sum(x.items for x in per)
        assert r.fidelity == pytest.approx(count / 90)
        if r.fidelity < 1.0:
            assert r.ci is not None and r.ci[0] <= r.fitness[0] <= r.ci[1]
    state = json.loads((tmp_path / "tiny" / "state.json").read_text())
    assert state["state"] == "finished"


def test_racing_on_the_small_demo_zoo_runs_to_its_budget(small_zoo, tmp_path, capsys):
    """On the small demo zoo (real skills, lm-eval generate_until and multiple-choice tasks):
    every item is scored at most once per candidate and the best rests on every item. (How much
    racing saves depends on how far apart the candidates are: tests/test_racing.py measures it on
    candidates of known skill.)"""
    data = yaml.safe_load(Path(small_zoo.study).read_text())
    data["fitness"] = {"fidelity": "racing", "rungs": 3, "eta": 3}
    data["optimizer"] = {"name": "cma", "popsize": 8, "sigma0": 0.5}  # diverse candidates
    data["executor"] = {"kind": "local", "workers": 1}
    data["budget"] = {"max_trials": 24}
    path = tmp_path / "race.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["run", str(path), "--runs-dir", str(tmp_path), "--quiet"])
    assert code == 0, capsys.readouterr().err
    store = RunStore(tmp_path / data["name"])
    records = store.read_trials()
    counts = json.loads((store.dir / "items" / "counts.json").read_text())
    total = sum(counts.values())
    assert len({r.proposal for r in records}) == 24
    for proposal in {r.proposal for r in records}:
        assert sum(r.items for r in records if r.proposal == proposal) <= total
    best = json.loads((store.dir / "best" / "trial.json").read_text())
    assert best["fidelity"] == 1.0


HALVING = {"fidelity": "racing", "rungs": 3, "eta": 3, "min_items": 4, "cohort_rule": "halving"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer, fitness",
    [
        ({"name": "cma", "popsize": 6, "sigma0": 0.3}, None),
        ({"name": "cma", "popsize": 6, "sigma0": 0.3}, HALVING),  # the demo's default
        ({"name": "optuna_tpe", "n_startup_trials": 4}, None),
    ],
)
@pytest.mark.parametrize("kill_after", [5, 9])
def test_racing_resume_after_sigkill_equals_uninterrupted(
    racing_root, tmp_path, optimizer, fitness, kill_after
):
    extra = {"fitness": fitness} if fitness else {}
    path = study_file(
        racing_root,
        f"kill-{optimizer['name']}-{kill_after}-{'halving' if fitness else 'default'}",
        optimizer=optimizer,
        budget={"max_trials": 60},
        **extra,
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    whole = tmp_path / "whole"
    subprocess.run(
        [*EVOMERGE, "run", str(path), "--runs-dir", str(whole), "--name", "r", "--quiet"],
        check=True,
        env=env,
        capture_output=True,
    )
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [*EVOMERGE, "run", str(path), "--runs-dir", str(cut), "--name", "r", "--quiet"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    wait_for_lines(cut / "r" / "trials.jsonl", kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(lines(cut / "r")) < len(lines(whole / "r"))  # killed mid-study
    res = subprocess.run(
        [*EVOMERGE, "resume", str(cut / "r"), "--quiet"], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert lines(cut / "r") == lines(whole / "r")  # the same trials, rungs and items


def test_racing_with_the_irt_estimator_runs_and_refits(racing_root, tmp_path, capsys):
    path = study_file(
        racing_root,
        "race-irt",
        fitness={"fidelity": "racing", "estimator": "irt", "rungs": 2, "eta": 3, "min_items": 4},
    )
    code = main(["run", str(path), "--runs-dir", str(tmp_path), "--quiet", "--max-trials", "14"])
    assert code == 0, capsys.readouterr().err
    records = RunStore(tmp_path / "tiny").read_trials()
    full = [r for r in records if r.fidelity == 1.0]
    assert len({r.proposal for r in records}) == 14 and len(full) >= 8
    partial = [r for r in records if r.fidelity < 1.0]
    assert all(r.ci is not None and r.ci[0] <= r.fitness[0] <= r.ci[1] for r in partial)


IRT = {"fidelity": "racing", "estimator": "irt", "rungs": 2, "eta": 3, "min_items": 4}


def count_evaluations(monkeypatch) -> list[tuple[str, int | None]]:
    """(recipe hash, rung) of every evaluation a worker of this process runs, in order."""
    from evomerge.worker import Worker

    calls: list[tuple[str, int | None]] = []
    evaluate = Worker.evaluate

    def counting(self, recipe, split="search", rung=None, scored=None):
        calls.append((recipe.content_hash(), rung))
        return evaluate(self, recipe, split, rung, scored)

    monkeypatch.setattr(Worker, "evaluate", counting)
    return calls


def parent_hashes(run_dir: Path) -> dict[str, str]:
    from evomerge.parents import parent_recipes
    from evomerge.study import load_run_config
    from evomerge.study_plan import build_plan

    plan = build_plan(load_run_config(RunStore(run_dir)))
    return {name: r.content_hash() for name, r in parent_recipes(plan).items()}


def parent_files(run_dir: Path) -> dict[str, bytes]:
    folder = run_dir / "items" / "parents"
    return {p.stem: p.read_bytes() for p in sorted(folder.glob("*.npz"))}


def test_racing_irt_scores_each_parent_once_first_and_resume_reuses_them(
    racing_root, tmp_path, monkeypatch, capsys
):
    import numpy as np

    path = study_file(racing_root, "race-parents", fitness=IRT)
    calls = count_evaluations(monkeypatch)
    code = main(["run", str(path), "--runs-dir", str(tmp_path), "--quiet", "--max-trials", "6"])
    assert code == 0, capsys.readouterr().err
    run_dir = tmp_path / "tiny"
    parents = parent_hashes(run_dir)
    assert list(parents) == ["base", "s1", "s2"]
    assert calls[:3] == [(h, None) for h in parents.values()]  # every item, before candidates
    assert [h for h, _ in calls].count(parents["s1"]) == 1
    store = RunStore(run_dir)
    total = sum(store.read_item_counts().values())
    rows = store.read_parent_items()
    assert sorted(rows) == ["base", "s1", "s2"]
    for name, items in rows.items():
        assert items.count == total == 90
        assert np.array_equal(items.ids["tiny_search"], np.arange(90))
        capsys.readouterr()
        model = racing_root / "models" / name
        tasks = ["--tasks", "tiny_search", "--include-path", str(racing_root / "tasks")]
        assert main(["eval", str(model), *tasks, "--device", "cpu", "--json"]) == 0
        alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert items.metrics()["tiny_search"]["acc"] == pytest.approx(
            alone["tasks"]["tiny_search"]["acc"]
        )  # the passthrough recipe scores as the checkpoint itself
    records = store.read_trials()
    assert len({r.proposal for r in records}) == 6  # parents are no candidates
    assert all(r.recipe_hash not in parents.values() for r in records)
    capsys.readouterr()
    assert main(["status", str(run_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["trials_completed"] == 6
    assert info["parent_items"] == 3 * 90

    before = parent_files(run_dir)
    calls.clear()
    code = main(["resume", str(run_dir), "--quiet", "--max-trials", "9"])
    assert code == 0, capsys.readouterr().err
    assert calls and not {h for h, _ in calls} & set(parents.values())  # none scored again
    assert parent_files(run_dir) == before
    assert len({r.proposal for r in store.read_trials()}) == 9


def test_racing_irt_killed_while_scoring_parents_resumes_exactly(
    racing_root, tmp_path, monkeypatch, capsys
):
    path = study_file(racing_root, "race-parents-kill", fitness=IRT)
    args = ["--quiet", "--max-trials", "8", "--name", "r"]
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "whole"), *args]) == 0

    write = RunStore.write_parent_items
    written: list[str] = []

    def write_then_stop(self, model, items):
        write(self, model, items)
        written.append(model)
        if len(written) == 1:
            raise KeyboardInterrupt  # Ctrl-C right after the first parent's file

    monkeypatch.setattr(RunStore, "write_parent_items", write_then_stop)
    cut = tmp_path / "cut" / "r"
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "cut"), *args]) == 130
    assert list(parent_files(cut)) == ["base"] and RunStore(cut).read_trials() == []
    assert json.loads((cut / "state.json").read_text())["state"] == "interrupted"

    calls = count_evaluations(monkeypatch)
    assert main(["resume", str(cut), "--quiet"]) == 0, capsys.readouterr().err
    parents = parent_hashes(cut)
    scored = [h for h, _ in calls if h in parents.values()]
    assert scored == [parents["s1"], parents["s2"]]  # only the missing ones, once each
    assert parent_files(cut) == parent_files(tmp_path / "whole" / "r")
    assert lines(cut) == lines(tmp_path / "whole" / "r")  # the same study as uninterrupted


def test_racing_irt_fits_on_the_parents_before_eight_full_candidates(
    racing_root, tmp_path, monkeypatch, capsys
):
    """The 3 parents and 5 full-fidelity candidates reach irt.MIN_ROWS: a generation's
    estimates are irt's (not the subset mean's) where, without the parents, they would not be."""
    import numpy as np

    from evomerge import estimators
    from evomerge.fidelity import Term, estimate_mean

    fits: list[list] = []
    fit = estimators.irt_estimator

    def recording(train, terms, counts):
        fits.append(list(train))
        return fit(train, terms, counts)

    monkeypatch.setattr(estimators, "irt_estimator", recording)
    optimizer = {"name": "cma", "popsize": 6, "sigma0": 0.3}
    path = study_file(racing_root, "race-parents-fit", fitness=IRT, optimizer=optimizer)
    code = main(["run", str(path), "--runs-dir", str(tmp_path), "--quiet", "--max-trials", "12"])
    assert code == 0, capsys.readouterr().err
    store = RunStore(tmp_path / "tiny")
    parents = store.read_parent_items()
    assert fits and len(fits[0]) == 8  # the first fit: the 3 parents, then 5 candidates
    for row, name in zip(fits[0][:3], ["base", "s1", "s2"], strict=True):
        acc = parents[name].values["tiny_search"]["acc"]
        assert np.array_equal(row.values["tiny_search"]["acc"], acc)
    counts, terms = store.read_item_counts(), (Term("tiny_search", "acc", 1.0),)
    full_before, cum, earlier = 0, {}, []
    for r in store.read_trials():  # each line's estimate against its candidate's items' mean
        got = store.read_items(r.trial)
        cum[r.proposal] = got if r.proposal not in cum else cum[r.proposal].union(got)
        mean = estimate_mean(cum[r.proposal], terms, counts)[0]
        if r.fidelity >= 1.0:
            full_before += 1
        elif 3 + full_before < 8:  # fewer than MIN_ROWS rows, parents included: the mean
            assert r.fitness[0] == pytest.approx(mean)
        elif full_before < 8:  # irt thanks to the parents
            earlier.append(r.fitness[0] != pytest.approx(mean))
    assert earlier and any(earlier)


def test_racing_irt_budget_counts_the_parents_items(racing_root, tmp_path, capsys):
    budget = {"max_trials": 50, "max_items": 3 * 90 + 70}
    path = study_file(racing_root, "race-parents-budget", fitness=IRT, budget=budget)
    code = main(["run", str(path), "--runs-dir", str(tmp_path), "--quiet"])
    assert code == 0, capsys.readouterr().err
    store = RunStore(tmp_path / "tiny")
    from evomerge.runstore import parent_items

    records = store.read_trials()
    assert parent_items(store.dir) == 3 * 90
    # max_items stops starting candidates (a started race runs on): the 70 items left after
    # the parents' 270 start two, at 30 items each on rung 0 (without the parents: eleven)
    first = [r.items for r in records if r.rung == 0]
    assert first == [30, 30] and len({r.proposal for r in records}) == 2

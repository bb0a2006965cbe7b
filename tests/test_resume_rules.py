"""What a resume may change (budget, wall time, executor) and what it refuses (the fitness
definition, evomerge/fitness_definition.py), with nothing on disk changed by a refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.fitness_definition import FITNESS, changed_fields
from evomerge.optimizers import Dimension
from evomerge.optimizers.cma_es import CMAOptimizer
from evomerge.run_lock import LOCK
from evomerge.runstore import RunStore
from tests.study_factory import make_tiny_study


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 3-trial run of the tiny study."""
    root = tmp_path_factory.mktemp("rules")
    study = make_tiny_study(root)
    runs = root / "runs"
    code = main(["run", str(study), "--runs-dir", str(runs), "--max-trials", "3", "--quiet"])
    assert code == 0
    return runs / "tiny"


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    """A copy of the finished run to edit (unlocked: no process holds it)."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def edit_study(run_dir: Path, edit) -> None:
    data = yaml.safe_load((run_dir / "study.yaml").read_text())
    edit(data)
    (run_dir / "study.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file's bytes, but the lock's (which names its last holder)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != LOCK
    }


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def _set(path: str, value):
    def edit(data):
        node = data
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[leaf] = value

    return edit


def _both(*edits):
    def edit(data):
        for e in edits:
            e(data)

    return edit


def _source_path_of_s1(data):
    data["models"]["sources"][1]["path"] = data["models"]["sources"][0]["path"]


def _rename_s2(data):
    data["models"]["sources"][1]["name"] = "s3"


def _base_is_s1(data):
    data["models"]["base"] = data["models"]["sources"][0]["path"]


@pytest.mark.parametrize(
    ("edit", "changed"),
    [
        (_set("tasks.search", ["other_task"]), "tasks.search"),
        (_set("tasks.heldout", []), "tasks.heldout"),
        (_set("tasks.limit", 5), "tasks.limit"),
        (_set("tasks.num_fewshot", 2), "tasks.num_fewshot"),
        (_set("objective.metrics", [{"task": "tiny_search", "weight": 2.0}]), "objective.metrics"),
        (_source_path_of_s1, "models.sources"),
        (_rename_s2, "models.sources"),
        (_base_is_s1, "models.base"),
        (_set("dtype", "bfloat16"), "dtype"),
        (_set("search_space.granularity", 2), "search_space.granularity"),
        (_set("seed", 1), "seed"),
        (_set("optimizer", {"name": "optuna_random"}), "optimizer.name, optimizer.popsize"),
        (_set("optimizer.sigma0", 0.2), "optimizer.sigma0"),
        (
            _both(_set("tasks.search", ["other_task"]), _set("dtype", "bfloat16")),
            "tasks.search, dtype",
        ),
    ],
)
def test_a_changed_fitness_definition_is_refused_and_nothing_changes(
    run_dir, capsys, edit, changed
):
    edit_study(run_dir, edit)
    before = snapshot(run_dir)
    code, _, err = cli(["resume", str(run_dir), "--max-trials", "10", "--quiet"], capsys)
    assert code == 2, err
    assert err == (
        f"evomerge: error: {run_dir.resolve()}: the study's fitness definition changed since it "
        f"started ({changed}"
        + (", optimizer.sigma0" if changed.startswith("optimizer.name") else "")
        + "); resume with the study.yaml it started with, or start a new run\n"
    )
    assert snapshot(run_dir) == before  # --max-trials 10 was not written either


def test_budget_time_executor_and_batch_changes_are_allowed(run_dir, capsys):
    def edit(data):
        data["tasks"]["batch_size"] = 4
        data["executor"]["workers"] = 1
        data["device"] = "cpu"
        data["budget"]["max_trials"] = 4  # by hand: the next resume's budget

    edit_study(run_dir, edit)
    code, _, err = cli(["resume", str(run_dir), "--quiet"], capsys)
    assert code == 0, err
    assert len(RunStore(run_dir).read_trials()) == 4
    code, _, err = cli(
        ["resume", str(run_dir), "--max-trials", "5", "--max-seconds", "600", "--quiet"], capsys
    )
    assert code == 0, err
    stored = yaml.safe_load((run_dir / "study.yaml").read_text())["budget"]
    assert (stored["max_trials"], stored["max_seconds"]) == (5, 600.0)
    assert len(RunStore(run_dir).read_trials()) == 5


def test_fitness_json_is_recorded_at_start_and_for_a_run_from_before_it(finished, run_dir, capsys):
    recorded = json.loads((finished / FITNESS).read_text())
    assert recorded["tasks"]["search"] == ["tiny_search"] and recorded["dtype"] == "float32"
    assert recorded["optimizer"] == {"name": "cma", "popsize": 4, "sigma0": 0.3}
    (run_dir / FITNESS).unlink()  # a run started before fitness.json existed
    code, _, err = cli(["resume", str(run_dir), "--max-trials", "4", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((run_dir / FITNESS).read_text()) == recorded


def test_the_space_mismatch_message_is_short(tmp_path):
    """The optimizer's own check (a preset edited between run and resume): counts and the
    first name that differs, not the whole list of dimensions (was 2,461 characters)."""
    dims = [Dimension(f"g{i}.linear.s{j}.weight") for i in range(40) for j in range(3)]
    CMAOptimizer(dims, state_dir=tmp_path, seed=0).save()
    with pytest.raises(ConfigError) as info:
        CMAOptimizer.load(
            [*dims[:50], Dimension("g99.method", choices=("a", "b"))], state_dir=tmp_path
        )
    msg = str(info.value)
    assert len(msg) < 300, msg
    assert "another search space (dims: 120 then, 51 now;" in msg and "'g99.method'" in msg
    with pytest.raises(ConfigError, match=r"seed = 0, now 1;"):
        CMAOptimizer.load(dims, state_dir=tmp_path, seed=1)


def test_resume_of_a_finished_run_rewrites_a_deleted_best(run_dir, capsys):
    shutil.rmtree(run_dir / "best")
    code, out, err = cli(["resume", str(run_dir)], capsys)
    assert code == 0, err
    assert "all 3 trials of the budget are done; raise it with --max-trials N" in out
    best = max(RunStore(run_dir).read_trials(), key=lambda r: (r.fitness[0], -r.trial))
    assert RunStore(run_dir).best_is(best)
    code, out, _ = cli(["status", str(run_dir)], capsys)
    assert code == 0 and f"recipe: {run_dir / 'best' / 'recipe.yaml'}" in out


def test_fields_a_record_lacks_are_not_compared_but_new_user_keys_are():
    before = {"tasks": {"search": ["a"]}, "optimizer": {"name": "cma"}, "dtype": "float32"}
    now = {
        "tasks": {"search": ["a"], "fewshot_seed": 1234},  # a field newer than the record
        "fitness": {"fidelity": "full"},  # a section newer than the record
        "optimizer": {"name": "cma", "popsize": 8},  # the user's own option
        "dtype": "float32",
    }
    assert changed_fields(before, now) == ["optimizer.popsize"]
    assert changed_fields(now, before) == ["tasks.fewshot_seed", "optimizer.popsize", "fitness"]

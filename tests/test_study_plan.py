"""The study plan: built once, every user error before any candidate, plugins by registry only."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.config import load_study_config
from evomerge.errors import ConfigError, IncompatibleModelsError
from evomerge.optimizers import OPTIMIZERS
from evomerge.optimizers.cma_es import CMAOptimizer
from evomerge.runstore import RunStore
from evomerge.study_plan import build_plan, warm_start_genome
from tests.study_factory import make_tiny_study


@pytest.fixture(scope="module")
def study_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan")
    make_tiny_study(root)
    return root


def changed(root: Path, name: str, **top) -> Path:
    data = yaml.safe_load((root / "study.yaml").read_text())
    data.update(top)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_plan_holds_each_concept_once_in_its_own_type(study_root) -> None:
    plan = build_plan(load_study_config(study_root / "study.yaml"))
    spec = plan.worker_spec
    assert spec.models is plan.models and plan.space.models is plan.models
    assert plan.models.reference == (plan.models.base or next(iter(plan.models.paths)))
    assert spec.scoring == plan.config.tasks.settings("search")
    assert plan.optimizer_class is OPTIMIZERS.get(plan.config.optimizer.name)
    assert pickle.loads(pickle.dumps(spec)) == spec  # ships to Ray actors as it is
    recipe = plan.space.decode(plan.x0)
    assert dict(recipe.models) == dict(plan.models.paths)


def test_optimizer_factory_starts_then_continues(study_root, tmp_path) -> None:
    plan = build_plan(load_study_config(study_root / "study.yaml"))
    opt = plan.optimizer(tmp_path, resume=True)  # nothing to continue: a new search
    first = opt.ask()
    opt.save()
    again = plan.optimizer(tmp_path, resume=True)
    assert [p.id for p in again.pending()] == [first.id]
    with pytest.raises(Exception, match="already exists"):
        plan.optimizer(tmp_path, resume=False)


def test_bad_inputs_fail_at_plan_time(study_root, tmp_path) -> None:
    with pytest.raises(ConfigError, match="optuna_nsga2"):
        build_plan(
            load_study_config(
                changed(
                    study_root,
                    "multi",
                    objective={
                        "multi": True,
                        "metrics": [{"task": "tiny_search"}, {"task": "tiny_search", "weight": 2}],
                    },
                )
            )
        )
    with pytest.raises(ConfigError, match="did you mean 'cma'"):
        load_study_config(changed(study_root, "typo", optimizer={"name": "cmaa"}))


def test_mismatched_models_are_named(study_root, tmp_path) -> None:
    from tests.model_factory import save_tiny_llama

    data = yaml.safe_load((study_root / "study.yaml").read_text())
    other = save_tiny_llama(tmp_path / "wide", layers=2, hidden=48, vocab=46, seed=5)
    data["models"]["sources"][0] = {"name": "s1", "path": str(other)}
    path = study_root / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(IncompatibleModelsError, match="model 's1' does not match the base"):
        build_plan(load_study_config(path))


def test_warm_start_reads_an_earlier_recipe(study_root, tmp_path) -> None:
    plan = build_plan(load_study_config(study_root / "study.yaml"))
    genome = dict(plan.x0)
    gene = next(d for d in plan.space.dimensions() if not d.choices)
    genome[gene.name] = round(gene.low + 0.77 * (gene.high - gene.low), 6)
    path = tmp_path / "winner.yaml"
    path.write_text(plan.space.decode(genome).to_yaml())
    assert warm_start_genome(plan.space, str(path)) == genome


class EchoOptimizer(CMAOptimizer):
    """A 'new' optimizer: registered at run time, no edit to study.py, config.py or the CLI."""

    name = "echo_cma"


def test_a_registered_optimizer_runs_a_study_unchanged(study_root, tmp_path, capsys) -> None:
    OPTIMIZERS.register("echo_cma", EchoOptimizer)
    path = changed(study_root, "echo", optimizer={"name": "echo_cma", "popsize": 3})
    code = main(["run", str(path), "--runs-dir", str(tmp_path), "--quiet", "--max-trials", "3"])
    assert code == 0, capsys.readouterr().err
    records = RunStore(tmp_path / "tiny").read_trials()
    assert len(records) == 3 and all(r.ok for r in records)

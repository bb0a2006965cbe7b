"""study.yaml (evomerge/config.py): paths, overrides, strictness, plugin options, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from evomerge.config import StudyConfig, TasksConfig, load_study_config, parse_study
from evomerge.errors import ConfigError, MissingPathError
from evomerge.scoring.config import ScoringSettings


def minimal(**changes) -> dict:
    data = {
        "name": "t",
        "models": {"base": "hub/base", "sources": ["hub/a", "hub/b"]},
        "search_space": {"preset": "linear"},
        "tasks": {"search": ["s"], "heldout": ["h"]},
    }
    data.update(changes)
    return data


def refused(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_study(data, "study.yaml")
    msg = str(info.value)
    assert msg.startswith("study.yaml: ") and "\n" not in msg
    return msg


@pytest.fixture
def study_dir(tmp_path) -> Path:
    """A study file beside its model folders, task folder and warm-start recipe."""
    root = tmp_path / "proj"
    for d in ("models/base", "models/s1", "models/s2.v2", "tasks"):
        (root / d).mkdir(parents=True)
    (root / "winner.yaml").write_text("evomerge_recipe: 1\n")
    data = minimal(
        models={
            "base": "models/base",
            "sources": [{"name": "s1", "path": "models/s1"}, "models/s2.v2", "org/hub-model"],
        },
        tasks={"include_path": "tasks", "search": ["s"]},
        warm_start="winner.yaml",
    )
    (root / "study.yaml").write_text(yaml.safe_dump(data))
    return root


# ---- loading -------------------------------------------------------------------------------


def test_relative_paths_are_relative_to_the_file_not_the_cwd(study_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the study's folder
    cfg = load_study_config(study_dir / "study.yaml")
    root = study_dir.resolve()
    assert cfg.models.base == str(root / "models/base")
    s1, s2, hub = cfg.models.sources
    assert (s1.name, s1.path) == ("s1", str(root / "models/s1"))
    assert (s2.name, s2.path) == ("s2_v2", str(root / "models/s2.v2"))  # name from the folder
    assert (hub.name, hub.path) == ("hub-model", "org/hub-model")  # no such folder: a hub id
    assert cfg.tasks.include_path == [str(root / "tasks")]
    assert cfg.warm_start == str(root / "winner.yaml")


def test_a_missing_relative_path_is_kept_as_written(study_dir):
    data = yaml.safe_load((study_dir / "study.yaml").read_text())
    data["models"]["base"] = "models/nope"
    data["warm_start"] = "uniform"
    (study_dir / "study.yaml").write_text(yaml.safe_dump(data))
    cfg = load_study_config(study_dir / "study.yaml")
    assert cfg.models.base == "models/nope"  # the later error names what the user wrote
    assert cfg.warm_start == "uniform"


def test_dotted_overrides_replace_and_create_keys(study_dir):
    cfg = load_study_config(
        study_dir / "study.yaml",
        {"budget.max_trials": 7, "executor.kind": "ray", "executor.workers": 3, "seed": 5},
    )
    assert cfg.budget.max_trials == 7 and cfg.seed == 5
    assert (cfg.executor.kind, cfg.executor.workers) == ("ray", 3)
    assert cfg.tasks.search == ["s"]  # the rest of the file is untouched


def test_overrides_are_validated_like_the_file(study_dir):
    with pytest.raises(ConfigError, match=r"budget\.max_trials") as info:
        load_study_config(study_dir / "study.yaml", {"budget.max_trials": 0})
    assert str(study_dir / "study.yaml") in str(info.value)


def test_override_into_an_empty_section(study_dir):
    text = (study_dir / "study.yaml").read_text() + "budget:\n"
    (study_dir / "study.yaml").write_text(text)
    cfg = load_study_config(study_dir / "study.yaml", {"budget.max_trials": 3})
    assert cfg.budget.max_trials == 3
    (study_dir / "study.yaml").write_text(text.replace("budget:\n", "budget: 5\n"))
    with pytest.raises(
        ConfigError, match=r"cannot set budget\.max_trials: budget is not a section"
    ):
        load_study_config(study_dir / "study.yaml", {"budget.max_trials": 3})


def test_file_errors(tmp_path):
    with pytest.raises(MissingPathError):
        load_study_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_study_config(tmp_path / "list.yaml")


# ---- strictness ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (minimal(bogus=1), "bogus: Extra inputs are not permitted"),
        (minimal(tasks={"search": ["s"], "helduot": ["h"]}), "tasks.helduot: Extra inputs"),
        (minimal(budget={"max_trails": 3}), "budget.max_trails: Extra inputs"),
        (minimal(name="a/b"), "must be a plain folder name"),
        (minimal(models={"sources": ["hub/a"]}), "at least two source models"),
        (
            minimal(models={"sources": [{"name": "x.y", "path": "p"}, "hub/b"]}),
            "without '.', '/' or spaces",
        ),
        (minimal(models={"sources": ["one/a", "two/a"]}), "source names repeat"),
        (minimal(tasks={"search": []}), "tasks.search is empty"),
        (minimal(tasks={"search": ["s"], "batch_size": 0}), "tasks.batch_size"),
    ],
)
def test_bad_shapes_name_the_key(data, needle):
    assert needle in refused(data)


def test_a_task_both_search_and_heldout_is_refused():
    msg = refused(minimal(tasks={"search": ["a", "b"], "heldout": ["c", "b"]}))
    assert "'b' is both a search and a held-out task" in msg


def test_config_is_frozen():
    cfg = parse_study(minimal(), "study.yaml")
    with pytest.raises(ValidationError):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.tasks.batch_size = 1  # type: ignore[misc]


# ---- scoring settings ----------------------------------------------------------------------


def test_tasks_give_the_scoring_settings_of_each_split():
    tasks = TasksConfig(
        include_path="evals",
        search=["a", "b"],
        heldout=["c"],
        limit=0.5,
        num_fewshot=2,
        batch_size=4,
        apply_chat_template=True,
        fewshot_seed=7,
    )
    common = dict(
        include_paths=("evals",),
        limit=0.5,
        num_fewshot=2,
        batch_size=4,
        apply_chat_template=True,
        fewshot_seed=7,
    )
    assert tasks.settings("search") == ScoringSettings(tasks=("a", "b"), **common)
    assert tasks.settings("heldout") == ScoringSettings(tasks=("c",), **common)
    assert TasksConfig(search=["a"]).settings("heldout") is None


def test_default_scoring_settings_are_the_scorers_defaults():
    got = TasksConfig(search=["a"]).settings("search")
    assert got == ScoringSettings(tasks=("a",))


# ---- plugin options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "needles"),
    [
        ({"optimizer": {"name": "optuna_tpe", "popsize": 8}}, ["optuna_tpe", "'popsize'"]),
        ({"optimizer": {"name": "cma", "popsiz": 8}}, ["'popsiz'", "did you mean 'popsize'"]),
        ({"optimizer": {"name": "cma", "popsize": 1}}, ["popsize", "greater than or equal to 2"]),
        ({"optimizer": {"name": "cma", "seed": 3}}, ["'seed' is not settable", "study's seed"]),
        ({"optimizer": {"name": "cmaa"}}, ["unknown optimizer 'cmaa'", "did you mean 'cma'"]),
        ({"executor": {"kind": "local", "ray_address": "x"}}, ["'local'", "'ray_address'"]),
        ({"executor": {"kind": "ray", "threads": 0}}, ["threads", "greater than or equal to 1"]),
        ({"executor": {"kind": "rya"}}, ["unknown executor 'rya'", "did you mean 'ray'"]),
        ({"executor": {"kind": "local", "workers": 0}}, ["executor.workers"]),
    ],
)
def test_plugin_options_are_validated_at_load(section, needles):
    msg = refused(minimal(**section))
    for needle in needles:
        assert needle in msg, msg


@pytest.mark.parametrize(
    ("section", "options"),
    [
        ({"executor": {"kind": "ray", "threads": 2}}, {"threads": 2}),
        ({"executor": {"kind": "local", "threads": 2}}, {"threads": 2}),
        (
            {"optimizer": {"name": "cma", "popsize": 4, "sigma0": 0.3}},
            {"popsize": 4, "sigma0": 0.3},
        ),
        ({"optimizer": {"name": "cma", "tolfun": 1e-9}}, {"tolfun": 1e-9}),  # pycma's own option
        ({"optimizer": {"name": "optuna_tpe", "n_startup_trials": 3}}, {"n_startup_trials": 3}),
    ],
)
def test_valid_plugin_options_are_kept(section, options):
    cfg = parse_study(minimal(**section), "study.yaml")
    plugin = cfg.optimizer if "optimizer" in section else cfg.executor
    assert plugin.options == options


def test_null_options_mean_the_default():
    from evomerge.executors import EXECUTORS
    from evomerge.optimizers import OPTIMIZERS

    cfg = parse_study(
        minimal(
            optimizer={"name": "cma", "popsize": None, "sigma0": None},
            executor={"kind": "ray", "threads": None, "ray_address": None},
        ),
        "study.yaml",
    )
    opt = OPTIMIZERS.get("cma").parse_options(cfg.optimizer.options)
    assert opt.given() == {} and opt == OPTIMIZERS.get("cma").Options()
    ex = EXECUTORS.get("ray").parse_options(cfg.executor.options)
    assert ex.given() == {} and ex == EXECUTORS.get("ray").Options()


# ---- round trip ----------------------------------------------------------------------------


def test_to_yaml_round_trips_with_every_default_filled_in(study_dir):
    cfg = load_study_config(
        study_dir / "study.yaml",
        {"optimizer.name": "optuna_tpe", "optimizer.n_startup_trials": 3, "executor.kind": "ray"},
    )
    text = cfg.to_yaml()
    data = yaml.safe_load(text)
    assert data["tasks"]["batch_size"] == 16 and data["budget"]["max_trials"] == 50
    assert data["optimizer"] == {"name": "optuna_tpe", "n_startup_trials": 3}
    again = parse_study(data, "run/study.yaml")
    assert isinstance(again, StudyConfig) and again == cfg
    assert again.to_yaml() == text

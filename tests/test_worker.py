"""The worker (evomerge/worker.py): its picklable spec, evaluation that never raises for a bad
candidate, the held-out scorer, and out-of-memory messages."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

import evomerge.resident
from evomerge.config import load_study_config
from evomerge.errors import ResourceError, UserError
from evomerge.model_set import ModelSet
from evomerge.recipe import Recipe
from evomerge.scoring.config import ScoringSettings
from evomerge.study_plan import StudyPlan, build_plan
from evomerge.worker import Outcome, Worker, WorkerSpec, oom_error, resolve_device
from tests.study_factory import make_tiny_study


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> StudyPlan:
    root = tmp_path_factory.mktemp("worker_study")
    return build_plan(load_study_config(make_tiny_study(root)))


@pytest.fixture(scope="module")
def spec(plan) -> WorkerSpec:
    return plan.worker_spec


@pytest.fixture(scope="module")
def worker(spec) -> Iterator[Worker]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the local executor does on CPU; tiny models run faster
    yield Worker(spec)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def good(plan) -> Recipe:
    return plan.space.decode(plan.x0)


def with_sections(recipe: Recipe, sections: list[dict]) -> Recipe:
    return Recipe.model_validate({**recipe.to_dict(), "sections": sections})


# ---- WorkerSpec ----------------------------------------------------------------------------


def test_spec_carries_the_plans_models_and_scoring_settings(plan, spec):
    assert isinstance(spec.models, ModelSet) and spec.models == plan.models
    assert spec.models.reference == "base" and set(spec.models.sources) == {"s1", "s2"}
    assert isinstance(spec.scoring, ScoringSettings) and spec.scoring.tasks == ("tiny_search",)
    assert spec.heldout is not None and spec.heldout.tasks == ("tiny_heldout",)
    assert spec.scoring.batch_size == 8 and (spec.device, spec.dtype) == ("cpu", "float32")


def test_spec_is_frozen_and_pickles_to_an_equal_spec(spec):
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and again is not spec
    assert again.models == spec.models and again.scoring == spec.scoring
    assert hash(again.scoring) == hash(spec.scoring)
    with pytest.raises(ValidationError):
        spec.device = "cuda"  # type: ignore[misc]


def test_spec_copies_differ_by_what_changed(spec):
    other = spec.model_copy(update={"heldout": None})
    assert other != spec and other.models == spec.models and other.heldout is None


def test_device_resolution():
    import torch

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"


# ---- Worker.evaluate -----------------------------------------------------------------------


def test_a_good_recipe_gets_scores_and_timings(worker, good):
    out = worker.evaluate(good)
    assert isinstance(out, Outcome) and out.error is None
    assert set(out.scores) == {"tiny_search"}
    acc = out.scores["tiny_search"]["acc"]
    assert 0.0 <= acc <= 1.0
    assert {"merge", "score", "forward", "harness", "total"} <= set(out.seconds)
    assert out.seconds["total"] >= out.seconds["merge"] > 0
    assert out.worker == worker.name and out.worker.endswith(":cpu")


def test_scores_depend_on_the_recipe_only_not_on_what_came_before(worker, good):
    import torch

    first = worker.evaluate(good).scores
    weights = {n: t.detach().clone() for n, t in worker.model.state_dict().items()}
    only_s1 = with_sections(good, [{"method": "linear", "models": {"s1": {"weight": 1.0}}}])
    assert worker.evaluate(only_s1).error is None
    live = worker.model.state_dict()
    assert not all(torch.equal(live[n], t) for n, t in weights.items())  # it did change the model
    assert worker.evaluate(good).scores == first
    live = worker.model.state_dict()
    assert all(torch.equal(live[n], t) for n, t in weights.items())


def test_heldout_split_scores_the_heldout_tasks(worker, good):
    out = worker.evaluate(good, "heldout")
    assert out.error is None and set(out.scores) == {"tiny_heldout"}


def test_a_recipe_failing_at_merge_time_is_an_outcome_not_an_exception(worker, good):
    bad = with_sections(
        good,
        [
            {
                "method": "della",
                "models": {
                    "s1": {"weight": 1.0, "density": 0.9, "epsilon": 0.15},
                    "s2": {"weight": 1.0, "density": 0.5},
                },
            }
        ],
    )
    out = worker.evaluate(bad)
    assert out.scores is None and "epsilon" in out.error and "della" in out.error
    assert "Traceback" not in out.error and "merge" not in out.seconds and "total" in out.seconds
    assert worker.evaluate(good).error is None  # the worker goes on


def test_an_unexpected_exception_is_one_line_with_its_type(worker, good, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(evomerge.resident, "run_task", explode)
    out = worker.evaluate(good)
    assert out.scores is None and out.error.startswith("RuntimeError: kernel exploded")
    assert "Traceback" not in out.error


def test_out_of_memory_while_evaluating_raises_resource_error(worker, good, monkeypatch):
    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(evomerge.resident, "run_task", oom)
    with pytest.raises(ResourceError, match="while evaluating a candidate") as info:
        worker.evaluate(good)
    assert "Tried to allocate 2.00 GiB" in str(info.value)


def test_no_heldout_tasks_is_a_user_error(spec, good):
    worker = Worker(spec.model_copy(update={"heldout": None}))
    with pytest.raises(UserError, match=r"tasks\.heldout"):
        worker.scorer("heldout")
    with pytest.raises(UserError, match=r"tasks\.heldout"):
        worker.evaluate(good, "heldout")  # a setup error propagates; it is no candidate's fault
    assert worker.evaluate(good).error is None


def test_a_worker_for_models_that_do_not_exist_fails_at_start(spec, tmp_path):
    missing = ModelSet(
        paths={"base": str(tmp_path / "nope"), "s1": spec.models.paths["s1"]}, base="base"
    )
    with pytest.raises(UserError, match="nope"):
        Worker(spec.model_copy(update={"models": missing}))


# ---- oom_error -----------------------------------------------------------------------------


def test_oom_message_names_what_to_make_smaller(spec):
    exc = RuntimeError("CUDA out of memory. Tried to allocate 20 MiB\nmore details")
    err = oom_error(spec, "cuda:0", "loading the models", exc)
    msg = str(err)
    assert isinstance(err, ResourceError) and isinstance(err, MemoryError)
    assert "on cuda:0 while loading the models" in msg
    assert "3 models resident" in msg and "live model in float32" in msg
    assert "tasks.batch_size 8" in msg
    assert "models.sources" in msg and "bfloat16" in msg
    assert msg.endswith("(CUDA out of memory. Tried to allocate 20 MiB)")  # first line only
    assert "\n" not in msg


def test_oom_message_of_an_empty_exception_names_its_type(spec):
    class OutOfMemoryError(Exception):
        pass

    msg = str(oom_error(spec, "cpu", "x", OutOfMemoryError()))
    assert msg.endswith("(OutOfMemoryError)")
    long = str(oom_error(spec, "cpu", "x", RuntimeError("y" * 500)))
    assert long.endswith("y" * 200 + ")") and "y" * 201 not in long


def test_config_errors_of_a_candidate_keep_their_message(worker, good):
    unknown = with_sections(good, [{"method": "no_such_method", "models": {"s1": {"weight": 1}}}])
    out = worker.evaluate(unknown)
    assert out.scores is None and "no_such_method" in out.error
    assert not out.error.startswith("ConfigError")  # a user error's own text, no type prefix


def test_spec_path_is_where_the_plan_resolved_it(spec):
    for path in spec.models.paths.values():
        assert Path(path).is_absolute() and (Path(path) / "config.json").exists()

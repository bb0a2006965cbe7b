"""The Ray executor: a study on a local Ray, same metrics as in process, killed actors, lost nodes.

Ray processes are slow to start on a small machine (each actor imports torch and lm-eval), so one
two-node cluster and one executor on it serve the last three tests.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from collections import Counter

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # offline: tests/conftest.py, for every test

ray = pytest.importorskip("ray")

from evomerge.cli import main  # noqa: E402
from evomerge.errors import ClusterLostError, ConfigError, TaskError  # noqa: E402
from evomerge.executors import Job, make_executor  # noqa: E402
from evomerge.executors.ray_health import check_deadlines  # noqa: E402
from evomerge.runstore import RunStore  # noqa: E402
from tests.study_factory import make_tiny_study  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    from evomerge.config import load_study_config
    from evomerge.study_plan import build_plan

    path = make_tiny_study(tmp_path_factory.mktemp("ray_study"))
    return build_plan(load_study_config(str(path), {}))


def random_recipes(plan, n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    recipes = []
    for _ in range(n):
        genome = dict(plan.x0)
        for d in plan.space.dimensions():
            if not d.choices:
                genome[d.name] = rng.uniform(d.low, d.high)
        recipes.append(plan.space.decode(genome))
    return recipes


@pytest.fixture(scope="module")
def expected(plan):
    """Recipes and their outcomes in process (the local executor is the reference)."""
    recipes = random_recipes(plan, 6)
    with make_executor("local", plan.worker_spec) as local:
        outcomes = []
        for i, recipe in enumerate(recipes):
            local.submit(Job(i, recipe))
            (result,) = local.wait()
            assert result.outcome.error is None
            outcomes.append(result.outcome)
    return recipes, outcomes


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    node = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c, node
    c.shutdown()


@pytest.fixture(scope="module")
def executor(cluster, plan):
    c, _ = cluster
    ex = make_executor("ray", plan.worker_spec, workers=2, ray_address=c.address)
    yield ex
    ex.close()


def test_demo_study_on_local_ray_to_budget(small_zoo, tmp_path, capsys, monkeypatch):
    study = small_zoo.study
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    args = ["run", str(study), "--runs-dir", str(tmp_path), "--executor", "ray", "--workers", "2"]
    code = main([*args, "--max-trials", "6", "--quiet"])
    assert code == 0, capsys.readouterr().err
    (run_dir,) = tmp_path.iterdir()
    records = RunStore(run_dir).read_trials()
    assert [r.trial for r in records] == list(range(6))
    assert len({r.proposal for r in records}) == 6
    assert all(r.status in ("ok", "duplicate") for r in records)
    evaluated = [r for r in records if r.status == "ok"]
    assert len({r.worker for r in evaluated}) == 2  # both actors took candidates
    assert not ray.is_initialized()  # the local Ray it started is shut down


def test_same_candidate_same_metrics_as_local(executor, expected):
    recipes, outcomes = expected
    for i, recipe in enumerate(recipes):
        executor.submit(Job(i, recipe))
    got = drain(executor)
    assert sorted(got) == list(range(len(recipes)))
    for i, outcome in enumerate(outcomes):
        assert got[i].error is None
        assert got[i].scores == outcome.scores
        assert got[i].seconds["merge"] >= 0 and got[i].seconds["score"] > 0
    assert len({o.worker for o in got.values()}) == 2


def test_start_errors_are_clear(executor, plan, cluster):
    c, _ = cluster
    bad = plan.worker_spec.scoring.model_copy(update={"tasks": ("no_such_task",)})
    spec = plan.worker_spec.model_copy(update={"scoring": bad})
    with pytest.raises(TaskError, match="no_such_task"):  # raised in the actor, shown as itself
        make_executor("ray", spec, workers=1, cpus_per_worker=0, ray_address=c.address)
    with pytest.raises(ConfigError, match=r"executor\.workers 3 needs 3 CPUs"):
        make_executor("ray", plan.worker_spec, workers=3, ray_address=c.address)
    with pytest.raises(ConfigError, match="unknown option"):
        make_executor("ray", plan.worker_spec, workers=1, ray_adress=c.address)
    assert ray.is_initialized()  # a failed start leaves the caller's connection alone


def test_killed_actor_requeues_its_job(executor, expected):
    recipes, outcomes = expected
    replaced, requeued = executor.replaced, executor.requeued
    executor.submit(Job(100, recipes[0]))
    executor.submit(Job(101, recipes[1]))
    ray.kill(executor.running()[100].actor, no_restart=True)
    got = drain(executor)
    assert sorted(got) == [100, 101]
    assert got[100].scores == outcomes[0].scores and got[101].scores == outcomes[1].scores
    assert executor.requeued == requeued + 1 and executor.replaced == replaced + 1


def test_lost_node_mid_study_completes_budget(executor, expected, cluster):
    """A study-like loop (at most `workers` in flight); after the first result, the node of a
    worker that is evaluating a candidate dies. Every candidate comes back exactly once."""
    c, node = cluster
    recipes, outcomes = expected
    executor.wait_started()  # one actor on each node (1 CPU each)
    assert {s.node for s in executor._slots} == {c.head_node.node_id, node.node_id}
    budget = [Job(200 + i, recipes[i]) for i in range(len(recipes))]
    replaced = executor.replaced
    seen: list[int] = []
    got = {}
    removed = False
    while budget or executor.in_flight():
        while budget and executor.in_flight() < executor.workers:
            executor.submit(budget.pop(0))
        on_node = [k for k, s in executor.running().items() if s.node == node.node_id]
        if seen and on_node and not removed:
            pid = int(executor.running()[on_node[0]].name.split(":")[1])
            c.remove_node(node)
            # A lost machine takes its processes along; here the actor's process can outlive
            # its raylet for a moment and still answer, so end it as the machine would.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            removed = True
        for result in executor.wait():
            seen.append(result.job.key)
            got[result.job.key] = result.outcome
    assert removed
    assert Counter(seen) == Counter(200 + i for i in range(len(recipes)))  # each exactly once
    assert all(got[200 + i].scores == o.scores for i, o in enumerate(outcomes))
    assert executor.replaced > replaced
    # The replacement waits for a node (the head's CPU is taken) while the live worker carries
    # the study: no deadline counts then, however long it waits (placement_timeout is for a
    # study left with no worker at all).
    (waiting,) = [s for s in executor._slots if not s.up]
    assert waiting.placing is not None
    waiting.since -= 10_000
    check_deadlines(executor._slots, **LATE, every_slot=False, watch=executor.watch)
    with pytest.raises(ClusterLostError, match="placed no worker"):  # at start: each slot's
        check_deadlines(executor._slots, **LATE, every_slot=True, watch=executor.watch)
    executor.watch.check(fresh=True)  # one node left: the cluster is there


LATE = {"placement_timeout": 1.0, "start_timeout": 1.0, "need": "1 CPU and 0 GPU"}


def drain(executor) -> dict:
    got = {}
    while executor.in_flight():
        for result in executor.wait():
            assert result.job.key not in got
            got[result.job.key] = result.outcome
    return got

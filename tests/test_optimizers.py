"""Optimizers: the ask/tell contract over every registered optimizer, exact resume, encodings."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from evomerge.errors import ConfigError, MissingPathError, RunDirError
from evomerge.optimizers import (
    OPTIMIZERS,
    Dimension,
    Optimizer,
    create_optimizer,
    load_optimizer,
)
from evomerge.optimizers.base import argmax_choice
from evomerge.optimizers.cma_es import Codec
from evomerge.optimizers.optuna_samplers import score_name

DIMS = (
    Dimension("a"),
    Dimension("b", -1.0, 2.0),
    Dimension("c", 0.0, 0.5),
    Dimension("m", choices=("linear", "ties", "slerp")),
)
POP = 4
OPTIONS = {
    "cma": {"popsize": POP},
    "optuna_tpe": {"n_startup_trials": POP},
    "optuna_cmaes": {"popsize": POP},
    "optuna_nsga2": {"population_size": POP},
    "optuna_random": {},
}
ALL = sorted(OPTIONS)
X0 = {"a": 1.0, "b": -1.0, "m": "ties"}  # a warm start on the bounds, where pycma reflects


def test_every_registered_optimizer_is_tested() -> None:
    assert OPTIMIZERS.names() == ALL


def fitness(pid: int, params: dict, n_objectives: int = 1) -> list[float] | None:
    """Deterministic toy objective (maximize): a bowl at 0.3 in unit coordinates, a method bonus,
    and a failed candidate now and then (ids 3, 8, 13, ...)."""
    if pid % 5 == 3:
        return None
    u = [d.to_unit(params[d.name]) for d in DIMS if d.choices is None]
    f1 = -sum((x - 0.3) ** 2 for x in u) + (0.2 if params["m"] == "ties" else 0.0)
    return [f1, -abs(u[0] - 0.8)][:n_objectives]


def make(name: str, state_dir: Path, *, seed: int = 3, load: bool = False, n_obj: int = 1, **kw):
    fn = load_optimizer if load else create_optimizer
    kw.setdefault("options", OPTIONS[name])
    return fn(name, DIMS, n_objectives=n_obj, seed=seed, state_dir=state_dir, **kw)


class _Stop(Exception):
    """The driving process ends here (its state saved); another one may go on."""


def drive(name, state_dir, total, *, crashes=None, workers=2, n_obj=1, seed=3, log=None):
    """The study loop in miniature: up to `workers` in flight, told first-in first-out, save()
    after every ask and tell. At each event (ask or tell) index in `crashes` the process "dies":
    "after_save" or "before_save" drops the object there and load()s a fresh one; "stop" saves
    and returns. Like the study loop after a load, pending proposals already in the log are told
    from it, the others dispatched again. `log` given: continue that run from its saved state.
    Returns the log [(id, params, values)] in tell order and the number re-dispatched per load."""
    crashes = crashes or {}
    log = [] if log is None else [(pid, params, values) for pid, params, values in log]
    logged = {pid: values for pid, _, values in log}
    redispatched: list[int] = []
    events = 0

    def resume():
        opt = make(name, state_dir, load=True, n_obj=n_obj, seed=seed, x0={"a": 0.9})
        flight = deque()
        for p in opt.pending():
            if p.id in logged:  # told (and logged) but the crash came before save()
                opt.tell(p.id, logged[p.id])
                opt.save()
            else:
                flight.append(p)
        redispatched.append(len(flight))
        return opt, flight

    if log:
        opt, flight = resume()
    else:
        opt, flight = make(name, state_dir, n_obj=n_obj, seed=seed, x0=X0), deque()
        opt.save()

    def event():
        nonlocal opt, flight, events
        events += 1
        mode = crashes.get(events)
        if mode != "before_save":
            opt.save()
        if mode is not None:
            opt.close()
            if mode == "stop":
                raise _Stop
            np.random.rand(7)  # other code drawing from numpy's global RNG must not matter
            opt, flight = resume()

    try:
        while len(log) < total:
            while len(flight) < workers and len(log) + len(flight) < total:
                p = opt.ask()
                if p is None:
                    break
                flight.append(p)
                event()
            p = flight.popleft()
            values = fitness(p.id, p.params, n_obj)
            log.append((p.id, p.params, values))
            logged[p.id] = values
            opt.tell(p.id, values)
            event()
    except _Stop:
        return log, redispatched
    opt.close()
    return log, redispatched


TOTAL = 3 * POP  # three generations
CASES = [(n, 1) for n in ALL] + [("optuna_nsga2", 2)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, computed once per (optimizer, objectives)."""
    cache: dict = {}

    def get(name: str, n_obj: int = 1) -> list:
        if (name, n_obj) not in cache:
            where = tmp_path_factory.mktemp(f"{name}-{n_obj}")
            cache[name, n_obj] = drive(name, where, TOTAL, n_obj=n_obj)[0]
        return cache[name, n_obj]

    return get


@pytest.mark.parametrize(("name", "n_obj"), CASES)
def test_resume_continues_exactly_the_same_search(name, n_obj, reference, tmp_path) -> None:
    ref = reference(name, n_obj)
    rng = random.Random(f"{name}{n_obj}")
    points = sorted(rng.sample(range(2, 2 * TOTAL), 3))  # events: one per ask, one per tell
    crashes = {e: rng.choice(["after_save", "before_save"]) for e in points}
    resumed, redispatched = drive(name, tmp_path, TOTAL, crashes=crashes, n_obj=n_obj)
    assert resumed == ref
    assert any(redispatched), "no crash happened with proposals pending"

    assert sorted(pid for pid, _, _ in ref) == list(range(TOTAL))
    assert sum(v is None for _, _, v in ref) == 2  # ids 3 and 8 fail and the run goes on
    for _, params, _ in ref:  # bounds and choices respected
        assert set(params) == {d.name for d in DIMS}
        for d in DIMS:
            if d.choices is None:
                assert isinstance(params[d.name], float) and d.low <= params[d.name] <= d.high
            else:
                assert params[d.name] in d.choices
    assert len({tuple(sorted(p.items())) for _, p, _ in ref}) == TOTAL


@pytest.mark.parametrize("stop", [7, 11])
def test_resume_in_a_new_process_continues_exactly(stop, reference, tmp_path) -> None:
    """A resume happens in a new Python process, whose str/bytes hashes differ: nothing saved
    may depend on them. One subprocess continues every optimizer from a mid-generation stop.
    Events 7 and 11 are tells with one proposal still pending, in the first generation and in
    the second (where pycma has injected a selective mirror, archived under a bytes hash)."""
    runs = {}
    for name in ALL:
        runs[name] = drive(name, tmp_path / name, TOTAL, crashes={stop: "stop"})[0]
    script = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from test_optimizers import drive; runs = json.loads(sys.argv[3]);"
        "print(json.dumps({n: drive(n, Path(sys.argv[2]) / n, int(sys.argv[4]), log=log)"
        " for n, log in runs.items()}))"
    )
    args = [str(Path(__file__).parent), str(tmp_path), json.dumps(runs), str(TOTAL)]
    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
        capture_output=True,
        text=True,
        check=True,
    )
    resumed = json.loads(out.stdout)
    for name in ALL:
        log, redispatched = resumed[name]
        assert redispatched == [1]
        assert log == json.loads(json.dumps(reference(name))), name


@pytest.mark.parametrize("name", [n for n in ALL if n != "cma"])
def test_optuna_kill_inside_ask_resumes_the_same_search(name, reference, tmp_path) -> None:
    """SIGKILL between Optuna creating a trial and suggesting its last parameter leaves a RUNNING
    trial with some parameters: it was never handed out, so the resumed search must propose
    exactly what the uninterrupted one did (same ids, same parameters)."""
    import optuna

    log, _ = drive(name, tmp_path, TOTAL, crashes={7: "stop"})
    study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{tmp_path}/optuna.db")
    torn = study.ask()
    torn.suggest_float("a", 0.0, 1.0)  # ... and the process dies here
    resumed, redispatched = drive(name, tmp_path, TOTAL, log=log)
    assert redispatched == [1]
    assert resumed == reference(name)
    study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{tmp_path}/optuna.db")
    numbers = [t.number for t in study.get_trials(deepcopy=False)]
    assert numbers == list(range(TOTAL))  # the torn trial is gone, its number reused


@pytest.mark.parametrize("name", ["cma", "optuna_tpe"])  # every Optuna sampler: one seeding path
def test_seed_decides_the_sequence(name, reference, tmp_path) -> None:
    other, _ = drive(name, tmp_path, 2, seed=4)
    assert [p for _, p, _ in other] != [p for _, p, _ in reference(name)[:2]]


def test_cma_hands_out_one_generation_at_a_time(tmp_path) -> None:
    opt = make("cma", tmp_path)
    first = [opt.ask() for _ in range(POP)]
    assert [p.id for p in first] == list(range(POP))
    assert opt.ask() is None
    for p in first[:-1]:
        opt.tell(p.id, [0.0])
        assert opt.ask() is None
    assert [p.id for p in opt.pending()] == [POP - 1]
    opt.tell(first[-1].id, [1.0])
    assert opt.generation == 1 and opt.ask().id == POP
    with pytest.raises(ValueError, match="not pending"):
        opt.tell(0, [1.0])


def test_cma_keeps_going_when_candidates_fail(tmp_path) -> None:
    opt = make("cma", tmp_path)
    for gen in range(4):
        props = [opt.ask() for _ in range(POP)]
        assert all(p is not None for p in props)
        for i, p in enumerate(props):
            bad = gen < 2 or i % 2 == 0  # two whole generations fail, then half of each
            opt.tell(p.id, None if bad else [float(i)])
            opt.save()
    assert opt.generation == 4
    assert opt.restarts >= 1  # a flat generation (all failed) ends pycma's run: restarted
    assert opt.ask() is not None
    assert opt.best[1] == (3.0,)
    opt.tell(opt.pending()[0].id, [math.nan])  # a non-finite value counts as a failure


def test_cma_warm_start_sets_the_mean(tmp_path) -> None:
    x0 = {"a": 0.25, "b": 1.5, "c": 0.1, "m": "slerp"}
    opt = make("cma", tmp_path, x0=x0)
    mean = opt.mean_params()
    assert mean["m"] == "slerp"
    for key in ("a", "b", "c"):
        assert mean[key] == pytest.approx(x0[key], abs=1e-12)
    # the categorical is encoded as one score per choice, the chosen one highest
    x = opt._bt.transform(opt._es.mean)
    assert x[3:].tolist() == pytest.approx([0.4, 0.4, 0.6])


@pytest.mark.parametrize("name", [n for n in ALL if n != "cma"])
def test_optuna_warm_start_is_the_first_proposal(name, tmp_path) -> None:
    x0 = {"a": 0.25, "b": 1.5, "c": 0.1, "m": "slerp"}
    opt = make(name, tmp_path, x0=x0)
    first = opt.ask()
    assert first.id == 0 and first.params == x0
    opt.tell(0, [1.0])
    second = opt.ask()
    assert second.id == 1 and second.params != x0
    opt.close()


def test_categorical_encoding_decodes_argmax(tmp_path) -> None:
    assert argmax_choice(("x", "y", "z"), [0.1, 0.7, 0.3]) == "y"
    assert argmax_choice(("x", "y", "z"), [0.5, 0.5, 0.2]) == "x"  # ties: the earlier choice
    codec = Codec(DIMS)
    assert codec.size == 3 + 3
    x = np.array([0.5, 0.5, 1.0, 0.2, 0.9, 0.3])
    assert codec.decode(x) == {"a": 0.5, "b": 0.5, "c": 0.5, "m": "ties"}

    # optuna_cmaes stores one float score per choice; the proposal holds the argmax
    opt = make("optuna_cmaes", tmp_path)
    props = [opt.ask() for _ in range(6)]
    for p in props:
        opt.tell(p.id, fitness(p.id, p.params))
    trials = opt.study.get_trials()
    for p, t in zip(props, trials, strict=True):
        scores = [t.params[score_name("m", c)] for c in DIMS[3].choices]
        assert p.params["m"] == DIMS[3].choices[int(np.argmax(scores))]
        assert "m" not in t.params
    opt.close()


def test_optuna_db_opens_like_the_dashboard_does(tmp_path) -> None:
    import optuna

    log, _ = drive("optuna_tpe", tmp_path, 5)
    study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.number for t in study.trials] == list(range(5))
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE]
    best = max((v[0], i) for i, _, v in log if v is not None)
    assert study.best_trial.number == best[1]


def test_unknown_names_and_options_say_what_to_do(tmp_path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'cma'"):
        create_optimizer("cmaa", DIMS, state_dir=tmp_path)
    with pytest.raises(ConfigError, match="did you mean 'popsize'"):
        make("cma", tmp_path, options={"popsiz": 4})
    with pytest.raises(ConfigError, match="did you mean 'n_startup_trials'"):
        make("optuna_tpe", tmp_path, options={"n_startup_trial": 4})
    with pytest.raises(ConfigError, match="study's seed"):
        make("cma", tmp_path, options={"seed": 4})
    with pytest.raises(ConfigError, match="popsize"):
        make("cma", tmp_path, options={"popsize": 1})


@pytest.mark.parametrize("name", ["cma", "optuna_cmaes"])
def test_single_objective_optimizers_point_to_nsga2(name, tmp_path) -> None:
    with pytest.raises(ConfigError, match="optuna_nsga2"):
        make(name, tmp_path, n_obj=2)


def test_bad_dimensions_and_warm_starts(tmp_path) -> None:
    with pytest.raises(ConfigError, match="low < high"):
        Dimension("w", 1.0, 1.0)
    with pytest.raises(ConfigError, match="unique"):
        Dimension("m", choices=("ties", "ties"))
    with pytest.raises(ConfigError, match="outside its bounds"):
        make("cma", tmp_path, x0={"b": 3.0})
    with pytest.raises(ConfigError, match="not one of"):
        make("cma", tmp_path, x0={"m": "dare"})
    with pytest.raises(ConfigError, match="did you mean 'a'"):
        make("cma", tmp_path, x0={"aa": 0.5})


@pytest.mark.parametrize("name", ["cma", "optuna_random"])
def test_state_dir_rules(name, tmp_path) -> None:
    with pytest.raises(MissingPathError, match="nothing to resume"):
        make(name, tmp_path, load=True)
    opt = make(name, tmp_path)
    opt.save()
    opt.close()
    with pytest.raises(RunDirError, match="already exists"):
        make(name, tmp_path)
    with pytest.raises(ConfigError, match="seed"):
        make(name, tmp_path, load=True, seed=99)
    with pytest.raises(ConfigError, match="dims"):
        load_optimizer(name, DIMS[:3], seed=3, options=OPTIONS[name], state_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == list(opt.state_files)  # no temp files


def test_base_class_is_the_contract() -> None:
    for name in ALL:
        cls = OPTIMIZERS.get(name)
        assert issubclass(cls, Optimizer) and cls.name == name

"""`evomerge bench --parts fidelity`: what a night's item budget buys with each fidelity.

Two measurements on the demo zoo, both labelled with what they spend:
- search: for each setting (`full`, `racing` + `mean`, `racing` + `irt`) and seed, the demo
  study with the same item budget (the items `--trials` full-fidelity candidates score), its
  winner's held-out mean (the mean of the held-out tasks' primary metrics) and the items it
  scored; studies are run once in the work dir and reused;
- items to match: for each racing setting and seed, the items it had scored when its incumbent
  (best full-fidelity candidate so far) first reached the held-out mean of the `full` winner of
  the same seed, as a share of the items `full` scored (None: never reached);
- estimates: for `--estimate-candidates` random candidates scored on every item, the Spearman
  rank correlation between each estimator's estimate from a quarter of the items and the full
  score (irt is fitted on the parents and on as many other random candidates).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SETTINGS = {
    "full": {"fidelity": "full"},
    "racing+mean": {"fidelity": "racing", "estimator": "mean"},
    "racing+irt": {"fidelity": "racing", "estimator": "irt"},
}


def run_fidelity_bench(
    zoo_dir: Path,
    work: Path,
    *,
    seeds: tuple[int, ...] = (0, 1, 2),
    trials: int = 240,
    settings: tuple[str, ...] = tuple(SETTINGS),
    estimate_candidates: int = 100,
) -> dict[str, Any]:
    from evomerge.bench.workers_bench import ensure_zoo

    study = ensure_zoo(Path(zoo_dir))
    out: dict[str, Any] = {"trials_budget": trials, "seeds": list(seeds), "search": {}}
    runs: dict[str, list[dict]] = {}
    for name in settings:
        rows = [_one_study(study, work / f"{name}-s{seed}", name, seed, trials) for seed in seeds]
        out["search"][name] = {
            "heldout_mean": [round(r["heldout_mean"], 4) for r in rows],
            "heldout_mean_avg": round(statistics.mean(r["heldout_mean"] for r in rows), 4),
            "items": [r["items"] for r in rows],
            "candidates": [r["candidates"] for r in rows],
            "seconds": [round(r["seconds"], 1) for r in rows],
        }
        runs[name] = rows
    if "full" in runs:
        for name, rows in runs.items():
            if name == "full":
                continue
            shares = [
                items_to_match(row["trace"], full["heldout_mean"], full["items"])
                for row, full in zip(rows, runs["full"], strict=True)
            ]
            out["search"][name]["items_to_match_full"] = shares
    if estimate_candidates:
        out["estimates"] = spearman_at_a_quarter(study, estimate_candidates)
    return out


def _one_study(study: Path, run_dir: Path, setting: str, seed: int, trials: int) -> dict:
    from evomerge.config import load_study_config
    from evomerge.runstore import RunStore, best_trial
    from evomerge.study import Study
    from evomerge.study_plan import build_plan

    t0 = time.perf_counter()
    config = load_study_config(study, {"seed": seed, "executor.kind": "local"})
    fitness = {**config.fitness.model_dump(), **SETTINGS[setting]}
    # the item budget binds every setting (max_trials is out of reach)
    budget = {"max_trials": 100 * trials, "max_items": item_budget(config, trials)}
    config = config.model_copy(
        update={
            "fitness": type(config.fitness).model_validate(fitness),
            "budget": type(config.budget).model_validate(budget),
            "executor": type(config.executor).model_validate({"kind": "local", "workers": 1}),
        }
    )
    plan = build_plan(config)
    store = RunStore(run_dir)
    if not (run_dir / "study.yaml").exists():
        store = RunStore.create(run_dir, config.to_yaml())
        Study(store, plan, progress=False).run()
    else:
        store = RunStore.open(run_dir)
        if store.state().get("state") != "finished":
            Study(store, plan, progress=False).run(resume=True)
    records = store.read_trials()
    best = best_trial(records)
    trace = incumbent_trace(records, lambda genome: _heldout_mean(plan, genome))
    return {
        "heldout_mean": trace[-1][1] if trace else _heldout_mean(plan, best.genome),
        "trace": trace,
        "items": sum(r.items for r in records),
        "candidates": len({r.proposal for r in records}),
        "seconds": time.perf_counter() - t0,
    }


def incumbent_trace(records: list, heldout: Callable[[dict], float]) -> list[tuple[int, float]]:
    """(items scored so far, held-out mean of the incumbent) each time the incumbent changes, in
    the order the lines were written; the incumbent is the best full-fidelity line so far."""
    trace: list[tuple[int, float]] = []
    spent, best = 0, None
    for r in records:
        spent += r.items
        full = r.status == "ok" and r.ok and r.fidelity >= 1.0
        if full and (best is None or r.fitness[0] > best):
            best = r.fitness[0]
            trace.append((spent, heldout(r.genome)))
    return trace


def items_to_match(trace: list[tuple[int, float]], target: float, full_items: int) -> float | None:
    """The share of `full_items` spent when the incumbent's held-out first reached `target`."""
    for spent, value in trace:
        if value >= target - 1e-9:
            return round(spent / full_items, 4)
    return None


def item_budget(config: Any, trials: int) -> int:
    """The items `trials` full-fidelity candidates scored on the zoo's first search split (48
    documents per task), the budget the issue states and the default search was chosen at."""
    from evomerge.zoo.data import N_SEARCH

    return trials * len(config.tasks.search) * N_SEARCH


def _heldout_mean(plan: Any, genome: dict) -> float:
    from evomerge.worker import Worker

    worker = Worker(plan.worker_spec)
    outcome = worker.evaluate(plan.space.decode(genome), "heldout")
    primary = worker.scorer("heldout").primary_metrics()
    return statistics.mean(outcome.scores[t][m] for t, (m, _) in primary.items())


def spearman_at_a_quarter(study: Path, n: int, seed: int = 0) -> dict[str, float]:
    """Spearman(estimate from a quarter of the items, full score) over `n` random candidates."""
    from evomerge.config import load_study_config
    from evomerge.fidelity import FitnessConfig, Rungs, Term, estimate_mean
    from evomerge.items import ItemScores
    from evomerge.study_plan import build_plan
    from evomerge.worker import Worker

    plan = build_plan(load_study_config(study, {"executor.kind": "local"}))
    worker = Worker(plan.worker_spec)
    terms = tuple(Term(t.task, t.metric, t.sign * t.weight) for t in plan.objective.terms)
    rng = random.Random(seed)

    def random_genome() -> dict:
        g = dict(plan.x0)
        for d in plan.space.dimensions():
            if not d.choices:
                g[d.name] = rng.uniform(d.low, d.high)
        return g

    def full_items_of(recipe: Any) -> ItemScores:
        return worker.evaluate(recipe).items

    def full_items(genome: dict) -> ItemScores:
        return full_items_of(plan.space.decode(genome))

    train = [full_items(random_genome()) for _ in range(n)]
    test = [full_items(random_genome()) for _ in range(n)]
    counts = worker.scorer("search").item_counts
    quarter = Rungs.build(counts, FitnessConfig(fidelity="racing", rungs=2, eta=4), seed)
    subset = quarter.sets[0]
    truth = [estimate_mean(items, terms, counts)[0] for items in test]
    part = [_restrict(items, subset) for items in test]
    out = {"candidates": n, "quarter_items": quarter.size(0), "all_items": quarter.size(1)}
    out["spearman_mean"] = round(
        _spearman([estimate_mean(p, terms, counts)[0] for p in part], truth), 4
    )
    try:
        from evomerge.estimators import irt_estimator
        from evomerge.parents import parent_recipes

        # the parents (base and sources alone) scored on every item: a study's first irt rows
        parents = [full_items_of(r) for r in parent_recipes(plan).values()]
        for key, rows in {
            "spearman_irt": train,  # n random candidates
            "spearman_irt_parents_only": parents,  # 0 random + the parents
            "spearman_irt_parents": parents + train,  # n random + the parents
        }.items():
            est = irt_estimator(rows, terms, counts)
            out[key] = round(_spearman([est(p)[0] for p in part], truth), 4)
            out[f"{key}_rows"] = len(rows)  # below irt.MIN_ROWS the estimate is the mean
    except ImportError:  # the irt estimator is optional in this build
        out["spearman_irt"] = float("nan")
    return out


def _restrict(items: Any, subset: dict) -> Any:
    from evomerge.items import ItemScores

    ids = {t: subset[t] for t in items.ids}
    values = {t: {m: items.select(t, m, ids[t]) for m in items.values[t]} for t in items.values}
    return ItemScores(ids, values)


def _spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho with average ranks for ties (numpy only)."""
    import numpy as np

    def ranks(x: list[float]) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties share their mean rank
            idx = x == v
            r[idx] = r[idx].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])

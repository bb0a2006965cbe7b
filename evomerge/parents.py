"""The parents as rows of the irt estimator (`fitness.fidelity: racing`, `estimator: irt`).

The item response model is fitted on rows scored on every item. Without the parents, a study has
none until 8 candidates have reached full fidelity (`estimators.refit_points`), and its first
generations race on the subset mean. The parents (models.base, if any, and every source, each
alone: a passthrough recipe) are scored once on every search item, through the executor like a
candidate, before the first candidate is raced; they are the first rows of the model.

Each parent's items go to `items/parents/<model>.npz` (atomically) as it returns, and that file
is the record: a resumed study reads the files and scores only the parents that have none, and
budget.max_items counts the items they hold (`runstore.parent_items`). A parent is no trial:
no proposal of the optimizer, never told, never the best, not a candidate of `evomerge status`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from evomerge.errors import UserError
from evomerge.executors import Executor, Job
from evomerge.items import ItemScores
from evomerge.recipe import Recipe
from evomerge.worker import Outcome

if TYPE_CHECKING:
    from evomerge.config import StudyConfig
    from evomerge.study_plan import StudyPlan


def wants_parents(config: StudyConfig) -> bool:
    """Only the irt estimator uses the rows, and only racing estimates from a subset."""
    return config.fitness.racing and config.fitness.estimator == "irt"


def parent_recipes(plan: StudyPlan) -> dict[str, Recipe]:
    """Each model alone, in the study's model order (base first): the same recipe as the
    reports' parent rows, so a parent is materialized and scored as a candidate is."""
    from evomerge.baselines import parent_recipe

    like = plan.space.decode(plan.x0)
    return {name: parent_recipe(like, name) for name in plan.models.paths}


def score_parents(
    executor: Executor,
    recipes: Mapping[str, Recipe],
    waiting: Callable[[], AbstractContextManager[object]],
) -> Iterator[tuple[str, ItemScores, dict[str, int]]]:
    """Score `recipes` on every item, up to `executor.workers` at a time; yields each parent's
    name, items and the item counts of the full set as it returns. `waiting`: the context in
    which the caller lets a signal interrupt the wait (study.InterruptGate)."""
    names = list(recipes)
    queued = deque(range(len(names)))
    running = 0
    while queued or running:
        while queued and running < executor.workers:
            key = queued.popleft()
            executor.submit(Job(key, recipes[names[key]]))
            running += 1
        with waiting():
            results = executor.wait()
        for result in results:
            running -= 1
            name = names[result.job.key]
            yield name, _items(name, result.outcome), result.outcome.item_counts


def _items(name: str, outcome: Outcome) -> ItemScores:
    if outcome.error is not None or outcome.items is None:
        raise UserError(
            f"fitness.estimator irt scores each parent on every search item first, and model "
            f"{name!r} alone failed: {outcome.error}; check that model, or use "
            "fitness.estimator: mean"
        )
    return outcome.items

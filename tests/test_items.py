"""Item-level results: the scorer's per-document values, subsets (racing rungs), storage."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.items import ItemScores, mean_and_variance
from evomerge.scoring import Scorer, ScoringSettings
from tests.test_scoring import _load, build_scoring_zoo


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    zoo = build_scoring_zoo(tmp_path_factory.mktemp("items"))
    model, tok = _load(zoo.a)
    cfg = ScoringSettings(tasks=("tiny_mc", "tiny_gen"), include_paths=(zoo.tasks,), batch_size=4)
    return Scorer(model, tok, cfg)


def test_item_values_average_to_the_task_metrics(scorer) -> None:
    result = scorer.score()
    items = result.items
    assert scorer.item_counts == {"tiny_mc": 24, "tiny_gen": 12}
    assert items.count == 36
    assert items.ids["tiny_mc"].tolist() == list(range(24))
    assert set(items.values["tiny_mc"]) == {"acc"}  # brier_score keeps (gold, probs) per item
    assert set(items.values["tiny_gen"]) == {"exact_match,first-word"}  # the filtered metric
    for task, per_metric in items.values.items():
        for metric, per in per_metric.items():
            assert set(np.unique(per)) <= {0.0, 1.0}
            value = result.metrics[task][metric]
            assert float(per.mean()) == pytest.approx(value, abs=1e-12), (task, metric)


def test_a_subset_scores_those_items_as_the_full_run_does(scorer) -> None:
    full = scorer.score().items
    subset = {"tiny_mc": [0, 3, 5, 7, 11, 20], "tiny_gen": [1, 2, 9]}
    part = scorer.score(subset)
    assert part.samples == {"tiny_mc": 6, "tiny_gen": 3}
    for task, ids in subset.items():
        assert part.items.ids[task].tolist() == ids
        for metric, values in part.items.values[task].items():
            assert values.tolist() == full.select(task, metric, np.array(ids)).tolist()
            assert part.metrics[task][metric] == pytest.approx(values.mean())
    again = scorer.score(subset)  # the cached subset requests give the same answers
    assert again.metrics == part.metrics
    only_mc = scorer.score({"tiny_mc": [2, 4]})
    assert set(only_mc.metrics) == {"tiny_mc"}
    assert scorer.score().metrics == scorer.score().metrics  # the full run is left intact


def test_union_save_load_and_select(tmp_path) -> None:
    a = ItemScores.from_lists({"t": [0, 4]}, {"t": {"acc": [1, 0]}})
    b = ItemScores.from_lists({"t": [2, 4], "u": [1]}, {"t": {"acc": [1, 0]}, "u": {"acc": [1]}})
    both = a.union(b)
    assert both.ids["t"].tolist() == [0, 2, 4] and both.values["t"]["acc"].tolist() == [1, 1, 0]
    assert both.count == 4 and both.metrics() == {"t": {"acc": 2 / 3}, "u": {"acc": 1.0}}
    path = tmp_path / "items.npz"
    both.save(path)
    back = ItemScores.load(path)
    assert back.ids["t"].tolist() == [0, 2, 4] and back.values["u"]["acc"].tolist() == [1.0]
    assert back.select("t", "acc", np.array([4, 0])).tolist() == [0.0, 1.0]
    with pytest.raises(KeyError, match="not all scored"):
        back.select("t", "acc", np.array([3]))
    with pytest.raises(ValueError, match="2 values for 1 items"):
        ItemScores.from_lists({"t": [0]}, {"t": {"acc": [1, 0]}})


def test_mean_and_variance_with_finite_population() -> None:
    values = np.array([1.0, 0.0, 1.0, 1.0])
    mean, var = mean_and_variance(values, population=4)
    assert mean == 0.75 and var == 0.0  # every item scored: the fitness itself
    mean, var = mean_and_variance(values, population=8)
    padded = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])  # two pseudo-items at the bounds
    assert mean == 0.75 and var == pytest.approx(padded.var(ddof=1) / 4 * (1 - 4 / 8))
    sure = mean_and_variance(np.ones(10), population=100)[1]
    assert sure > 0  # ten out of ten is not a certainty
    assert mean_and_variance(np.ones(10), population=100, bounds=(-1, 1))[1] > sure

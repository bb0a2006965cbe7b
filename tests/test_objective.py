"""Objective: weighted sums and multi-objective tuples of task metrics, always to maximize."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from evomerge.errors import CandidateError, TaskError
from evomerge.objective import MetricTerm, Objective, ObjectiveConfig, TaskMetrics

CATALOG = {
    "mc": TaskMetrics("mc", {"acc": True, "acc_norm": True, "brier_score": False}, "acc"),
    "gen": TaskMetrics(
        "gen",
        {"exact_match,strict-match": True, "exact_match,flexible": True},
        "exact_match,strict-match",
    ),
    "ppl": TaskMetrics("ppl", {"word_perplexity": False, "custom": None}, "word_perplexity"),
}
SCORES = {
    "mc": {"acc": 0.5, "acc_norm": 0.25, "brier_score": 0.75},
    "gen": {"exact_match,strict-match": 0.2, "exact_match,flexible": 0.4},
    "ppl": {"word_perplexity": 30.0, "custom": 2.0},
}


def test_default_is_the_sum_of_primary_metrics_with_minimized_ones_negated():
    objective = Objective(ObjectiveConfig(), CATALOG)
    assert objective.n_objectives == 1 and objective.names == ("fitness",)
    assert objective.evaluate(SCORES) == (pytest.approx(0.5 + 0.2 - 30.0),)


def test_weights_directions_and_metric_name_forms():
    config = ObjectiveConfig(
        metrics=[
            MetricTerm(task="mc", metric="acc,none", weight=2.0),  # lm-eval spelling accepted
            MetricTerm(task="mc", metric="brier_score", weight=0.5),  # lower is better: negated
            MetricTerm(task="gen", metric="exact_match,flexible"),
            MetricTerm(task="ppl", metric="custom", direction="minimize"),
        ]
    )
    objective = Objective(config, CATALOG)
    assert [t.sign for t in objective.terms] == [1, -1, 1, -1]
    assert objective.evaluate(SCORES) == (pytest.approx(2 * 0.5 - 0.5 * 0.75 + 0.4 - 2.0),)


def test_multi_keeps_one_value_per_term():
    config = ObjectiveConfig(
        metrics=[MetricTerm(task="mc"), MetricTerm(task="ppl", weight=0.1)], multi=True
    )
    objective = Objective(config, CATALOG)
    assert objective.names == ("mc/acc", "ppl/word_perplexity")
    assert objective.evaluate(SCORES) == (0.5, pytest.approx(-3.0))


@pytest.mark.parametrize(
    ("term", "message"),
    [
        (MetricTerm(task="nope"), "task 'nope' is not among the scored tasks"),
        (MetricTerm(task="mc", metric="f1"), "does not produce metric 'f1'"),
        (MetricTerm(task="gen", metric="exact_match"), "ambiguous; name one of"),
        (MetricTerm(task="ppl", metric="custom"), "direction of ppl/custom is unknown"),
    ],
)
def test_terms_that_cannot_be_scored_raise_task_error(term, message):
    with pytest.raises(TaskError, match=message):
        Objective(ObjectiveConfig(metrics=[term]), CATALOG)


def test_unique_filtered_variant_is_found_by_bare_metric_name():
    catalog = {
        "g": TaskMetrics("g", {"exact_match,strict-match": True}, "exact_match,strict-match")
    }
    objective = Objective(
        ObjectiveConfig(metrics=[MetricTerm(task="g", metric="exact_match")]), catalog
    )
    assert objective.terms[0].metric == "exact_match,strict-match"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_metric_fails_the_candidate(bad):
    objective = Objective(ObjectiveConfig(), CATALOG)
    scores = {**SCORES, "mc": {**SCORES["mc"], "acc": bad}}
    with pytest.raises(CandidateError, match="mc/acc is"):
        objective.evaluate(scores)


def test_missing_metric_in_scores_fails_the_candidate():
    objective = Objective(ObjectiveConfig(), CATALOG)
    with pytest.raises(CandidateError, match="gen/exact_match,strict-match"):
        objective.evaluate({"mc": SCORES["mc"], "ppl": SCORES["ppl"]})


def test_config_validation():
    with pytest.raises(ValidationError, match="weight must be a finite number"):
        MetricTerm(task="mc", weight=math.nan)
    with pytest.raises(ValidationError, match="empty list"):
        ObjectiveConfig(metrics=[])
    with pytest.raises(ValidationError):
        ObjectiveConfig(metricz=None)  # typo'd keys are errors, not silently ignored
    with pytest.raises(ValidationError):
        MetricTerm(task="mc", direction="up")
    config = ObjectiveConfig.model_validate({"metrics": [{"task": "mc", "weight": 3}]})
    assert config.metrics[0].weight == 3.0


@given(
    st.lists(
        st.tuples(
            st.floats(-10, 10),
            st.floats(0, 1),
            st.sampled_from(["maximize", "minimize"]),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_weighted_sum_equals_signed_sum_of_terms(terms):
    catalog = {f"t{i}": TaskMetrics(f"t{i}", {"m": True}, "m") for i in range(len(terms))}
    config = ObjectiveConfig(
        metrics=[
            MetricTerm(task=f"t{i}", weight=w, direction=d) for i, (w, _, d) in enumerate(terms)
        ]
    )
    scores = {f"t{i}": {"m": v} for i, (_, v, _) in enumerate(terms)}
    expected = math.fsum((w if d == "maximize" else -w) * v for w, v, d in terms)
    (value,) = Objective(config, catalog).evaluate(scores)
    assert value == pytest.approx(expected, abs=1e-12)
    assert Objective(config.model_copy(update={"multi": True}), catalog).evaluate(scores) == tuple(
        (w if d == "maximize" else -w) * v for w, v, d in terms
    )

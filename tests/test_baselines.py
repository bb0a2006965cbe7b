"""The baselines the evolved merge is compared with: their recipes, their rows, the greedy soup,
and rows that equal scoring the same models independently."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.baselines import default_baselines, greedy_soup, make_row, parent_recipe, soup_recipe
from evomerge.recipe import Recipe, Section
from evomerge.report import build_report, open_run
from evomerge.report_model import Report
from tests.report_factory import ties_run

LIKE = Recipe(
    models={"base": "/m/base", "a": "/m/a", "b": "/m/b", "c": "/m/c"},
    base_model="base",
    sections=[Section(method="ties", models={"a": {"weight": 0.4}, "b": {"weight": 0.6}})],
)


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> tuple[Path, Report]:
    """A finished TIES study and its report, scored through the API (no cache)."""
    run_dir = ties_run(tmp_path_factory.mktemp("base"))
    return run_dir, build_report(open_run(run_dir), progress=False, use_cache=False)


def test_baseline_rows_match_independent_scoring(reported):
    """Parent rows equal scoring that checkpoint from disk; the uniform row equals scoring
    the elementwise mean of the two parents' weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.scoring import Scorer, ScoringSettings

    run_dir, report = reported
    rows = {r.name: r for r in report.heldout}
    models = run_dir.parent.parent / "models"
    config = ScoringSettings(tasks=("tiny_heldout",), include_paths=(str(models.parent / "tasks"),),
                             batch_size=8)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(models / "s1")
    s1 = AutoModelForCausalLM.from_pretrained(models / "s1").eval()
    s2 = AutoModelForCausalLM.from_pretrained(models / "s2").eval()
    scorer = Scorer(s1, tok, config, fitness=False)
    assert scorer.score().metrics == rows["parent s1"].metrics
    avg = {k: (v + s2.state_dict()[k]) / 2 for k, v in s1.state_dict().items()}
    s1.load_state_dict(avg)
    assert scorer.score().metrics == rows["uniform average"].metrics


def test_ensemble_row_equals_ensemble_of_fresh_models(reported):
    """The swapping ensemble inside the report scores like one built from separate models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.ensemble import EnsembleForCausalLM
    from evomerge.scoring import Scorer, ScoringSettings

    run_dir, report = reported
    models = run_dir.parent.parent / "models"
    parents = [AutoModelForCausalLM.from_pretrained(models / s).eval() for s in ("s1", "s2")]
    tok = AutoTokenizer.from_pretrained(models / "s1")
    config = ScoringSettings(tasks=("tiny_heldout",), include_paths=(str(models.parent / "tasks"),),
                             batch_size=8)  # fmt: skip
    got = Scorer(EnsembleForCausalLM.of_models(parents), tok, config, fitness=False).score()
    row = next(r for r in report.heldout if r.kind == "ensemble")
    assert got.metrics == row.metrics


def test_greedy_soup_follows_the_search_scores(reported):
    """Two sources: the soup is the better parent alone, or both (then it is the uniform row)."""
    _, report = reported
    rows = {r.name: r for r in report.search}
    fit = {s: sum(rows[f"parent {s}"].tasks.values()) for s in ("s1", "s2")}
    first = max(fit, key=lambda s: (fit[s], s == "s1"))
    members = report.greedy_soup
    assert members[0] == first
    soup = next(r for r in report.search if r.kind == "greedy_soup")
    if len(members) == 1:
        assert soup.tasks == rows[f"parent {first}"].tasks
    else:
        uniform = rows["uniform average"]
        assert soup.tasks == uniform.tasks and sum(uniform.tasks.values()) >= fit[first]


def test_greedy_soup_keeps_a_member_unless_the_score_drops():
    """Wortsman et al.'s Algorithm 1: best parent first, each next one kept if the soup's score
    does not drop (ties are kept)."""
    value = {("a",): 0.5, ("b",): 0.7, ("c",): 0.6, ("b", "c"): 0.7,
             ("a", "b", "c"): 0.69}  # fmt: skip
    seen = []

    def score(recipe: Recipe, label: str):
        members = tuple(m for m in recipe.models if m in recipe.sections[0].models)
        seen.append(members)
        return {"t": {"acc": value[members]}}, None

    members = greedy_soup(LIKE, ["a", "b", "c"], lambda s: s["t"]["acc"], score)
    assert members == ["b", "c"]  # b; + c keeps 0.7 (kept); + a drops to 0.69 (left out)
    assert seen == [("a",), ("b",), ("c",), ("b", "c"), ("a", "b", "c")]


def test_a_failed_parent_ranks_last():
    def score(recipe: Recipe, label: str):
        members = tuple(m for m in recipe.models if m in recipe.sections[0].models)
        return (None, "NaN") if members == ("a",) else ({"t": {"acc": 0.1 * len(members)}}, None)

    assert greedy_soup(LIKE, ["a", "b"], lambda s: s["t"]["acc"], score)[0] == "b"


def test_make_row_primary_metrics_and_mean():
    primary = {"t1": "acc", "t2": "exact_match"}
    row = make_row("p", "parent", {"t1": {"acc": 0.5, "f1": 1}, "t2": {"exact_match": 0.25}}, None,
                   primary)  # fmt: skip
    assert row.tasks == {"t1": 0.5, "t2": 0.25} and row.mean == 0.375 and row.error is None
    assert row.metrics == {"t1": {"acc": 0.5, "f1": 1.0}, "t2": {"exact_match": 0.25}}
    partial = make_row("p", "parent", {"t1": {"acc": 0.5}}, "", primary)
    assert partial.tasks == {"t1": 0.5, "t2": None} and partial.mean is None
    assert partial.error is None  # an empty error is no error
    failed = make_row("x", "ties", None, "the model produced NaN", primary)
    assert (
        failed.metrics is None and failed.mean is None and failed.error == "the model produced NaN"
    )


def test_default_baselines_with_and_without_a_base():
    rows, notes = default_baselines(LIKE, ["a", "b"])
    assert [r.kind for r in rows] == ["parent", "parent", "uniform", "task_arithmetic", "ties"]
    assert notes == [] and rows[-1].recipe.sections[0].models["a"] == {
        "weight": 1.0,
        "density": 0.5,
    }
    no_base = LIKE.model_copy(update={"base_model": None})
    rows, notes = default_baselines(no_base, ["a", "b"])
    assert [r.kind for r in rows] == ["parent", "parent", "uniform"]
    assert notes == ["no models.base: task arithmetic and TIES need one and are left out"]


def test_soups_of_equal_members_hash_once():
    """A soup of one member is that parent; members are put in the recipe's model order."""
    assert soup_recipe(LIKE, ["b"]).content_hash() == parent_recipe(LIKE, "b").content_hash()
    assert (
        soup_recipe(LIKE, ["c", "a"]).content_hash() == soup_recipe(LIKE, ["a", "c"]).content_hash()
    )

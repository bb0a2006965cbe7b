"""The model card is written from the typed report and the recipe alone."""

from __future__ import annotations

from evomerge import __version__
from evomerge.model_card import model_card
from evomerge.recipe import Recipe, Section
from evomerge.report_model import Report
from evomerge.report_table import markdown_heldout_table
from tests.report_factory import DATA

RECIPE = Recipe(
    models={"base": "/data/example/models/base", "s1": "/data/example/models/s1",
            "s2": "/data/example/models/s2"},
    base_model="base",
    sections=[
        Section(layers=(0, 1), method="ties", models={"s1": {"weight": 0.5}, "s2": {"weight": 0.5}}),
        Section(layers=(1, 2), method="ties", models={"s1": {"weight": 0.2}, "s2": {"weight": 0.7}}),
        Section(method="linear", models={"s1": {"weight": 0.4}, "s2": {"weight": 0.5}}),
    ],
)  # fmt: skip
FILES = ["README.md", "plots/fitness.png", "plots/pareto.png", "recipe.yaml", "report.json"]


def golden(name: str) -> Report:
    return Report.from_json((DATA / name).read_text())


def test_card_carries_provenance_scores_and_the_heldout_table():
    report = golden("scored.json")
    card = model_card(report, RECIPE, None, FILES)
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "# tiny: evolved merge (trial 0)\n" in card
    assert f"Merged with evomerge {__version__}" in card
    assert "trial 0 of run `tiny`\n(6 trials, the best)" in card
    assert "- base: `/data/example/models/base`\n- `s1`: `/data/example/models/s1`\n" in card
    assert "- winning recipe: ties (2 sections), linear (1 sections), dtype as sources\n" in card
    assert "- search space: method_choice (45 genes, methods task_arithmetic, ties, linear" in card
    assert '- optimizer: optuna_nsga2 {"population_size": 4}, seed 0\n' in card
    assert "- fitness tasks: tiny_search, tiny_search2; held-out tasks: tiny_heldout\n" in card
    assert "Fitness: tiny_search/acc = 0.5000, tiny_search2/acc = 0.4167." in card
    assert "| tiny_search2 | acc | 0.4167 |\n" in card
    assert markdown_heldout_table(report) in card
    assert "`mergekit.yaml` reproduces these weights with `mergekit-yaml mergekit.yaml OUT`" in card
    assert card.endswith("## Plots\n![plots/fitness.png](plots/fitness.png)\n"
                         "![plots/pareto.png](plots/pareto.png)\n\n")  # fmt: skip


def test_card_of_an_unscored_report_without_base_or_heldout_tasks():
    report = golden("unscored.json")
    card = model_card(report, RECIPE, "mergekit applies one merge method per config", [])
    assert "- base:" not in card and "held-out tasks: none" in card
    assert "_Not computed: held-out table not computed (run `evomerge report RUN_DIR`)._" in card
    assert "No `mergekit.yaml`: mergekit cannot reproduce this recipe (mergekit applies" in card
    assert '- optimizer: cma {"popsize": 4, "sigma0": 0.3}, seed 0' in card
    assert "(5 trials, the best)" in card and card.endswith("## Plots\n\n")


def test_card_shows_the_comparisons_and_the_remeasured_fitness():
    report = golden("compared.json")
    card = model_card(report, RECIPE, None, FILES)
    assert markdown_heldout_table(report) in card
    assert "| held-out: vs evolved (95% CI) |" in card and "| +0.167 [+0.000, +0.417] |" in card
    assert "search fitness: recorded 0.5000 / 0.4167 (trial 0, the best of 6 trials)" in card
    assert (
        "Fitness: tiny_search/acc = 0.5000, tiny_search2/acc = 0.4167 as the study recorded it; "
        "0.5000 / 0.4167 re-measured on every search item." in card
    )

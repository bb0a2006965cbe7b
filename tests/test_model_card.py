"""The model card is written from the typed report and the recipe alone."""

from __future__ import annotations

import re

import yaml

from evomerge import __version__
from evomerge.model_card import model_card
from evomerge.recipe import Recipe, Section
from evomerge.report_model import ModelsSummary, Report
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
    assert card.startswith("---\n") and "\nlibrary_name: transformers\n" in card.split("---")[1]
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


MERGEKIT = """# mergekit config written by evomerge: `mergekit-yaml mergekit.yaml OUT`
merge_method: ties
base_model: org/base-7b
models:
- model: org/math-7b
  parameters: {weight: [0.5, 0.2], density: 1.0}
- model: /data/example/models/s2
  parameters: {weight: [0.5, 0.7], density: 1.0}
"""


def with_models(report: Report, base: str | None, sources: dict[str, str]) -> Report:
    run = report.run.model_copy(update={"models": ModelsSummary(base=base, sources=sources)})
    return report.model_copy(update={"run": run})


def test_card_metadata_is_what_the_hub_reads_for_a_merge(tmp_path):
    """huggingface_hub's own ModelCard reads the front matter back: base_model (the hub ids, base
    first, local folders left out), the merge tags, library_name, evomerge's provenance; the
    mergekit config is in the body as a yaml block, as mergekit's card has it."""
    from huggingface_hub import ModelCard

    report = with_models(
        golden("scored.json"),
        "org/base-7b",
        {"s1": "org/math-7b", "s2": "/data/example/models/s2", "s3": "org/base-7b+org/lora"},
    )
    (tmp_path / "README.md").write_text(model_card(report, RECIPE, None, FILES, MERGEKIT))
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == ["org/base-7b", "org/math-7b", "org/lora"]
    assert data["base_model_relation"] == "merge"
    assert {"merge", "mergekit", "evomerge"} <= set(data["tags"])
    assert data["library_name"] == "transformers"
    prov = data["evomerge"]
    assert prov["version"] == __version__ and prov["run"] == "tiny" and prov["trial"] == 0
    assert prov["fitness"] == {"tiny_search/acc": 0.5, "tiny_search2/acc": report.trial.fitness[1]}
    means = prov["heldout_mean"]  # every held-out row's mean (None: that baseline failed)
    assert list(means) == [r.name for r in report.heldout]
    assert means["evolved (trial 0)"] == 0.25 and means["parent s1"] == 0.416667
    assert means["TIES (w=1, density 0.5)"] is None
    assert prov["heldout_tasks"] == ["tiny_heldout"]
    assert prov["models"]["sources"]["s2"] == "/data/example/models/s2"  # as the study gave it
    block = re.search(r"```yaml\n(.*?)```", card.text, re.S)
    assert block is not None and yaml.safe_load(block.group(1)) == yaml.safe_load(MERGEKIT)


def test_card_of_local_models_has_no_base_model_and_says_why_no_mergekit(tmp_path):
    from huggingface_hub import ModelCard

    report = golden("unscored.json")
    reason = "mergekit applies one merge method per config"
    (tmp_path / "README.md").write_text(model_card(report, RECIPE, reason, []))
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data
    assert "heldout_mean" not in data["evomerge"]  # the report was not scored
    assert data["tags"] == ["merge", "mergekit", "evomerge"]
    text = (tmp_path / "README.md").read_text()
    assert "## Configuration\nNo `mergekit.yaml`: mergekit cannot reproduce this recipe" in text
    assert "```yaml" not in text


def test_a_hub_base_the_recipe_resolved_is_a_base_model(tmp_path):
    """A LoRA source given as an adapter folder names its base only inside the recipe, as the
    snapshot folder its hub id resolved to (`base+adapter`): the card maps it back to the id."""
    from huggingface_hub import ModelCard, constants

    snapshot = f"{constants.HF_HUB_CACHE}/models--org--lora-base/snapshots/{'ab' * 20}"
    recipe = RECIPE.model_copy(
        update={"models": {**RECIPE.models, "s2": f"{snapshot}+/data/example/adapter"}}
    )
    report = with_models(
        golden("scored.json"), None, {"s1": "org/math-7b", "s2": "/data/example/adapter"}
    )
    (tmp_path / "README.md").write_text(model_card(report, recipe, None, []))
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert data["base_model"] == ["org/math-7b", "org/lora-base"]

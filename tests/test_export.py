"""`evomerge export`: a checkpoint that loads and scores exactly as its trial did, the recipes
(ours and mergekit's, checked against mergekit-yaml), the model card, report.json and plots."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import ConfigError
from evomerge.recipe import Recipe, Section
from evomerge.recipe_loader import load_recipe_file
from evomerge.runstore import RunStore, best_trial
from tests.report_factory import cli, method_choice_run, ties_run

KINDS = {"evolved", "parent", "uniform", "task_arithmetic", "ties", "greedy_soup", "ensemble"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return ties_run(tmp_path_factory.mktemp("exp"))


@pytest.fixture(scope="module")
def exported(run_dir) -> tuple[Path, str]:
    out = run_dir.parent.parent / "export"
    code, stdout, err = cli(["export", str(run_dir), "--out", str(out), "--quiet"])
    assert code == 0, err
    return out, stdout


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_export_writes_checkpoint_recipes_card_report_and_plots(run_dir, exported):
    out, stdout = exported
    best = best_trial(RunStore(run_dir).read_trials())
    for name in ["config.json", "tokenizer.json", "recipe.yaml", "mergekit.yaml", "README.md",
                 "report.json", "plots/fitness.png", "plots/coefficients.png"]:  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "plots" / "fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "plots" / "pareto.png").exists()  # one objective
    assert not list(out.parent.glob(".export.tmp-*"))  # the temp folder was renamed away
    assert load_recipe_file(out / "recipe.yaml").content_hash() == best.recipe_hash
    card = (out / "README.md").read_text()
    for needle in [f"trial {best.trial}", "models/s1", "models/s2", "models/base", "ties",
                   "cma", "tiny_heldout", "from_pretrained", "mergekit-yaml mergekit.yaml",
                   "| output ensemble (2 parents) | ensemble |"]:  # fmt: skip
        assert needle in card, needle
    assert f"exported trial {best.trial}" in stdout and "mergekit.yaml: " in stdout
    assert "held-out report" in stdout and "greedy soup" in stdout


def test_exported_checkpoint_scores_exactly_as_the_best_trial(run_dir, exported):
    """Acceptance: loaded fresh from disk (from_pretrained) and scored, the export gives the
    best trial's search metrics exactly."""
    out, _ = exported
    best = best_trial(RunStore(run_dir).read_trials())
    tasks = run_dir.parent.parent / "tasks"
    code, stdout, err = cli(["eval", str(out), "--tasks", "tiny_search", "--include-path",
                             str(tasks), "--batch-size", "8", "--json"])  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["tasks"] == best.scores


def test_report_json_rows(run_dir, exported):
    out, _ = exported
    best = best_trial(RunStore(run_dir).read_trials())
    report = json.loads((out / "report.json").read_text())
    assert report["trial"]["trial"] == best.trial and report["trial"]["is_best"]
    for split, tasks in (("heldout", ["tiny_heldout"]), ("search", ["tiny_search"])):
        rows = report[split]
        assert {r["kind"] for r in rows} == KINDS
        assert [r["kind"] for r in rows].count("parent") == 2
        for r in rows:
            assert list(r["tasks"]) == tasks and r["mean"] == statistics.fmean(r["tasks"].values())
    evolved = report["search"][0]
    assert evolved["kind"] == "evolved" and evolved["metrics"] == best.scores
    # the cache in the run directory holds the same table, for `evomerge report`
    cached = json.loads((run_dir / "report" / "report.json").read_text())
    assert cached["search"] == report["search"] and cached["heldout"] == report["heldout"]
    assert (run_dir / "report" / "items.npz").is_file()
    # every row but the evolved one against it, and the winner's fitness re-measured
    for split in ("heldout", "search"):
        assert all(("vs_evolved" in r) == (r["kind"] != "evolved") for r in report[split])
    assert report["search_fitness"]["recorded"] == best.fitness
    assert report["search_fitness"]["remeasured"] == pytest.approx(best.fitness, abs=1e-12)
    card = (out / "README.md").read_text()
    assert "| held-out: vs evolved (95% CI) |" in card and "search fitness: recorded" in card


@pytest.mark.mergekit
@pytest.mark.skipif(
    importlib.util.find_spec("mergekit") is None, reason="mergekit extra not installed"
)
def test_mergekit_yaml_gives_the_same_tensors(exported, tmp_path):
    """Acceptance: mergekit-yaml on the exported mergekit.yaml (TIES, per-layer weights and
    densities) reproduces the checkpoint; so does the mergekit.yaml of a per-layer linear recipe
    whose base model takes no part (mergekit would otherwise feed the base in as one more input)."""
    import yaml

    from evomerge.export import mergekit_config
    from evomerge.merge import MergeSettings, merge_to_disk

    out, _ = exported
    recipe = load_recipe_file(out / "recipe.yaml")
    linear = recipe.model_copy(
        update={
            "sections": [
                Section(layers=(0, 1), method="linear", models={"s1": {"weight": 0.2}, "s2": {"weight": 0.7}}),
                Section(filter="self_attn", method="linear", models={"s1": {"weight": 0.9}, "s2": {"weight": 0.3}}),
                Section(method="linear", models={"s1": {"weight": 0.4}, "s2": {"weight": 0.5}}),
            ]
        }
    )  # fmt: skip
    text, why = mergekit_config(linear)
    assert why is None and "base_model" not in yaml.safe_load(text)
    (tmp_path / "linear.yaml").write_text(text)
    merge_to_disk(linear, MergeSettings(out_dir=tmp_path / "ours-linear", progress=False))
    driver = (
        "import sys\nfrom mergekit.scripts.run_yaml import main\n"
        "for cfg, dst in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    main([cfg, dst, '--no-copy-tokenizer', '--quiet'], standalone_mode=False)"
    )
    args = [
        out / "mergekit.yaml",
        tmp_path / "mk",
        tmp_path / "linear.yaml",
        tmp_path / "mk-linear",
    ]
    subprocess.run([sys.executable, "-c", driver, *map(str, args)], check=True, capture_output=True)
    for ours_dir, theirs_dir in (
        (out, tmp_path / "mk"),
        (tmp_path / "ours-linear", tmp_path / "mk-linear"),
    ):
        ours, theirs = weights(ours_dir), weights(theirs_dir)
        assert ours.keys() == theirs.keys()
        worst = max(
            (
                (ours[k].double() - v.double()).abs().max()
                / v.double().abs().max().clamp_min(1e-12)
            ).item()
            for k, v in theirs.items()
        )
        assert worst <= 1e-5, f"{ours_dir.name}: max relative error {worst:.2e}"


def test_not_expressible_in_mergekit_says_why(run_dir, exported):
    from evomerge.export import mergekit_config

    recipe = load_recipe_file(exported[0] / "recipe.yaml")
    two = [
        Section(
            layers=(0, 1), method="linear", models={"s1": {"weight": 1.0}, "s2": {"weight": 1.0}}
        ),
        Section(method="ties", models={"s1": {"weight": 1.0}, "s2": {"weight": 1.0}}),
    ]
    text, why = mergekit_config(recipe.model_copy(update={"sections": two}))
    assert text is None and "one merge method" in why and "linear" in why
    dare = [Section(method="dare_ties", models={"s1": {"weight": 1.0}, "s2": {"weight": 1.0}})]
    text, why = mergekit_config(
        Recipe.model_validate({**recipe.to_dict(), "sections": [dare[0].model_dump()]})
    )
    assert text is None and "random" in why


def test_export_a_given_trial_without_report(run_dir, tmp_path):
    records = RunStore(run_dir).read_trials()
    code, stdout, err = cli(["export", str(run_dir), "--out", str(tmp_path / "t0"), "--trial", "0",
                             "--no-report", "--quiet"])  # fmt: skip
    assert code == 0, err
    assert (
        load_recipe_file(tmp_path / "t0" / "recipe.yaml").content_hash() == records[0].recipe_hash
    )
    report = json.loads((tmp_path / "t0" / "report.json").read_text())
    assert report["trial"]["trial"] == 0 and report["scored"] is False and report["search"] == []
    assert (
        "held-out report" not in stdout
        and "Not computed" in (tmp_path / "t0" / "README.md").read_text()
    )


def test_user_errors_are_one_line_exit_2(run_dir, exported, tmp_path):
    out, _ = exported
    before = sorted(p.name for p in out.iterdir())
    code, _, err = cli(["export", str(run_dir), "--out", str(out), "--quiet"])
    assert code == 2 and "not empty" in err and "--force" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == before
    code, _, err = cli(["export", str(run_dir), "--out", str(run_dir.parent), "--force", "--quiet"])
    assert code == 2 and "contains the run directory" in err and (run_dir / "trials.jsonl").exists()
    code, _, err = cli(["export", str(run_dir), "--out", str(tmp_path / "x"), "--trial", "99"])
    assert code == 2 and "no such trial" in err
    code, _, err = cli(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "y")])
    assert code == 2 and "does not exist" in err
    with pytest.raises(ConfigError, match="not empty"):
        from evomerge.export import export_run

        export_run(run_dir, out)


def test_export_of_a_mixed_method_trial_explains_missing_mergekit_yaml(tmp_path_factory):
    """A trial whose recipe mixes methods: no mergekit.yaml, and the CLI and the card say why;
    a multi-objective run exports its Pareto plot."""
    from evomerge.report import open_run

    run_dir = method_choice_run(tmp_path_factory.mktemp("mixed"))
    mixed = None
    for r in RunStore(run_dir).read_trials():
        if r.ok and len({s.method for s in open_run(run_dir, r.trial).recipe.sections}) > 1:
            mixed = r.trial
            break
    assert mixed is not None, "no trial mixes methods"
    out = run_dir.parent.parent / "mixed"
    code, stdout, err = cli(["export", str(run_dir), "--out", str(out), "--trial", str(mixed),
                             "--no-report", "--quiet"])  # fmt: skip
    assert code == 0, err
    assert not (out / "mergekit.yaml").exists()
    assert "no mergekit.yaml: mergekit applies one merge method per config" in stdout
    assert "No `mergekit.yaml`: mergekit cannot reproduce" in (out / "README.md").read_text()
    assert (out / "plots" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

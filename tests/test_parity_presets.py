"""The search-space presets of the methods added for mergekit parity (multislerp, della, sce):
their genes, what a genome decodes to, and real tiny studies run to their budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.methods.multislerp import multislerp_merge
from evomerge.model_set import ModelSet
from evomerge.space import SearchSpace, load_space
from tests.study_factory import make_tiny_study


def models(base: bool = True, n: int = 3) -> ModelSet:
    paths = {"base": "/m/base"} if base else {}
    return ModelSet(
        paths={**paths, **{f"s{i}": f"/m/s{i}" for i in range(n)}}, base="base" if base else None
    )


@pytest.mark.parametrize(
    ("preset", "base", "genes"),
    [
        # 4 layers x (attn, rest) + global = 9 groups, one weight per model (3)
        ("multislerp", False, 9 * 3),
        ("multislerp", True, 9 * 3),
        # 4 layers + global = 5 groups, weight and density per model (epsilon is fixed)
        ("della", True, 5 * 3 * 2),
        # 9 groups, one select_topk each (sce has no per-model parameters)
        ("sce", True, 9),
    ],
)
def test_preset_genes_and_decoding(preset, base, genes):
    sp = SearchSpace(load_space(preset, None, preset), models(base), 4)
    dims = sp.dimensions()
    assert len(dims) == genes
    genome = {d.name: d.low + (d.high - d.low) * (i % 5) / 4 for i, d in enumerate(dims)}
    recipe = sp.decode(genome)
    assert {s.method for s in recipe.sections} == {preset}
    assert recipe.base_model == ("base" if base else None)
    if preset == "della":  # every decoded density keeps density +/- epsilon inside (0, 1)
        for s in recipe.sections:
            assert all(p["density"] - p["epsilon"] > 0 and p["density"] + p["epsilon"] < 1
                       for p in s.models.values())  # fmt: skip


def test_sce_preset_needs_a_base():
    from evomerge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"needs models\.base"):
        SearchSpace(load_space("sce", None, "sce"), models(base=False), 4)


def run_study(root: Path, preset: str, *, base: bool, max_trials: int = 3) -> dict:
    study = make_tiny_study(root, preset=preset, max_trials=max_trials)
    if not base:  # the fine-tunes alone
        data = yaml.safe_load(study.read_text())
        del data["models"]["base"]
        study.write_text(yaml.safe_dump(data, sort_keys=False))
    runs = root / "runs"
    assert main(["run", str(study), "--runs-dir", str(runs), "--quiet"]) == 0
    return {
        "trials": [json.loads(line) for line in (runs / "tiny" / "trials.jsonl").read_text().splitlines()],
        "run_dir": runs / "tiny",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("preset", "base"), [("multislerp", False), ("della", True), ("sce", True)]
)
def test_preset_study_runs_to_its_budget(tmp_path, preset, base):
    got = run_study(tmp_path, preset, base=base)
    assert len(got["trials"]) == 3
    assert all(t["status"] == "ok" and t["error"] is None for t in got["trials"])
    if preset == "multislerp":
        check_export_matches_the_kernel(tmp_path, got["run_dir"])


def check_export_matches_the_kernel(root: Path, run_dir: Path) -> None:
    """The exported winner of a base-less multislerp study holds, in a layer, the kernel's
    result for the weights its recipe gives that layer."""
    from safetensors.torch import load_file

    from evomerge.recipe_loader import load_recipe_file

    out = root / "export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    recipe = load_recipe_file(out / "recipe.yaml")
    name = "model.layers.1.self_attn.q_proj.weight"
    section = next(s for s in recipe.sections if s.matches(name, 1))
    weights = [section.models[m]["weight"] for m in ("s1", "s2")]
    srcs = [load_file(root / "models" / m / "model.safetensors")[name] for m in ("s1", "s2")]
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    torch.testing.assert_close(merged[name], multislerp_merge(srcs, weights))

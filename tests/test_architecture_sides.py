"""The tensors outside the blocks, before or after them (evomerge.architectures.outside_sides),
checked against mergekit 0.1.5's own architecture files (`pre_weights`, `post_weights`), which
decide what a frankenmerge takes from its first slice and what from its last."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from evomerge.architectures import outside_sides
from evomerge.checkpoint import CheckpointReader
from tests.arch_factory import ARCHS, save_arch_model

NO_MERGEKIT = importlib.util.find_spec("mergekit") is None


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sides")
    return {name: save_arch_model(arch, root / name) for name, arch in ARCHS.items()}


def mergekit_sides(config: dict) -> dict[str, str]:
    """Tensor name (and every alias) -> "pre" / "post" from mergekit's file for this
    architecture class."""
    from importlib.resources import files

    folder = files("mergekit") / "_data" / "architectures"
    for f in (f for f in folder.iterdir() if f.name.endswith(".json")):
        d = json.loads(f.read_text())
        if d.get("model_type") == config["model_type"] and config["architectures"][0] in d.get(
            "architectures", []
        ):
            return {
                n: side
                for side in ("pre", "post")
                for w in d.get(f"{side}_weights", [])
                for n in [w["name"], *w.get("aliases", [])]
            }
    raise AssertionError(f"mergekit has no architecture file for {config['architectures']}")


@pytest.mark.skipif(NO_MERGEKIT, reason="mergekit extra not installed")
@pytest.mark.parametrize("arch", list(ARCHS))
def test_sides_are_mergekits_pre_and_post_weights(arch, bases):
    reader = CheckpointReader(bases[arch])
    ours = outside_sides(reader.config, reader.names())
    theirs = mergekit_sides(reader.config)
    assert ours and ours == {n: theirs[n] for n in ours}
    assert set(ours.values()) == {"pre", "post"}


@pytest.mark.skipif(NO_MERGEKIT, reason="mergekit extra not installed")
def test_a_checkpoint_without_the_base_models_prefix_gets_the_same_sides(bases):
    """The hub's original GPT-2 files name `wte.weight`, not `transformer.wte.weight`."""
    reader = CheckpointReader(bases["gpt2"])
    bare = [n.removeprefix("transformer.") for n in reader.names()]
    ours = outside_sides(reader.config, bare)
    theirs = mergekit_sides(reader.config)
    assert ours == {n: theirs[n] for n in ours}
    assert ours["wte.weight"] == ours["wpe.weight"] == "pre" and ours["ln_f.bias"] == "post"


def test_an_architecture_transformers_cannot_build_takes_everything_first():
    """mergekit's inferred architectures put every tensor outside the blocks in pre_weights."""
    names = ["model.embed.weight", "model.layers.0.w.weight", "model.final_norm.weight"]
    assert outside_sides({"model_type": "no_such_architecture"}, names) == {
        "model.embed.weight": "pre",
        "model.final_norm.weight": "pre",
    }


def test_a_gpt2_frankenmerge_takes_wte_and_wpe_from_its_first_slice(bases, tmp_path):
    """GPT-2's pre-block tensors hold no `embed` in their names; they come from the first
    slice's model all the same, ln_f from the last's."""
    from evomerge.plan import build_layout, open_readers, plan_merge
    from evomerge.recipe_loader import load_recipe_file

    b = save_arch_model(ARCHS["gpt2"], tmp_path / "b", seed=1, base=bases["gpt2"])
    cfg = tmp_path / "frank.yaml"
    cfg.write_text(
        json.dumps(
            {
                "merge_method": "passthrough",
                "slices": [
                    {"sources": [{"model": str(bases["gpt2"]), "layer_range": [0, 2]}]},
                    {"sources": [{"model": str(b), "layer_range": [1, 2]}]},
                ],
            }
        )
    )
    recipe = load_recipe_file(cfg)
    by_path = {p: m for m, p in recipe.models.items()}
    first, last = by_path[str(bases["gpt2"])], by_path[str(b)]
    readers = open_readers(recipe)
    layout = {o.name: o for o in build_layout(recipe, readers)}
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):
        assert layout[name].side == "pre" and list(layout[name].sources) == [first]
    for name in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
        assert layout[name].side == "post" and list(layout[name].sources) == [last]
    assert layout["transformer.h.2.ln_1.weight"].sources == {last: "transformer.h.1.ln_1.weight"}
    tasks = {t.out.name: t.models for t in plan_merge(recipe, readers)}
    assert tasks["transformer.wte.weight"] == (first,) and tasks["transformer.ln_f.bias"] == (last,)

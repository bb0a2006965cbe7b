"""Search spaces: gene layout, pure decoding, method choice, presets, errors."""

from __future__ import annotations

import pytest

from evomerge.errors import ConfigError
from evomerge.model_set import ModelSet
from evomerge.plan import OutTensor, resolve_task
from evomerge.space import PRESETS_DIR, SPACE_PRESETS, SearchSpace, load_space

MODELS = {"math": "/m/math", "code": "/m/code", "chat": "/m/chat"}


def model_set(sources: dict[str, str] = MODELS) -> ModelSet:
    return ModelSet(paths={"base": "/m/base", **sources}, base="base")


def space(preset: str, layers: int = 4, **overrides) -> SearchSpace:
    return SearchSpace(load_space(preset, overrides, "test"), model_set(), layers, seed=3)


def test_presets_registry_lists_the_folder_and_suggests():
    assert SPACE_PRESETS.names() == sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    with pytest.raises(ConfigError, match="did you mean 'ties'"):
        load_space("tis", None, "search_space")


def test_every_preset_loads_and_decodes_its_start_point():
    presets = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    assert {"linear", "task_arithmetic", "ties", "ties_dare", "slerp", "method_choice"} <= set(
        presets
    )
    for name in presets:
        models = dict(list(MODELS.items())[:2]) if name == "slerp" else MODELS
        sp = SearchSpace(load_space(name, None, name), model_set(models), 4)
        recipe = sp.decode(sp.initial_genome())
        assert recipe.base_model == "base" and recipe.sections


def test_gene_count_follows_groups_models_and_params():
    sp = space("ties", layers=8, granularity=2)
    # 4 layer groups + the global group, 3 models, weight and density
    assert len(sp.dimensions()) == (4 + 1) * 3 * 2
    sp = space("method_choice", layers=4, granularity=4)
    # 1 layer group x 2 tensor groups + global = 3 groups; per group: method choice,
    # task_arithmetic 3 weights, ties 3 weights + 3 densities, linear 3 weights
    assert len(sp.dimensions()) == 3 * (1 + 3 + 6 + 3)
    assert sum(1 for d in sp.dimensions() if d.choices) == 3


def test_decode_is_pure_and_places_values_where_the_genes_say():
    sp = space("ties", layers=4, granularity=2)
    genome = {
        d.name: round(d.low + (d.high - d.low) * (i % 7) / 7, 6)
        for i, d in enumerate(sp.dimensions())
    }
    a, b = sp.decode(genome), sp.decode(dict(genome))
    assert a == b and a.content_hash() == b.content_hash()
    sec = a.sections[1]  # layers 2..3
    assert sec.layers == (2, 4) and sec.method == "ties"
    assert sec.models["code"]["density"] == genome["L2-3.all.ties.code.density"]
    out = OutTensor(
        "model.layers.3.mlp.up_proj.weight",
        3,
        (2, 2),
        {m: "model.layers.3.mlp.up_proj.weight" for m in ["base", *MODELS]},
    )
    task = resolve_task(a, out)
    assert task.method.name == "ties" and task.models == ("math", "code", "chat")
    assert task.model_params[2]["weight"] == genome["L2-3.all.ties.chat.weight"]
    emb = OutTensor("model.embed_tokens.weight", None, (2, 2), out.sources)
    assert resolve_task(a, emb).model_params[0]["density"] == genome["global.ties.math.density"]
    genome2 = dict(genome, **{"L2-3.all.ties.code.density": 0.5})
    assert sp.decode(genome2).content_hash() != a.content_hash()


def test_method_choice_switches_section_method_and_params():
    sp = space("method_choice", layers=2, granularity=1)
    genome = sp.initial_genome()
    genome["L1-1.attn.method"] = "linear"
    genome["L1-1.attn.linear.chat.weight"] = 0.9
    recipe = sp.decode(genome)
    attn = next(s for s in recipe.sections if s.layers == (1, 2) and s.filter == "self_attn")
    rest = next(s for s in recipe.sections if s.layers == (1, 2) and s.filter is None)
    assert attn.method == "linear" and attn.models["chat"] == {"weight": 0.9}
    assert rest.method == "task_arithmetic"
    q = OutTensor(
        "model.layers.1.self_attn.q_proj.weight", 1, (2, 2), {m: "x" for m in ["base", *MODELS]}
    )
    mlp = OutTensor("model.layers.1.mlp.up_proj.weight", 1, (2, 2), q.sources)
    assert resolve_task(recipe, q).method.name == "linear"
    assert resolve_task(recipe, mlp).method.name == "task_arithmetic"


def test_without_global_group_outer_tensors_follow_first_group():
    sp = space("linear", layers=2, global_group=False)
    genome = sp.initial_genome()
    genome["L0-0.all.linear.math.weight"] = 0.123
    recipe = sp.decode(genome)
    last = recipe.sections[-1]
    assert last.layers is None and last.models["math"]["weight"] == 0.123


@pytest.mark.parametrize(
    ("preset", "overrides", "layers", "needle"),
    [
        ("linear", {"granularity": 3}, 4, "does not divide"),
        ("nope", {}, 4, "unknown search space preset"),
        ("slerp", {}, 4, "exactly 2"),
        (
            "ties",
            {
                "methods": {
                    "ties": {"per_model": {"density": {"low": 0.0, "high": 1.0, "init": 0.5}}}
                }
            },
            4,
            "density",
        ),
        (
            "linear",
            {"methods": {"linear": {"per_model": {"weight": {"low": 1, "high": 0, "init": 0.5}}}}},
            4,
            "low",
        ),
        (
            "linear",
            {"tensor_groups": [{"name": "attn", "filter": "self_attn"}]},
            4,
            "last tensor group",
        ),
        ("linear", {"methods": {"lienar": {}}}, 4, "did you mean 'linear'"),
    ],
)
def test_bad_spaces_name_the_problem(preset, overrides, layers, needle):
    with pytest.raises(ConfigError, match=needle):
        SearchSpace(load_space(preset, overrides, "search_space"), model_set(), layers)

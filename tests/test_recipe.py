"""The recipe models: structural validation, value evaluation (mergekit's rules), hash, YAML."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from evomerge.recipe import FilterValue, Recipe, Section, Slice, SliceSource, evaluate_value


def recipe_data() -> dict[str, Any]:
    return {
        "models": {"a": "/m/a", "b": "/m/b"},
        "base_model": "a",
        "seed": 3,
        "sections": [
            {
                "layers": [0, 2],
                "filter": "mlp",
                "method": "ties",
                "parameters": {"normalize": True},
                "models": {"b": {"weight": [0.2, 0.9], "density": 0.5}},
            },
            {
                "method": "linear",
                "models": {
                    "a": {"weight": 1.0},
                    "b": {"weight": [{"filter": "attn", "value": 0.3}, {"value": 0.7}]},
                },
            },
        ],
    }


def first_error(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        Recipe.model_validate(data)
    return info.value.errors()[0]["msg"]


# ---------------------------------------------------------------- structural validation


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d.update(models={}), "models is empty"),
        (lambda d: d.update(base_model="c"), "base_model 'c' is not one of models (a, b)"),
        (
            lambda d: d.update(tokenizer_source="c"),
            "tokenizer_source 'c' is not base, union or one of models",
        ),
        (lambda d: d.update(sections=[]), "sections is empty"),
        (
            lambda d: d["sections"][1]["models"].update(c={"weight": 1}),
            "sections[1] names model 'c', which is not in models",
        ),
        (
            lambda d: d.update(slices=[{"sources": [{"model": "z", "layer_range": [0, 2]}]}]),
            "slices[0] names model 'z', which is not in models",
        ),
        (
            lambda d: d["sections"][0].update(layers=[2, 2]),
            "layers must be [start, end) with 0 <= start < end, got [2, 2]",
        ),
        (
            lambda d: d["sections"][0].update(layers=[-1, 2]),
            "layers must be [start, end) with 0 <= start < end, got [-1, 2]",
        ),
        (lambda d: d.update(methods="ties"), "Extra inputs are not permitted"),
    ],
)
def test_structural_errors_name_the_rule(change, needle):
    data = recipe_data()
    change(data)
    assert needle in first_error(data)


@pytest.mark.parametrize(
    "sources",
    [
        [],
        [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}],
        [{"model": "a", "layer_range": [2, 2]}],
    ],
)
def test_slice_sources_need_one_non_empty_length(sources):
    with pytest.raises(ValidationError, match="non-empty layer_range of the same length"):
        Slice.model_validate({"sources": sources})


def test_slice_length_and_models_are_frozen():
    sl = Slice(sources=[SliceSource(model="a", layer_range=(3, 7))])
    assert sl.length == 4
    recipe = Recipe.model_validate(recipe_data())
    with pytest.raises(ValidationError):
        recipe.seed = 4  # type: ignore[misc]


def test_reference_model_prefers_tokenizer_source_then_base_then_first():
    data = recipe_data()
    assert Recipe.model_validate({**data, "tokenizer_source": "b"}).reference_model == "b"
    assert Recipe.model_validate(data).reference_model == "a"
    data.pop("base_model")
    data["models"] = {"b": "/m/b", "a": "/m/a"}
    assert Recipe.model_validate(data).reference_model == "b"


@pytest.mark.parametrize(
    ("layers", "flt", "name", "layer", "want"),
    [
        (None, None, "lm_head.weight", None, True),
        (None, "mlp", "model.layers.3.mlp.up.weight", 3, True),
        (None, "mlp", "model.layers.3.self_attn.q.weight", 3, False),
        ((0, 2), None, "model.layers.1.mlp.up.weight", 1, True),
        ((0, 2), None, "model.layers.2.mlp.up.weight", 2, False),
        ((0, 2), None, "model.embed_tokens.weight", None, False),
    ],
)
def test_section_matches_layer_range_and_filter(layers, flt, name, layer, want):
    section = Section(layers=layers, filter=flt, method="linear", models={"a": {}})
    assert section.matches(name, layer) is want


# ---------------------------------------------------------------- value evaluation


@pytest.mark.parametrize(
    ("value", "t", "want"),
    [
        (0.4, 0.7, 0.4),
        (True, 0.5, True),
        ([0.0, 1.0], 0.25, 0.25),
        ([1.0, 3.0, 2.0], 0.75, 2.5),  # t*(n-1) = 1.5: halfway between 3 and 2
        ([1.0, 3.0, 2.0], 0.5, 3.0),
        ([1.0, 3.0, 2.0], 1.0, 2.0),
        ([2, 4], 0.5, 3.0),  # ints interpolate as floats
        ([True, False], 0.9, True),  # not numbers: a step, index int(t * (n - 1))
        (["a", "b", "c"], 0.99, "b"),
        ([], 0.5, None),
    ],
)
def test_gradients_interpolate_linearly_in_t(value, t, want):
    got = evaluate_value(value, "model.layers.0.mlp.weight", t)
    assert got == pytest.approx(want) if isinstance(want, float) else got == want
    assert type(got) is type(want)


def test_filters_first_substring_match_wins():
    value = [{"filter": "mlp", "value": 0.1}, {"filter": "up", "value": 0.2}, {"value": 0.3}]
    assert evaluate_value(value, "model.layers.1.mlp.up_proj.weight", 0.0) == 0.1
    assert evaluate_value(value, "model.layers.1.up.weight", 0.0) == 0.2
    assert evaluate_value(value, "lm_head.weight", 0.0) == 0.3


def test_filter_without_match_is_none_and_star_matches_everything():
    assert evaluate_value([{"filter": "mlp", "value": 1.0}], "lm_head.weight", 0.0) is None
    assert evaluate_value({"filter": "*", "value": 2.0}, "lm_head.weight", 0.0) == 2.0


def test_filter_values_may_hold_gradients_and_be_models():
    value = [FilterValue(filter="attn", value=[0.0, 2.0]), FilterValue(value=5.0)]
    assert evaluate_value(value, "model.layers.2.self_attn.q.weight", 0.25) == 0.5
    assert evaluate_value(value, "model.layers.2.mlp.w", 0.25) == 5.0


def test_section_values_parse_into_filter_values():
    recipe = Recipe.model_validate(recipe_data())
    weight = recipe.sections[1].models["b"]["weight"]
    assert all(isinstance(e, FilterValue) for e in weight)
    assert evaluate_value(weight, "model.layers.0.self_attn.q.weight", 0.0) == 0.3


# ---------------------------------------------------------------- hash and YAML


def test_content_hash_is_pinned():
    """The hash names trials in every run directory: changing it breaks dedup on resume."""
    assert Recipe.model_validate(recipe_data()).content_hash() == "b2833b081d35be4e"


def test_content_hash_ignores_mapping_order():
    data = recipe_data()
    reordered = copy.deepcopy(data)
    reordered["sections"][0]["parameters"] = {"normalize": True}
    reordered["sections"][0]["models"]["b"] = {"density": 0.5, "weight": [0.2, 0.9]}
    h = Recipe.model_validate(data).content_hash()
    assert Recipe.model_validate(reordered).content_hash() == h


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["sections"][0]["models"]["b"].update(weight=[0.2, 0.91]),
        lambda d: d["models"].update(b="/m/other"),
        lambda d: d.update(seed=4),
        lambda d: d.update(dtype="bfloat16"),
        lambda d: d["sections"][0].update(filter="attn"),
    ],
)
def test_content_hash_changes_with_anything_that_changes_tensors(change):
    data = recipe_data()
    before = Recipe.model_validate(data).content_hash()
    change(data)
    assert Recipe.model_validate(data).content_hash() != before


def test_yaml_round_trip_is_lossless_and_omits_unset_fields():
    recipe = Recipe.model_validate(recipe_data())
    text = recipe.to_yaml()
    assert "dtype" not in text and "slices" not in text and "tokenizer_source" not in text
    back = Recipe.model_validate(yaml.safe_load(text))
    assert back == recipe and back.content_hash() == recipe.content_hash()
    assert list(yaml.safe_load(text)) == [
        "evomerge_recipe",
        "models",
        "base_model",
        "seed",
        "sections",
    ]

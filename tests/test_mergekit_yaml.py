"""Recipe -> mergekit's YAML, without mergekit (the differential tests run mergekit itself;
reading is tests/test_mergekit_read.py)."""

from __future__ import annotations

from typing import Any

import pytest

from evomerge.errors import ConfigError
from evomerge.mergekit_yaml import to_mergekit
from evomerge.plan import OutTensor, TensorTask, resolve_task
from evomerge.recipe import Recipe, evaluate_value

KINDS = (".mlp.up_proj.weight", ".self_attn.q_proj.weight")


def layout(sources: tuple[str, ...], extra: tuple[str, ...] = ()) -> list[OutTensor]:
    def o(name: str, layer: int | None, t: float) -> OutTensor:
        return OutTensor(name, layer, (2, 2), {m: name for m in sources}, t)

    out = [o("model.embed_tokens.weight", None, 0.0)]
    out += [o(f"model.layers.{i}{k}", i, i / 2) for i in range(3) for k in KINDS]
    return out + [o(n, None, 0.0) for n in ("lm_head.weight", *extra)]


def tasks(recipe: Recipe, extra: tuple[str, ...] = ()) -> list[TensorTask]:
    return [resolve_task(recipe, o) for o in layout(tuple(recipe.models), extra)]


def recipe(sections: list[dict[str, Any]], **extra: Any) -> Recipe:
    return Recipe.model_validate(
        {"models": {"a": "/m/a", "b": "/m/b"}, "sections": sections, **extra}
    )


# ---------------------------------------------------------------- writing


def test_per_layer_values_become_gradients_and_constants_stay_scalars():
    sections = [
        {
            "layers": [0, 1],
            "method": "linear",
            "models": {"a": {"weight": 0.1}, "b": {"weight": 1.0}},
        },
        {
            "layers": [1, 3],
            "method": "linear",
            "models": {"a": {"weight": 0.4}, "b": {"weight": 1.0}},
        },
        {"method": "linear", "models": {"a": {"weight": 0.9}, "b": {"weight": 1.0}}},
    ]
    r = recipe(sections, dtype="bfloat16")
    ts = tasks(r)
    out = to_mergekit(r, ts)
    assert out["merge_method"] == "linear" and out["dtype"] == "float32"
    assert out["out_dtype"] == "bfloat16" and "base_model" not in out
    assert out["parameters"] == {"normalize": True}
    a, b = out["models"]
    assert a["model"] == "/m/a" and b["parameters"] == {"weight": 1.0}
    assert a["parameters"]["weight"] == [
        {"filter": "model.embed_tokens.weight", "value": 0.9},
        {"filter": "lm_head.weight", "value": 0.9},
        {"filter": KINDS[0], "value": [0.1, 0.4, 0.4]},
        {"filter": KINDS[1], "value": [0.1, 0.4, 0.4]},
    ]
    for t in ts:  # mergekit's rules (first substring filter, gradient at t) give our values
        got = evaluate_value(a["parameters"]["weight"], t.out.name, t.out.t)
        assert got == t.model_params[0]["weight"]


def test_base_model_is_named_only_where_it_is_used():
    ta = {"method": "task_arithmetic", "models": {"b": {"weight": 0.5}}}
    r = recipe([ta], base_model="a")
    out = to_mergekit(r, tasks(r))
    assert out["base_model"] == "/m/a" and [m["model"] for m in out["models"]] == ["/m/b"]
    lin = {"method": "linear", "models": {"b": {"weight": 1.0}}}
    r = recipe([lin], base_model="a")
    assert "base_model" not in to_mergekit(r, tasks(r))
    # nuslerp takes the base optionally, as the origin of the task vectors: it must be named
    nu = {"method": "nuslerp", "models": {"b": {"weight": 1.0}}}
    r = Recipe.model_validate(
        {"models": {"a": "/m/a", "b": "/m/b", "c": "/m/c"}, "base_model": "a",
         "sections": [{**nu, "models": {"b": {"weight": 1.0}, "c": {"weight": 1.0}}}]}
    )  # fmt: skip
    assert to_mergekit(r, tasks(r))["base_model"] == "/m/a"


@pytest.mark.parametrize(
    ("sections", "extra", "needle"),
    [
        (
            [
                {"filter": "mlp", "method": "ties", "models": {"b": {"weight": 1.0}}},
                {"method": "task_arithmetic", "models": {"b": {"weight": 1.0}}},
            ],
            {"base_model": "a"},
            r"one merge method per config; this recipe uses \['task_arithmetic', 'ties'\]",
        ),
        (
            [{"method": "dare_ties", "models": {"b": {"weight": 1.0, "density": 0.5}}}],
            {"base_model": "a"},
            "method 'dare_ties' drops parameters at random",
        ),
    ],
)
def test_what_mergekit_cannot_reproduce_is_a_config_error(sections, extra, needle):
    r = recipe(sections, **extra)
    with pytest.raises(ConfigError, match=needle):
        to_mergekit(r, tasks(r))


def test_a_name_filter_that_matches_another_tensor_is_refused():
    sections = [
        {"filter": "model.norm", "method": "linear", "models": {"a": {"weight": 0.2}}},
        {"method": "linear", "models": {"a": {"weight": 0.7}}},
    ]
    r = recipe(sections)
    with pytest.raises(ConfigError, match=r"cannot single out tensor 'model\.norm\.weight'"):
        to_mergekit(r, tasks(r, extra=("norm.weight", "model.norm.weight")))

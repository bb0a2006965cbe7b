"""The merge planner: tensor layout from headers, and each tensor's method and values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from evomerge.errors import ConfigError, IncompatibleModelsError
from evomerge.plan import (
    OutTensor,
    build_layout,
    open_readers,
    plan_merge,
    resolve_task,
    section_t,
    tensor_seed,
)
from evomerge.recipe import Recipe, Section
from tests.model_factory import save_tiny_llama

UP = "model.layers.{}.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan_models")
    base = save_tiny_llama(root / "base", seed=0)
    return {
        "base": base,
        "a": save_tiny_llama(root / "a", seed=1, base=base),
        "b": save_tiny_llama(root / "b", seed=2, base=base),
        "short": save_tiny_llama(root / "short", seed=3, layers=2),
        "wide": save_tiny_llama(root / "wide", seed=4, hidden=48),
    }


def recipe(models: dict[str, Any], sections: list[dict], **extra: Any) -> Recipe:
    return Recipe.model_validate(
        {"models": {k: str(v) for k, v in models.items()}, "sections": sections, **extra}
    )


def linear(*names: str, **weights: Any) -> dict:
    return {"method": "linear", "models": {n: {"weight": weights.get(n, 1.0)} for n in names}}


def out(name: str, layer: int | None, t: float = 0.0, sources=("base", "a", "b")) -> OutTensor:
    return OutTensor(name, layer, (2, 2), {m: name for m in sources}, t)


# ---------------------------------------------------------------- layout


def test_layout_follows_the_reference_with_gradient_positions(models):
    r = recipe({"a": models["a"], "b": models["b"]}, [linear("a", "b")])
    layout = build_layout(r, open_readers(r))
    readers = open_readers(r)
    assert [o.name for o in layout] == list(readers["a"].infos)
    by_name = {o.name: o for o in layout}
    assert [(by_name[UP.format(i)].layer, by_name[UP.format(i)].t) for i in range(4)] == [
        (0, 0.0),
        (1, 1 / 3),
        (2, 2 / 3),
        (3, 1.0),
    ]
    emb = by_name["model.embed_tokens.weight"]
    assert emb.layer is None and emb.t == 0.0 and emb.shape == (64, 32)
    assert dict(emb.sources) == {"a": "model.embed_tokens.weight", "b": "model.embed_tokens.weight"}


def test_layout_rejects_a_missing_tensor_and_a_shape_mismatch(models):
    r = recipe({"a": models["a"], "short": models["short"]}, [linear("a", "short")])
    with pytest.raises(
        IncompatibleModelsError,
        match=r"tensor 'model\.layers\.2\..*' of 'a' is missing from model 'short'",
    ):
        build_layout(r, open_readers(r))
    r = recipe({"a": models["a"], "wide": models["wide"]}, [linear("a", "wide")])
    with pytest.raises(
        IncompatibleModelsError, match=r"has shape \[\d+, 32\] in 'a' but \[\d+, 48\] in 'wide'"
    ):
        build_layout(r, open_readers(r))


def test_layout_rejects_another_architecture(models, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(models["b"], other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    r = recipe({"a": models["a"], "o": other}, [linear("a", "o")])
    with pytest.raises(
        IncompatibleModelsError, match="'o' is a 'mistral' model but 'a' is a 'llama'"
    ):
        build_layout(r, open_readers(r))


def test_slices_lay_out_blocks_from_source_ranges(models):
    r = recipe(
        {"a": models["a"], "b": models["b"]},
        [{"method": "passthrough", "models": {"a": {}}}],
        slices=[
            {"sources": [{"model": "a", "layer_range": [0, 2]}]},
            {"sources": [{"model": "b", "layer_range": [1, 4]}]},
        ],
    )
    layout = build_layout(r, open_readers(r))
    by_name = {o.name: o for o in layout}
    assert sorted({o.layer for o in layout if o.layer is not None}) == [0, 1, 2, 3, 4]
    assert dict(by_name[UP.format(1)].sources) == {"a": UP.format(1)}
    assert dict(by_name[UP.format(2)].sources) == {"b": UP.format(1)}
    assert dict(by_name[UP.format(4)].sources) == {"b": UP.format(3)}
    assert [by_name[UP.format(j)].t for j in range(5)] == [0.0, 1.0, 0.0, 0.5, 1.0]
    assert dict(by_name["model.embed_tokens.weight"].sources) == {"a": "model.embed_tokens.weight"}
    assert dict(by_name["lm_head.weight"].sources) == {"b": "lm_head.weight"}
    assert layout[0].name == "model.embed_tokens.weight" and layout[-1].layer is None


def test_slice_beyond_a_source_is_a_config_error(models):
    r = recipe(
        {"short": models["short"]},
        [{"method": "passthrough", "models": {"short": {}}}],
        slices=[{"sources": [{"model": "short", "layer_range": [1, 3]}]}],
    )
    with pytest.raises(ConfigError, match=r"slices\[0\]: model 'short' has no layer 2"):
        build_layout(r, open_readers(r))


# ---------------------------------------------------------------- resolving one tensor


def test_first_matching_section_wins():
    r = recipe(
        {"a": "/a", "b": "/b"},
        [
            {**linear("a", "b", a=0.9), "filter": "mlp", "layers": [0, 2]},
            {**linear("a", "b", a=0.5), "filter": "mlp"},
            linear("a", "b", a=0.1),
        ],
    )
    weight = lambda o: resolve_task(r, o).model_params[0]["weight"]  # noqa: E731
    assert weight(out(UP.format(1), 1, sources=("a", "b"))) == 0.9
    assert weight(out(UP.format(2), 2, sources=("a", "b"))) == 0.5
    assert weight(out("model.layers.1.self_attn.q_proj.weight", 1, sources=("a", "b"))) == 0.1
    assert weight(out("lm_head.weight", None, sources=("a", "b"))) == 0.1


def test_gradient_t_is_within_the_section_range():
    section = {"layers": [2, 6], **linear("a", a=[0.0, 3.0])}
    r = recipe({"a": "/a"}, [section, linear("a")])
    for layer, want in [(2, 0.0), (3, 1.0), (5, 3.0)]:
        task = resolve_task(r, out(UP.format(layer), layer, t=0.9, sources=("a",)))
        assert task.model_params[0]["weight"] == pytest.approx(want)
    one = Section(layers=(4, 5), method="linear", models={"a": {}})
    assert section_t(one, out(UP.format(4), 4, t=0.3)) == 1.0
    assert section_t(Section(method="linear", models={"a": {}}), out(UP.format(4), 4, 0.3)) == 0.3


def test_base_goes_first_where_it_takes_part_and_is_dropped_by_delta_methods():
    models = {"a": "/a", "base": "/base", "b": "/b"}
    r = recipe(models, [linear("a", "b", "base")], base_model="base")
    task = resolve_task(r, out(UP.format(0), 0))
    assert task.models == ("base", "a", "b") and task.base == "base"
    ta = {"method": "task_arithmetic", "models": {n: {"weight": 0.5} for n in ("a", "b", "base")}}
    task = resolve_task(recipe(models, [ta], base_model="base"), out(UP.format(0), 0))
    assert task.models == ("a", "b") and task.base == "base"


def test_a_method_needing_a_base_without_one_is_an_error():
    ta = {"method": "task_arithmetic", "models": {"a": {"weight": 0.5}}}
    with pytest.raises(
        ConfigError,
        match=r"sections\[0\] \(task_arithmetic, tensor .*\): method 'task_arithmetic' needs base_model",
    ):
        resolve_task(recipe({"a": "/a"}, [ta]), out(UP.format(0), 0))


def test_a_tensor_no_section_covers_is_an_error():
    r = recipe({"a": "/a"}, [{**linear("a"), "layers": [0, 4]}])
    with pytest.raises(
        ConfigError, match=r"no section of the recipe covers tensor 'lm_head\.weight'"
    ):
        resolve_task(r, out("lm_head.weight", None))


def test_a_model_that_is_not_a_source_of_the_tensor_is_an_error():
    r = recipe({"a": "/a", "b": "/b"}, [linear("a", "b")])
    with pytest.raises(ConfigError, match="model 'b' is not a source of this tensor"):
        resolve_task(r, out(UP.format(0), 0, sources=("a",)))


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"method": "lienar", "models": {"a": {}}}, "did you mean 'linear'"),
        ({**linear("a"), "parameters": {"lambda": 2}}, "has no parameter 'lambda'"),
        ({"method": "linear", "models": {"a": {"wieght": 1}}}, "has no parameter 'wieght'"),
        ({"method": "linear", "models": {"a": {}}}, "needs per-model parameter 'weight'"),
    ],
)
def test_methods_and_parameters_are_checked(section, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_task(recipe({"a": "/a"}, [section]), out(UP.format(0), 0))


def test_values_come_from_the_model_then_the_section_then_defaults():
    ties = {
        "method": "ties",
        "parameters": {"density": 0.4, "lambda": [{"filter": "mlp", "value": 2.0}]},
        "models": {
            "a": {"weight": 1.0, "density": [{"filter": "attn", "value": 0.9}]},
            "b": {"weight": 2.0},
        },
    }
    r = recipe({"base": "/base", "a": "/a", "b": "/b"}, [ties], base_model="base")
    task = resolve_task(r, out(UP.format(0), 0))
    assert [p["density"] for p in task.model_params] == [0.4, 0.4]  # a's filter misses: section's
    assert task.global_params["lambda"] == 2.0 and task.global_params["normalize"] is True
    task = resolve_task(r, out("model.layers.0.self_attn.q_proj.weight", 0))
    assert [p["density"] for p in task.model_params] == [0.9, 0.4]
    assert task.global_params["lambda"] == 1.0  # no filter matches: the default


def test_seeds_are_stable_per_recipe_seed_and_tensor():
    r = recipe({"a": "/a"}, [linear("a")], seed=7)
    assert resolve_task(r, out(UP.format(0), 0)).seed == tensor_seed(7, UP.format(0))
    assert tensor_seed(7, "x") == tensor_seed(7, "x") != tensor_seed(8, "x") != tensor_seed(7, "y")
    assert 0 <= tensor_seed(7, "x") < 2**63


def test_plan_merge_resolves_every_tensor_of_the_layout(models):
    r = recipe({"a": models["a"], "b": models["b"]}, [linear("a", "b", a=[0.0, 1.0])])
    readers = open_readers(r)
    tasks = plan_merge(r, readers)
    assert [t.out for t in tasks] == build_layout(r, readers)
    ups = {t.out.name: t.model_params[0]["weight"] for t in tasks if "up_proj" in t.out.name}
    assert ups[UP.format(3)] == 1.0 and ups[UP.format(0)] == 0.0

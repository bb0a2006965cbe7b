"""Recipe files: our format or mergekit's told apart by keys; paths relative to the file."""

from __future__ import annotations

import pytest
import yaml

from evomerge.errors import ConfigError, MissingPathError
from evomerge.recipe_loader import load_recipe_dict, load_recipe_file


def write(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def ours(models: dict[str, str]) -> dict:
    return {
        "evomerge_recipe": 1,
        "models": models,
        "sections": [{"method": "linear", "models": {n: {"weight": 1.0} for n in models}}],
    }


def test_our_format_resolves_paths_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "sub" / "m1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "sub")  # "m1" also exists relative to the cwd
    recipe = load_recipe_file(write(tmp_path / "sub" / "r.yaml", ours({"a": "m1", "b": "hub/id"})))
    assert recipe.models["b"] == "hub/id"  # not a folder next to the file: left as written
    assert recipe.models["a"] == "m1"  # exists from the cwd too: left as written
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe_file(write(tmp_path / "sub" / "r.yaml", ours({"a": "m1"})))
    assert recipe.models["a"] == str((tmp_path / "sub" / "m1").resolve())


def test_mergekit_format_is_recognized_by_merge_method(tmp_path):
    (tmp_path / "x").mkdir()
    data = {"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1.0}}]}
    recipe = load_recipe_file(write(tmp_path / "mk.yaml", data))
    assert recipe.models == {"x": str((tmp_path / "x").resolve())}
    assert recipe.sections[0].method == "linear"


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(
        ConfigError, match=r"r\.yaml: expected a mapping at the top level, got list"
    ):
        load_recipe_file(write(tmp_path / "r.yaml", [1, 2]))
    with pytest.raises(ConfigError, match=r"^here: expected a mapping at the top level, got str$"):
        load_recipe_dict("text", "here")


def test_validation_error_is_one_line_with_the_field(tmp_path):
    data = ours({"a": "/m/a"})
    data["base_model"] = "z"
    with pytest.raises(ConfigError) as info:
        load_recipe_file(write(tmp_path / "r.yaml", data))
    assert str(info.value) == (f"{tmp_path / 'r.yaml'}: base_model 'z' is not one of models (a)")


def test_missing_file(tmp_path):
    with pytest.raises(MissingPathError, match="does not exist"):
        load_recipe_file(tmp_path / "none.yaml")

"""Recipe files: our YAML (`evomerge_recipe: 1`) or a mergekit merge YAML, told apart by their keys.

The one place that knows both formats, so that `recipe` (the models) and `mergekit_yaml` (the
conversion) need not import each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.recipe import Recipe
from evomerge.yaml_io import read_yaml, validate_model


def load_recipe_dict(data: Any, where: str) -> Recipe:
    """Our recipe format from parsed YAML; ConfigError naming `where` and the field otherwise."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: expected a mapping at the top level, got {type(data).__name__}"
        )
    return validate_model(Recipe, data, where)


def load_recipe_file(path: str | Path) -> Recipe:
    """Our recipe YAML or a mergekit merge YAML (told apart by their keys). A mergekit file is
    read as mergekit reads it (warnings for what mergekit ignores) and checked against the
    model files for what a Recipe cannot say (tokenizer rework, input casts)."""
    data = read_yaml(path)
    if isinstance(data, dict) and "merge_method" in data:
        from evomerge.mergekit_files import check_mergekit_files
        from evomerge.mergekit_read import read_mergekit

        mk = read_mergekit(data, where=str(path), base_dir=Path(path).parent)
        check_mergekit_files(mk, str(path))
        return mk.recipe
    recipe = load_recipe_dict(data, str(path))
    return _resolve_relative_paths(recipe, Path(path).parent)


def _resolve_relative_paths(recipe: Recipe, base_dir: Path) -> Recipe:
    """Model paths written relative to the recipe file mean relative to that file."""
    models = {}
    for name, ref in recipe.models.items():
        cand = (base_dir / ref) if not Path(ref).is_absolute() else Path(ref)
        models[name] = str(cand.resolve()) if cand.exists() and not Path(ref).exists() else ref
    return recipe.model_copy(update={"models": models})

"""The pure parts of the plots: the Pareto front and where coefficients land in the heatmaps."""

from __future__ import annotations

from evomerge.plots import coefficient_panels, pareto_front
from evomerge.recipe import Recipe, Section


def test_pareto_front_of_known_points():
    pts = [(1, 0), (0, 1), (0.5, 0.5), (0.4, 0.4), (1, 0), (0.2, 0.9)]
    assert pareto_front(pts) == [0, 1, 2, 4, 5]


def test_coefficient_panels_place_values():
    models = {"base": "b", "a": "x", "c": "y"}
    recipe = Recipe(
        models=models,
        base_model="base",
        sections=[
            Section(layers=(0, 2), filter="self_attn", method="ties",
                    models={"a": {"weight": 0.1, "density": 0.5}, "c": {"weight": 0.2, "density": 0.6}}),
            Section(layers=(0, 2), method="linear", models={"a": {"weight": 0.3}, "c": {"weight": 0.4}}),
            Section(method="slerp", parameters={"t": 0.25}, models={"base": {}, "c": {}}),
        ],
    )  # fmt: skip
    panels = coefficient_panels(recipe, searched={"weight", "density", "t"})
    rows, cols, values = panels["weight [self_attn]"]
    assert rows == ["L0-1 ties"] and cols == ["a", "c"] and values == [[0.1, 0.2]]
    rows, cols, values = panels["weight [rest]"]
    assert rows == ["L0-1 linear"] and values == [[0.3, 0.4]]
    assert panels["t [rest]"][:2] == (["global slerp"], ["all"])
    assert "density [rest]" not in panels and panels["density [self_attn]"][2] == [[0.5, 0.6]]

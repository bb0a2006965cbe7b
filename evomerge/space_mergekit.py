"""Two ways mergekit-evolve lays a genome over the tensors, as recipe sections.

A search space normally gives each layer group constant values and, without a global group,
lets the tensors outside the blocks follow the first layer group. mergekit-evolve decodes the
same genes differently, and `SpaceConfig` offers both so that a converted mergekit-evolve study
(`evomerge.mergekit_evolve`) merges exactly what mergekit-evolve would:

- `outside_blocks: first_last`: its genomes become mergekit slices, one per layer group, and
  mergekit takes the tensors before the blocks (embeddings) from the first slice and those after
  them (final norm, lm_head) from the last, each with the values of the first filter that
  matches its name (`outside` sections: the architecture's own order decides the side);
- `smooth: true`: each layer group's value is one control point of a gradient across all
  layers (mergekit interpolates at t = layer / (layers - 1)); tensors outside the blocks are
  evaluated at t = 0, the first point.

Both need one method (a tensor group's values are combined across groups).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from evomerge.recipe import FilterValue, Section


def smooth_sections(layer_sections: Sequence[Section], n_tensor_groups: int) -> list[Section]:
    """One section per tensor group over every tensor, its values gradients whose control points
    are the layer groups' values (`layer_sections`: layer groups in order, each with its
    tensor groups in order)."""
    out = []
    for k in range(n_tensor_groups):
        column = list(layer_sections[k::n_tensor_groups])
        out.append(_combine(column, lambda values: _gradient(values), filter_=column[0].filter))
    return out


def outside_sections(layer_sections: Sequence[Section], n_tensor_groups: int) -> list[Section]:
    """mergekit's slices rule for the tensors outside the blocks: those before them (embeddings)
    from the first layer group, those after (final norm, lm_head) from the last, the tensor
    group chosen by filter."""
    first, last = layer_sections[:n_tensor_groups], layer_sections[-n_tensor_groups:]
    return [
        _combine(first, lambda values: _by_filter(first, values), filter_=None, outside="pre"),
        _combine(last, lambda values: _by_filter(last, values), filter_=None, outside="post"),
    ]


def _combine(
    group: Sequence[Section],
    join: Any,
    *,
    filter_: str | None,
    outside: Literal["pre", "post"] | None = None,
) -> Section:
    """A section without layers whose every value joins the group's values for it."""
    head = group[0]
    return Section(
        filter=filter_,
        outside=outside,
        method=head.method,
        parameters={p: join([s.parameters[p] for s in group]) for p in head.parameters},
        models={
            m: {p: join([s.models[m][p] for s in group]) for p in head.models[m]}
            for m in head.models
        },
    )


def _same(values: Sequence[Any]) -> bool:
    return len({repr(v) for v in values}) == 1


def _gradient(values: Sequence[Any]) -> Any:
    """A constant stays a scalar (fixed values, booleans); else the control points."""
    return values[0] if _same(values) else [float(v) for v in values]


def _by_filter(group: Sequence[Section], values: Sequence[Any]) -> Any:
    """First matching tensor-group filter wins, as the layer sections do (the last has none)."""
    if _same(values):
        return values[0]
    return [FilterValue(filter=s.filter, value=v) for s, v in zip(group, values, strict=True)]

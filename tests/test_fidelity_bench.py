"""The fidelity bench's items-to-match figure: incumbents in line order, full-fidelity lines only."""

from __future__ import annotations

from evomerge.bench.fidelity_bench import incumbent_trace, items_to_match
from evomerge.runstore import TrialRecord


def line(trial: int, fitness: float, items: int, fidelity: float, g: float) -> TrialRecord:
    return TrialRecord(
        trial=trial,
        proposal=trial,
        status="ok",
        genome={"x": g},
        recipe_hash=str(trial),
        fitness=[fitness],
        items=items,
        fidelity=fidelity,
    )


def test_trace_follows_full_fidelity_incumbents_and_counts_every_item() -> None:
    records = [
        line(0, 0.5, 10, 1.0, 0.1),
        line(1, 0.9, 4, 0.4, 0.2),  # a partial estimate never becomes the incumbent
        line(2, 0.5, 10, 1.0, 0.3),  # a tie keeps the earlier incumbent
        line(3, 0.7, 10, 1.0, 0.4),
        line(4, 0.6, 10, 1.0, 0.5),
    ]
    heldout = {0.1: 0.30, 0.4: 0.62}
    trace = incumbent_trace(records, lambda genome: heldout[genome["x"]])
    assert trace == [(10, 0.30), (34, 0.62)]
    assert items_to_match(trace, 0.6, 100) == 0.34
    assert items_to_match(trace, 0.30, 100) == 0.10
    assert items_to_match(trace, 0.7, 100) is None

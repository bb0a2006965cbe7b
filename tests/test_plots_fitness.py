"""fitness.png with racing: subset estimates are drawn apart and never make the best so far."""

from __future__ import annotations

from evomerge.plots import fitness_figure
from evomerge.runstore import TrialRecord


def line(trial: int, fitness: float, fidelity: float) -> TrialRecord:
    return TrialRecord(
        trial=trial,
        proposal=trial,
        status="ok",
        genome={},
        recipe_hash=str(trial),
        fitness=[fitness],
        fidelity=fidelity,
    )


def test_best_so_far_follows_full_fidelity_lines_only() -> None:
    records = [line(0, 0.5, 1.0), line(1, 0.9, 0.1), line(2, 0.6, 1.0), line(3, 0.95, 0.3)]
    fig = fitness_figure(records, ["fitness"], chosen=2)
    ax = fig.axes[0]
    (step,) = ax.get_lines()
    assert list(step.get_ydata()) == [0.5, 0.6]  # 0.9 and 0.95 are subset estimates
    labels = ax.get_legend_handles_labels()[1]
    assert "subset estimate (racing)" in labels and "exported" in labels
    partial = next(c for c in ax.collections if c.get_label() == "subset estimate (racing)")
    assert sorted(map(tuple, partial.get_offsets())) == [(1.0, 0.9), (3.0, 0.95)]

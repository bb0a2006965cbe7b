"""The report's plots of how a search went (evomerge/plots_progress.py): worker utilization
against hand-computed numbers on a synthetic run, the generation blocks and the best-so-far
steps, generation sizes against pycma's and Optuna's own, valid PNGs, and `evomerge report`
writing them for a real run whose lines carry each evaluation's start time."""

from __future__ import annotations

import io
import itertools

import pytest

from evomerge.cli import main
from evomerge.plots_progress import (
    best_so_far,
    generation_fitness,
    generation_size,
    progress_plots,
    utilization_figure,
)
from evomerge.run_metrics import evaluation_intervals, utilization
from evomerge.runstore import RunStore, TrialRecord
from tests.study_factory import make_tiny_study


def rec(trial, proposal, worker, start, total, *, fit=0.5, status="ok", **kw):
    return TrialRecord(
        trial=trial,
        proposal=proposal,
        status=status,
        genome={},
        recipe_hash=f"h{proposal}",
        fitness=None if status == "failed" else [fit],
        scores={} if status == "failed" else {"t": {"acc": fit, "f1": 1 - fit}},
        seconds={"total": total},
        worker=worker,
        finished_at=start + total + 0.01,
        started_at=start,
        **kw,
    )


def synthetic() -> list[TrialRecord]:
    """Session 1: A busy [100,110] and [112,120], B [101,109] and [115,120] (failed); a stop;
    session 2: C busy [200,205] and [205,210] (one candidate raced over two rungs)."""
    return [
        rec(0, 0, "B", 101, 8, fit=0.2),
        rec(1, 1, "A", 100, 10, fit=0.4),
        rec(2, 2, "A", 112, 8, fit=0.3),
        rec(3, 3, "B", 115, 5, status="failed"),
        TrialRecord(4, 4, "duplicate", {}, "h2", fitness=[0.3], duplicate_of=2, finished_at=121),
        rec(5, 5, "C", 200, 5, fit=0.9, rung=0, fidelity=0.4),
        rec(6, 5, "C", 205, 5, fit=0.6, rung=1),
    ]


def test_utilization_equals_the_hand_computed_numbers():
    use = utilization(evaluation_intervals(synthetic()))
    assert use.sessions == ((100, 120), (200, 210))  # the stop between counts for nobody
    assert use.workers == ("A", "B", "C")
    assert use.busy == pytest.approx({"A": 18, "B": 13, "C": 10})
    assert use.available == pytest.approx({"A": 20, "B": 20, "C": 10})
    assert use.fraction == pytest.approx(41 / 50)
    assert (use.of("A"), use.of("B"), use.of("C")) == pytest.approx((0.9, 0.65, 1.0))
    fig = utilization_figure(synthetic())
    ax = fig.axes[0]
    assert ax.get_title() == "worker utilization 82.0% (3 workers, 2 sessions, red: failed)"
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["A (90%)", "B (65%)", "C (100%)"]
    assert ax.get_xlim() == pytest.approx((0, 30))  # 20 s + 10 s, the 80 s stop cut out


def test_generation_blocks_and_best_so_far():
    recs = synthetic()
    # blocks of 4 proposals; the failed one left out; the raced candidate by its last line;
    # the duplicate with the fitness it repeats
    assert generation_fitness(recs, 4) == [[0.2, 0.4, 0.3], [0.3, 0.6]]
    assert generation_fitness(recs, 2) == [[0.2, 0.4], [0.3], [0.3, 0.6]]
    steps = best_so_far(recs)  # trial 5 is a partial estimate: never the best
    assert [(x, b.trial) for x, b in steps] == [
        (0, 0),
        (1, 1),
        (2, 1),
        (3, 1),
        (4, 1),
        (5, 1),
        (6, 6),
    ]
    assert best_so_far(recs[3:4]) == []


def test_generation_size_is_the_optimizers_own():
    import cma
    import optuna

    n = 15
    es = cma.CMAEvolutionStrategy([0.5] * n, 0.3, {"verbose": -9})
    assert generation_size("cma", {}, n) == (es.popsize, True)
    assert generation_size("cma", {"popsize": 6, "sigma0": 0.2}, n) == (6, True)
    nsga = optuna.samplers.NSGAIISampler()
    assert generation_size("optuna_nsga2", {}, n) == (nsga._population_size, False)
    assert generation_size("optuna_nsga2", {"population_size": 8}, n) == (8, False)
    assert generation_size("optuna_tpe", {}, n) == (es.popsize, False)


def assert_png(data: bytes) -> tuple[int, int]:
    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    Image.open(io.BytesIO(data)).verify()  # the whole file, not only its header
    size = Image.open(io.BytesIO(data)).size
    assert min(size) > 100
    return size


def test_plots_are_valid_pngs_and_skip_what_does_not_apply():
    plots = progress_plots(synthetic(), 4, True, "cma")
    assert sorted(plots) == ["best_scores.png", "generations.png", "utilization.png"]
    for data in plots.values():
        assert_png(data)
    failed_only = [synthetic()[3]]
    assert sorted(progress_plots(failed_only, 4, False)) == ["utilization.png"]
    assert progress_plots([], 4, False) == {}


def test_report_writes_the_plots_of_a_real_run(tmp_path, capsys):
    study = make_tiny_study(tmp_path / "s", max_trials=12)
    assert main(["run", str(study), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 0
    run = tmp_path / "runs" / "tiny"
    recs = RunStore(run).read_trials()
    ivs = evaluation_intervals(recs)
    assert len(ivs) == len([r for r in recs if r.status != "duplicate"]) > 0
    for r in recs:  # the worker's start + its seconds end before the controller appends
        if r.status != "duplicate":
            assert 0 < r.started_at <= r.started_at + r.seconds["total"] <= r.finished_at + 1e-3
    ends = sorted((iv.start, iv.end) for iv in ivs)  # one local worker: one at a time
    assert all(a[1] <= b[0] + 1e-3 for a, b in itertools.pairwise(ends))
    assert 0 < utilization(ivs).fraction <= 1
    capsys.readouterr()
    assert main(["report", str(run), "--no-heldout", "--quiet"]) == 0
    out = capsys.readouterr().out
    for name in ("best_scores.png", "generations.png", "utilization.png"):
        assert_png((run / "report" / name).read_bytes())
        assert name in out

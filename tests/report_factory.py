"""Finished tiny runs for the report and export tests, and the CLI called in process."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import yaml

from evomerge.cli import main
from tests.study_factory import make_tiny_study, write_task

DATA = Path(__file__).parent / "data" / "report"


def cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def _run(root: Path, study: Path) -> Path:
    code, _, err = cli(["run", str(study), "--runs-dir", str(root / "runs"), "--quiet"])
    assert code == 0, err
    return root / "runs" / "tiny"


def ties_run(root: Path) -> Path:
    """A finished 4-trial TIES study (deterministic method, base model, per-layer values)."""
    return _run(root, make_tiny_study(root, preset="ties", max_trials=4))


def method_choice_run(root: Path) -> Path:
    """NSGA-II over a method choice (linear / task arithmetic / TIES), two search objectives:
    its recipes mix methods (so mergekit cannot express them) and it has a Pareto plot."""
    study = make_tiny_study(
        root,
        optimizer={"name": "optuna_nsga2", "population_size": 4},
        max_trials=6,
        preset="method_choice",
    )
    write_task(root / "tasks", "tiny_search2", seed=3)
    data = yaml.safe_load(study.read_text())
    data["tasks"]["search"] = ["tiny_search", "tiny_search2"]
    data["objective"] = {"multi": True}
    study.write_text(yaml.safe_dump(data))
    return _run(root, study)

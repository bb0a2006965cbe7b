"""`evomerge demo` end to end on the small zoo: zoo, search, export, held-out table; a second run
reuses everything and a larger budget resumes the finished study."""

from __future__ import annotations

import contextlib
import io
import json

from evomerge.cli import main
from evomerge.runstore import RunStore
from evomerge.zoo import task_names


def cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def test_demo_runs_exports_and_prints_the_heldout_table(tmp_path):
    args = ["demo", "--small", "--runs-dir", str(tmp_path), "--max-trials", "6", "--quiet"]
    code, out, err = cli(args)
    assert code == 0, err
    run_dir = tmp_path / "zoo-demo"
    assert len(RunStore(run_dir).read_trials()) == 6
    export = run_dir / "export"
    assert (export / "model.safetensors").is_file() or any(export.glob("model-*.safetensors"))
    report = json.loads((export / "report.json").read_text())
    kinds = {row["kind"] for row in report["heldout"]}
    assert {"evolved", "parent", "uniform", "task_arithmetic", "ties"} <= kinds
    for row in report["heldout"]:
        assert set(row["tasks"]) == set(task_names("heldout"))
        assert 0.0 <= row["mean"] <= 1.0
    assert "held-out report" in out and "demo done in" in out
    for task in task_names("heldout"):
        assert task in out

    code, out, err = cli(args)  # everything reused: no new trial
    assert code == 0, err
    assert "is finished (6 trials); reusing it" in out
    assert len(RunStore(run_dir).read_trials()) == 6

    code, out, err = cli([*args[:-2], "8", "--quiet"])  # a larger budget resumes the study
    assert code == 0, err
    assert "resuming" in out
    assert len(RunStore(run_dir).read_trials()) == 8

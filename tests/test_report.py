"""`evomerge report`, the baselines table, the output ensemble, plots and the notebook, on a
multi-objective study whose recipes mix methods (so mergekit cannot express them)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.errors import ConfigError, RunDirError
from evomerge.plots import coefficient_panels, pareto_front
from evomerge.recipe import Recipe, Section
from evomerge.report import format_heldout_table, select_trial, table_cells
from evomerge.runstore import RunStore, TrialRecord, best_trial
from tests.study_factory import make_tiny_study, write_task

PNG = b"\x89PNG\r\n\x1a\n"


def cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """NSGA-II over a method choice (linear / task arithmetic / TIES), two search objectives."""
    root = tmp_path_factory.mktemp("rep")
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
    code, _, err = cli(["run", str(study), "--runs-dir", str(root / "runs"), "--quiet"])
    assert code == 0, err
    return root / "runs" / "tiny"


@pytest.fixture(scope="module")
def reported(run_dir) -> tuple[dict, str]:
    code, stdout, err = cli(["report", str(run_dir), "--quiet"])
    assert code == 0, err
    return json.loads((run_dir / "report" / "report.json").read_text()), stdout


def test_report_writes_json_and_plots_and_prints_tables(run_dir, reported):
    report, stdout = reported
    best = best_trial(RunStore(run_dir).read_trials())
    for name in ("fitness.png", "coefficients.png", "pareto.png"):
        assert (run_dir / "report" / name).read_bytes()[:8] == PNG, name
    assert report["scored"] and report["trial"]["trial"] == best.trial
    assert report["run"]["objectives"] == ["tiny_search/acc", "tiny_search2/acc"]
    for split, tasks in (
        ("heldout", ["tiny_heldout"]),
        ("search", ["tiny_search", "tiny_search2"]),
    ):
        kinds = [r["kind"] for r in report[split]]
        assert kinds == ["evolved", "parent", "parent", "uniform", "task_arithmetic", "ties",
                         "greedy_soup", "ensemble"]  # fmt: skip
        for r in report[split]:
            assert list(r["tasks"]) == tasks
            assert math.isclose(r["mean"], statistics.fmean(r["tasks"].values()))
    assert report["search"][0]["metrics"] == best.scores
    assert f"trial {best.trial} (best)" in stdout and "held-out report: tiny" in stdout
    assert "output ensemble (2 parents)" in stdout and "pareto.png" in stdout


def test_greedy_soup_follows_the_search_scores(reported):
    """Two sources: the soup is the better parent alone, or both (then it is the uniform row)."""
    report, _ = reported
    rows = {r["name"]: r for r in report["search"]}
    fit = {s: sum(rows[f"parent {s}"]["tasks"].values()) for s in ("s1", "s2")}
    first = max(fit, key=lambda s: (fit[s], s == "s1"))
    members = report["greedy_soup"]
    assert members[0] == first
    soup = next(r for r in report["search"] if r["kind"] == "greedy_soup")
    if len(members) == 1:
        assert soup["tasks"] == rows[f"parent {first}"]["tasks"]
    else:
        uniform = rows["uniform average"]
        assert soup["tasks"] == uniform["tasks"] and sum(uniform["tasks"].values()) >= fit[first]


def test_second_report_reuses_the_cache(run_dir, reported):
    code, stdout, err = cli(["report", str(run_dir), "--no-heldout", "--json", "--quiet"])
    assert code == 0, err
    again = json.loads(stdout)
    assert again["cached"] and again["heldout"] == reported[0]["heldout"]


def test_ensemble_row_equals_ensemble_of_fresh_models(run_dir, reported):
    """The swapping ensemble inside the report scores like one built from separate models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.ensemble import EnsembleForCausalLM
    from evomerge.scoring import Scorer, ScoringConfig

    models = run_dir.parent.parent / "models"
    parents = [AutoModelForCausalLM.from_pretrained(models / s).eval() for s in ("s1", "s2")]
    tok = AutoTokenizer.from_pretrained(models / "s1")
    config = ScoringConfig(tasks=("tiny_heldout",), include_paths=(str(models.parent / "tasks"),),
                           batch_size=8)  # fmt: skip
    got = Scorer(EnsembleForCausalLM.of_models(parents), tok, config, fitness=False).score()
    row = next(r for r in reported[0]["heldout"] if r["kind"] == "ensemble")
    assert got.metrics == row["metrics"]


def test_ensemble_is_the_mean_of_the_parents_probabilities(run_dir):
    from transformers import AutoModelForCausalLM

    from evomerge.ensemble import EnsembleForCausalLM

    models = run_dir.parent.parent / "models"
    parents = [AutoModelForCausalLM.from_pretrained(models / s).eval() for s in ("s1", "s2")]
    x = torch.tensor([[2, 5, 7, 9, 11], [3, 4, 8, 8, 20]])
    with torch.no_grad():
        probs = torch.stack([torch.softmax(m(x).logits.double(), -1) for m in parents]).mean(0)
    ens = EnsembleForCausalLM.of_models(parents)
    torch.testing.assert_close(ens(x).logits.double(), probs.log(), rtol=0, atol=1e-5)
    live = AutoModelForCausalLM.from_pretrained(models / "base").eval()
    states = [m.state_dict() for m in parents]
    swap = EnsembleForCausalLM.swapping(live, [lambda s=s: live.load_state_dict(s) for s in states])
    assert torch.equal(swap(x).logits, ens(x).logits)
    # generation on a left-padded batch: positions follow the mask and each member keeps its own
    # KV cache; a duplicated member generates what the model does, two members what greedy
    # decoding of the mean distribution (recomputed in full every step) gives
    x = torch.tensor([[1, 1, 2, 5, 7], [3, 4, 8, 8, 20], [1, 9, 9, 30, 31]])
    mask = (x != 1).long()
    kw = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 1}
    twice = EnsembleForCausalLM.of_models([parents[0], parents[0]]).generate(input_ids=x, **kw)
    assert torch.equal(twice, parents[0].generate(input_ids=x, **kw))
    seq, m = x, mask
    with torch.no_grad():
        for _ in range(5):
            pos = (m.cumsum(-1) - 1).clamp_min(0)
            p = torch.stack(
                [torch.softmax(mm(input_ids=seq, attention_mask=m, position_ids=pos).logits[:, -1].double(), -1)
                 for mm in parents]
            ).mean(0)  # fmt: skip
            seq = torch.cat([seq, p.argmax(-1, keepdim=True)], dim=1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
    assert torch.equal(swap.generate(input_ids=x, **kw), seq)


def test_export_of_a_mixed_method_trial_explains_missing_mergekit_yaml(run_dir, tmp_path):
    from evomerge.report import open_run

    records = RunStore(run_dir).read_trials()
    mixed = None
    for r in records:
        if r.ok and len({s.method for s in open_run(run_dir, r.trial).recipe.sections}) > 1:
            mixed = r.trial
            break
    assert mixed is not None, "no trial mixes methods"
    out = tmp_path / "mixed"
    code, stdout, err = cli(["export", str(run_dir), "--out", str(out), "--trial", str(mixed),
                             "--no-report", "--quiet"])  # fmt: skip
    assert code == 0, err
    assert not (out / "mergekit.yaml").exists()
    assert "no mergekit.yaml: mergekit applies one merge method per config" in stdout
    assert "No `mergekit.yaml`: mergekit cannot reproduce" in (out / "README.md").read_text()
    assert (out / "plots" / "pareto.png").read_bytes()[:8] == PNG


def test_notebook_runs_on_the_run(run_dir, reported, tmp_path, monkeypatch):
    """The notebook shows the cached table and the three plots (the kernel inherits our env)."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    path = Path(__file__).resolve().parents[1] / "notebooks" / "analyze_study.ipynb"
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("EVOMERGE_RUN_DIR", str(run_dir))
    monkeypatch.setenv("EVOMERGE_COMPUTE_HELDOUT", "0")  # the table comes from the cache
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "held-out report: tiny" in text and "output ensemble" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # fitness, coefficients, pareto
    assert not [o for o in outputs if o.output_type == "error"]


# ---------------------------------------------------------------------------- pure parts


def _record(trial: int, status: str = "ok", fitness=(0.5,), dup=None) -> TrialRecord:
    return TrialRecord(trial=trial, proposal=trial, status=status, genome={}, recipe_hash=str(trial),
                       fitness=list(fitness) if fitness else None, duplicate_of=dup)  # fmt: skip


def test_select_trial_rules(tmp_path):
    recs = [_record(0, fitness=(0.2,)), _record(1, "failed", None), _record(2, fitness=(0.7,)),
            _record(3, "duplicate", (0.2,), dup=0)]  # fmt: skip
    assert select_trial(recs, None, tmp_path).trial == 2
    assert select_trial(recs, 3, tmp_path).trial == 0  # a duplicate stands for its original
    with pytest.raises(ConfigError, match="failed"):
        select_trial(recs, 1, tmp_path)
    with pytest.raises(ConfigError, match="no such trial"):
        select_trial(recs, 7, tmp_path)
    with pytest.raises(RunDirError, match="no successful trial"):
        select_trial([recs[1]], None, tmp_path)


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


def test_table_marks_best_merge_and_reports_failures():
    def row(name, kind, v, err=None):
        r = {"name": name, "kind": kind, "mean": v, "tasks": {"t": v}}
        return {**r, "error": err} if err else r

    report = {
        "run": {"name": "x"},
        "primary_metrics": {"search": {"t": {"metric": "acc", "higher_is_better": True}}},
        "search": [row("evolved", "evolved", 0.6), row("p", "parent", 0.5),
                   row("bad", "ties", None, "the model produced NaN"), row("ens", "ensemble", 0.9)],
        "heldout": [],
        "notes": [],
    }  # fmt: skip
    header, rows, notes = table_cells(report)
    assert header == ["model", "kind", "search: t (acc)"]
    assert [r[2] for r in rows] == ["0.600*", "0.500", "-", "0.900"]
    assert notes == ["bad failed on the search tasks: the model produced NaN"]
    assert "bad failed on the search tasks" in format_heldout_table(report)
    tie = {**report, "search": [row("a", "evolved", 0.0), row("b", "parent", 0.0)]}
    assert [r[2] for r in table_cells(tie)[1]] == ["0.000", "0.000"]  # all tie: no mark


GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{q}}}} A:"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_ensemble_generates_through_lm_eval(run_dir, tmp_path):
    """generate_until through HFLM: an ensemble of one model twice generates what the model
    does (targets = s1's own greedy answers for half the questions), and swapping weights into
    one live model generates what separate members do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.ensemble import EnsembleForCausalLM
    from evomerge.scoring import Scorer, ScoringConfig
    from tests.study_factory import WORDS

    models = run_dir.parent.parent / "models"
    tok = AutoTokenizer.from_pretrained(models / "s1")
    s1, s2 = (AutoModelForCausalLM.from_pretrained(models / s).eval() for s in ("s1", "s2"))
    rows = []
    for i in range(8):
        q = " ".join(WORDS[3 * i : 3 * i + 3])
        ids = tok(f"Q: {q} A:", return_tensors="pt").input_ids
        gen = s1.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        answer = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        rows.append({"q": q, "a": answer if i % 2 == 0 else "nope"})
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_gen.yaml").write_text(GEN_TASK.format(data=tmp_path / "g.jsonl"))
    config = ScoringConfig(tasks=("tiny_gen",), include_paths=(str(tmp_path),), batch_size=4)

    def score(model):
        return Scorer(model, tok, config, fitness=False).score().metrics["tiny_gen"]["exact_match"]

    assert score(s1) == 0.5
    assert score(EnsembleForCausalLM.of_models([s1, s1])) == 0.5
    separate = score(EnsembleForCausalLM.of_models([s1, s2]))
    live = AutoModelForCausalLM.from_pretrained(models / "base").eval()
    states = [s1.state_dict(), s2.state_dict()]
    swap = EnsembleForCausalLM.swapping(live, [lambda s=s: live.load_state_dict(s) for s in states])
    assert score(swap) == separate

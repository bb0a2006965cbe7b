"""The lm-eval adapter: each internal it relies on, checked against lm-eval's own behaviour.

These are the tests to run (with the "equals simple_evaluate" tests of test_scoring.py) before
widening the lm-eval bound in pyproject.toml: each fails when lm-eval changes what we rely on.
"""

from __future__ import annotations

import ast
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import torch
from test_scoring import MC_YAML, _jsonl, _load, _reference, build_scoring_zoo

from evomerge.errors import TaskError
from evomerge.scoring import Scorer, ScoringSettings, check_tasks
from evomerge.scoring.catalog import resolve_tasks, task_manager
from evomerge.scoring.lm_eval_adapter import index
from evomerge.scoring.lm_eval_adapter.runtime import seeded
from evomerge.scoring.lm_eval_adapter.tasks import TaskSuite

EVOMERGE = Path(__file__).resolve().parents[1] / "evomerge"
ADAPTER = EVOMERGE / "scoring" / "lm_eval_adapter"


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return build_scoring_zoo(tmp_path_factory.mktemp("adapter"))


# ---------------------------------------------------------------------- one place


def _lm_eval_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every lm_eval import in a file, top level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.split(".")[0] == "lm_eval"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lm_eval":
            found += [(node.module or "", a.name) for a in node.names]
    return found


PUBLIC = {
    ("lm_eval", ""),
    ("lm_eval.tasks", "TaskManager"),
    ("lm_eval.models.huggingface", "HFLM"),
}
INTERNAL_NAMES = ("_loglikelihood_tokens", "_model_call", "tok_batch_encode", "setattr(task")


def test_only_the_adapter_uses_lm_eval_internals():
    outside = [p for p in EVOMERGE.rglob("*.py") if ADAPTER not in p.parents]
    for path in outside:
        imports = set(_lm_eval_imports(path))
        assert imports <= PUBLIC, f"{path}: {sorted(imports - PUBLIC)} belongs in the adapter"
        text = path.read_text()
        for name in INTERNAL_NAMES:
            assert name not in text, f"{path} uses {name}: move it to the adapter"
    inside = {i for p in ADAPTER.rglob("*.py") for i in _lm_eval_imports(p)}
    assert ("lm_eval.tasks._index", "TaskIndex") in inside  # the scan sees the adapter's own


def test_importing_the_adapter_imports_neither_lm_eval_nor_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import evomerge.scoring, evomerge.scoring.lm_eval_adapter.tasks\n"
        "import evomerge.scoring.lm_eval_adapter.model, evomerge.scoring.lm_eval_adapter.index\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lm_eval', 'torch'}))\n"
        "print(sorted(n for n in ('bench_scoring', 'fresh_evaluate') if hasattr(evomerge.scoring, n)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "[]"], out.stdout  # cheap, and no bench helpers exported


# ---------------------------------------------------------------------- model: HFLM subclass


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_planned_loglikelihood_equals_lm_evals_loop(zoo, batch_size):
    """The replayed plan gives lm-eval's (log-probability, is-greedy) answers bit for bit, in
    request order, including one-token continuations that share one forward row."""
    from lm_eval.models.huggingface import HFLM

    cfg = ScoringSettings(
        tasks=("tiny_mc", "tiny_mc2"),
        include_paths=(zoo.tasks,),
        num_fewshot=1,
        batch_size=batch_size,
    )
    model, tok = _load(zoo.a)
    scorer = Scorer(model, tok, cfg)
    tokens = scorer.suite.ll_tokens
    plan = scorer.lm._plans[id(tokens)]
    assert plan is not None and plan.requests is tokens
    rows = sum(b.inputs.shape[0] for b in plan.batches)
    answers = sum(len(b.spans) for b in plan.batches)
    assert rows < answers == len(tokens)  # single-word choices share their context row
    with torch.no_grad():
        want = HFLM._loglikelihood_tokens(scorer.lm, list(tokens), disable_tqdm=True)
        got = scorer.lm.run_loglikelihood(tokens)
    assert got == want
    assert len({a for a, _ in got}) > 10  # distinct numbers: a wrong order could not pass


def test_captured_tokens_are_lm_evals_tokenization(zoo):
    from lm_eval.models.huggingface import HFLM

    cfg = ScoringSettings(tasks=("tiny_mc",), include_paths=(zoo.tasks,), limit=3)
    scorer = Scorer(*_load(zoo.a), cfg)
    instances = scorer.suite._requests["loglikelihood"]
    seen: list = []
    real = HFLM._loglikelihood_tokens

    def spy(self, requests, disable_tqdm=False, override_bs=None):
        seen.extend(requests)
        return real(self, requests, disable_tqdm, override_bs)

    plain = HFLM(pretrained=scorer.model, tokenizer=scorer.lm.tokenizer, batch_size=16)
    plain._loglikelihood_tokens = spy.__get__(plain)
    with torch.no_grad():
        plain.loglikelihood(instances, disable_tqdm=True)
    assert [(ctx, cont) for _, ctx, cont in seen] == [
        (ctx, cont) for _, ctx, cont in scorer.suite.ll_tokens
    ]


def test_prompt_encodings_are_cached_and_equal_to_hflms(zoo):
    from lm_eval.models.huggingface import HFLM

    cfg = ScoringSettings(tasks=("tiny_gen",), include_paths=(zoo.tasks,), limit=4, batch_size=2)
    scorer = Scorer(*_load(zoo.a), cfg)
    first = scorer.score().metrics
    cached = dict(scorer.lm._encoded or {})
    assert cached  # generate_until encoded its prompt batches through the cache
    assert scorer.score().metrics == first
    assert {k: id(v) for k, v in scorer.lm._encoded.items()} == {
        k: id(v) for k, v in cached.items()
    }  # the second candidate encoded nothing
    for (strings, side, trunc_len, trunc), (ids, mask) in cached.items():
        want_ids, want_mask = HFLM.tok_batch_encode(
            scorer.lm, list(strings), side, trunc_len, trunc
        )
        assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)


# ---------------------------------------------------------------------- tasks: evaluate() split


def test_doc_fields_are_memoized_on_this_suites_instances_only(zoo):
    from lm_eval.api.task import ConfigurableTask

    cfg = ScoringSettings(tasks=("tiny_mc",), include_paths=(zoo.tasks,), limit=5)
    scorer = Scorer(*_load(zoo.a), cfg)
    task = scorer.suite.tasks["tiny_mc"]
    assert {"doc_to_choice", "doc_to_target", "doc_to_text"} <= set(vars(task))
    assert type(task).doc_to_choice is ConfigurableTask.doc_to_choice  # the class is untouched
    for doc, _ in scorer.suite._docs["tiny_mc"]:
        assert task.doc_to_choice(doc) == ConfigurableTask.doc_to_choice(task, doc)
        assert task.doc_to_target(doc) == ConfigurableTask.doc_to_target(task, doc)
    other = {"q": "w1", "choices": ["w7", "w8"], "label": 1}  # not a held doc: rendered anew
    assert task.doc_to_choice(other) == ["w7", "w8"] and task.doc_to_target(other) == 1


def test_fraction_limits_round_up_as_lm_eval_does(zoo):
    cfg = ScoringSettings(tasks=("tiny_mc", "tiny_mc2"), include_paths=(zoo.tasks,), limit=0.3)
    result = Scorer(*_load(zoo.a), cfg).score()
    assert result.samples == {"tiny_mc": 8, "tiny_mc2": 3}  # ceil(24 * 0.3), ceil(10 * 0.3)
    assert result.metrics == _reference(zoo.a, cfg)


def test_nested_groups_aggregate_children_first_as_simple_evaluate(zoo, tmp_path):
    outer = "group: tiny_outer\ntask: [tiny_group]\naggregate_metric_list:\n  - metric: acc\n"
    (tmp_path / "outer.yaml").write_text(outer)
    cfg = ScoringSettings(tasks=("tiny_outer",), include_paths=(zoo.tasks, str(tmp_path)))
    scorer = Scorer(*_load(zoo.a), cfg, fitness=False)
    facts = scorer.suite.group_facts()
    assert [g.name for g in facts] == ["tiny_group", "tiny_outer"]
    assert facts[1].leaves == ("tiny_mc", "tiny_mc2")
    assert facts[1].aggregate_metric_list == [{"metric": "acc", "filter_list": None}]
    result = scorer.score()
    assert result.metrics == _reference(zoo.a, cfg)
    assert set(result.metrics) >= {"tiny_outer", "tiny_mc", "tiny_mc2"}


def test_a_task_that_cannot_be_built_is_one_task_error(zoo, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("{not json\n")
    (tmp_path / "bad.yaml").write_text(MC_YAML.format(name="tiny_bad", data=data))
    cfg = ScoringSettings(tasks=("tiny_bad",), include_paths=(str(tmp_path),))
    with pytest.raises(TaskError, match=r"^tasks tiny_bad could not be built: \w+") as exc:
        TaskSuite(resolve_tasks(cfg), cfg.tasks)
    assert "\n" not in str(exc.value)


# ---------------------------------------------------------------------- index and registry


def test_index_entries_for_tasks_groups_tags_and_paths(zoo, tmp_path):
    tm = resolve_tasks(ScoringSettings(tasks=("tiny_group",), include_paths=(zoo.tasks,)))
    group = index.entry(tm, "tiny_group")
    assert (group.kind, group.cfg["task"]) == ("GROUP", ["tiny_mc", "tiny_mc2"])
    task = index.entry(tm, "tiny_mc")
    assert (task.kind, task.cfg["output_type"]) == ("TASK", "multiple_choice")
    by_path = index.entry(tm, str(Path(zoo.tasks) / "tiny_mc.yaml"))
    assert (by_path.name, by_path.cfg["output_type"]) == ("tiny_mc", "multiple_choice")
    assert index.indexed(tm, "tiny_nothing") is None
    with pytest.raises(TaskError, match="tiny_nothing"):
        index.entry(tm, "tiny_nothing")

    data = _jsonl(tmp_path / "d.jsonl", [{"q": "w1", "choices": ["w2", "w3"], "label": 0}])
    for name in ("tiny_t1", "tiny_t2"):
        text = MC_YAML.format(name=name, data=data) + "tag: tiny_tag\n"
        (tmp_path / f"{name}.yaml").write_text(text)
    tag = index.entry(task_manager((str(tmp_path),), False), "tiny_tag")
    assert (tag.kind, tag.tags, tag.cfg) == ("TAG", frozenset({"tiny_t1", "tiny_t2"}), {})
    cfg = ScoringSettings(tasks=("tiny_tag",), include_paths=(str(tmp_path),))
    assert list(check_tasks(cfg)) == ["tiny_t1", "tiny_t2"]


def test_index_error_is_what_lm_eval_skips(zoo, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: zz\ndoc_to_text: [unclosed\n")
    shapeless = tmp_path / "shapeless.yaml"
    shapeless.write_text("dataset_path: json\n")  # neither task nor group: lm-eval skips it
    assert index.index_error(broken) is not None
    assert "Unknown config shape" in str(index.index_error(shapeless))
    assert index.index_error(Path(zoo.tasks) / "tiny_mc.yaml") is None
    assert "zz" not in task_manager((str(tmp_path),), False).task_index  # lm-eval did skip both


def test_metric_registry_and_builtin_names():
    assert index.higher_is_better("acc") is True
    assert index.higher_is_better("brier_score") is False
    assert index.higher_is_better("tiny_custom_metric") is None
    assert index.default_metrics("multiple_choice") == ["acc", "acc_norm"]
    assert index.default_metrics("no_such_output_type") == []
    names = index.builtin_names()
    assert {"arc_easy", "hellaswag", "mmlu"} <= set(names)
    assert "arc_easy" in index.builtin_yaml_text()


def test_builtin_task_group_yaml_is_read_like_the_index():
    """The built-in tasks are YAMLs under lm_eval/tasks, each a task, group or tag (sampled)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    arc = sorted(root.glob("arc/arc_easy.yaml"))
    assert arc, "lm-eval moved its built-in task YAMLs: index.builtin_yaml_text reads them there"
    assert index.index_error(arc[0]) is None


# ---------------------------------------------------------------------- runtime


def test_seeded_seeds_like_simple_evaluate_and_restores_the_callers_rng():
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    with seeded(7, torch.device("cpu")):
        inside = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    torch.manual_seed(7)
    assert inside == (
        random.Random(0).random(),  # simple_evaluate's random_seed=0
        float(np.random.RandomState(1234).rand()),  # its numpy_random_seed=1234
        float(torch.rand(1)),  # its torch_random_seed, ours `seed`
    )


def test_lm_evals_logger_names_are_the_ones_we_quiet(zoo, caplog):
    """The loggers the runtime quiets are lm-eval's under those names, and the warning goes."""
    import logging

    import lm_eval.api.task
    import lm_eval.models.huggingface
    from lm_eval.models.huggingface import HFLM

    from evomerge.scoring.lm_eval_adapter.model import resident_lm

    assert lm_eval.api.task.eval_logger.name == "lm_eval.api.task"
    assert lm_eval.models.huggingface.eval_logger.name == "lm_eval.models.huggingface"
    model, tok = _load(zoo.a)
    with caplog.at_level(logging.WARNING, logger="lm_eval.models.huggingface"):
        HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    assert any("not of type `str`" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lm_eval.models.huggingface"):
        resident_lm(model, tok, 1)
    assert not caplog.records

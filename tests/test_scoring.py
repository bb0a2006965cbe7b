"""The resident scorer against lm-eval's own `simple_evaluate`, on tiny random Llamas.

Everything is built here: a word-level tokenizer, two random 2-layer Llamas saved as
safetensors, and three local tasks (multiple choice, generate_until with a filter, a group).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from evomerge.bench.scoring_bench import bench_scoring
from evomerge.errors import CandidateError, MissingPathError, TaskError
from evomerge.objective import MetricTerm, ObjectiveConfig
from evomerge.scoring import (
    PublicBenchmarkWarning,
    Scorer,
    ScoringSettings,
    check_tasks,
    describe_tasks,
    public_benchmarks,
)

WORDS = [f"w{i}" for i in range(90)]
SPECIAL = ["<unk>", "<pad>", "<s>", "</s>"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL, *WORDS, "Q:", "A:"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def _model(seed: int, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        initializer_range=0.5,  # decisive logits: greedy answers do not flip on rounding
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{q}}}} A:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: brier_score
    aggregation: brier_score
    higher_is_better: false
"""

GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{q}}}} A:"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["Q:"]
  max_gen_toks: 3
  do_sample: false
filter_list:
  - name: first-word
    filter:
      - function: regex
        regex_pattern: "(w[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

GROUP_YAML = """group: tiny_group
task: [tiny_mc, tiny_mc2]
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
"""


def build_scoring_zoo(root: Path) -> SimpleNamespace:
    """Models a and b (random), a tokenizer, and a folder of task YAMLs with local data."""
    tok = _tokenizer()
    paths = {}
    for name, seed in (("a", 0), ("b", 1)):
        paths[name] = root / name
        _model(seed, len(tok)).save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    tasks = root / "tasks"
    tasks.mkdir()
    rng = random.Random(0)
    for name, n in (("tiny_mc", 24), ("tiny_mc2", 10)):
        rows = [
            {
                "q": " ".join(rng.sample(WORDS, 4)),
                "choices": rng.sample(WORDS, 3),
                "label": rng.randrange(3),
            }
            for _ in range(n)
        ]
        data = _jsonl(root / f"{name}.jsonl", rows)
        (tasks / f"{name}.yaml").write_text(MC_YAML.format(name=name, data=data))
    # Half the generation targets are model a's own greedy word, so exact_match is not 0.
    model_a = _load(paths["a"])[0]
    gen = []
    for i in range(12):
        q = " ".join(rng.sample(WORDS, 3))
        ids = torch.tensor([tok.encode(f"Q: {q} A:")])
        with torch.no_grad():
            first = model_a.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=1)[0, -1]
        answer = tok.decode([int(first)]) if i % 2 == 0 else rng.choice(WORDS)
        gen.append({"q": q, "a": answer})
    (tasks / "tiny_gen.yaml").write_text(GEN_YAML.format(data=_jsonl(root / "gen.jsonl", gen)))
    (tasks / "tiny_group.yaml").write_text(GROUP_YAML)
    return SimpleNamespace(root=root, tasks=str(tasks), a=paths["a"], b=paths["b"])


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return build_scoring_zoo(tmp_path_factory.mktemp("scoring"))


def _reference(model_dir: Path, config: ScoringSettings) -> dict[str, dict[str, float]]:
    """Independent reference: a fresh load and plain lm_eval.simple_evaluate."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = _load(model_dir)
    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=config.batch_size),
        tasks=list(config.tasks),
        task_manager=TaskManager(include_path=list(config.include_paths), include_defaults=False),
        limit=config.limit,
        num_fewshot=config.num_fewshot,
        bootstrap_iters=0,
        log_samples=False,
    )
    return {
        task: {
            k.removesuffix(",none"): v for k, v in res.items() if "," in k and "_stderr" not in k
        }
        for task, res in out["results"].items()
        if any("," in k for k in res)
    }


def _swap_in(resident: torch.nn.Module, source_dir: Path) -> None:
    """What a worker does per candidate: copy new weights into the resident model in place."""
    source = _load(source_dir)[0].state_dict()
    with torch.no_grad():
        for name, param in resident.state_dict().items():
            param.copy_(source[name])


def test_check_tasks_lists_metrics_without_a_model(zoo):
    cfg = ScoringSettings(tasks=("tiny_mc", "tiny_gen", "tiny_group"), include_paths=(zoo.tasks,))
    assert check_tasks(cfg) == {
        "tiny_mc": ["acc", "brier_score"],
        "tiny_gen": ["exact_match,first-word"],
        "tiny_group": ["acc"],
    }
    info = describe_tasks(cfg)
    assert info["tiny_mc"].higher_is_better == {"acc": True, "brier_score": False}


def test_bad_task_configs_fail_with_one_clear_line(zoo, tmp_path):
    with pytest.raises(TaskError, match=r"unknown task 'tiny_mcc'.*did you mean 'tiny_mc'"):
        check_tasks(ScoringSettings(tasks=("tiny_mcc",), include_paths=(zoo.tasks,)))
    with pytest.raises(MissingPathError, match=r"include path .*nowhere does not exist"):
        check_tasks(ScoringSettings(tasks=("tiny_mc",), include_paths=(str(tmp_path / "nowhere"),)))
    # a task whose data file is gone, and a YAML lm-eval cannot parse (it skips those silently)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "lost.yaml").write_text(MC_YAML.format(name="lost", data=tmp_path / "gone.jsonl"))
    (bad / "broken.yaml").write_text("task: zz_broken\ndoc_to_text: [unclosed\n")
    with pytest.raises(
        MissingPathError, match=r"task 'lost': data file .*gone.jsonl does not exist"
    ):
        check_tasks(ScoringSettings(tasks=("lost",), include_paths=(str(bad),)))
    with pytest.raises(TaskError, match=r"unknown task .zz_broken.*broken.yaml"):
        check_tasks(ScoringSettings(tasks=("zz_broken",), include_paths=(str(bad),)))
    # a metric the task does not produce: caught from the YAMLs, before any model is loaded
    from evomerge.objective import Objective

    info = describe_tasks(ScoringSettings(tasks=("tiny_mc",), include_paths=(zoo.tasks,)))
    with pytest.raises(TaskError, match=r"does not produce metric .f1.*acc, brier_score"):
        Objective(ObjectiveConfig(metrics=[MetricTerm(task="tiny_mc", metric="f1")]), info)


def test_weight_swap_scores_like_a_fresh_load_and_simple_evaluate(zoo):
    """Same weights twice: identical. After an in-place swap: the other checkpoint's numbers, as
    lm-eval's simple_evaluate computes them on a fresh load (few-shot, limit, both request types)."""
    cfg = ScoringSettings(
        tasks=("tiny_mc", "tiny_gen"),
        include_paths=(zoo.tasks,),
        limit=10,
        num_fewshot=2,
        batch_size=4,
    )
    resident, tok = _load(zoo.a)
    scorer = Scorer(resident, tok, cfg)
    first = scorer.score()
    assert scorer.score().metrics == first.metrics
    assert first.metrics == _reference(zoo.a, cfg)
    assert first.samples == {"tiny_mc": 10, "tiny_gen": 10}
    assert set(first.metrics["tiny_mc"]) == {"acc", "brier_score"}
    assert all(type(v) is float for m in first.metrics.values() for v in m.values())
    assert 0 < first.forward_seconds <= first.lm_seconds <= first.seconds
    assert first.n_forward > 0

    _swap_in(resident, zoo.b)
    swapped = scorer.score()
    assert swapped.metrics != first.metrics  # else this test could not fail
    assert swapped.metrics == _reference(zoo.b, cfg)  # b loaded fresh from disk

    _swap_in(resident, zoo.a)
    assert scorer.score().metrics == first.metrics


def test_zero_shot_group_and_generation_match_simple_evaluate(zoo):
    cfg = ScoringSettings(tasks=("tiny_group", "tiny_gen"), include_paths=(zoo.tasks,))
    model, tok = _load(zoo.a)
    scorer = Scorer(model, tok, cfg)
    result = scorer.score()
    assert result.metrics == _reference(zoo.a, cfg)
    assert set(result.metrics) == {"tiny_group", "tiny_mc", "tiny_mc2", "tiny_gen"}
    assert result.metrics["tiny_gen"]["exact_match,first-word"] > 0  # a's own answers count
    assert scorer.primary_metrics() == {
        "tiny_group": ("acc", True),
        "tiny_gen": ("exact_match,first-word", True),
    }
    assert scorer.task_metrics() == describe_tasks(cfg)  # YAML reading agrees with built tasks
    objective = scorer.validate(ObjectiveConfig())
    expected = (
        result.metrics["tiny_group"]["acc"] + result.metrics["tiny_gen"]["exact_match,first-word"]
    )
    assert objective.evaluate(result.metrics) == pytest.approx((expected,))


def test_nan_weights_fail_the_candidate_not_the_run(zoo):
    cfg = ScoringSettings(tasks=("tiny_mc", "tiny_gen"), include_paths=(zoo.tasks,), limit=4)
    model, tok = _load(zoo.a)
    scorer = Scorer(model, tok, cfg)
    good = scorer.score().metrics
    with torch.no_grad():
        saved = model.model.norm.weight.clone()
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(CandidateError, match="NaN or inf"):
        scorer.score()
    with torch.no_grad():
        model.model.norm.weight.copy_(saved)
    assert scorer.score().metrics == good


def test_requests_that_tokenize_to_nothing_fail_at_build_not_per_candidate(zoo, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"q": "w1 w2", "choices": ["w3", "w4"], "label": 0}])
    glued = MC_YAML.format(name="glued", data=data) + 'target_delimiter: ""\n'  # "A:w3": one word
    (tmp_path / "glued.yaml").write_text(glued)
    cfg = ScoringSettings(tasks=("glued",), include_paths=(str(tmp_path),))
    with pytest.raises(TaskError, match=r"'glued'.*tokenizes to an empty context or continuation"):
        Scorer(*_load(zoo.a), cfg)


def test_public_benchmark_fitness_tasks_warn(zoo, tmp_path):
    assert public_benchmarks(["gsm8k", "arc_easy", "mmlu_anatomy", "tiny_mc", "mmlux"]) == [
        "gsm8k",
        "arc_easy",
        "mmlu_anatomy",
    ]
    data = tmp_path / "d.jsonl"
    _jsonl(data, [{"q": "w1 w2", "choices": ["w3", "w4"], "label": 0}] * 2)
    (tmp_path / "t.yaml").write_text(MC_YAML.format(name="hellaswag_local", data=data))
    cfg = ScoringSettings(tasks=("hellaswag_local",), include_paths=(str(tmp_path),))
    model, tok = _load(zoo.a)
    with pytest.warns(PublicBenchmarkWarning, match="hellaswag_local"):
        Scorer(model, tok, cfg)


def test_bench_scoring_reports_split_and_agrees_with_fresh_call(zoo):
    cfg = ScoringSettings(tasks=("tiny_mc",), include_paths=(zoo.tasks,), limit=6)
    report = bench_scoring(*_load(zoo.a), cfg, repeats=1)
    assert report["metrics_match"] is True
    assert report["score_s"] > 0 and report["fresh_s"] > 0
    assert report["forward_s"] + report["overhead_s"] == pytest.approx(report["score_s"])
    assert 0 <= report["overhead_frac"] <= 1


def test_eval_command_prints_table_and_json(zoo, capsys):
    from evomerge.cli import main

    args = ["eval", str(zoo.a), "--tasks", "tiny_mc,tiny_gen", "--include-path", zoo.tasks]
    assert main([*args, "--limit", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = ScoringSettings(tasks=("tiny_mc", "tiny_gen"), include_paths=(zoo.tasks,), limit=6)
    assert out["tasks"] == Scorer(*_load(zoo.a), cfg, fitness=False).score().metrics
    assert out["primary"]["tiny_mc"] == {"metric": "acc", "higher_is_better": True}

    assert main([*args, "--limit", "0.25"]) == 0
    table = capsys.readouterr().out
    assert "tiny_gen" in table and "exact_match,first-word" in table and "brier_score" in table


def test_eval_command_user_errors_exit_2(zoo, tmp_path, capsys):
    from evomerge.cli import main

    assert main(["eval", str(tmp_path / "missing"), "--tasks", "tiny_mc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evomerge: error: MODEL_DIR") and "missing" in err and "\n" not in err
    inc = ["--include-path", zoo.tasks]
    assert main(["eval", str(zoo.a), "--tasks", "tiny_mcc", *inc]) == 2
    assert "did you mean 'tiny_mc'" in capsys.readouterr().err
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"")
    assert main(["eval", str(pickled), "--tasks", "tiny_mc", *inc]) == 2
    assert "--allow-pickle" in capsys.readouterr().err

"""A complete tiny study on disk: random tiny Llamas with a tokenizer, a local task, study.yaml."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import yaml

from tests.model_factory import save_tiny_llama

WORDS = [f"w{i}" for i in range(40)]


def save_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<pad>", "<s>", "</s>", *WORDS, "Q:", "A:"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    fast.save_pretrained(out)


TASK_YAML = """task: {name}
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
"""


def write_task(folder: Path, name: str, seed: int, n: int = 12) -> None:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.sample(WORDS, 3))
        choices = rng.sample(WORDS, 3)
        rows.append({"q": q, "choices": choices, "label": rng.randrange(3)})
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))


def make_tiny_study(
    root: Path, *, optimizer: dict | None = None, max_trials: int = 6, preset: str = "linear"
) -> Path:
    """Models in root/models, tasks in root/tasks, and root/study.yaml; returns the study path."""
    models = root / "models"
    base = save_tiny_llama(models / "base", seed=0, layers=2, vocab=46)
    save_tokenizer(base)
    for i, name in enumerate(["s1", "s2"]):
        save_tiny_llama(models / name, seed=i + 1, base=base, noise=0.05)
        save_tokenizer(models / name)
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    write_task(tasks, "tiny_search", seed=1)
    write_task(tasks, "tiny_heldout", seed=2)
    study = {
        "name": "tiny",
        "models": {
            "base": "models/base",
            "sources": [{"name": "s1", "path": "models/s1"}, {"name": "s2", "path": "models/s2"}],
        },
        "search_space": {"preset": preset, "granularity": 1},
        "tasks": {
            "include_path": ["tasks"],
            "search": ["tiny_search"],
            "heldout": ["tiny_heldout"],
            "batch_size": 8,
        },
        "optimizer": optimizer or {"name": "cma", "popsize": 4, "sigma0": 0.3},
        "budget": {"max_trials": max_trials},
        "device": "cpu",
        "seed": 0,
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Block until `path` has `n` lines; fail if the process ends first or time runs out."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for trials")


def with_changes(root: Path, name: str, **changes) -> Path:
    """A copy of root/study.yaml with top-level or `a__b` (dotted) keys changed, written beside
    it (its relative model and task paths resolve against the file)."""
    data = yaml.safe_load((root / "study.yaml").read_text())
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def trial_sequence(run_dir: Path) -> list[tuple]:
    """What must equal between an interrupted-then-resumed run and an uninterrupted one."""
    from evomerge.runstore import RunStore

    return [
        (r.proposal, json.dumps(r.genome, sort_keys=True), r.fitness, r.status)
        for r in RunStore(run_dir).read_trials()
    ]

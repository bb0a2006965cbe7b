"""`evomerge fetch STUDY.yaml` offline against pre-populated caches in the real layouts (the HF
hub cache for models, the HF datasets cache for a hub dataset): the table, the checks from the
safetensors headers, and one line for what is missing."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.hub_factory import cache_dataset, cache_repo, commit_of, use_cache
from tests.model_factory import save_tiny_llama
from tests.report_factory import cli
from tests.study_factory import WORDS, make_tiny_study, with_changes

HUB_TASK = """task: hub_mc
dataset_path: org/tiny-mc
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{q}} A:"
doc_to_choice: "{{choices}}"
doc_to_target: label
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny study whose s2 is the hub id org/tiny-s2 and whose held-out task reads the hub
    dataset org/tiny-mc, with both in caches under root/hf."""
    root = tmp_path_factory.mktemp("fetch")
    make_tiny_study(root)
    cache_repo(root / "hf" / "hub", "org/tiny-s2", root / "models" / "s2")
    (root / "tasks" / "hub_mc.yaml").write_text(HUB_TASK)
    rng = random.Random(0)
    rows = [{"q": " ".join(rng.sample(WORDS, 3)), "choices": rng.sample(WORDS, 3), "label": i % 3}
            for i in range(7)]  # fmt: skip
    cache_dataset(root / "hf" / "datasets", "org/tiny-mc", rows)
    return root


@pytest.fixture
def caches(root, monkeypatch):
    import datasets

    use_cache(monkeypatch, root / "hf" / "hub")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(root / "hf" / "datasets"))


def study(root: Path, name: str, s2: str = "org/tiny-s2", heldout: str = "hub_mc") -> Path:
    sources = [{"name": "s1", "path": "models/s1"}, {"name": "s2", "path": s2}]
    return with_changes(root, name, models__sources=sources, tasks__heldout=[heldout])


def rows(out: str, word: str) -> list[list[str]]:
    """The table rows of `out` that mention `word`, split into cells."""
    return [[c.strip() for c in ln.strip("│ ").split("│")] for ln in out.splitlines() if word in ln]


def test_fetch_lists_the_hub_model_and_dataset_from_the_caches(root, caches):
    code, out, err = cli(["fetch", str(study(root, "ok"))])
    assert code == 0, err
    (s2,) = rows(out, "org/tiny-s2")
    assert s2 == ["s2", "org/tiny-s2", "main", commit_of("org/tiny-s2")[:12], "5", s2[5], "cached"]
    assert rows(out, "models/base")[0][-1] == "local"
    assert rows(out, "org/tiny-mc") == [["heldout", "hub_mc", "org/tiny-mc", "7", "ready"]]
    assert rows(out, "tiny_search")[0][-1] == "local"
    last = out.strip().splitlines()[-1]
    assert last.startswith("fetched 3 models (2 local, 1 cached;") and "ready to run" in last


def test_a_missing_hub_model_is_one_line_naming_it(root, caches):
    code, out, err = cli(["fetch", str(study(root, "missing", s2="org/no-such-model"))])
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("evomerge: error: models.sources[s2]: 'org/no-such-model' is no local")
    assert "downloads are off (HF_HUB_OFFLINE=1)" in line


def test_a_model_that_does_not_match_the_base_is_refused_from_its_headers(root, caches):
    save_tiny_llama(root / "wide", seed=3, layers=2, hidden=64, vocab=46)
    cache_repo(root / "hf" / "hub", "org/wide", root / "wide")
    code, _, err = cli(["fetch", str(study(root, "wide", s2="org/wide"))])
    (line,) = err.strip().splitlines()
    assert code == 2 and line.startswith("evomerge: error: ") and "'s2'" in line, err
    assert "does not match" in line and "64" in line  # the width its header gives


def test_an_uncached_hub_dataset_offline_is_one_line_naming_the_task(root, caches):
    (root / "tasks" / "hub_gone.yaml").write_text(
        HUB_TASK.replace("hub_mc", "hub_gone").replace("org/tiny-mc", "org/not-cached")
    )
    code, _, err = cli(["fetch", str(study(root, "gone", heldout="hub_gone"))])
    (line,) = err.strip().splitlines()
    assert code == 2 and line.startswith("evomerge: error: tasks.heldout: tasks hub_gone "), err
    assert "org/not-cached" in line and "downloads are off" in line


def test_dry_run_lists_what_would_be_fetched_and_loads_nothing(root, caches, monkeypatch):
    import datasets

    empty = root / "empty-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(empty))
    code, out, err = cli(["fetch", str(study(root, "dry")), "--dry-run"])
    assert code == 0, err
    assert rows(out, "org/tiny-s2")[0][-1] == "cached"
    assert rows(out, "org/tiny-mc") == [["heldout", "hub_mc", "org/tiny-mc", "", "hub"]]
    assert out.strip().splitlines()[-1].endswith("0 B of weights to download; nothing was fetched")
    assert not empty.exists()  # no dataset was loaded


@pytest.fixture
def pinned(root, caches) -> str:
    """org/tiny-pinned: main holds the base's weights, the branch v2 holds s2's."""
    cache_repo(root / "hf" / "hub", "org/tiny-pinned", root / "models" / "base")
    cache_repo(root / "hf" / "hub", "org/tiny-pinned", root / "models" / "s2", revision="v2")
    return "org/tiny-pinned@v2"


def test_dry_run_and_fetch_list_a_pinned_revision_and_its_commit(root, pinned):
    v2 = commit_of("org/tiny-pinned", "v2")[:12]
    for extra, last in ((["--dry-run"], "nothing was fetched"), ([], "ready to run")):
        code, out, err = cli(["fetch", str(study(root, "pinned", s2=pinned)), *extra])
        assert code == 0, err
        (row,) = rows(out, "org/tiny-pinned")
        assert row[:4] == ["s2", "org/tiny-pinned", "v2", v2] and row[-1] == "cached"
        assert rows(out, "models/s1")[0][2] == ""  # a local folder has no revision
        assert last in out.strip().splitlines()[-1]


def test_a_pinned_revision_missing_from_the_cache_is_one_line_naming_it(root, pinned):
    for extra in (["--dry-run"], []):
        path = study(root, "pinned_gone", s2="org/tiny-pinned@v9")
        code, out, err = cli(["fetch", str(path), *extra])
        assert code == 2 and out == ""
        (line,) = err.strip().splitlines()
        assert line.startswith("evomerge: error: models.sources[s2]: 'org/tiny-pinned@v9' is no")
        assert "revision 'v9' of 'org/tiny-pinned' is not in the hub cache" in line
        assert "holds main, v2, " in line and "downloads are off (HF_HUB_OFFLINE=1)" in line


def test_online_with_the_hub_unreachable_the_cache_serves_and_a_missing_id_says_why(
    root, caches, monkeypatch
):
    """The default (online, as huggingface_hub defines it) against a hub that refuses
    connections (a closed localhost port; huggingface_hub reads both settings at call time):
    a cached model is used, dry run or not; a missing one is one line with the connection
    error, and the dry run downloads nothing there either."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for extra in (["--dry-run"], []):
        code, out, err = cli(["fetch", str(study(root, "online", heldout="tiny_heldout")), *extra])
        assert code == 0, err
        assert rows(out, "org/tiny-s2")[0][-1] == "cached"
    missing = study(root, "online_missing", s2="org/no-such-model", heldout="tiny_heldout")
    lines = []
    for extra in (["--dry-run"], []):
        code, out, err = cli(["fetch", str(missing), *extra])
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        lines.append(err.strip())
    assert all("'org/no-such-model'" in ln and "Connection refused" in ln for ln in lines), lines
    assert "the hub could not list it (ConnectError" in lines[0]
    assert "could not be downloaded from the hub (LocalEntryNotFoundError" in lines[1]


def test_a_group_is_fetched_as_its_tasks_with_their_data():
    """The demo's zoo_search group: the dry run lists its three tasks from the index, the fetch
    builds them (their documents are the lines of evals/data/*_search.jsonl)."""
    from evomerge.scoring.catalog import resolve_tasks
    from evomerge.scoring.config import ScoringSettings
    from evomerge.scoring.lm_eval_adapter.task_data import load, planned

    evals = Path(__file__).parents[1] / "evals"
    tm = resolve_tasks(ScoringSettings(tasks=("zoo_search",), include_paths=(str(evals),)))
    skills = ["add", "facts", "reverse"]
    for rows in (planned(tm, ["zoo_search"]), load(tm, "zoo_search")):
        assert [r.task for r in rows] == [f"zoo_{s}_search" for s in skills]
        assert all(r.local and r.dataset == "custom_dataset zoo_loader.load" for r in rows)
    lines = [len((evals / "data" / f"{s}_search.jsonl").read_text().splitlines()) for s in skills]
    assert [r.docs for r in load(tm, "zoo_search")] == lines


def test_a_lora_source_fetches_the_hub_base_its_adapter_names(root, caches):
    """An adapter folder (made with peft) whose adapter_config.json names a hub id as its base:
    fetch lists and resolves that base from the cache, and the study validates with it."""
    import json

    import torch

    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    cache_repo(root / "hf" / "hub", "org/tiny-base", root / "models" / "base")
    model = LlamaForCausalLM.from_pretrained(root / "models" / "base", dtype=torch.float32)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(root / "adapter", safe_serialization=True)
    cfg_path = root / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": "org/tiny-base"}))
    sources = [
        {"name": "tuned", "path": str(root / "adapter")},
        {"name": "s1", "path": "models/s1"},
    ]
    path = with_changes(root, "lora", models__base="org/tiny-base", models__sources=sources,
                        tasks__heldout=["tiny_heldout"])  # fmt: skip
    code, out, err = cli(["fetch", str(path)])
    assert code == 0, err
    assert [r[0] for r in rows(out, "org/tiny-base")] == ["base", "tuned (its base)"]
    assert all(r[-1] == "cached" for r in rows(out, "org/tiny-base"))
    assert rows(out, str(root / "adapter"))[0][::6] == ["tuned (adapter)", "local"]

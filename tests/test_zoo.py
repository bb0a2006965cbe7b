"""The demo zoo: tokenizer, data splits, committed tasks loading offline, deterministic builds,
and `evomerge eval` over its checkpoints (one table, the JSON lines, errors)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from evomerge.cli import main
from evomerge.zoo import SKILLS, build_zoo, task_names
from evomerge.zoo import data as zoo_data
from evomerge.zoo import tasks as zoo_tasks
from evomerge.zoo.tokenizer import save_tokenizer
from evomerge.zoo.train import encode


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("model.safetensors"))
    }


def test_tokenizer_round_trip_matches_training_ids(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    rng = random.Random(0)
    lines = ["".join(zoo_data.skill_example(s, rng)) for s in SKILLS for _ in range(5)] + [
        "cpy abc=abc\n",
        "the home of zorp is cave",
    ]
    for line in lines:
        ids = tok(line)["input_ids"]
        assert ids == encode(line), line  # no BOS or other special token is added
        assert tok.decode(ids) == line
    assert tok.decode(tok("?Q")["input_ids"]) == "?" + tok.unk_token  # outside the alphabet


def test_eval_splits_are_disjoint_and_never_trained():
    docs = zoo_data.eval_docs()
    for skill in SKILLS:
        search = {d["question"] for d in docs[skill]["search"]}
        heldout = {d["question"] for d in docs[skill]["heldout"]}
        assert len(search) == zoo_data.n_search(skill) and len(heldout) == zoo_data.N_HELDOUT
        assert not search & heldout, skill
    rng = random.Random(7)
    eval_questions = {
        d["question"] for s in ("add", "reverse") for sp in docs[s].values() for d in sp
    }
    for _ in range(2000):
        for skill in ("add", "reverse"):
            assert zoo_data.skill_example(skill, rng)[0] not in eval_questions
        prompt, _ = zoo_data.pretrain_example(rng)
        assert prompt not in eval_questions
        assert not prompt.startswith("rev ")  # the base never sees the reverse task's format


def test_committed_evals_folder_is_current():
    """evals/ is generated from evomerge.zoo.data: regenerate it when the data changes."""
    assert zoo_tasks.is_complete(zoo_tasks.repo_evals_dir()), (
        "evals/ is stale: run python -m evomerge.zoo.tasks evals/"
    )


def test_tasks_load_offline_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager, get_task_dict

    folder = zoo_tasks.materialize_tasks(tmp_path / "copy")  # not the repo: paths are relative
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    names = task_names("search") + task_names("heldout")
    loaded = get_task_dict(names, manager)
    kinds = {}
    for name in names:
        task = loaded[name]
        docs = list(task.eval_docs)
        skill = name.split("_")[1]
        assert len(docs) == (
            zoo_data.n_search(skill) if name.endswith("search") else zoo_data.N_HELDOUT
        )
        kinds[name] = task.OUTPUT_TYPE
    assert set(kinds.values()) == {"multiple_choice", "generate_until"}
    group = get_task_dict(["zoo_heldout"], manager)
    assert {t for t in json.dumps(str(group)).split("'") if t.startswith("zoo_")} >= set(
        task_names("heldout")
    )


def test_zoo_build_is_reused_and_bit_identical_when_rebuilt(small_zoo, tmp_path):
    again = build_zoo(small_zoo.root, small=True, progress=False)
    assert not again.rebuilt and again.build_hash == small_zoo.build_hash
    fresh = build_zoo(tmp_path / "fresh", small=True, progress=False)
    assert fresh.rebuilt
    assert _digests(fresh.root) == _digests(small_zoo.root)
    assert len(_digests(fresh.root)) == 1 + len(SKILLS)


def test_zoo_writes_a_valid_study(small_zoo):
    from evomerge.config import load_study_config

    config = load_study_config(small_zoo.study, {})
    assert [s.name for s in config.models.sources] == list(SKILLS)
    assert config.tasks.search == task_names("search")
    assert config.tasks.heldout == task_names("heldout")
    assert Path(config.models.base) == small_zoo.base


def test_eval_prints_the_parent_by_skill_table(small_zoo, capsys):
    dirs = [str(small_zoo.base), *(str(p) for p in small_zoo.sources.values())]
    tasks = ",".join(task_names("heldout"))
    args = ["eval", *dirs, "--tasks", tasks, "--include-path", str(small_zoo.evals)]
    assert main([*args, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["model"]).name for r in rows] == ["base", *SKILLS]
    score = {
        Path(r["model"]).name: {
            t: r["tasks"][t][r["primary"][t]["metric"]] for t in task_names("heldout")
        }
        for r in rows
    }
    for skill in SKILLS:  # every fine-tune is better than the base at its own skill
        task = zoo_tasks.task_name(skill, "heldout")
        assert score[skill][task] > score["base"][task], (skill, score)
    assert main(args) == 0
    table = capsys.readouterr().out
    for name in ("base", *SKILLS, "mean", *task_names("heldout")):
        assert name in table


def test_eval_errors_are_one_line_exit_2(small_zoo, tmp_path, capsys):
    code = main(
        ["eval", str(small_zoo.base), "--tasks", "zoo_nope", "--include-path", str(small_zoo.evals)]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "zoo_nope" in err
    code = main(["eval", str(small_zoo.base), str(tmp_path / "missing"), "--tasks", "zoo_heldout"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("evomerge: error:") and "missing" in err

"""Hub ids through a Hugging Face cache in the real huggingface_hub layout, offline: the layout
itself (read back by huggingface_hub), what a hub id downloads (never pickles), and a study
whose source is a hub id; and that evomerge leaves the user's HF offline settings alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.checkpoint import HUB_ALLOW_PATTERNS, HUB_IGNORE_PATTERNS, CheckpointReader
from evomerge.errors import UnsafeCheckpointError
from tests.hub_factory import cache_repo, commit_of, use_cache
from tests.report_factory import cli
from tests.study_factory import make_tiny_study, trial_sequence, with_changes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return make_tiny_study(tmp_path_factory.mktemp("hub_study"), max_trials=3)


def test_the_hand_made_cache_is_what_huggingface_hub_reads(tmp_path, study, monkeypatch):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache
    from safetensors import safe_open

    folder = study.parent / "models" / "s2"
    snapshot = cache_repo(tmp_path, "org/tiny-s2", folder)
    (repo,) = scan_cache_dir(tmp_path).repos
    (rev,) = repo.revisions
    assert (repo.repo_id, repo.repo_type, rev.commit_hash) == (
        "org/tiny-s2",
        "model",
        commit_of("org/tiny-s2"),
    )
    assert rev.refs == frozenset({"main"})
    assert sorted(f.file_name for f in rev.files) == sorted(p.name for p in folder.iterdir())
    cfg = try_to_load_from_cache("org/tiny-s2", "config.json", cache_dir=tmp_path)
    assert Path(cfg).read_bytes() == (folder / "config.json").read_bytes()
    use_cache(monkeypatch, tmp_path)
    reader = CheckpointReader("org/tiny-s2", where="models.sources[s2]")
    assert reader.path == snapshot
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert sorted(reader.names()) == sorted(f.keys())


def test_a_hub_id_fetches_weights_tokenizer_templates_and_adapters_never_pickles():
    """huggingface_hub's own filter (the one snapshot_download applies) over a typical repo."""
    from huggingface_hub.utils import filter_repo_objects

    repo = [
        "config.json", "generation_config.json", "model.safetensors.index.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
        "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
        "additional_chat_templates/tool_use.jinja", "adapter_config.json",
        "adapter_model.safetensors", "qwen.tiktoken",
        # never: pickles, a second copy of the weights, training leftovers, other formats
        "pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt", "training_args.bin",
        "optimizer.pt", "rng_state.pth", "original/consolidated.00.pth", "consolidated.safetensors",
        "checkpoint-500/model.safetensors", "model.ckpt", "flax_model.msgpack", "tf_model.h5",
        "model.onnx", "README.md", ".gitattributes",
    ]  # fmt: skip
    kept = set(
        filter_repo_objects(
            repo, allow_patterns=list(HUB_ALLOW_PATTERNS), ignore_patterns=list(HUB_IGNORE_PATTERNS)
        )
    )
    assert kept == set(repo[: repo.index("pytorch_model.bin")])


def test_a_hub_repo_with_only_pickled_weights_is_refused(tmp_path, study, monkeypatch):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes(
        (study.parent / "models" / "s1" / "config.json").read_bytes()
    )
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04N.")  # pickle.dumps(None)
    cache_repo(tmp_path / "hub", "org/pickled", folder)
    use_cache(monkeypatch, tmp_path / "hub")
    with pytest.raises(UnsafeCheckpointError, match="hub id 'org/pickled' has no safetensors"):
        CheckpointReader("org/pickled", where="models.sources[p]")


def test_a_study_with_a_hub_id_source_runs_as_with_the_folder_and_exports(
    tmp_path, study, monkeypatch
):
    """The same bytes behind a hub id give the same trials as the local folder (seeded); the
    export's model card names the hub id as a base model and carries mergekit.yaml."""
    root = study.parent
    cache_repo(tmp_path / "hub", "org/tiny-s2", root / "models" / "s2")
    use_cache(monkeypatch, tmp_path / "hub")
    sources = [{"name": "s1", "path": "models/s1"}, {"name": "s2", "path": "org/tiny-s2"}]
    hub = with_changes(root, "hub_source", models__sources=sources)
    runs = tmp_path / "runs"
    for name, path in (("local", study), ("hub", hub)):
        code, _, err = cli(["run", str(path), "--name", name, "--runs-dir", str(runs), "--quiet"])
        assert code == 0, err
    trials = [json.loads(line) for line in (runs / "hub" / "trials.jsonl").read_text().splitlines()]
    assert [t["status"] for t in trials] == ["ok"] * 3
    assert trial_sequence(runs / "hub") == trial_sequence(runs / "local")
    assert "path: org/tiny-s2" in (runs / "hub" / "study.yaml").read_text()  # as the user named it
    # its export's card names the hub id as a base model and carries the mergekit config
    from huggingface_hub import ModelCard

    out = tmp_path / "export"
    code, _, err = cli(["export", str(runs / "hub"), "--out", str(out), "--no-report", "--quiet"])
    assert code == 0, err
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict()["base_model"] == ["org/tiny-s2"]
    block = re.search(r"```yaml\n(.*?)```", card.text, re.S)
    assert block is not None
    assert yaml.safe_load(block.group(1)) == yaml.safe_load((out / "mergekit.yaml").read_text())


def test_evomerge_leaves_the_users_hf_offline_settings_alone():
    """After the CLI's environment setup and the scoring package's import, with none of the
    offline variables set, huggingface_hub and datasets are online, as they define it."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    code = (
        "import os\n"
        "from evomerge.cli import main\n"
        "try:\n    main(['fetch', '--help'])\nexcept SystemExit:\n    pass\n"
        "import evomerge.scoring\n"
        "import datasets.config, huggingface_hub.constants\n"
        "print('ENV', os.environ.get('HF_HUB_OFFLINE'), os.environ.get('HF_DATASETS_OFFLINE'),"
        " huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,"
        " os.environ.get('TQDM_DISABLE'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert out.splitlines()[-1] == "ENV None None False False 1"  # other defaults are still set


def test_an_interrupted_download_names_the_files_still_missing(tmp_path, study, monkeypatch):
    """snapshot_download records the commit's file listing (trees/<commit>.json) before it
    downloads; offline, a snapshot missing a listed file is refused, naming that file."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    from evomerge.errors import MissingPathError

    snapshot = cache_repo(tmp_path, "org/partial", study.parent / "models" / "s1")
    listing = {
        f.name: TreeCacheEntry(size=f.stat().st_size, blob_id="0" * 40) for f in snapshot.iterdir()
    }
    listing["model-00002-of-00002.safetensors"] = TreeCacheEntry(size=10, blob_id="1" * 40)
    write_tree_cache(str(tmp_path / "models--org--partial"), commit_of("org/partial"), listing)
    use_cache(monkeypatch, tmp_path)
    with pytest.raises(MissingPathError) as err:
        CheckpointReader("org/partial", where="models.sources[p]")
    assert (
        f"only partly in the hub cache ({tmp_path}: 1 file(s) are missing "
        "(model-00002-of-00002.safetensors)); downloads are off (HF_HUB_OFFLINE=1)"
    ) in str(err.value)


@pytest.fixture
def two_revisions(tmp_path, study, monkeypatch) -> dict[str, Path]:
    """org/tiny in the cache three times: main holds s1, the branch v2 holds s2, and a commit
    reached by its hash alone (no ref) holds the base."""
    models = study.parent / "models"
    hub = tmp_path / "hub"
    snaps = {
        "main": cache_repo(hub, "org/tiny", models / "s1"),
        "v2": cache_repo(hub, "org/tiny", models / "s2", revision="v2"),
        "detached": cache_repo(hub, "org/tiny", models / "base", revision=None),
    }
    use_cache(monkeypatch, hub)
    return snaps


def test_a_pinned_revision_is_the_one_loaded(two_revisions, study):
    from huggingface_hub import scan_cache_dir
    from safetensors.torch import load_file

    (repo,) = scan_cache_dir(two_revisions["main"].parents[2]).repos  # huggingface_hub agrees
    assert {r.commit_hash: r.refs for r in repo.revisions} == {
        commit_of("org/tiny"): frozenset({"main"}),
        commit_of("org/tiny", "v2"): frozenset({"v2"}),
        commit_of("org/tiny", "snapshot"): frozenset(),
    }
    models = study.parent / "models"
    detached = commit_of("org/tiny", "snapshot")
    for ref, snap, folder in [
        ("org/tiny", "main", "s1"),
        ("org/tiny@main", "main", "s1"),
        ("org/tiny@v2", "v2", "s2"),
        (f"org/tiny@{detached}", "detached", "base"),
    ]:
        reader = CheckpointReader(ref, where="models.sources[s]")
        assert reader.path == two_revisions[snap], ref
        name = "model.layers.0.mlp.up_proj.weight"
        expected = load_file(models / folder / "model.safetensors")[name]
        assert reader.get(name).equal(expected), ref
    assert not load_file(models / "s1" / "model.safetensors")[name].equal(expected)


def test_a_revision_not_in_the_cache_is_one_line_naming_what_is(two_revisions, tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": "org/tiny@v9", "parameters": {"weight": 0.5}},
                   {"model": "org/tiny@v2", "parameters": {"weight": 0.5}}],
    }))  # fmt: skip
    code, out, err = cli(["merge", str(cfg), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("evomerge: error: model 'tiny': 'org/tiny@v9' is no local folder")
    assert "revision 'v9' of 'org/tiny' is not in the hub cache" in line
    held = sorted(commit_of("org/tiny", r)[:12] for r in ("main", "v2", "snapshot"))
    assert f"holds main, v2, {', '.join(held)})" in line
    assert "downloads are off (HF_HUB_OFFLINE=1)" in line


def test_a_mergekit_file_merges_the_pinned_revisions(two_revisions, study, tmp_path):
    """`org/tiny@v2` and {path: org/tiny, revision: <commit>} merge the snapshots they pin:
    the same tensors as the merge of the two folders."""
    from safetensors.torch import load_file

    models = study.parent / "models"
    detached = commit_of("org/tiny", "snapshot")

    def merge(a, b, out):
        cfg = tmp_path / f"{out}.yaml"
        cfg.write_text(yaml.safe_dump({
            "merge_method": "linear", "dtype": "float32",
            "models": [{"model": a, "parameters": {"weight": 0.3}},
                       {"model": b, "parameters": {"weight": 0.7}}],
        }))  # fmt: skip
        code, _, err = cli(["merge", str(cfg), "--out", str(tmp_path / out), "--quiet"])
        assert code == 0, err
        return load_file(tmp_path / out / "model.safetensors")

    pinned = merge("org/tiny@v2", {"path": "org/tiny", "revision": detached}, "pinned")
    folders = merge(str(models / "s2"), str(models / "base"), "folders")
    assert pinned.keys() == folders.keys()
    assert all(pinned[k].equal(folders[k]) for k in folders)


def test_a_local_folder_whose_name_holds_an_at_sign_is_a_folder(
    two_revisions, study, tmp_path, monkeypatch
):
    """A path that exists wins over the hub reading of 'org/tiny@v2'."""
    import shutil

    local = tmp_path / "work" / "org" / "tiny@v2"
    shutil.copytree(study.parent / "models" / "base", local)
    monkeypatch.chdir(tmp_path / "work")
    assert CheckpointReader("org/tiny@v2").path == local.resolve()
    assert CheckpointReader(str(local)).path == local.resolve()


def test_a_study_with_a_pinned_source_runs_it_and_its_card_records_the_revision(
    tmp_path, study, monkeypatch
):
    """s2 given as org/tiny-s2@v2 (main holds other weights) runs exactly as the s2 folder; the
    export's card keeps base_model the bare id and records the revision and its commit."""
    from huggingface_hub import ModelCard

    root = study.parent
    cache_repo(tmp_path / "hub", "org/tiny-s2", root / "models" / "base")  # main: not s2
    cache_repo(tmp_path / "hub", "org/tiny-s2", root / "models" / "s2", revision="v2")
    use_cache(monkeypatch, tmp_path / "hub")
    sources = [{"name": "s1", "path": "models/s1"}, {"name": "s2", "path": "org/tiny-s2@v2"}]
    pinned = with_changes(root, "pinned_source", models__sources=sources)
    runs = tmp_path / "runs"
    for name, path in (("local", study), ("pinned", pinned)):
        code, _, err = cli(["run", str(path), "--name", name, "--runs-dir", str(runs), "--quiet"])
        assert code == 0, err
    assert trial_sequence(runs / "pinned") == trial_sequence(runs / "local")
    assert "path: org/tiny-s2@v2" in (runs / "pinned" / "study.yaml").read_text()
    out = tmp_path / "export"
    args = ["export", str(runs / "pinned"), "--out", str(out), "--no-report", "--quiet"]
    code, _, err = cli(args)
    assert code == 0, err
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == ["org/tiny-s2"]
    assert meta["evomerge"]["revisions"] == [
        {"model": "org/tiny-s2", "revision": "v2", "commit": commit_of("org/tiny-s2", "v2")}
    ]
    assert meta["evomerge"]["models"]["sources"]["s2"] == "org/tiny-s2@v2"
    assert "- `s2`: `org/tiny-s2@v2`" in card.text

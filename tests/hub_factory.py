"""A Hugging Face hub cache written by hand in huggingface_hub's own layout, so hub ids resolve
offline in tests: models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob symlink,
refs/<branch> = <commit>}, as `snapshot_download` leaves it (tests/test_hub_cache.py checks that
huggingface_hub's scan_cache_dir and try_to_load_from_cache read it back)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def commit_of(repo_id: str, revision: str = "main") -> str:
    """A stable 40-hex commit id per repo and revision (what refs/<revision> names)."""
    return hashlib.sha1(
        (repo_id if revision == "main" else f"{repo_id}@{revision}").encode()
    ).hexdigest()


def cache_repo(
    cache: Path,
    repo_id: str,
    folder: Path,
    extra: dict[str, bytes] | None = None,
    *,
    revision: str | None = "main",
    commit: str | None = None,
) -> Path:
    """Put the files of `folder` (and `extra` name -> bytes) into `cache` as repo `repo_id` at
    `revision` (a branch or tag: refs/<revision> names the commit; None: a snapshot reached only
    by its commit hash, as `snapshot_download(revision=<commit>)` leaves it); `commit` defaults
    to commit_of(repo_id, revision), or to commit_of(repo_id, "snapshot") with no revision.
    Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = commit or commit_of(repo_id, revision or "snapshot")
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    files = {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}
    for name, data in {**files, **(extra or {})}.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)  # the same repo cached again: the new files win
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    if revision is not None:
        (repo / "refs" / revision).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    return snapshot


def use_cache(monkeypatch, cache: Path) -> None:
    """Point huggingface_hub (read at call time: `constants.HF_HUB_CACHE`) at `cache`, offline."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))


def cache_dataset(cache: Path, repo_id: str, rows: list[dict], split: str = "test") -> Path:
    """The HF datasets cache entry that `datasets.load_dataset(repo_id)` leaves after a download
    and reads offline (`namespace___name/default/0.0.0/<hash>/` with dataset_info.json and
    `<name>-<split>.arrow`): written by datasets' own Json builder, then moved where a hub
    dataset's prepared copy lives. `cache` is HF_DATASETS_CACHE."""
    import json
    import shutil
    import tempfile

    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        builder = Json(
            cache_dir=str(Path(tmp) / "build"),
            dataset_name=name,
            config_name="default",
            data_files={split: str(data)},
            hash=commit_of(repo_id)[:16],
        )
        builder.download_and_prepare()
        built = next((Path(tmp) / "build" / name).glob("default-*"))
        target = cache / f"{namespace}___{name}"
        target.mkdir(parents=True, exist_ok=True)
        shutil.move(str(built), str(target / "default"))
    return target / "default"

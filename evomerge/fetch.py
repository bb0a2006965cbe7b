"""`evomerge fetch STUDY.yaml`: every model and dataset a study needs, in the Hugging Face caches
and checked, before any GPU is booked.

Why: a study resolves hub ids and builds its tasks when it starts, on the cluster, where a
missing download, a gated repo or a misspelled id stops the night at hour one. Fetching on a
login node (or a laptop) fills the caches the study reads (the HF hub cache for models, the HF
datasets cache for lm-eval's datasets), then validates the study as `run` would, from the
safetensors headers only: every model against the base, the space against the models, the tasks
and metrics. Models come through `checkpoint.resolve_model_path` (the same allow patterns as a
study: safetensors, config, tokenizer, chat template and adapter files, never pickles; a
pinned `org/name@revision` at that revision), datasets
through lm-eval's own task building (`scoring.lm_eval_adapter.task_data`). Downloads follow the
user's HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: offline, fetch checks that everything is cached.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from evomerge.config import StudyConfig
from evomerge.scoring.lm_eval_adapter.task_data import TaskData


@dataclass(frozen=True)
class ModelRow:
    """One model of the study: `snapshot` is the hub commit (None for a local folder) of
    `revision` (the pinned branch, tag or commit of `org/name@revision`; None: the default
    branch); `files` and `bytes` what is on disk (dry run: what the snapshot holds); `status`
    one of local, cached, downloaded (dry run: cached, or 'would download N B')."""

    name: str
    ref: str
    path: str | None
    snapshot: str | None
    files: int
    bytes: int
    status: str
    to_download: int = 0  # bytes a dry run found missing from the cache
    revision: str | None = None


@dataclass(frozen=True)
class TaskRow:
    split: str  # search or heldout
    data: TaskData
    status: str  # local, ready (loaded from or into the datasets cache), hub (dry run)


@dataclass(frozen=True)
class FetchReport:
    models: list[ModelRow]
    tasks: list[TaskRow]
    dry_run: bool
    checked: bool  # the study validated (build_plan) against the fetched models and tasks
    seconds: float = 0.0


def study_models(config: StudyConfig) -> Iterator[tuple[str, str, str]]:
    """(name, reference, where) of every model the study reads, base first. A LoRA source
    (mergekit's `base+adapter`, or an adapter folder naming its base) is two: the base its
    adapter applies to (often a hub id) and the adapter folder."""
    from evomerge.lora import find_adapter

    refs = [("base", config.models.base, "models.base")] if config.models.base else []
    refs += [(s.name, s.path, f"models.sources[{s.name}]") for s in config.models.sources]
    for name, ref, where in refs:
        adapter = find_adapter(ref, where)
        if adapter is None:
            yield name, ref, where
        else:
            yield f"{name} (its base)", adapter.base, where
            yield f"{name} (adapter)", str(adapter.adapter), where


def _on_disk(path: Path) -> tuple[int, int]:
    """(files, bytes) of a checkpoint folder; a hub snapshot's symlinks count their blobs."""
    files = [p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts]
    return len(files), sum(p.stat().st_size for p in files)


def _snapshot(ref: str, **kwargs: Any) -> Any:
    """huggingface_hub's snapshot_download with the files a study reads (checkpoint's patterns),
    at the revision `ref` pins ('org/name@revision')."""
    from huggingface_hub import snapshot_download

    from evomerge.checkpoint import HUB_ALLOW_PATTERNS, HUB_IGNORE_PATTERNS
    from evomerge.hub_ref import split_revision

    repo, revision = split_revision(ref)
    return snapshot_download(
        repo,
        revision=revision,
        allow_patterns=list(HUB_ALLOW_PATTERNS),
        ignore_patterns=list(HUB_IGNORE_PATTERNS),
        **kwargs,
    )


def _cached_snapshot(ref: str) -> Path | None:
    """The hub id's snapshot already in the HF cache (as a study would read it), or None."""
    try:
        return Path(_snapshot(ref, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError, IncompleteSnapshotError, ...)
        return None


def fetch_model(name: str, ref: str, where: str, *, dry_run: bool = False) -> ModelRow:
    """Download (or find in the cache) one model; raises the one-line user error of a study
    that names a missing or unreachable model."""
    from huggingface_hub import constants

    from evomerge.checkpoint import is_hub_id, resolve_model_path
    from evomerge.hub_ref import split_revision

    if not is_hub_id(ref):
        path = resolve_model_path(ref, where=where)  # a folder, or MissingPathError
        return ModelRow(name, ref, str(path), None, *_on_disk(path), "local")
    rev = split_revision(ref)[1]
    before = _cached_snapshot(ref)
    if dry_run and not constants.HF_HUB_OFFLINE:
        return _dry_run_row(name, ref, where)
    if dry_run and before is not None:
        return ModelRow(
            name, ref, str(before), before.name, *_on_disk(before), "cached", revision=rev
        )
    seen = None if before is None else _on_disk(before)
    path = resolve_model_path(ref, where=where)  # offline: the cache or the one-line error
    now = _on_disk(path)
    status = "cached" if before == path and seen == now else "downloaded"
    return ModelRow(name, ref, str(path), path.name, *now, status, revision=rev)


def _dry_run_row(name: str, ref: str, where: str) -> ModelRow:
    """What a download would bring, from the hub's file listing (huggingface_hub's dry run);
    nothing is downloaded, also when the hub cannot be reached (then the cache is what counts)."""
    from evomerge.errors import MissingPathError
    from evomerge.hub_ref import split_revision

    rev = split_revision(ref)[1]
    try:
        infos = _snapshot(ref, dry_run=True)  # [DryRunFileInfo]: file_size, will_download, ...
    except Exception as exc:  # unreachable, unknown, gated: the cache decides
        cached = _cached_snapshot(ref)
        if cached is None:
            why = exc.__cause__ or exc  # DryRunError wraps the connection or HTTP error
            detail = next((ln.strip() for ln in str(why).splitlines() if ln.strip()), "")[:200]
            raise MissingPathError(
                f"{where}: hub id {ref!r} is not in the hub cache and the hub could not list it "
                f"({type(why).__name__}: {detail}); check the network and the id: it may be "
                "misspelled, or a gated or private repo (log in with `hf auth login`)"
            ) from None
        return ModelRow(
            name, ref, str(cached), cached.name, *_on_disk(cached), "cached", revision=rev
        )
    size = sum(int(i.file_size or 0) for i in infos)
    missing = sum(int(i.file_size or 0) for i in infos if i.will_download)
    commit = infos[0].commit_hash if infos else None
    status = f"would download {human_size(missing)}" if missing else "cached"
    return ModelRow(
        name, ref, None, commit, len(infos), size, status, to_download=missing, revision=rev
    )


def fetch_tasks(config: StudyConfig, *, dry_run: bool = False) -> list[TaskRow]:
    """Every dataset the search and held-out tasks read, loaded through lm-eval (dry run: listed
    from the task index). Raises TaskError naming a task whose dataset cannot be had."""
    from evomerge.errors import TaskError
    from evomerge.scoring.catalog import resolve_tasks
    from evomerge.scoring.lm_eval_adapter import task_data

    rows: list[TaskRow] = []
    splits: tuple[Literal["search", "heldout"], ...] = ("search", "heldout")
    for split in splits:
        settings = config.tasks.settings(split)
        if settings is None:
            continue
        tm = resolve_tasks(settings)  # unknown names fail here, in a second
        if dry_run:
            for data in task_data.planned(tm, settings.tasks):
                rows.append(TaskRow(split, data, "local" if data.local else "hub"))
            continue
        for name in settings.tasks:
            try:
                loaded = task_data.load(tm, name)
            except TaskError as exc:
                raise TaskError(f"tasks.{split}: {exc}{_datasets_hint()}") from None
            rows += [TaskRow(split, d, "local" if d.local else "ready") for d in loaded]
    return rows


def _datasets_hint() -> str:
    import datasets

    if datasets.config.HF_DATASETS_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        return (
            "; downloads are off (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): set them to 0 and run "
            "`evomerge fetch` again where the hub is reachable"
        )
    return ""


def fetch_study(config: StudyConfig, *, dry_run: bool = False) -> FetchReport:
    """Models, then the study validated against them as `run` validates it (headers, shapes,
    config.json, the space, task names and metrics; not in a dry run, which has no weights),
    then the datasets: a model that does not fit fails before any dataset downloads."""
    t0 = time.perf_counter()
    models = [fetch_model(n, r, w, dry_run=dry_run) for n, r, w in study_models(config)]
    checked = False
    if not dry_run:
        from evomerge.study_plan import build_plan

        build_plan(config)  # reads the fetched snapshots: no second download
        checked = True
    tasks = fetch_tasks(config, dry_run=dry_run)
    return FetchReport(models, tasks, dry_run, checked, time.perf_counter() - t0)


def human_size(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the hub shows sizes)."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} TB"


def summary(report: FetchReport) -> str:
    """The closing line: what is where, and whether the study is ready to run."""
    by_status: dict[str, int] = {}
    for m in report.models:
        key = "would download" if m.status.startswith("would") else m.status
        by_status[key] = by_status.get(key, 0) + 1
    kinds = ", ".join(f"{n} {s}" for s, n in by_status.items())
    total = human_size(sum(m.bytes for m in report.models))
    hub_tasks = sum(1 for t in report.tasks if not t.data.local)
    tasks = f"{len(report.tasks)} tasks ({hub_tasks} with hub datasets)"
    if report.dry_run:
        missing = human_size(sum(m.to_download for m in report.models))
        return (
            f"dry run: {len(report.models)} models ({kinds}; {total}), {tasks}; "
            f"{missing} of weights to download; nothing was fetched"
        )
    return (
        f"fetched {len(report.models)} models ({kinds}; {total}) and {tasks} in "
        f"{report.seconds:.1f} s; every model matches the base (safetensors headers) and the "
        "study validates: ready to run"
    )

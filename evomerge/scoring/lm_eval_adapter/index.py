"""lm-eval's task index, YAML loader and metric registry, read without building any task.

`TaskManager.task_index` is public, but its values are `lm_eval.tasks._index.Entry` objects
from a private module; this module turns them into `IndexEntry`, ours, so the catalog reads
task configs without knowing lm-eval's classes.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import TaskError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager


@dataclass(frozen=True)
class IndexEntry:
    """One task, group or tag as lm-eval's index knows it."""

    name: str
    kind: str  # "TASK", "PY_TASK", "GROUP" or "TAG": the names of lm_eval.tasks._index.Kind
    cfg: dict[str, Any]  # the YAML with includes resolved, `!function`s left as strings
    tags: frozenset[str]  # a tag: the tasks it names; a task or group: its own tags


def _entry(raw: Any) -> IndexEntry:
    # lm_eval.tasks._index.Entry: name, kind (a Kind enum), yaml_path, cfg (None for a tag and
    # from TaskIndex.entry_from_path), tags (a set); a missing cfg is read the way
    # TaskIndex.build reads every YAML: _yaml_loader.load_yaml(resolve_func=False, recursive=True)
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = raw.cfg
    if cfg is None and raw.yaml_path is not None:
        cfg = load_yaml(raw.yaml_path, resolve_func=False, recursive=True)
    return IndexEntry(raw.name, raw.kind.name, dict(cfg or {}), frozenset(raw.tags))


def indexed(tm: TaskManager, name: str) -> IndexEntry | None:
    """The index entry of a registered name, or None."""
    raw = tm.task_index.get(name)
    return None if raw is None else _entry(raw)


def entry(tm: TaskManager, name: str) -> IndexEntry:
    """A registered name, or a path to a task YAML as TaskManager.load accepts it
    (`TaskManager._load_spec` falls back to `TaskIndex.entry_from_path`)."""
    from lm_eval.tasks._index import TaskIndex

    raw = tm.task_index.get(name) or TaskIndex.entry_from_path(Path(name))
    if raw is None:
        raise TaskError(f"unknown task {name!r}: neither a registered name nor a task YAML file")
    return _entry(raw)


def index_error(path: Path) -> Exception | None:
    """Why `TaskIndex.build` would skip this YAML file, or None. lm-eval logs such a file at
    debug level only ("Skip ..."), and the task is later "not found"; we name the cause."""
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    try:  # the two calls TaskIndex.build makes per file, into a scratch index
        TaskIndex.process_cfg(load_yaml(path, resolve_func=False, recursive=True), path, {})
    except Exception as exc:  # any parse or shape error; the caller only reports it
        return exc
    return None


@functools.lru_cache(maxsize=1)
def builtin_yaml_text() -> str:
    """All of lm-eval's built-in task YAMLs as one string (~7 MB): a name absent from it is no
    built-in task, found in a second instead of indexing every task (tens of seconds).
    Relies on the built-in tasks being YAML files under the `lm_eval.tasks` package folder,
    where `TaskManager(include_defaults=True)` indexes them."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    return "\n".join(f.read_text(errors="replace") for f in sorted(root.glob("**/*.yaml")))


def builtin_names() -> list[str]:
    """Task, group and tag names declared in the built-in YAMLs (for did-you-mean only)."""
    pattern = r"(?m)^\s*(?:task|group|tag):\s*[\"']?([\w.\-]+)"
    return sorted(set(re.findall(pattern, builtin_yaml_text())))


def higher_is_better(metric: str) -> bool | None:
    """lm_eval.api.registry.is_higher_better: the direction registered for a metric name, or
    None where the metric is unknown or custom."""
    from lm_eval.api.registry import is_higher_better

    try:
        return is_higher_better(metric)
    except Exception:  # unknown or custom metric: direction unknown
        return None


def default_metrics(output_type: str) -> list[str]:
    """lm_eval.api.registry.DEFAULT_METRIC_REGISTRY: the metrics a task without a metric_list
    reports for its output_type."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    return list(DEFAULT_METRIC_REGISTRY.get(output_type, []))

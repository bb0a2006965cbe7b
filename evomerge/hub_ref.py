"""Hub model references, with mergekit's pinned revision: `org/name@revision`.

The revision (a branch, a tag or a commit hash) stays part of the reference string everywhere
(study.yaml, recipes, mergekit files), so one shape carries it from the config to the download;
only the hub lookup (`checkpoint.resolve_model_path`, `evomerge fetch`) splits it off and hands
it to huggingface_hub as `revision=`. A path that exists is a local folder, '@' or not. This
module imports nothing heavy: config validation uses it.
"""

from __future__ import annotations

import re
from pathlib import Path

# 'org/name' (the hub's repo id characters), then at most one '@' and a revision: mergekit's
# ModelPath refuses a second '@' (and splits a LoRA's '+' first); branch names may hold '/'
# (refs/pr/1), never whitespace.
_HUB_RE = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^\s@+]+))?")


def is_hub_ref(ref: str) -> bool:
    """'org/name' or 'org/name@revision' that is no existing path."""
    return (
        _HUB_RE.fullmatch(ref) is not None
        and not ref.startswith((".", "/"))
        and not Path(ref).expanduser().exists()
    )


def split_revision(ref: str) -> tuple[str, str | None]:
    """'org/name@v2' -> ('org/name', 'v2'); a reference without a revision, or any that is no
    hub reference (an existing folder whose name holds '@'), comes back whole with None."""
    m = _HUB_RE.fullmatch(ref)
    if m is None or not is_hub_ref(ref):
        return ref, None
    return m["repo"], m["revision"]


def with_revision(repo: str, revision: str | None) -> str:
    """mergekit's ModelPath {path, revision} as one reference: 'org/name@revision'."""
    return f"{repo}@{revision}" if revision else repo


def display_name(ref: str) -> str:
    """The last part of a path or hub id, without a revision: a default short name
    ('org/tiny-s2@v2' -> 'tiny-s2')."""
    return Path(split_revision(ref)[0].rstrip("/")).name or ref

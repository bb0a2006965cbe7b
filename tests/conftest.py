"""Fixtures shared across test modules."""

from __future__ import annotations

import os

import pytest

# evomerge respects the user's Hugging Face settings and is online by default (README); the
# suite is offline: nothing in it may reach a hub. Set here, before any test module imports
# huggingface_hub or datasets (both read these once, at import), and so inherited by every
# `evomerge` subprocess and local Ray worker the tests start.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def small_zoo(tmp_path_factory):
    """The small demo zoo (about 11 s to build on 2 cores), built once per test session."""
    from evomerge.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("small_zoo"), small=True, progress=False)

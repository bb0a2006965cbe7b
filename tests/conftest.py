"""Fixtures shared across test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_zoo(tmp_path_factory):
    """The small demo zoo (about 11 s to build on 2 cores), built once per test session."""
    from evomerge.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("small_zoo"), small=True, progress=False)

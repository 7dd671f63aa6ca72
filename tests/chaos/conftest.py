"""Fixtures of the chaos suite: services a scenario starts are stopped whatever happens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def services(ray_local: None) -> Iterator[list[Any]]:
    """Service handles a scenario starts; all stopped at the end (a killed one quietly)."""
    started: list[Any] = []
    yield started
    for handle in started:
        handle.stop(timeout_s=20.0)


@pytest.fixture
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Where the chaos report goes when BILEVEL_CHAOS_REPORT does not say."""
    return tmp_path_factory.getbasetemp()

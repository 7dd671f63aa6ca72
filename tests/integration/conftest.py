"""Fixtures of the integration tests that need more than the session's single Redis server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from scheduler.settings import Settings
from tests.integration.observe_helpers import live_config
from tests.sentinel_cluster import SentinelCluster

# The deployments' passwords: tests check that no error message or repr ever shows them.
DATA_SECRET = "data-S3cret-pw"
SENTINEL_SECRET = "sentinel-S3cret-pw"


@pytest.fixture(scope="session")
def sentinel_cluster() -> Iterator[SentinelCluster]:
    """One password-protected master, replica and three sentinels for the tests that leave its
    topology alone (none kills a node). Started only by tests that ask for it."""
    with SentinelCluster(password=DATA_SECRET, sentinel_password=SENTINEL_SECRET) as cluster:
        yield cluster


@pytest.fixture
def disposable_sentinel_cluster() -> Iterator[SentinelCluster]:
    """A deployment of the test's own, for a test that kills its master."""
    with SentinelCluster(password=DATA_SECRET, sentinel_password=SENTINEL_SECRET) as cluster:
        yield cluster


@pytest.fixture
def live_service(ray_local: None, settings: Settings) -> Iterator[Any]:
    """A service on Ray with the test handlers' two queues (observe_helpers.live_config), its
    metrics and dashboard on a free port; stopped at the end."""
    from scheduler.service.runner import start_service

    handle = start_service(live_config(settings), leader_ttl_s=1.0, wait_s=30.0)
    try:
        yield handle
    finally:
        handle.stop(timeout_s=20.0)

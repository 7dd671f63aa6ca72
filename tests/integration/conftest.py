"""Fixtures of the integration tests that need more than the session's single Redis server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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

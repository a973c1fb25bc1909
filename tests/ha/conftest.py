"""The 3-node OpenBao Raft cluster (TLS, a private CA) the HA tests run against: one per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ha.raft_cluster import RaftCluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[RaftCluster]:
    raft = RaftCluster()
    try:
        yield raft.start()
    finally:
        raft.cleanup()

"""Fixtures the attack tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.adversarial.support_peers import Cgroups


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    """Cgroups a test creates under every systemd hierarchy, removed after it."""
    made = Cgroups()
    try:
        yield made
    finally:
        made.cleanup()

"""Fixtures for the container tests: podman (installed when missing) and keyd's image, built once
per test session with `make image`'s script on a Debian base imported from a cached debootstrap
tree (the first run builds the tree, about two minutes; later runs reuse it)."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containers.podman import Podman, require_podman


@pytest.fixture(scope="session")
def podman() -> Iterator[Podman]:
    require_podman()
    workdir = Path(tempfile.mkdtemp(prefix="keyd-podman-"))
    try:
        yield Podman(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def keyd_image(podman: Podman) -> Iterator[str]:
    """keyd's image from this checkout's Containerfile (removed at the end of the session)."""
    tag = f"localhost/keyd-test:{secrets.token_hex(4)}"
    base = podman.base_image()
    before = set(podman.dangling())
    image = podman.build_keyd(base, tag)
    try:
        yield image
    finally:
        podman.run("rmi", "--force", image, check=False)
        for leftover in set(podman.dangling()) - before:  # this build's stage images, nothing else
            podman.run("rmi", leftover, check=False)

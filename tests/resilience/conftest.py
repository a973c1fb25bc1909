"""Resilience fixtures: a persistent OpenBao that can be stopped, sealed and restarted, keyd on it
with AppRole auth, and a per-scenario report of every answer counted.

The OpenBao server keeps its storage (single-node Raft; OpenBao 2 has no "file" backend) in a
directory of its own, so a restart keeps the KV data, the
AppRole role and its policy; the fixture initialises it once (one unseal key) and unseals it after
every restart. Each scenario leaves it running and unsealed for the next one (the ``vault`` fixture
makes sure of it).

Every scenario reports its counts: printed (visible with ``-s`` or ``-rA``), recorded with
``record_property`` and repeated in a "keyd resilience" section at the end of the terminal output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import KeydProcess
from tests.resilience.support import Load, PersistentBao

REPORTS: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if REPORTS:
        terminalreporter.section("keyd resilience: answers counted per scenario")
        for line in sorted(REPORTS, key=lambda text: int(text.split(".", 1)[0])):
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def persistent_bao() -> Iterator[PersistentBao]:
    """OpenBao with persistent storage, KV v2 at secret/, AppRole role "keyd" reading secret/talkjs/*."""
    bao = PersistentBao()
    try:
        bao.first_start()
        bao.set_up_for_keyd()
        yield bao
    finally:
        bao.cleanup()


@pytest.fixture
def vault(persistent_bao: PersistentBao) -> PersistentBao:
    """The persistent OpenBao, running and unsealed at the start of the test."""
    persistent_bao.ensure_up()
    return persistent_bao


@pytest.fixture
def approle_files(vault: PersistentBao, short_dir: Path) -> tuple[Path, Path]:
    """role_id and a fresh secret_id for the "keyd" role, in 0600 files."""
    root = vault.client()
    role_id = root.auth.approle.read_role_id("keyd")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("keyd")["data"]["secret_id"]
    paths = (short_dir / "role-id", short_dir / "secret-id")
    for path, value in zip(paths, (role_id, secret_id), strict=True):
        path.write_text(value)
        path.chmod(0o600)
    return paths


@pytest.fixture
def start_keyd(short_dir: Path, keyd_procs: list[KeydProcess]) -> Callable[..., KeydProcess]:
    """Start keyd processes on the persistent OpenBao; stopped at the end of the test."""

    def make(config: dict[str, Any], wait_ready: bool = True) -> KeydProcess:
        proc = KeydProcess(short_dir, config, env={})
        keyd_procs.append(proc)
        proc.start(wait_ready=wait_ready)
        return proc

    return make


@pytest.fixture
def report(record_property: Callable[[str, object], None]) -> Callable[..., None]:
    """Print, record and summarise a scenario's counts (plus an optional note)."""

    def emit(scenario: str, load: Load, note: str = "") -> None:
        line = f"{scenario}: {load.summary()}" + (f"; {note}" if note else "")
        print(line)
        record_property("answers", load.summary())
        REPORTS.append(line)

    return emit

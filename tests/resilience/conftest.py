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

from tests.conftest import new_key
from tests.helpers import KeydProcess, wait_until
from tests.resilience.support import POLICY, Load, PersistentBao, try_call

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
        root = bao.client()
        # Each step is retried: on a loaded machine a single Raft node can step down for a moment
        # ("local node not active"); the mounts are checked first so a retry never enables twice.
        steps = (
            lambda: "secret/" in root.sys.list_mounted_secrets_engines()["data"]
            or root.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"}),
            lambda: "approle/" in root.sys.list_auth_methods()["data"]
            or root.sys.enable_auth_method("approle"),
            lambda: root.sys.create_or_update_policy("keyd", POLICY),
            lambda: root.auth.approle.create_or_update_approle(
                "keyd", token_policies=["keyd"], token_ttl="10m", token_max_ttl="1h", secret_id_ttl="0"
            ),
        )
        for step in steps:
            wait_until(lambda step=step: try_call(step), 30, what="OpenBao set up for the scenarios")
        # The KV mount becomes usable a moment after it is enabled.
        wait_until(lambda: try_call(lambda: bao.write_key(new_key())), 20, what="KV v2 ready")
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

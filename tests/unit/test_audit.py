"""The audit sink: the line format, hashing, file mode and append-only, buffering, reopen, errors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keyd.config import AppConfig, AuditConfig, GrantConfig
from keyd.daemon.callers.caller import Caller
from keyd.daemon.keys.health import Health
from keyd.daemon.keys.keystore import KeySnapshot, SecretKey
from keyd.daemon.observe.audit import AuditLog
from keyd.daemon.policy.grants import Policy
from keyd.daemon.signing.api import Api, Request
from keyd.daemon.signing.decisions import Decision
from keyd.errors import StartupError
from tests.helpers import built_config

CALLER = Caller(
    pid=4242,
    uid=33,
    gid=33,
    user='www-"data"',
    groups=frozenset({"www-data"}),
    gids=frozenset({33}),
    unit="php-fpm.service",
)
KEY = "sk_test_auditAUDITaudit0123456789"


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_json_line_per_record_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(AuditConfig(file=str(path)), clock=lambda: 1_700_000_000.25)
    audit.record(Decision(CALLER, "default", "user", "alice\n", 3600, "issued", None))
    audit.record(Decision(CALLER, None, None, None, None, "refused", "forbidden"))
    first, second = lines(path)
    assert first == {
        "time": "2023-11-14T22:13:20.250Z",
        "outcome": "issued",
        "code": None,
        "app": "default",
        "type": "user",
        "sub": "alice\n",
        "ttl": 3600,
        "pid": 4242,
        "uid": 33,
        "gid": 33,
        "user": 'www-"data"',
        "unit": "php-fpm.service",
    }
    assert second["outcome"] == "refused" and second["code"] == "forbidden"
    assert second["app"] is None and second["sub"] is None and second["ttl"] is None


def test_hash_user_ids_replaces_sub_with_its_sha256(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(AuditConfig(file=str(path), hash_user_ids=True))
    audit.record(Decision(CALLER, "default", "user", "alice", 60, "issued", None))
    (doc,) = lines(path)
    assert "sub" not in doc
    assert doc["sub_sha256"] == hashlib.sha256(b"alice").hexdigest()
    assert "alice" not in path.read_text()


def test_file_is_created_0600_and_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_text('{"earlier": true}\n')
    os.chmod(path, 0o600)
    old_umask = os.umask(0)
    try:
        AuditLog(AuditConfig(file=str(path))).record(Decision(CALLER, "a", "user", "b", 1, "issued", None))
        fresh = tmp_path / "fresh.log"
        AuditLog(AuditConfig(file=str(fresh))).record(Decision(CALLER, "a", "user", "b", 1, "issued", None))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    assert lines(path)[0] == {"earlier": True}
    assert len(lines(path)) == 2


def test_unopenable_file_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"audit\.file"):
        AuditLog(AuditConfig(file=str(tmp_path / "missing-dir" / "audit.log")))


class FakeLoop:
    def __init__(self) -> None:
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers.append((delay, callback))


def test_with_a_loop_lines_are_buffered_and_flushed_by_one_timer(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(AuditConfig(file=str(path)), flush_interval=0.2)
    loop = FakeLoop()
    audit.attach(loop)  # type: ignore[arg-type]
    for i in range(100):
        audit.record(Decision(CALLER, "default", "user", f"u{i}", 60, "issued", None))
    assert path.read_text() == ""
    assert len(loop.timers) == 1 and loop.timers[0][0] == 0.2
    loop.timers[0][1]()
    assert [d["sub"] for d in lines(path)] == [f"u{i}" for i in range(100)]
    audit.record(Decision(CALLER, "default", "user", "next", 60, "issued", None))
    assert len(loop.timers) == 2, "a new burst schedules a new flush"
    audit.close()
    assert lines(path)[-1]["sub"] == "next"


def test_a_big_burst_is_written_without_waiting_for_the_timer(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(AuditConfig(file=str(path)))
    audit.attach(FakeLoop())  # type: ignore[arg-type]
    for _ in range(2000):
        audit.record(Decision(CALLER, "default", "user", "x" * 64, 60, "issued", None))
    assert len(lines(path)) >= 1000


def test_reopen_after_rotation_writes_to_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(AuditConfig(file=str(path)))
    audit.attach(FakeLoop())  # type: ignore[arg-type]
    audit.record(Decision(CALLER, "default", "user", "before", 60, "issued", None))
    path.rename(tmp_path / "audit.log.1")
    audit.reopen()  # flushes "before" into the rotated file first
    audit.record(Decision(CALLER, "default", "user", "after", 60, "issued", None))
    audit.flush()
    assert [d["sub"] for d in lines(tmp_path / "audit.log.1")] == ["before"]
    assert [d["sub"] for d in lines(path)] == ["after"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def issue(audit: AuditLog, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        audit.record(Decision(CALLER, "default", "user", f"u{i}", 60, "issued", None))


def subs(tmp_path: Path, keep: int) -> list[list[int]]:
    """The user ids of each file, oldest file first (audit.log.<keep> ... audit.log)."""
    files = [tmp_path / f"audit.log.{n}" for n in range(keep, 0, -1)] + [tmp_path / "audit.log"]
    return [[int(d["sub"][1:]) for d in lines(path)] for path in files if path.exists()]


def test_rotation_by_size_keeps_keep_files_of_0600_with_no_line_lost_or_split(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    old_umask = os.umask(0)
    try:
        audit = AuditLog(AuditConfig(file=str(path), max_size=4000, keep=3))
        audit.attach(FakeLoop())  # type: ignore[arg-type]  # batches of lines, as in keyd
        for batch in range(40):
            issue(audit, 25, batch * 25)
            audit.flush()
    finally:
        os.umask(old_umask)
    audit.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]
    for name in ("audit.log", "audit.log.1", "audit.log.2", "audit.log.3"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    for name in ("audit.log.1", "audit.log.2", "audit.log.3"):  # rotated after the write that reached it
        assert 4000 <= (tmp_path / name).stat().st_size < 4000 + 25 * 300
    kept = [sub for file in subs(tmp_path, 3) for sub in file]
    assert kept == list(range(kept[0], 1000)), "the kept files hold one unbroken run ending with the last line"
    assert kept[0] > 0  # older lines went with the oldest file


def test_rotation_counts_what_the_file_already_held(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_text('{"sub": "u-1"}\n' * 300)
    os.chmod(path, 0o600)
    audit = AuditLog(AuditConfig(file=str(path), max_size=4000, keep=2))
    issue(audit, 1)
    assert lines(tmp_path / "audit.log.1")[-1]["sub"] == "u0" and path.stat().st_size == 0
    issue(audit, 1, 1)
    assert [d["sub"] for d in lines(path)] == ["u1"]


def test_max_size_zero_never_rotates(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(AuditConfig(file=str(path), max_size=0))
    issue(audit, 200)
    assert [p.name for p in tmp_path.iterdir()] == ["audit.log"] and len(lines(path)) == 200


def test_a_rotation_that_cannot_open_a_new_file_keeps_every_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(AuditConfig(file=str(path), max_size=2000, keep=20))

    def refuse(name: str) -> int:
        raise StartupError(f"audit.file: cannot open {name!r}: No space left on device")

    monkeypatch.setattr("keyd.daemon.observe.audit.open_audit_file", refuse)
    issue(audit, 30)
    assert "could not rotate the audit file" in caplog.text
    monkeypatch.undo()
    issue(audit, 30, 30)
    assert sorted(sub for file in subs(tmp_path, 20) for sub in file) == list(range(60))
    assert lines(path)[-1]["sub"] == "u59"  # back to a fresh audit.log at the next rotation


def test_write_errors_are_logged_once_and_do_not_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audit = AuditLog(AuditConfig(file=str(tmp_path / "audit.log")))
    os.close(audit._fd)  # simulate a broken file descriptor
    audit._fd = os.open("/dev/full", os.O_WRONLY) if os.path.exists("/dev/full") else 10_000
    with caplog.at_level(logging.ERROR, logger="keyd.audit"):
        for _ in range(3):
            audit.record(Decision(CALLER, "default", "user", "alice", 60, "issued", None))
    errors = [r for r in caplog.records if r.name == "keyd.audit"]
    assert len(errors) == 1
    assert "alice" not in errors[0].getMessage()


def test_stderr_is_the_default_sink(capfd: pytest.CaptureFixture[str]) -> None:
    AuditLog(AuditConfig()).record(Decision(CALLER, "default", "app", None, 30, "issued", None))
    err = capfd.readouterr().err.strip().splitlines()
    assert json.loads(err[-1])["type"] == "app"


# -- through the API: every decision is recorded, never a token, signature or key --------------


class OneKey:
    def __init__(self) -> None:
        key = SecretKey.from_str(KEY)
        self.snapshot = KeySnapshot("default", key, key, 3, 2, 0.0)

    def signing(self, app: str) -> KeySnapshot:
        return self.snapshot

    def health(self) -> Health:
        return Health("ok", ())


def test_api_decisions_are_audited_without_secrets(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    cfg = built_config(
        AppConfig(name="default", app_id="tA"),
        grants=(GrantConfig(index=0, types=("user", "signature"), max_ttl=600),),
        source="t",
    )
    audit = AuditLog(AuditConfig(file=str(path)))
    api = Api(cfg, OneKey(), Policy(cfg.grants), audit)

    def post(url: str, payload: dict[str, Any]) -> tuple[int, bytes]:
        body = json.dumps(payload).encode()
        request = Request(b"POST", url.encode(), {}, {b"content-type": b"application/json"}, body, CALLER)
        response = api.handle(request)
        return response.status, response.body

    status, body = post("/v1/tokens", {"user_id": "alice"})
    assert status == 200
    token = json.loads(body)["token"]
    status, body = post("/v1/signatures", {"user_id": "bob"})
    assert status == 200
    signature = json.loads(body)["signature"]
    assert post("/v1/tokens", {"type": "app"})[0] == 403
    assert post("/v1/tokens", {"user_id": "carol", "ttl": 601})[0] == 403
    records = lines(path)
    assert [(r["outcome"], r["type"], r["sub"], r["code"]) for r in records] == [
        ("issued", "user", "alice", None),
        ("issued", "signature", "bob", None),
        ("refused", "app", None, "forbidden"),
        ("refused", "user", "carol", "forbidden"),
    ]
    assert records[0]["ttl"] == 600, "the grant's max_ttl lowers the default of 1h"
    text = path.read_text()
    for secret in (KEY, token, token.split(".")[2], signature):
        assert secret not in text

"""The audit log's bound on refusals: a burst, then a rate, per uid and code; the rest folded into
counted summary lines; issued tokens always line by line; refused user ids cut short."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from keyd.config import AuditConfig
from keyd.daemon.callers.caller import Caller
from keyd.daemon.observe import audit as audit_module
from keyd.daemon.observe.audit import MAX_REFUSED_SUB, AuditLog
from keyd.daemon.signing.decisions import Decision, RestCall
from keyd.errors import StartupError

MALLORY = Caller(
    pid=7, uid=1001, gid=1001, user="mallory", groups=frozenset(), gids=frozenset(), unit="x" * 600
)
ALICE = Caller(pid=8, uid=1002, gid=1002, user="alice", groups=frozenset(), gids=frozenset(), unit="")


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def make(tmp_path: Path, **options: Any) -> tuple[AuditLog, Clock, Path]:
    clock = Clock()
    path = tmp_path / "audit.log"
    config = dataclasses.replace(AuditConfig(file=str(path)), **options)
    return AuditLog(config, clock=clock), clock, path


def test_a_burst_then_folded_with_a_count(tmp_path: Path) -> None:
    audit, clock, path = make(tmp_path, refusal_burst=5, refusal_rate=1.0)
    for i in range(1000):
        audit.record(Decision(MALLORY, "default", "user", f"id-{i}", 3600, "refused", "forbidden"))
    audit.record(Decision(ALICE, "default", "user", "alice", 3600, "issued", None))
    clock.now += 0.5
    audit.summarise()
    got = read(path)
    refused = [line for line in got if line["outcome"] == "refused"]
    assert [line["sub"] for line in refused] == [f"id-{i}" for i in range(5)]
    (summary,) = [line for line in got if line["outcome"] == "refused_folded"]
    assert summary["folded"] == 995
    assert (summary["uid"], summary["code"], summary["user"]) == (1001, "forbidden", "mallory")
    assert summary["since"] == "2023-11-14T22:13:20.000Z"
    assert [line["sub"] for line in got if line["outcome"] == "issued"] == ["alice"]
    # nothing folded since: no second summary line
    audit.summarise()
    assert len(read(path)) == len(got)


def test_the_bucket_refills_at_the_rate(tmp_path: Path) -> None:
    audit, clock, path = make(tmp_path, refusal_burst=2, refusal_rate=1.0)
    for _ in range(5):
        audit.record(Decision(MALLORY, "default", "user", "a", None, "refused", "forbidden"))
    clock.now += 3.0  # three tokens back, capped at the burst of two
    for _ in range(5):
        audit.record(Decision(MALLORY, "default", "user", "b", None, "refused", "forbidden"))
    audit.close()
    got = read(path)
    assert [line["sub"] for line in got if line["outcome"] == "refused"] == ["a", "a", "b", "b"]
    assert sum(line["folded"] for line in got if line["outcome"] == "refused_folded") == 6


def test_every_issued_token_has_its_line(tmp_path: Path) -> None:
    audit, _, path = make(tmp_path, refusal_burst=1)
    for i in range(3000):
        audit.record(Decision(MALLORY, "default", "user", f"u{i}", 60, "issued", None))
        audit.record(Decision(MALLORY, "default", "user", f"r{i}", 60, "refused", "rate_limited"))
    audit.close()
    got = read(path)
    assert [line["sub"] for line in got if line["outcome"] == "issued"] == [f"u{i}" for i in range(3000)]
    assert [line["folded"] for line in got if line["outcome"] == "refused_folded"] == [2999]


def test_callers_and_codes_are_counted_apart(tmp_path: Path) -> None:
    audit, _, path = make(tmp_path, refusal_burst=1)
    for _ in range(10):
        audit.record(Decision(MALLORY, "default", "user", "m", None, "refused", "forbidden"))
        audit.record(Decision(MALLORY, "default", "user", "m", None, "refused", "rate_limited"))
        audit.record(Decision(ALICE, "default", "user", "a", None, "refused", "forbidden"))
    audit.close()
    summaries = {(line["uid"], line["code"]): line["folded"] for line in read(path) if "folded" in line}
    assert summaries == {(1001, "forbidden"): 9, (1001, "rate_limited"): 9, (1002, "forbidden"): 9}


def test_a_refused_user_id_and_long_names_are_cut(tmp_path: Path) -> None:
    audit, _, path = make(tmp_path)
    long_id = "\u2603" * 256  # 256 characters, six bytes each once escaped
    audit.record(Decision(MALLORY, "default", "user", long_id, None, "refused", "forbidden"))
    audit.record(Decision(MALLORY, "default", "user", long_id, None, "issued", None))
    audit.close()
    refused, issued = read(path)
    assert refused["sub"] == long_id[:MAX_REFUSED_SUB]
    assert refused["sub_chars"] == 256
    assert len(refused["unit"]) == 256
    assert issued["sub"] == long_id  # an issued token's subject is recorded whole
    assert max(len(line) for line in path.read_text().splitlines()) < 2048


def test_rest_lines_cut_long_user_and_unit_names_as_token_lines_do(tmp_path: Path) -> None:
    audit, _, path = make(tmp_path)
    caller = dataclasses.replace(MALLORY, user="u" * 600)
    audit.rest(RestCall(caller, "default", "GET", "/users/x", "proxied", None, 200, 0.01, 1))
    audit.rest(RestCall(caller, "default", "GET", "/users/x", "refused", "forbidden", None, 0.0, 0))
    audit.close()
    for line in read(path):
        assert len(line["unit"]) == 256 and len(line["user"]) == 256, line


def test_hashed_refusals_hash_the_whole_id(tmp_path: Path) -> None:
    audit, _, path = make(tmp_path, hash_user_ids=True)
    audit.record(Decision(MALLORY, "default", "user", "z" * 200, None, "refused", "forbidden"))
    audit.close()
    (line,) = read(path)
    assert line["sub_sha256"] == hashlib.sha256(b"z" * 200).hexdigest()
    assert "sub" not in line


def test_a_flood_of_20000_refusals_stays_small(tmp_path: Path) -> None:
    audit, clock, path = make(tmp_path)
    for i in range(20_000):
        clock.now += 0.0002  # 5,000 a second for four seconds
        audit.record(Decision(MALLORY, "default", "user", "A" * 256 + str(i), None, "refused", "forbidden"))
    audit.close()
    assert path.stat().st_size < 64 * 1024
    assert (
        sum(line.get("folded", 0) for line in read(path))
        + sum(1 for line in read(path) if line["outcome"] == "refused")
        == 20_000
    )


# -- the file itself ---------------------------------------------------------------------------


def test_the_audit_file_is_not_followed_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "credential"
    target.write_text("secret\n")
    target.chmod(0o600)
    link = tmp_path / "audit.log"
    link.symlink_to(target)
    with pytest.raises(StartupError, match="symbolic link"):
        AuditLog(AuditConfig(file=str(link)))
    assert target.read_text() == "secret\n"


def test_the_audit_file_must_be_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "audit.log"
    os.mkfifo(fifo)
    with pytest.raises(StartupError, match=r"not a regular file|cannot open"):
        AuditLog(AuditConfig(file=str(fifo)))


def test_reopen_refuses_a_symlink_and_keeps_the_old_file(tmp_path: Path) -> None:
    audit, _, path = make(tmp_path)
    audit.record(Decision(ALICE, "default", "user", "one", None, "issued", None))
    target = tmp_path / "other"
    target.write_text("")
    path.rename(tmp_path / "audit.log.1")
    path.symlink_to(target)
    audit.reopen()
    audit.record(Decision(ALICE, "default", "user", "two", None, "issued", None))
    audit.close()
    assert target.read_text() == ""
    assert [line["sub"] for line in read(tmp_path / "audit.log.1")] == ["one", "two"]


def test_the_table_of_callers_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_module, "_MAX_REFUSAL_KEYS", 3)
    audit, _, path = make(tmp_path, refusal_burst=1)
    for uid in range(10):
        caller = dataclasses.replace(MALLORY, uid=2000 + uid)
        for _ in range(3):
            audit.record(Decision(caller, "default", "user", "m", None, "refused", "forbidden"))
    assert len(audit._refusals) <= 4  # three callers and the shared bucket
    audit.close()
    lines = read(path)
    total = sum(1 for line in lines if line["outcome"] == "refused") + sum(
        line.get("folded", 0) for line in lines
    )
    assert total == 30
    shared = [line for line in lines if line.get("uid") == -1]
    assert shared and shared[0]["user"] == "" and shared[0]["pid"] == 0

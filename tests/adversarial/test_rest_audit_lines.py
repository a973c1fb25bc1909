"""A caller with no grant cannot write kilobytes per request into the audit log via the REST proxy.

Every refused ``/v1/rest/...`` request is audited with its path, and the path was logged whole:
a URL may be 8 KiB, so a caller with no grant at all, pipelining requests such as
``GET /v1/rest/default/users/xxxx...`` (7,000 characters, refused 403), wrote about 7 KiB of audit
log per request (5,000 requests: 35 MiB, in about a second). With ``hash_user_ids`` it was worse:
``/a/b/a/b/...`` has 4,000 segments, each id hashed to 71 characters. Now a refused call's path is
logged up to 200 characters (as the error message quotes it), a proxied call's up to 1,024, after
hashing, "..." marking the cut; and repeated REST refusals are folded per (uid, code) into counted
``refused_folded`` lines, as token refusals are.

Against a real keyd with an audit file; the attacker is this process, whose uid no grant names.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import base_config
from tests.helpers import wait_until

REQUESTS = 5000


@pytest.mark.parametrize(
    ("hashed", "path", "logged"),
    [
        (False, "/users/" + "x" * 7000, "/users/" + "x" * 190 + "..."),
        (True, "/a/b" * 1700, "/a/sha256:" + hashlib.sha256(b"b").hexdigest() + "/a/sha256:"),
    ],
)
def test_refused_rest_calls_with_long_paths_do_not_flood_the_audit_log(
    bao: Any,
    secret_path: tuple[str, str],
    short_dir: Path,
    keyd_factory: Any,
    hashed: bool,
    path: str,
    logged: str,
) -> None:
    config = base_config(bao, short_dir, secret_path[0])
    audit = short_dir / "audit.log"
    config["audit"] = {"file": str(audit), "hash_user_ids": hashed, "refusal_summary_every": "1s"}
    other = os.getuid() + 1 if os.getuid() != 0 else 65534
    config["grant"] = [{"uid": other, "types": ["rest"], "rest": ["GET /users/*"]}]
    keyd = keyd_factory(config)
    request = f"GET /v1/rest/default{path} HTTP/1.1\r\nHost: keyd\r\n\r\n".encode()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(keyd.socket)
        # Pipelined: a writer thread sends every request while this thread reads the answers.
        writer = threading.Thread(target=lambda: sock.sendall(request * REQUESTS), daemon=True)
        writer.start()
        received, tail = 0, b""
        while received < REQUESTS:
            chunk = sock.recv(1 << 20)
            assert chunk, "keyd closed the connection"
            received += (tail + chunk).count(b"HTTP/1.1 403") - tail.count(b"HTTP/1.1 403")
            tail = chunk[-16:]
        writer.join(10)
    def counted() -> int:
        if not audit.exists():
            return 0
        lines = [json.loads(line) for line in audit.read_text().splitlines()]
        return sum(line.get("folded", 1) for line in lines)

    wait_until(lambda: counted() >= REQUESTS, what="every refusal logged or folded")
    size = audit.stat().st_size
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    refused = [line for line in lines if line["outcome"] == "refused"]
    folded = [line for line in lines if line["outcome"] == "refused_folded"]
    assert refused and folded
    assert {line["code"] for line in lines} == {"forbidden"}
    assert len(refused) + sum(line["folded"] for line in folded) == REQUESTS
    assert all(len(line["path"]) <= 200 for line in refused), max(len(line["path"]) for line in refused)
    assert refused[0]["path"].startswith(logged) and refused[0]["path"].endswith("...")
    assert size <= 64 * 1024, f"{size} bytes of audit log for {REQUESTS} refusals"

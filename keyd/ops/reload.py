"""``keyd reload``: SIGHUP a running keyd and wait for its verdict (the unit's ExecReload=).

``systemctl reload keyd`` used to return 0 whatever happened, while the journal said "grants not
reloaded". This sends SIGHUP to keyd's main process, then reads ``GET /v1/health`` until the
``reload`` section counts a newer reload, and exits 0 when it applied everything (the config file
and every app's key), 1 when it did not (printing why: keyd keeps what it had), 2 when keyd cannot
be reached or does not finish within the timeout.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from keyd.client import ClientError, KeydClient

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2


def _last(client: KeydClient) -> dict[str, Any]:
    _, doc = client.health()
    return dict(doc.get("reload") or {})


def reload(socket_path: str, pid: int, timeout: float = 60.0) -> int:
    try:
        with KeydClient(socket_path, timeout=5.0) as client:
            before = int(_last(client).get("count") or 0)
            try:
                os.kill(pid, signal.SIGHUP)
            except OSError as exc:
                print(f"keyd reload: cannot signal pid {pid}: {exc.strerror}", file=sys.stderr)
                return EXIT_UNREACHABLE
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                last = _last(client)
                if int(last.get("count") or 0) > before:
                    if last.get("ok"):
                        print("keyd reloaded: the config file and every app's key")
                        return EXIT_OK
                    print(f"keyd reload failed, keeping what it had: {last.get('error')}", file=sys.stderr)
                    return EXIT_FAILED
                time.sleep(0.05)
    except ClientError as exc:
        print(f"keyd reload: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(f"keyd reload: no verdict within {timeout:g}s (is Vault slow?)", file=sys.stderr)
    return EXIT_UNREACHABLE

"""10,000 grants: decisions stay correct and remembered decisions follow a SIGHUP (issue 19).

A real keyd on a real OpenBao with this test's uid's grant behind 9,999 others; the same
kept-alive connection is decided again after each reload. The throughput these numbers are about
is measured by `keyd bench --scale` (docs/benchmarks.md), not here.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from tests.conftest import base_config
from tests.helpers import to_toml, wait_until

OTHERS = 9_999


def _grants(own: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"uid": 3_000_000 + i, "types": ["user"]} for i in range(OTHERS)] + [own]


def test_ten_thousand_grants_decide_correctly_and_follow_a_reload(
    bao: Any, secret_path: tuple[str, str], short_dir: Path, keyd_factory: Any
) -> None:
    config = base_config(bao, short_dir, secret_path[0])
    config["grant"] = _grants({"uid": os.getuid(), "types": ["user"]})
    began = time.monotonic()
    keyd = keyd_factory(config)
    assert time.monotonic() - began < 30  # generous: docs/benchmarks.md has the measured figure
    client = keyd.http()
    assert client.post_json("/v1/tokens", {"user_id": "a"})[0] == 200
    status, body = client.post_json("/v1/tokens", {"type": "app"})
    assert (status, body["error"]["code"]) == (403, "forbidden")
    # The same kept-alive connection, after a reload that grants app tokens too.
    config["grant"] = _grants({"uid": os.getuid(), "types": ["user", "app"]})
    keyd.config_path.write_text(to_toml(config))
    keyd.signal(signal.SIGHUP)
    wait_until(lambda: f"{OTHERS + 1} grant(s) reloaded" in keyd.logs(), what="the reload", timeout=30)
    assert client.post_json("/v1/tokens", {"type": "app"})[0] == 200
    # And a reload that drops this uid's grant: refused on the next request.
    config["grant"] = _grants({"uid": 0 if os.getuid() else 1, "types": ["user"]})
    keyd.config_path.write_text(to_toml(config))
    keyd.signal(signal.SIGHUP)
    wait_until(lambda: keyd.logs().count(f"{OTHERS + 1} grant(s) reloaded") >= 2, what="the second reload", timeout=30)
    status, body = client.post_json("/v1/tokens", {"user_id": "a"})
    assert (status, body["error"]["code"]) == (403, "forbidden")

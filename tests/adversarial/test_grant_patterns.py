"""An operator's backtracking ``user_id_pattern`` cannot stall keyd for every caller.

With Python's re, ``^(a+)+$`` against ``"a" * 40 + "!"`` backtracks for hours, on the event loop:
every other caller waits. keyd compiles grant patterns with RE2 (linear time in the user id), and
refuses at load, naming the file and the grant, what RE2 cannot match that way (backreferences,
lookaround). Against a real keyd on a real OpenBao.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import base_config
from tests.helpers import Http, to_toml

CRAFTED = "a" * 40 + "!"


def test_a_crafted_user_id_does_not_stall_other_callers(
    bao: Any, secret_path: tuple[str, str], short_dir: Path, keyd_factory: Any
) -> None:
    config = base_config(bao, short_dir, secret_path[0])
    config["grant"] = [{"uid": os.getuid(), "types": ["user"], "user_id_pattern": "^(a+)+$"}]
    keyd = keyd_factory(config)
    answers: list[tuple[int, Any]] = []

    def attacker() -> None:
        answers.append(Http(keyd.socket, timeout=30).post_json("/v1/tokens", {"user_id": CRAFTED}))

    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    time.sleep(0.2)  # the crafted id is in keyd (and, before RE2, still being matched)
    began = time.monotonic()
    status, body = Http(keyd.socket, timeout=5).post_json("/v1/tokens", {"user_id": "aaa"})
    waited = time.monotonic() - began
    assert status == 200 and body["token"], body
    assert waited < 0.5, f"another caller waited {waited:.2f}s behind one crafted user_id"
    thread.join(5)
    assert answers and answers[0][0] == 403, answers
    assert answers[0][1]["error"]["code"] == "forbidden"


def test_a_pattern_re2_cannot_match_in_linear_time_is_refused_at_load(
    bao: Any, secret_path: tuple[str, str], short_dir: Path
) -> None:
    config = base_config(bao, short_dir, secret_path[0])
    config["grant"] = [
        {"uid": os.getuid(), "types": ["user"]},
        {"uid": os.getuid(), "types": ["user"], "user_id_pattern": r"^(a)\1$"},
    ]
    path = short_dir / "keyd.toml"
    path.write_text(to_toml(config))
    result = subprocess.run(
        [sys.executable, "-m", "keyd", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "VAULT_TOKEN": "s.x"},
    )
    assert result.returncode != 0
    assert str(path) in result.stderr and "grant[1].user_id_pattern" in result.stderr, result.stderr
    assert "linear time" in result.stderr and "backreferences" in result.stderr

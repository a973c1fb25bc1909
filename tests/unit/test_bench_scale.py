"""keyd bench --scale's configs: N grants with the caller's last, M apps; each loads as a config."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from types import SimpleNamespace

from keyd import config
from keyd.bench import scale
from keyd.bench.stack import _KEYD_CONFIG
from keyd.bench.workload import APP_ID


def test_the_scale_configs_load_with_the_callers_grant_last(tmp_path: Path) -> None:
    path = tmp_path / "keyd.toml"
    path.write_text(
        _KEYD_CONFIG.format(
            socket=json.dumps(str(tmp_path / "k.sock")), address='"http://127.0.0.1:1"', app_id=APP_ID,
            source='path = "talkjs/bench"', uid=4242,
        )
    )
    stack = SimpleNamespace(config_path=str(path), PATH="talkjs/bench")
    text = scale._config(stack, grants=1_000, apps=50)  # type: ignore[arg-type]
    cfg = config.parse(tomllib.loads(text), "scale.toml")
    assert len(cfg.grants) == 1_000 and cfg.grants[-1].uid == 4242
    assert len(cfg.apps) == 50 and cfg.server.max_connections_per_uid == 2048

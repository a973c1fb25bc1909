"""OpenBao servers the tests start from a config file: persistent (Raft) storage, TLS listeners.

Only tests need them (the crash and outage scenarios, the HA cluster, the TLS walkthrough); ``keyd
dev``, ``make run`` and the benchmark only ever run the in-memory dev server, so keyd.ops.dev ships
that one and this subclass adds the rest here.
"""

from __future__ import annotations

import os
from pathlib import Path

import hvac

from keyd.ops.dev import BaoServer, bao_binary


class ConfiguredBao(BaoServer):
    """``bao server -config=FILE`` with ``config_hcl``: it starts sealed and uninitialised; the
    caller initialises and unseals it (and sets ``root_token``). ``ca_cert`` verifies a TLS
    listener's certificate while waiting for it to come up."""

    def __init__(
        self,
        config_hcl: str,
        port: int,
        scheme: str = "http",
        ca_cert: str | None = None,
        log_path: str | None = None,
    ) -> None:
        self.scheme = scheme
        super().__init__(port=port, log_path=log_path)
        self.root_token = ""
        self.verify = ca_cert or True
        self._config_hcl = config_hcl

    def command(self, env: dict[str, str]) -> list[str]:
        config_file = os.path.join(self.workdir, "bao.hcl")
        Path(config_file).write_text(self._config_hcl)
        return [bao_binary(), "server", f"-config={config_file}"]

    def is_up(self, client: hvac.Client) -> bool:
        client.sys.read_health_status(method="GET")  # any answer: sealed and uninitialised is fine
        return True

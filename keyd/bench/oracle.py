"""What the signing-oracle check costs: ``python -m keyd.bench.oracle``.

Times ``POST /v1/signatures`` through ``Api.handle`` in-process (no sockets, a random key, a grant
for every type) for a few kinds of user id, with the check (keyd.daemon.signing.oracle.refusal) and with it
replaced by one that refuses nothing, and the check alone. Best of several rounds, microseconds.
The numbers quoted in docs/security.md come from this script.
"""

from __future__ import annotations

import json
import secrets
import timeit
from typing import Any

from keyd import config as configuration
from keyd.config import GrantConfig
from keyd.daemon.callers.caller import Caller
from keyd.daemon.keys.health import Health
from keyd.daemon.keys.keystore import KeySnapshot, SecretKey
from keyd.daemon.policy.grants import Policy
from keyd.daemon.signing import oracle
from keyd.daemon.signing.api import Api, Request

IDS = (
    "alice",  # no dot: the check is one str.find
    "john.doe@example.com",  # a dotted id with a plain head
    "mary-jane.watson@example.com",  # punctuation in the head: several lenient decodings
    "1764380000.{}",  # a refused one (422)
)
ROUNDS = 5
NUMBER = 20_000


class _Keys:
    def __init__(self) -> None:
        secret = SecretKey.from_str("sk_test_" + secrets.token_urlsafe(24))
        self._snapshot = KeySnapshot(
            app="default", signing=secret, webhook=secret, version=1, kv_version=2, loaded_at=0
        )

    def signing(self, app: str) -> KeySnapshot:
        return self._snapshot

    def health(self) -> Health:
        return Health("ok", ())


def _best(func: Any) -> float:
    return min(timeit.repeat(func, number=NUMBER, repeat=ROUNDS)) / NUMBER * 1e6


def main() -> None:
    config = configuration.parse({"apps": {"default": {"app_id": "tBench"}}}, "bench.toml")
    grants = (GrantConfig(index=0, types=("user", "app", "signature", "webhook")),)
    api = Api(config, _Keys(), Policy(grants))
    caller = Caller(pid=1, uid=1, gid=1, user="bench", groups=frozenset(), gids=frozenset(), unit="")
    real = oracle.refusal
    print(f"{'user_id':32} {'check':>8} {'request':>9} {'no check':>9} status")
    for user_id in IDS:
        body = json.dumps({"user_id": user_id}).encode()
        request = Request(
            b"POST", b"/v1/signatures", {}, {b"content-type": b"application/json"}, body, caller
        )
        try:
            with_check = _best(lambda: api.handle(request))  # noqa: B023 - called before the loop moves on
            oracle.refusal = lambda message: None  # what the request costs without the check
            without = _best(lambda: api.handle(request))  # noqa: B023 - same
        finally:
            oracle.refusal = real
        alone = _best(lambda: oracle.refusal(user_id))  # noqa: B023 - same
        status = api.handle(request).status
        print(f"{user_id:32} {alone:8.2f} {with_check:9.2f} {without:9.2f} {status}")


if __name__ == "__main__":
    main()

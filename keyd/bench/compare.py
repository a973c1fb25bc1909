"""The comparisons that give keyd's numbers a meaning, besides the reference server:

- ``transit``: ``POST transit/hmac/<key>`` on the same OpenBao (the peer design where the key never
  leaves Vault and every signature is a round trip), over keep-alive HTTP, with the TalkJS key
  imported into Transit (RSA-OAEP + AES-KWP wrapping, the Vault/OpenBao BYOK scheme);
- ``pyjwt``: ``jwt.encode`` in-process (what an app server does when it holds the key).
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import os
import secrets
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from keyd import http1
from keyd.bench.load import Endpoint
from keyd.bench.options import BenchError, Options
from keyd.bench.report import Result
from keyd.bench.stack import Stack
from keyd.bench.workload import APP_ID, JSON, TOKEN_TTL, USER_IDS, keyd_requests, signing_input, user_ids
from keyd.ops.transit_import import wrap_for_import

VAULT_DELAY = 0.001  # seconds added each way for the keyd-transit-1ms target (Vault on another machine)


def transit_requests(address: str, vault_token: str, mount: str, key: str, kind: str) -> list[bytes]:
    """``POST <mount>/hmac/<key>/sha2-256`` over HTTP/1.1 keep-alive, one per user id.

    Each asks Vault for the HMAC of the same signing input keyd signs: the round trip an app server
    makes per token when the key stays inside Vault.
    """
    host = urlsplit(address).netloc
    headers = {"X-Vault-Token": vault_token, **JSON}
    iat = int(time.time())
    out = []
    for uid in user_ids() if kind == "user" else [""]:
        body = json.dumps({"input": base64.b64encode(signing_input(kind, uid, iat)).decode()}).encode()
        out.append(http1.encode_request("POST", f"/v1/{mount}/hmac/{key}/sha2-256", headers, body, host))
    return out


def vault_endpoint(address: str, ca_cert: str = "") -> Endpoint:
    """Where the load generator connects for Vault at ``address`` (TLS for https)."""
    parts = urlsplit(address)
    tls = None
    if parts.scheme == "https":
        tls = ssl.create_default_context(cafile=ca_cert or None)
    port = parts.port or (443 if tls else 80)
    return Endpoint(host=parts.hostname or "127.0.0.1", port=port, tls=tls)


def pyjwt_run(key: bytes, kind: str, seconds: float) -> Result:
    """``jwt.encode`` in this process on one core for ``seconds``: what an app holding the key does."""
    import jwt  # noqa: PLC0415 - only the comparison needs it

    ids = user_ids()
    latencies: list[float] = []
    clock = time.perf_counter
    end = clock() + seconds
    i = 0
    started = clock()
    while True:
        t0 = clock()
        if t0 >= end:
            break
        now = int(time.time())
        claims: dict[str, Any] = {"tokenType": kind, "iss": APP_ID}
        if kind == "user":
            claims["sub"] = ids[i & (USER_IDS - 1)]
        claims["iat"] = now
        claims["exp"] = now + TOKEN_TTL
        jwt.encode(claims, key, algorithm="HS256")
        latencies.append(clock() - t0)
        i += 1
    elapsed = clock() - started
    result = Result.from_latencies("pyjwt", latencies, elapsed, {200: len(latencies)}, 0)
    result.note = "in-process, one thread, no I/O"
    return result


class Transit:
    """A Transit mount created for one run, holding the HMAC key; removed by ``close``."""

    KEY = "talkjs"

    def __init__(self, client: Any) -> None:
        self.client = client
        self.mount = "keyd-bench-" + secrets.token_hex(4)
        self.how = ""

    def setup(self, key: bytes) -> str:
        """Import ``key`` as an HMAC key (or generate one where import is refused); says which."""
        import hvac.exceptions  # noqa: PLC0415

        self.client.sys.enable_secrets_engine("transit", path=self.mount)
        adapter = self.client.adapter
        try:
            pem = adapter.get(f"/v1/{self.mount}/wrapping_key")["data"]["public_key"]
            adapter.post(
                f"/v1/{self.mount}/keys/{self.KEY}/import",
                json={"ciphertext": wrap_for_import(key, pem), "hash_function": "SHA256", "type": "hmac"},
            )
        except hvac.exceptions.VaultError as exc:
            adapter.post(f"/v1/{self.mount}/keys/{self.KEY}", json={"type": "hmac", "key_size": 32})
            self.how = f"generated Transit HMAC key (import refused: {type(exc).__name__})"
            return self.how
        # Prove the import: Transit's HMAC of a message must equal ours with the same key.
        message = b"keyd bench import check"
        answer = adapter.post(
            f"/v1/{self.mount}/hmac/{self.KEY}/sha2-256",
            json={"input": base64.b64encode(message).decode()},
        )["data"]["hmac"]
        expected = "vault:v1:" + base64.b64encode(hmac.digest(key, message, "sha256")).decode()
        if not hmac.compare_digest(answer, expected):
            raise BenchError("the key imported into Transit does not reproduce keyd's HMAC")
        self.how = "TalkJS key imported into Transit (RSA-OAEP + AES-KWP), HMACs match keyd's"
        return self.how

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.sys.disable_secrets_engine(path=self.mount)


# -- a self-contained stack: OpenBao dev server + keyd + reference ------------------------------


def transit_run(
    options: Options,
    s: Stack,
    measure: Callable[[str, Endpoint, list[bytes]], Result],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """``--compare``'s Transit target: set up a Transit mount with the key, measure, remove it."""
    import hvac  # noqa: PLC0415

    if options.socket is None:
        address, token, key = s.bao.address, s.bao.root_token, s.key
    else:
        address = options.vault_address or os.environ.get("VAULT_ADDR", "")
        token = os.environ.get("VAULT_TOKEN", "")
        if not address or not token:
            raise BenchError("--compare with --socket needs --vault-address (or VAULT_ADDR) and VAULT_TOKEN")
        key = ("sk_test_" + secrets.token_urlsafe(24)).encode()  # keyd never reveals its key
    transit = Transit(hvac.Client(url=address, token=token))
    try:
        how = transit.setup(key)
        if options.socket is not None:
            how += " (a random key of the same form: keyd never hands out the real one)"
        say(f"transit:   {how}")
        if options.socket is None:
            # keyd in transit mode on the same OpenBao and key: the batched design against both.
            s.start_keyd_transit(transit.mount, Transit.KEY)
            batched = measure("keyd-transit", Endpoint(unix=s.keyd_transit_socket), keyd_requests(options.kind))
            batched.note = "keyd with key_source = \"transit\": HMACs batched into Transit calls"
            # The same, with Vault 1 ms away (each way) as on another machine: keyd.bench.delay.
            s.start_keyd_transit(transit.mount, Transit.KEY, delay=VAULT_DELAY)
            far = measure("keyd-transit-1ms", Endpoint(unix=s.keyd_transit_socket), keyd_requests(options.kind))
            far.note = "keyd-transit with 1 ms added each way between keyd and OpenBao (a delay proxy)"
        requests = transit_requests(address, token, transit.mount, Transit.KEY, options.kind)
        result = measure("transit", vault_endpoint(address), requests)
        result.note = how
    finally:
        s.stop_keyd_transit()  # before its Transit mount goes
        transit.close()
    return {"key": how, "address": address}

"""The legacy signature endpoint is no signing oracle, against a real keyd on a real OpenBao.

The attacker holds only a ``signature`` grant: a real other uid through ``setpriv`` when the tests
run as root, else the running user. It sends the signing input of a 30-day app (admin) token, and of
a webhook, as the user_id. Before the fix keyd answered HMAC(key, input): the test turns such an
answer into the token (or webhook signature) and shows PyJWT (or /v1/webhooks/verify) accepting it,
so it fails with the proof. After the fix the answer is 422 ``invalid_field``; ordinary ids are
still signed, and the signature matches the HMAC computed here from the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.conftest import base_config
from tests.helpers import Http, KeydProcess
from tests.integration.sysusers import SysUsers, sysusers

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

DAY = 86400
ORDINARY = [
    "alice",
    "john.doe@example.com",
    "ezra.smith@example.com",
    "ewan.mcgregor@example.org",
    "nan.jones@example.com",
    "2pac.shakur@example.com",
    "mary-jane.watson@example.com",
    "a.b",
    "j.r.r.tolkien",
    "v1.2.3",
    "ü.ñ@例え.jp",
    "Zoë Ünal",
]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Attacker:
    """Sends requests as the attacking caller: another uid via setpriv (root), else this process."""

    def __init__(self, socket: str, users: SysUsers | None, name: str | None) -> None:
        self.socket, self.users, self.name = socket, users, name

    def post(self, requests: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
        if self.users is not None and self.name is not None:
            got = self.users.client(self.name, self.socket, [("POST", url, body) for url, body in requests])
            assert "connect_error" not in got, got
            return [(status, doc) for status, doc in got["results"]]
        http = Http(self.socket)
        try:
            return [http.post_json(url, body) for url, body in requests]
        finally:
            http.close()


@pytest.fixture(scope="module")
def users() -> Iterator[SysUsers | None]:
    if os.geteuid() != 0:
        yield None  # the running user plays the attacker
        return
    with sysusers() as created:
        yield created


@pytest.fixture(scope="module")
def attacker_account(users: SysUsers | None) -> tuple[str, str] | None:
    """(user, socket group) of the attacker, when tests create real users."""
    if users is None:
        return None
    group = users.group("sock")
    return users.user("oracle", primary=group).pw_name, group


Start = Callable[..., tuple[KeydProcess, Attacker, str]]


@pytest.fixture
def start(
    bao: Any,
    secret_path: tuple[str, str],
    keyd_factory: Callable[..., KeydProcess],
    short_dir: Path,
    users: SysUsers | None,
    attacker_account: tuple[str, str] | None,
) -> Start:
    """keyd with the attacker's signature-only grant (``pattern`` as its user_id_pattern) and a
    webhook receiver's grant for the running user: (keyd, attacker, key)."""

    def make(
        pattern: str | None = None, extra_types: tuple[str, ...] = ()
    ) -> tuple[KeydProcess, Attacker, str]:
        path, key = secret_path
        config = base_config(bao, short_dir, path)
        grant: dict[str, Any] = {"types": ["signature", *extra_types]}
        if pattern is not None:
            grant["user_id_pattern"] = pattern
        if attacker_account is not None:
            name, group = attacker_account
            config["server"].update(socket_mode="0660", socket_group=group)
            config["grant"] = [{"user": name, **grant}, {"uid": os.getuid(), "types": ["webhook"]}]
        else:
            config["grant"] = [{"uid": os.getuid(), **grant}]
        keyd = keyd_factory(config)
        who = attacker_account[0] if attacker_account is not None else None
        return keyd, Attacker(keyd.socket, users, who), key

    return make


def app_token_signing_inputs(now: int) -> list[str]:
    """Signing inputs of a 30-day app token, as TalkJS's and lenient verifiers read them."""
    claims = {"tokenType": "app", "iss": "tTestApp", "iat": now, "exp": now + 30 * DAY}
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    header = b'{"alg":"HS256","typ":"JWT"}'
    standard = base64.standard_b64encode(header).decode()  # padded, standard alphabet
    return [
        b64url(header) + "." + payload,
        standard + "." + payload,
        b64url(b' \n{"typ":"JWT","alg":"HS256"}') + "." + payload,  # whitespace before "{"
        b64url(b'{"alg":"HS256"}') + "." + payload,
        b64url(header) + "." + payload + ".x",  # several dots
    ]


def forge(signing_input: str, hex_signature: str) -> str:
    return signing_input + "." + b64url(bytes.fromhex(hex_signature))


@pytest.mark.parametrize("pattern", [None, "^.{1,256}$"], ids=["no-pattern", "pattern-any-256"])
def test_signature_grant_cannot_mint_an_admin_token(start: Start, pattern: str | None) -> None:
    keyd, attacker, key = start(pattern)
    now = int(time.time())
    inputs = app_token_signing_inputs(now)
    answers = attacker.post([("/v1/signatures", {"user_id": text}) for text in inputs])
    for signing_input, (status, doc) in zip(inputs, answers, strict=True):
        if status == 200:
            claims = jwt.decode(forge(signing_input, doc["signature"]), key, algorithms=["HS256"])
            pytest.fail(f"signing oracle: keyd signed an app token valid for {claims['exp'] - now} s")
        assert status == 422, doc
        assert doc["error"]["code"] == "invalid_field"
        assert "JWT signing input" in doc["error"]["message"]

    # Positive control: the same attacker gets ordinary signatures, and they are HMAC(key, id).
    answers = attacker.post([("/v1/signatures", {"user_id": user_id}) for user_id in ORDINARY])
    for user_id, (status, doc) in zip(ORDINARY, answers, strict=True):
        assert status == 200, (user_id, doc)
        assert doc["signature"] == hmac.new(key.encode(), user_id.encode(), hashlib.sha256).hexdigest()
    # ... and the forging step itself works: a real HMAC over the first input is a token PyJWT takes.
    real = hmac.new(key.encode(), inputs[0].encode(), hashlib.sha256).hexdigest()
    assert jwt.decode(forge(inputs[0], real), key, algorithms=["HS256"])["tokenType"] == "app"
    keyd.stop()
    assert key not in keyd.logs()


@pytest.mark.parametrize("pattern", [None, "^.{1,256}$"], ids=["no-pattern", "pattern-any-256"])
def test_signature_grant_cannot_forge_a_webhook(start: Start, pattern: str | None) -> None:
    keyd, attacker, key = start(pattern)
    timestamp = str(int(time.time()))
    body = '{"type":"message.sent","data":{"message":{"text":"transfer everything"}}}'
    # (X-TalkJS-Timestamp, body): seconds, milliseconds, a fraction, a body that is no JSON.
    forms = [(timestamp, body), (timestamp + "000", body), (timestamp + ".5", body), (timestamp, "plain")]
    answers = attacker.post([("/v1/signatures", {"user_id": f"{stamp}.{text}"}) for stamp, text in forms])
    receiver = Http(keyd.socket)  # the running user holds the webhook grant (when not root: both)

    def verify(stamp: str, payload: str, signature: str) -> tuple[int, dict[str, Any]]:
        headers = {"X-TalkJS-Timestamp": stamp, "X-TalkJS-Signature": signature}
        status, _, data = receiver.request("POST", "/v1/webhooks/verify", payload.encode(), headers)
        return status, json.loads(data)

    for (stamp, text), (status, doc) in zip(forms, answers, strict=True):
        if status == 200:
            verdict = verify(stamp, text, doc["signature"].upper())
            pytest.fail(
                f"signing oracle: keyd signed the webhook {stamp}.{text[:20]}...: verify says {verdict}"
            )
        assert status == 422, doc
        assert doc["error"]["code"] == "invalid_field"
        assert "webhook signing input" in doc["error"]["message"]

    if attacker.users is None:
        pytest.skip("the webhook verdicts need the receiver's own grant (another uid: root only)")
    # Positive control: the receiver accepts the real signature (so an oracle's answer would have
    # passed) and refuses a signature over another body.
    real = hmac.new(key.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest().upper()
    assert verify(timestamp, body, real) == (200, {"valid": True, "app": "default"})
    assert verify(timestamp, body + " ", real)[0] == 401
    receiver.close()

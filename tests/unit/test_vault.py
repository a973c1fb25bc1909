"""keyd.vault without a server: error translation, secret validation, credential files, token info.

The real login, renewal and read paths run against OpenBao in tests/integration/test_core.py.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hvac.exceptions
import pytest
import requests

from keyd.config import VaultAuthConfig, VaultConfig
from keyd.daemon.keys import vault as vault_module
from keyd.daemon.keys.vault import TokenInfo, Vault, translate
from keyd.errors import SecretError, VaultAuthError, VaultError, VaultLoginError, VaultUnavailable

BODY_SECRET = "hvs.LEAKED-TOKEN-IN-BODY"


@pytest.mark.parametrize(
    ("raised", "expected", "text"),
    [
        (hvac.exceptions.VaultDown(BODY_SECRET), VaultUnavailable, "sealed or down (503)"),
        (hvac.exceptions.VaultNotInitialized(BODY_SECRET), VaultUnavailable, "not initialized (501)"),
        (hvac.exceptions.InternalServerError(BODY_SECRET), VaultUnavailable, "server error (500)"),
        (hvac.exceptions.BadGateway(BODY_SECRET), VaultUnavailable, "server error (502)"),
        (hvac.exceptions.RateLimitExceeded(BODY_SECRET), VaultUnavailable, "rate limit exceeded (429)"),
        (hvac.exceptions.Forbidden(BODY_SECRET), VaultAuthError, "permission denied (403)"),
        (hvac.exceptions.Unauthorized(BODY_SECRET), VaultAuthError, "permission denied (401)"),
        (hvac.exceptions.InvalidPath(BODY_SECRET), SecretError, "not found (404)"),
        (hvac.exceptions.InvalidRequest(BODY_SECRET), VaultError, "rejected the request (400)"),
        (hvac.exceptions.UnexpectedError(BODY_SECRET), VaultUnavailable, "unexpected Vault answer"),
        (requests.exceptions.SSLError(BODY_SECRET), VaultUnavailable, "TLS verification"),
        (requests.exceptions.ConnectTimeout(BODY_SECRET), VaultUnavailable, "did not answer in time"),
        (requests.exceptions.ReadTimeout(BODY_SECRET), VaultUnavailable, "did not answer in time"),
        (requests.exceptions.ConnectionError(BODY_SECRET), VaultUnavailable, "cannot connect to Vault"),
        (requests.exceptions.TooManyRedirects(BODY_SECRET), VaultUnavailable, "TooManyRedirects"),
        (KeyError(BODY_SECRET), VaultUnavailable, "malformed Vault response (KeyError)"),
    ],
)
def test_translate_maps_errors_by_what_to_do_and_drops_the_body(
    raised: Exception, expected: type[Exception], text: str
) -> None:
    with pytest.raises(VaultError) as info, translate("reading secret/x"):
        raise raised
    assert type(info.value) is expected
    assert str(info.value).startswith("reading secret/x: ")
    assert text in str(info.value)
    assert BODY_SECRET not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__  # tracebacks never show the original (body-bearing) error


def test_translate_passes_keyd_errors_through() -> None:
    original = SecretError("field missing")
    with pytest.raises(SecretError) as info, translate("x"):
        raise original
    assert info.value is original


def test_token_info_renews_at_two_thirds() -> None:
    info = TokenInfo(ttl=90.0, renewable=True, obtained_at=1000.0)
    assert info.renew_at() == 1060.0
    assert info.expires_at() == 1090.0
    forever = TokenInfo(ttl=0.0, renewable=False, obtained_at=1000.0)
    assert forever.renew_at() is None and forever.expires_at() is None


# -- reading and validating secrets with a fake hvac client ------------------------------------


class FakeKv:
    def __init__(self, response: dict[str, Any] | Exception) -> None:
        self.response = response

    def _answer(self, **_: Any) -> dict[str, Any]:
        if isinstance(self.response, Exception):
            raise self.response
        return self.response

    read_secret_version = _answer
    read_secret = _answer


def vault_with(response: dict[str, Any] | Exception, monkeypatch: pytest.MonkeyPatch) -> Vault:
    monkeypatch.setenv("VAULT_TOKEN", "s.test")
    fake = FakeKv(response)
    # Replace hvac's clients with one that gives canned answers.
    return Vault(
        VaultConfig(auth=VaultAuthConfig(method="token")),
        client_factory=lambda address, token, session: SimpleNamespace(
            secrets=SimpleNamespace(kv=SimpleNamespace(v1=fake, v2=fake))
        ),
    )


def v2(data: Any, version: int = 4) -> dict[str, Any]:
    return {"data": {"data": data, "metadata": {"version": version}}}


def test_read_kv2_records_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = vault_with(v2({"secret_key": "sk_test_abc"}), monkeypatch).read("secret", "p", "secret_key", 2)
    assert (secret.version, secret.kv_version) == (4, 2)
    mac = secret.value.hmac()
    mac.update(b"m")
    assert mac.digest() == hmac.new(b"sk_test_abc", b"m", hashlib.sha256).digest()


def test_read_kv1_has_no_version(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = vault_with({"data": {"k": "sk_live_x"}}, monkeypatch).read("kv", "p", "k", 1)
    assert (secret.version, secret.kv_version) == (None, 1)


@pytest.mark.parametrize(
    ("data", "text"),
    [
        ({"other": "x"}, "the secret has no field 'secret_key'"),
        ({"secret_key": ""}, "field 'secret_key' is empty"),
        ({"secret_key": 12345}, "field 'secret_key' is not a string"),
        ({"secret_key": None}, "field 'secret_key' is not a string"),
        ({"secret_key": " sk_test_abc"}, "surrounding whitespace"),
        ({"secret_key": "sk_test_abc\n"}, "surrounding whitespace"),
        (None, "no field"),
    ],
)
def test_bad_values_are_clear_errors_without_the_value(
    data: Any, text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SecretError) as info:
        vault_with(v2(data), monkeypatch).read("secret", "talkjs/live", "secret_key", 2)
    assert str(info.value).startswith("reading secret/talkjs/live: ")
    assert text in str(info.value)
    assert "sk_test_abc" not in str(info.value)


def test_missing_path_is_a_secret_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        SecretError, match=r"reading secret/nope \(KV v2\) at http://127.0.0.1:8200: not found \(404\)"
    ):
        vault_with(hvac.exceptions.InvalidPath(BODY_SECRET), monkeypatch).read("secret", "nope", "k", 2)


# -- credentials -------------------------------------------------------------------------------


def test_env_token_is_taken_out_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "s.very-secret-token")
    v = Vault(VaultConfig(auth=VaultAuthConfig(method="token")))
    assert "VAULT_TOKEN" not in os.environ
    assert "s.very-secret-token" not in repr(v)
    assert v._static_token() == "s.very-secret-token"


def test_env_token_is_scrubbed_from_proc_environ() -> None:
    """os.environ.pop alone leaves the bytes in the block /proc/<pid>/environ shows."""
    code = (
        "import os\n"
        "from keyd.config import VaultAuthConfig, VaultConfig\n"
        "from keyd.daemon.keys.vault import Vault\n"
        "v = Vault(VaultConfig(auth=VaultAuthConfig(method='token')))\n"
        "block = open(f'/proc/{os.getpid()}/environ', 'rb').read()\n"
        "print(b's.scrub-me-please' in block, b'KEYD_NEIGHBOUR=intact' in block, v._static_token())\n"
    )
    env = dict(os.environ, VAULT_TOKEN="s.scrub-me-please", KEYD_NEIGHBOUR="intact")
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=30
    )
    assert result.stdout.split() == ["False", "True", "s.scrub-me-please"], result.stderr


def test_no_token_anywhere_is_a_login_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    v = Vault(VaultConfig(auth=VaultAuthConfig(method="token")))
    with pytest.raises(VaultLoginError, match="VAULT_TOKEN"):
        v.login()
    assert not v.logged_in


def test_token_file_is_preferred_and_not_taken_from_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "s.env")
    (tmp_path / "token").write_text("s.file\n")
    v = Vault(VaultConfig(auth=VaultAuthConfig(method="token", token_file=str(tmp_path / "token"))))
    assert v._static_token() == "s.file"


def test_no_other_auth_method_picks_up_an_ambient_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # hvac on its own reads VAULT_TOKEN or ~/.vault-token and sends it with every request.
    monkeypatch.setenv("VAULT_TOKEN", "s.operators-token")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".vault-token").write_text("s.from-home\n")
    auth = VaultAuthConfig(
        method="approle", role_id_file=str(tmp_path / "r"), secret_id_file=str(tmp_path / "s")
    )
    v = Vault(VaultConfig(auth=auth))
    assert v._client(v.current_node, None).token == ""  # not logged in: no token at all
    assert v._client(v.current_node, "").token == ""  # the clients logins use
    assert "VAULT_TOKEN" not in os.environ  # not left for child processes either


@pytest.mark.parametrize(
    ("content", "text"),
    [(None, "does not exist"), ("", "is empty"), ("  \n", "is empty"), (b"\xff\xfe", "cannot read")],
)
def test_credential_file_problems(content: str | bytes | None, text: str, tmp_path: Path) -> None:
    path = tmp_path / "secret-id"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(VaultLoginError) as info:
        vault_module._read_file(str(path), "vault.auth.secret_id_file")
    assert text in str(info.value)
    assert str(path) in str(info.value)


def test_unreachable_vault_is_transient_on_login(tmp_path: Path) -> None:
    (tmp_path / "role").write_text("role")
    (tmp_path / "sid").write_text("super-secret-id")
    auth = VaultAuthConfig(
        method="approle", role_id_file=str(tmp_path / "role"), secret_id_file=str(tmp_path / "sid")
    )
    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    v = Vault(VaultConfig(address="http://127.0.0.1:9", timeout=1.0, auth=auth))
    with pytest.raises(VaultUnavailable) as info:
        v.login()
    assert "cannot connect to Vault" in str(info.value)
    assert "super-secret-id" not in str(info.value)

"""The only module that talks to Vault (through hvac): log in, renew, read keys.

hvac's and requests' exceptions become keyd's own here, built from the status code, the method and
the path only: never from a response body, which can hold tokens. Every call is blocking; callers
run them off the event loop (the refresher's worker threads).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import hvac
import hvac.exceptions
import requests

from keyd.config import VaultConfig
from keyd.daemon import containment
from keyd.daemon.keystore import SecretKey
from keyd.errors import (
    SecretError,
    VaultAuthError,
    VaultError,
    VaultLoginError,
    VaultUnavailable,
)

log = logging.getLogger("keyd.vault")

# urllib3 at DEBUG logs request lines; nothing secret is in our URLs, but keep it quiet anyway.
logging.getLogger("urllib3").setLevel(logging.WARNING)


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What keyd knows about its current Vault token (never the token itself)."""

    ttl: float  # seconds of life left when obtained; 0 = never expires
    renewable: bool
    obtained_at: float

    @classmethod
    def parse(cls, data: dict[str, Any], ttl_field: str, now: float) -> TokenInfo:
        """From a login/renew ``auth`` block (``lease_duration``) or a lookup-self ``data`` (``ttl``)."""
        return cls(
            ttl=float(data.get(ttl_field) or 0),
            renewable=bool(data.get("renewable")),
            obtained_at=now,
        )

    def expires_at(self) -> float | None:
        return self.obtained_at + self.ttl if self.ttl else None

    def renew_at(self) -> float | None:
        """About two thirds into the token's life."""
        return self.obtained_at + self.ttl * 2 / 3 if self.ttl else None


@dataclass(frozen=True, slots=True)
class Secret:
    value: SecretKey
    version: int | None
    kv_version: int


def _read_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            value = handle.read().strip()
    except FileNotFoundError:
        raise VaultLoginError(f"{what} file {path!r} does not exist") from None
    except PermissionError:
        raise VaultLoginError(f"{what} file {path!r} is not readable by keyd") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VaultLoginError(f"cannot read {what} file {path!r}: {type(exc).__name__}") from None
    if not value:
        raise VaultLoginError(f"{what} file {path!r} is empty")
    return value


@contextmanager
def translate(action: str) -> Iterator[None]:
    """Turn hvac/requests failures into keyd errors that say what to do, without response bodies."""
    try:
        yield
    except VaultError:
        raise
    except hvac.exceptions.VaultDown:
        raise VaultUnavailable(f"{action}: Vault is sealed or down (503)") from None
    except hvac.exceptions.VaultNotInitialized:
        raise VaultUnavailable(f"{action}: Vault is not initialized (501)") from None
    except (hvac.exceptions.InternalServerError, hvac.exceptions.BadGateway) as exc:
        raise VaultUnavailable(f"{action}: Vault server error ({_status(exc)})") from None
    except hvac.exceptions.RateLimitExceeded:
        raise VaultUnavailable(f"{action}: Vault rate limit exceeded (429)") from None
    except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized) as exc:
        raise VaultAuthError(f"{action}: permission denied ({_status(exc)})") from None
    except hvac.exceptions.InvalidPath:
        raise SecretError(f"{action}: not found (404)") from None
    except hvac.exceptions.InvalidRequest:
        raise VaultError(f"{action}: Vault rejected the request (400)") from None
    except hvac.exceptions.VaultError as exc:
        raise VaultUnavailable(f"{action}: unexpected Vault answer ({_status(exc)})") from None
    except requests.exceptions.SSLError:
        raise VaultUnavailable(
            f"{action}: TLS verification of the Vault server failed (check vault.ca_cert)"
        ) from None
    except requests.exceptions.Timeout:
        raise VaultUnavailable(f"{action}: Vault did not answer in time") from None
    except requests.exceptions.ConnectionError:
        raise VaultUnavailable(f"{action}: cannot connect to Vault") from None
    except requests.exceptions.RequestException as exc:
        raise VaultUnavailable(f"{action}: {type(exc).__name__}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise VaultUnavailable(f"{action}: malformed Vault response ({type(exc).__name__})") from None


def _status(exc: BaseException) -> str:
    names = {
        hvac.exceptions.InternalServerError: "500",
        hvac.exceptions.BadGateway: "502",
        hvac.exceptions.Forbidden: "403",
        hvac.exceptions.Unauthorized: "401",
    }
    return names.get(type(exc), type(exc).__name__)


class Vault:
    """A logged-in hvac client plus the credentials to log in again.

    Login and renewal are serialised by a lock; reads may run concurrently from several threads.
    """

    def __init__(self, config: VaultConfig, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._auth = config.auth
        self._clock = clock
        self._lock = threading.Lock()
        verify: bool | str = config.ca_cert or True
        cert = None
        if self._auth.method == "cert":
            cert = (self._auth.client_cert, self._auth.client_key)
        # token="": otherwise hvac picks up VAULT_TOKEN or ~/.vault-token by itself and sends it
        # with every request, logins included, whatever the configured auth method.
        self._client = hvac.Client(
            url=config.address, token="", verify=verify, timeout=config.timeout, cert=cert
        )
        # VAULT_TOKEN is read once and removed whatever the auth method, so it does not reach child
        # processes or linger in /proc/<pid>/environ. Only token auth without a file keeps it.
        env_token = containment.take_env("VAULT_TOKEN")
        self._env_token: str | None = None
        if self._auth.method == "token" and not self._auth.token_file:
            self._env_token = env_token or None
        self._unwrapped_secret_id: str | None = None
        self.token: TokenInfo | None = None

    def __repr__(self) -> str:
        return f"Vault(address={self._config.address!r}, method={self._auth.method!r})"

    @property
    def logged_in(self) -> bool:
        return self.token is not None

    def invalidate(self) -> None:
        """Forget the current token (after a 403), so the next call logs in again."""
        self.token = None

    def login(self) -> TokenInfo:
        """Log in with the configured method; returns the new token's TTL and renewability."""
        with self._lock:
            method = self._auth.method
            with translate(f"Vault login ({method})"):
                if method == "token":
                    self._client.token = self._static_token()
                    data = self._client.auth.token.lookup_self()["data"]
                    info = TokenInfo.parse(data, "ttl", self._clock())
                else:
                    auth = self._login_approle() if method == "approle" else self._login_cert()
                    info = TokenInfo.parse(auth, "lease_duration", self._clock())
            self.token = info
            log.info(
                "logged in to Vault with %s auth (token ttl %s, renewable %s)",
                method,
                f"{int(info.ttl)}s" if info.ttl else "unlimited",
                info.renewable,
                extra={"event": "login"},
            )
            return info

    def _static_token(self) -> str:
        if self._auth.token_file:
            return _read_file(self._auth.token_file, "vault.auth.token_file")
        if not self._env_token:
            raise VaultLoginError("no Vault token: set vault.auth.token_file or VAULT_TOKEN")
        return self._env_token

    def _login_approle(self) -> dict[str, Any]:
        role_id = _read_file(self._auth.role_id_file, "vault.auth.role_id_file")
        secret_id = self._secret_id()
        try:
            response = self._client.auth.approle.login(
                role_id=role_id, secret_id=secret_id, mount_point=self._auth.mount_point
            )
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
            raise VaultLoginError(
                "Vault refused the AppRole login: check role_id_file and secret_id_file "
                "(the secret_id may be expired or used up)"
            ) from None
        auth: dict[str, Any] = response["auth"]
        return auth

    def _secret_id(self) -> str:
        if not self._auth.secret_id_wrapped:
            return _read_file(self._auth.secret_id_file, "vault.auth.secret_id_file")
        if self._unwrapped_secret_id is None:
            wrapping_token = _read_file(self._auth.secret_id_file, "vault.auth.secret_id_file")
            try:
                # Unwrap with the wrapping token itself as the client token, never the old one.
                self._client.token = wrapping_token
                data = self._client.sys.unwrap()["data"]
            except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
                raise VaultLoginError(
                    "cannot unwrap the secret_id: the wrapping token is invalid, expired or was "
                    "already used (each wrapped secret_id works once)"
                ) from None
            finally:
                self._client.token = None
            # A wrapping token is single-use, so the secret_id it held is kept (in memory only)
            # for later logins.
            self._unwrapped_secret_id = str(data["secret_id"])
        return self._unwrapped_secret_id

    def _login_cert(self) -> dict[str, Any]:
        params = {"name": self._auth.cert_role} if self._auth.cert_role else {}
        try:
            response = self._client.adapter.login(f"/v1/auth/{self._auth.mount_point}/login", json=params)
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
            raise VaultLoginError(
                "Vault refused the TLS certificate login: check vault.auth.client_cert and client_key, "
                "and that a cert role trusts their CA (keyd vault setup --client-ca FILE)"
            ) from None
        auth: dict[str, Any] = response["auth"]
        return auth

    def renew(self) -> TokenInfo:
        """renew-self; VaultAuthError when the token is gone (log in again instead)."""
        with self._lock, translate("Vault token renewal"):
            auth = self._client.auth.token.renew_self()["auth"]
            info = TokenInfo.parse(auth, "lease_duration", self._clock())
            self.token = info
            return info

    def read(self, mount: str, path: str, field: str, kv_version: int) -> Secret:
        """One field of a KV secret, validated: a non-empty string without surrounding whitespace."""
        where = f"{mount}/{path}"
        with translate(f"reading {where} (KV v{kv_version})"):
            if kv_version == 2:
                response = self._client.secrets.kv.v2.read_secret_version(
                    path=path, mount_point=mount, raise_on_deleted_version=True
                )
                data = response["data"]["data"]
                version = response["data"]["metadata"].get("version")
            else:
                response = self._client.secrets.kv.v1.read_secret(path=path, mount_point=mount)
                data = response["data"]
                version = None
        if not isinstance(data, dict) or field not in data:
            raise SecretError(f"reading {where}: the secret has no field {field!r}")
        value = data[field]
        if not isinstance(value, str):
            raise SecretError(f"reading {where}: field {field!r} is not a string")
        if not value:
            raise SecretError(f"reading {where}: field {field!r} is empty")
        if value != value.strip():
            raise SecretError(f"reading {where}: field {field!r} has surrounding whitespace")
        return Secret(
            value=SecretKey.from_str(value),
            version=int(version) if version is not None else None,
            kv_version=kv_version,
        )

"""The only module that talks to Vault (through hvac): log in, renew, read keys, probe health.

hvac's and requests' exceptions become keyd's own here, built from the status code, the method and
the path only: never from a response body, which can hold tokens. Every call is blocking; callers
run them off the event loop (the refresher's worker threads).

An HA cluster is a list of nodes (``vault.address`` as a list, or ``vault.addresses``). keyd talks
to one node at a time, most preferred first, and moves to the next when a node cannot serve the call
(connection refused, TLS failure, timeout, 5xx, sealed, a standby that cannot forward). A Vault
token is valid on every node of its cluster, so moving never needs a new login. A node that failed is
skipped for a backoff (1 s doubling to 30 s, jittered) unless every node is, and is preferred again as
soon as a call or a ``probe`` (unauthenticated ``sys/health``) finds it serving.

Tokens and clients (issue 13): no hvac client ever has its token changed while another thread may use
it. Logins and unwraps get a client of their own, made for that one call; reads and renewals use a
client per (node, token) that is built once with its token and then only read (keyd never sets
``client.token`` and calls hvac's logins with ``use_token=False``). The token and its generation
are one tuple, ``Vault._credential``, replaced whole by a login: a thread building a client reads it
once, so the client it caches under a generation always holds that generation's token. The token
lives there and in the clients built with it, never in a log line, a repr or an error.
"""

from __future__ import annotations

import base64
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests

from keyd.config import VaultConfig
from keyd.daemon import containment
from keyd.daemon.keys.keystore import SecretKey
from keyd.daemon.keys.nodes import SERVING, Failover, Node, NodeView, ProbeResult, health_failure
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

T = TypeVar("T")

PROBE_TIMEOUT = 2.0


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


def _classify(exc: BaseException) -> tuple[type[VaultError], str, str] | None:
    """(keyd error class, what happened, short cause) for an hvac/requests failure, else None."""
    if isinstance(exc, hvac.exceptions.VaultDown):
        return VaultUnavailable, "Vault is sealed or down (503)", "sealed"
    if isinstance(exc, hvac.exceptions.VaultNotInitialized):
        return VaultUnavailable, "Vault is not initialized (501)", "not initialized"
    if isinstance(exc, hvac.exceptions.InternalServerError | hvac.exceptions.BadGateway):
        return VaultUnavailable, f"Vault server error ({_status(exc)})", "server error"
    if isinstance(exc, hvac.exceptions.RateLimitExceeded):
        return VaultUnavailable, "Vault rate limit exceeded (429)", "rate limited"
    if isinstance(exc, hvac.exceptions.Forbidden | hvac.exceptions.Unauthorized):
        return VaultAuthError, f"permission denied ({_status(exc)})", "permission denied"
    if isinstance(exc, hvac.exceptions.InvalidPath):
        return SecretError, "not found (404)", "not found"
    if isinstance(exc, hvac.exceptions.InvalidRequest):
        return VaultError, "Vault rejected the request (400)", "request rejected"
    if isinstance(exc, hvac.exceptions.VaultError):
        # 412 (a performance standby not caught up), 405 and the like: another node may serve it.
        return VaultUnavailable, f"unexpected Vault answer ({_status(exc)})", "unexpected answer"
    if isinstance(exc, requests.exceptions.SSLError):
        return (
            VaultUnavailable,
            "TLS verification of the Vault server failed (check vault.ca_cert)",
            "TLS failure",
        )
    if isinstance(exc, requests.exceptions.Timeout):
        return VaultUnavailable, "Vault did not answer in time", "timeout"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return VaultUnavailable, "cannot connect to Vault", "node unreachable"
    if isinstance(exc, requests.exceptions.RequestException):
        return VaultUnavailable, type(exc).__name__, "node unreachable"
    if isinstance(exc, KeyError | TypeError | ValueError):
        return VaultUnavailable, f"malformed Vault response ({type(exc).__name__})", "malformed answer"
    return None


@contextmanager
def translate(action: str) -> Iterator[None]:
    """Turn hvac/requests failures into keyd errors that say what to do, without response bodies."""
    try:
        yield
    except VaultError:
        raise
    except Exception as exc:
        found = _classify(exc)
        if found is None:
            raise
        cls, what, cause = found
        raise cls(f"{action}: {what}", cause) from None


def _status(exc: BaseException) -> str:
    names = {
        hvac.exceptions.InternalServerError: "500",
        hvac.exceptions.BadGateway: "502",
        hvac.exceptions.Forbidden: "403",
        hvac.exceptions.Unauthorized: "401",
        hvac.exceptions.PreconditionFailed: "412",
    }
    return names.get(type(exc), type(exc).__name__)


# -- the client ------------------------------------------------------------------------------------

ClientFactory = Callable[[str, str, requests.Session], Any]


class Vault:
    """Logs in, renews, reads and probes against a list of Vault nodes with failover.

    Login and renewal are serialised by a lock; reads may run concurrently from several threads.
    ``client_factory(address, token, session)`` builds an hvac client (tests pass fakes).
    """

    def __init__(
        self,
        config: VaultConfig,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        client_factory: ClientFactory | None = None,
    ) -> None:
        self._config = config
        self._auth = config.auth
        self._clock = clock
        self._lock = threading.Lock()
        self._failover = Failover(config.nodes, clock, rand)
        self._sessions: dict[str, requests.Session] = {}
        # Passed with every request, not only set on the session: requests lets REQUESTS_CA_BUNDLE
        # override a session's own ``verify`` (hvac passes it explicitly too).
        self._verify: bool | str = config.ca_cert or True
        self._cert: tuple[str, str] | None = None
        if self._auth.method == "cert":
            self._cert = (self._auth.client_cert, self._auth.client_key)
        for address in config.nodes:
            session = requests.Session()
            session.verify = self._verify
            session.cert = self._cert
            self._sessions[address] = session
        self._factory = client_factory or self._hvac_client
        # (token generation, {address: client}): replaced whole, never mutated.
        self._clients: tuple[int, dict[str, Any]] = (0, {})
        # (token generation, token): replaced whole by a login, so the two are never read apart.
        self._credential: tuple[int, str] = (0, "")
        # VAULT_TOKEN is read once and removed whatever the auth method, so it does not reach child
        # processes or linger in /proc/<pid>/environ. Only token auth without a file keeps it.
        env_token = containment.take_env("VAULT_TOKEN")
        self._env_token: str | None = None
        if self._auth.method == "token" and not self._auth.token_file:
            self._env_token = env_token or None
        self._unwrapped_secret_id: str | None = None
        self.secret_id_expires: float | None = None  # unix time the AppRole secret_id expires
        self._expiry_warned = False
        self.token: TokenInfo | None = None

    def __repr__(self) -> str:
        return f"Vault(nodes={list(self._config.nodes)!r}, method={self._auth.method!r})"

    def _hvac_client(self, address: str, token: str, session: requests.Session) -> Any:
        # token="" rather than None: otherwise hvac picks up VAULT_TOKEN or ~/.vault-token by itself
        # and sends it with every request, logins included, whatever the configured auth method.
        return hvac.Client(url=address, token=token, session=session, timeout=self._config.timeout)

    # -- state for health and the refresher -----------------------------------------------------

    @property
    def logged_in(self) -> bool:
        return self.token is not None

    @property
    def token_generation(self) -> int:
        """Grows by one with every login: tells a fresh token from the one a failure was seen with."""
        return self._credential[0]

    @property
    def current_node(self) -> str:
        return self._failover.current

    @property
    def failovers(self) -> int:
        return self._failover.failovers

    def nodes(self) -> list[NodeView]:
        return self._failover.views()

    def any_node_failed(self) -> bool:
        return self._failover.any_failed()

    def invalidate(self) -> None:
        """Forget the current token (after a 403), so the next call logs in again."""
        self.token = None

    # -- calls through failover -----------------------------------------------------------------

    def _client(self, address: str, token: str | None) -> Any:
        """A client for the current token (``token`` None) or a one-off client for ``token``."""
        if token is not None:
            return self._factory(address, token, self._sessions[address])
        generation, current = self._credential  # one read: a token and its own generation
        cached, clients = self._clients
        if cached != generation:
            clients = {}
        client = clients.get(address)
        if client is None:
            client = self._factory(address, current, self._sessions[address])
            # Two threads may both build one here; the last assignment wins and the other client is
            # simply dropped (it held the same token). A thread still on an older generation may
            # store its cache over a newer one: the next call sees the generation differ and
            # builds again. Never a client with one generation's token under another's number.
            self._clients = (generation, {**clients, address: client})
        return client

    def _call(self, action: str, call: Callable[[Any], T], token: str | None = None) -> T:
        """Run ``call(client)`` on the first node that can serve it.

        ``token`` None: the current token's client; otherwise a client made for this one call with
        ``token`` ("" for an unauthenticated login). Raises the first answer that is not a reason to
        move on (403, 404, 400, a refused login), or VaultUnavailable naming every node's failure.
        """
        failures: list[tuple[str, str, str]] = []
        for node in self._failover.order():
            client = self._client(node.address, token)
            try:
                with translate(node.address):
                    result = call(client)
            except VaultUnavailable as exc:
                streak = self._failover.failed(node, str(exc), exc.cause)
                failures.append((node.address, str(exc), exc.cause))
                if len(self._failover.nodes) > 1:
                    log.log(
                        logging.WARNING if streak == 1 else logging.DEBUG,
                        "%s: Vault node %s failed (%s); trying the next node",
                        action,
                        node.address,
                        exc.cause,
                        extra={"event": "vault_node_failed", "node": node.address, "error": str(exc)},
                    )
                continue
            except VaultError as exc:
                self._failover.succeeded(node)  # it answered; the answer is for the caller
                text = str(exc).removeprefix(f"{node.address}: ")
                raise type(exc)(f"{action} at {node.address}: {text}", exc.cause) from None
            self._failover.succeeded(node)
            return result
        if len(failures) == 1:
            raise VaultUnavailable(f"{action} at {failures[0][1]}", failures[0][2])
        # In the configured order, so the same outage always reads the same (logged once, not per try).
        failures.sort(key=lambda failure: self._config.nodes.index(failure[0]))
        causes = list(dict.fromkeys(cause for _, _, cause in failures))
        raise VaultUnavailable(
            f"{action}: no Vault node could serve it: " + "; ".join(text for _, text, _ in failures),
            ", ".join(causes) if len(causes) > 1 else causes[0],
        )

    # -- login ----------------------------------------------------------------------------------

    def login(self) -> TokenInfo:
        """Log in with the configured method; returns the new token's TTL and renewability."""
        with self._lock:
            method = self._auth.method
            action = f"Vault login ({method})"
            if method == "token":
                token = self._static_token()
                data = self._call(action, lambda c: c.auth.token.lookup_self()["data"], token=token)
                info = TokenInfo.parse(data, "ttl", self._clock())
            else:
                logins = {
                    "approle": self._login_approle,
                    "cert": self._login_cert,
                    "kubernetes": self._login_jwt,
                    "jwt": self._login_jwt,
                }
                auth = logins[method](action)
                token = str(auth["client_token"])
                info = TokenInfo.parse(auth, "lease_duration", self._clock())
            self._credential = (self._credential[0] + 1, token)
            self.token = info
            log.info(
                "logged in to Vault with %s auth (token ttl %s, renewable %s) at %s",
                method,
                f"{int(info.ttl)}s" if info.ttl else "unlimited",
                info.renewable,
                self._failover.current,
                extra={"event": "login", "node": self._failover.current},
            )
            return info

    def _static_token(self) -> str:
        if self._auth.token_file:
            return _read_file(self._auth.token_file, "vault.auth.token_file")
        if not self._env_token:
            raise VaultLoginError("no Vault token: set vault.auth.token_file or VAULT_TOKEN")
        return self._env_token

    def _login_approle(self, action: str) -> dict[str, Any]:
        role_id = _read_file(self._auth.role_id_file, "vault.auth.role_id_file")
        secret_id = self._secret_id()
        mount = self._auth.mount_point

        def call(client: Any) -> dict[str, Any]:
            try:
                response = client.auth.approle.login(
                    role_id=role_id, secret_id=secret_id, mount_point=mount, use_token=False
                )
            except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
                raise VaultLoginError(
                    "Vault refused the AppRole login: check role_id_file and "
                    "secret_id_file (the secret_id may be expired or used up)"
                ) from None
            return _auth_block(response)

        auth = self._call(action, call, token="")
        role = str((auth.get("metadata") or {}).get("role_name") or "")
        self.secret_id_expires = self._secret_id_expiry(role, secret_id, str(auth["client_token"])) if role else None
        return auth

    def _secret_id_expiry(self, role: str, secret_id: str, token: str) -> float | None:
        """When the secret_id keyd logs in with expires (unix time), None when it never does or
        the policy does not let keyd look it up (a policy from before keyd asked: logged once)."""
        mount = self._auth.mount_point

        def call(client: Any) -> Any:
            return client.auth.approle.read_secret_id(role, secret_id, mount_point=mount)

        try:
            found = self._call("looking up the secret_id's expiry", call, token=token)
        except VaultError as exc:
            if not self._expiry_warned:
                self._expiry_warned = True
                log.warning(
                    "cannot look up when the AppRole secret_id expires (%s); "
                    "keyd_vault_secret_id_ttl_seconds stays absent: re-run keyd vault setup for the policy",
                    exc.cause or type(exc).__name__,
                )
            return None
        data = (found or {}).get("data") or {}
        if not int(data.get("secret_id_ttl") or 0):
            return None  # never expires
        try:
            return datetime.fromisoformat(str(data["expiration_time"]).replace("Z", "+00:00")).timestamp()
        except (KeyError, ValueError):
            return None

    def _secret_id(self) -> str:
        if not self._auth.secret_id_wrapped:
            return _read_file(self._auth.secret_id_file, "vault.auth.secret_id_file")
        if self._unwrapped_secret_id is None:
            wrapping_token = _read_file(self._auth.secret_id_file, "vault.auth.secret_id_file")

            def call(client: Any) -> str:
                # A client of its own whose token is the wrapping token (never keyd's own token).
                try:
                    data = client.sys.unwrap()["data"]
                except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
                    raise VaultLoginError(
                        "cannot unwrap the secret_id: the wrapping token is "
                        "invalid, expired or was already used (each wrapped secret_id works once)"
                    ) from None
                return str(data["secret_id"])

            # A wrapping token is single-use, so the secret_id it held is kept (in memory only)
            # for later logins. (If a node unwraps it and the answer is lost on the way, no other
            # node can unwrap it again: a fresh wrapped secret_id is then needed.)
            self._unwrapped_secret_id = self._call("unwrapping the secret_id", call, token=wrapping_token)
        return self._unwrapped_secret_id

    def _login_cert(self, action: str) -> dict[str, Any]:
        params = {"name": self._auth.cert_role} if self._auth.cert_role else {}
        url = f"/v1/auth/{self._auth.mount_point}/login"

        def call(client: Any) -> dict[str, Any]:
            try:
                response = client.adapter.login(url, use_token=False, json=params)
            except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
                raise VaultLoginError(
                    "Vault refused the TLS certificate login: check "
                    "vault.auth.client_cert and client_key, and that a cert role trusts their CA "
                    "(keyd vault setup --client-ca FILE)"
                ) from None
            return _auth_block(response)

        return self._call(action, call, token="")

    def _login_jwt(self, action: str) -> dict[str, Any]:
        """Vault's Kubernetes or JWT auth: the role and the workload's JWT, read from jwt_file at
        every login because projected service account tokens rotate."""
        method, role, path = self._auth.method, self._auth.role, self._auth.jwt_file
        token = _read_file(path, "vault.auth.jwt_file")
        url = f"/v1/auth/{self._auth.mount_point}/login"
        what = "Kubernetes" if method == "kubernetes" else "JWT"

        def call(client: Any) -> dict[str, Any]:
            try:
                response = client.adapter.login(url, use_token=False, json={"role": role, "jwt": token})
            except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as exc:
                raise VaultLoginError(
                    f"Vault refused the {what} login to role {role!r} with the token in "
                    f"vault.auth.jwt_file {path!r}{_refusal_reason(exc, token)}: check the role's "
                    "bound service account, namespace, audience and issuer, and that the token "
                    "has not expired"
                ) from None
            return _auth_block(response)

        return self._call(action, call, token="")

    # -- token and keys -------------------------------------------------------------------------

    def renew(self) -> TokenInfo:
        """renew-self; VaultAuthError when the token is gone (log in again instead)."""
        with self._lock:
            auth = self._call("Vault token renewal", lambda c: _auth_block(c.auth.token.renew_self()))
            info = TokenInfo.parse(auth, "lease_duration", self._clock())
            self.token = info
            return info

    def lookup(self) -> TokenInfo:
        """lookup-self: the current token's remaining TTL, without changing anything."""
        data = self._call("Vault token lookup", lambda c: c.auth.token.lookup_self()["data"])
        return TokenInfo.parse(data, "ttl", self._clock())

    def read(self, mount: str, path: str, field: str, kv_version: int) -> Secret:
        """One field of a KV secret, validated: a non-empty string without surrounding whitespace."""
        where = f"{mount}/{path}"

        def call(client: Any) -> tuple[Any, Any]:
            if kv_version == 2:
                response = client.secrets.kv.v2.read_secret_version(
                    path=path, mount_point=mount, raise_on_deleted_version=True
                )
                return response["data"]["data"], response["data"]["metadata"].get("version")
            return client.secrets.kv.v1.read_secret(path=path, mount_point=mount)["data"], None

        try:
            data, version = self._call(f"reading {where} (KV v{kv_version})", call)
        except SecretError as exc:  # 404
            raise SecretError(str(exc), f"secret not found at {where}") from None
        cause = f"malformed secret at {where}"
        if not isinstance(data, dict) or field not in data:
            raise SecretError(f"reading {where}: the secret has no field {field!r}", cause)
        value = data[field]
        if not isinstance(value, str):
            raise SecretError(f"reading {where}: field {field!r} is not a string", cause)
        if not value:
            raise SecretError(f"reading {where}: field {field!r} is empty", cause)
        if value != value.strip():
            raise SecretError(f"reading {where}: field {field!r} has surrounding whitespace", cause)
        return Secret(
            value=SecretKey.from_str(value),
            version=int(version) if version is not None else None,
            kv_version=kv_version,
        )

    def transit_hmac(self, mount: str, key: str, inputs: list[bytes]) -> list[TransitItem]:
        """HMAC-SHA256 of each input with the Transit key ``mount/key``, in one ``batch_input`` call.

        One answer per input, in order: the digest and the key version of its ``vault:vN:`` prefix,
        or the error Vault gave for that item alone. A refused call (403, 404, a sealed Vault)
        raises, naming the path; the node list and failover are ``_call``'s.
        """
        path = f"{mount}/hmac/{key}/sha2-256"
        batch = [{"input": base64.b64encode(data).decode("ascii")} for data in inputs]

        def call(client: Any) -> list[Any]:
            answer = client.adapter.post(f"/v1/{path}", json={"batch_input": batch})
            results = answer["data"]["batch_results"]
            if not isinstance(results, list) or len(results) != len(inputs):
                raise ValueError("batch_results")  # a malformed answer (translate: VaultUnavailable)
            return results

        try:
            results = self._call(f"Transit HMAC on {path}", call)
        except VaultAuthError as exc:
            raise VaultAuthError(f"{exc}: keyd's Vault policy must grant update on {path}", exc.cause) from None
        except SecretError as exc:
            raise SecretError(f"{exc}: no Transit key {key!r} at mount {mount!r}", exc.cause) from None
        return [transit_item(result) for result in results]

    # -- for the event loop's Transit client (keyd.daemon.keys.transit_client) ---------------------------

    def current_token(self) -> str | None:
        """The token of the current login, for a call made outside hvac; never logged or shown."""
        return self._credential[1] if self.token is not None else None

    def node_order(self) -> list[Node]:
        return self._failover.order()

    def node_failed(self, node: Node, error: str, cause: str) -> None:
        self._failover.failed(node, error, cause)

    def node_succeeded(self, node: Node) -> None:
        self._failover.succeeded(node)

    def tls(self) -> tuple[str, tuple[str, str] | None]:
        """(ca_cert, client certificate and key or None): what every call to Vault verifies with."""
        return self._config.ca_cert, self._cert

    # -- health probes --------------------------------------------------------------------------

    def probe(self) -> ProbeResult:
        """Ask every node's unauthenticated ``sys/health`` (no token, no login: one small GET each).

        A node found serving is preferred again at once; one found sealed or unreachable is marked
        failed, so calls skip it until its backoff ends or a later probe finds it serving.
        """
        newly: list[str] = []
        causes: list[str] = []
        serving = False
        timeout = min(self._config.timeout, PROBE_TIMEOUT)
        for node in self._failover.nodes:
            status: int | None = None
            error = cause = ""
            try:
                response = self._sessions[node.address].get(
                    f"{node.address}/v1/sys/health",
                    timeout=timeout,
                    allow_redirects=False,
                    verify=self._verify,
                    cert=self._cert,
                )
                status = response.status_code
                if status not in SERVING:
                    error, cause = health_failure(status)
            except requests.exceptions.RequestException as exc:
                found = _classify(exc)
                error, cause = (found[1], found[2]) if found else (type(exc).__name__, "node unreachable")
            if error:
                error = f"{node.address}: {error}"
                causes.append(cause)
            serving |= status in SERVING
            if self._failover.probed(node, status, error, cause):
                newly.append(node.address)
        cause = "" if serving else ", ".join(dict.fromkeys(causes))
        return ProbeResult(serving=serving, newly_serving=tuple(newly), cause=cause)

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()


@dataclass(frozen=True, slots=True)
class TransitItem:
    """One ``batch_results`` entry: ``digest`` and ``version``, or ``error`` (Vault's own text)."""

    digest: bytes = b""
    version: int = 0
    error: str = ""


def transit_item(result: Any) -> TransitItem:
    """One ``batch_results`` entry as a TransitItem (malformed entries become that item's error)."""
    if not isinstance(result, dict):
        return TransitItem(error="malformed Transit answer")
    if result.get("error"):
        return TransitItem(error=str(result["error"])[:200])
    text = result.get("hmac")
    if not isinstance(text, str) or not text.startswith("vault:v"):
        return TransitItem(error="malformed Transit answer")
    version, _, encoded = text[len("vault:v") :].partition(":")
    try:
        return TransitItem(digest=base64.b64decode(encoded, validate=True), version=int(version))
    except ValueError:
        return TransitItem(error="malformed Transit answer")


def _auth_block(response: Any) -> dict[str, Any]:
    """The ``auth`` block of a login or renewal answer (KeyError, a malformed answer, if missing)."""
    auth: dict[str, Any] = response["auth"]
    if not isinstance(auth.get("client_token"), str):
        raise KeyError("client_token")  # a malformed answer, turned into VaultUnavailable by translate
    return auth


def _refusal_reason(exc: BaseException, jwt_text: str) -> str:
    """Vault's own words for a refused login (" (role not found)"), never echoing the JWT."""
    errors = getattr(exc, "errors", None) or []
    words = "; ".join(str(e) for e in errors if isinstance(e, str))[:200]
    if not words or jwt_text in words or jwt_text[:40] in words:
        return ""
    return f" ({words})"

"""HTTP routes: parse, authorize, sign, shape errors. No sockets here (see connection.py).

Every error is ``{"error": {"code": "<snake_case>", "message": "<text>"}}`` with a 4xx/5xx status.
Request validation happens entirely before anything is signed or recorded, so a bad request changes
nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import json.scanner
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl

from keyd.config import Config
from keyd.daemon.keys.health import Health, document
from keyd.daemon.keys.keystore import KeySnapshot
from keyd.daemon.signing import oracle, tokens
from keyd.daemon.signing.decisions import Decision
from keyd.daemon.signing.oracle import Unsignable
from keyd.errors import ApiError, Forbidden, KeyUnavailable, RateLimited, Refusal

if TYPE_CHECKING:
    from keyd.config import AppConfig
    from keyd.daemon.keys.vault import TransitItem
from keyd.daemon.callers.caller import Caller
from keyd.daemon.http.types import Response, deferred, error_body
from keyd.daemon.policy.grants import Policy
from keyd.daemon.signing.requests import _invalid, _ttl, check_fields, parse_json_object, valid_user_id

_perf_counter = time.perf_counter
TOKENS_ENDPOINT = "/v1/tokens"
TOKENS_PATH = b"/v1/tokens"
REFUSED = "refused"


class Keys(Protocol):
    """What the API needs from the key store: the snapshot to sign with, and health."""

    def signing(self, app: str) -> KeySnapshot: ...
    def health(self) -> Health: ...


class Macs(Protocol):
    """Where a transit app's HMACs come from (keyd.daemon.keys.transit.TransitMac): the future of
    ``finish(result)``, ``result`` being the HMAC of ``data`` or why there is none."""

    def mac(
        self, app: AppConfig, data: bytes, finish: Callable[[TransitItem | KeyUnavailable], Response]
    ) -> asyncio.Future[Response]: ...


class Audit(Protocol):
    """Receives one record per decision (issued or refused). Never given a token or key."""

    def record(self, decision: Decision) -> None: ...


class NoAudit:
    def record(self, decision: Decision) -> None:
        return None


class Stats(Protocol):
    """Request counters for the metrics (keyd.metrics.RequestStats); called on the hot path."""

    def request(self, endpoint: str, status: int, seconds: float) -> None: ...
    def error(self, code: str) -> None: ...
    def decision(self, decision: Decision) -> None: ...
    def issued(self, decision: Decision, seconds: float) -> None: ...


class NoStats:
    def request(self, endpoint: str, status: int, seconds: float) -> None:
        return None

    def error(self, code: str) -> None:
        return None

    def decision(self, decision: Decision) -> None:
        return None

    def issued(self, decision: Decision, seconds: float) -> None:
        return None


def error_response(exc: ApiError) -> Response:
    return Response(exc.status, error_body(exc.code, exc.message))


# The one table from the domain's refusals (raised by the key store and the policy) to HTTP.
REFUSALS: dict[type[Refusal], tuple[int, str]] = {
    Forbidden: (403, "forbidden"),
    RateLimited: (429, "rate_limited"),
    KeyUnavailable: (503, "key_unavailable"),
}


def refusal_error(exc: Refusal) -> ApiError:
    """The answer to a refusal: its status and code from REFUSALS, its own message."""
    status, code = REFUSALS[type(exc)]
    return ApiError(status, code, exc.message)


_TIMESTAMP = re.compile(rb"[0-9]{1,16}(?:\.[0-9]{1,9})?")
_TOKEN_FIELDS = frozenset({"user_id", "type", "ttl", "app"})
_SIGNATURE_FIELDS = frozenset({"user_id", "app", "uppercase"})


class Api:
    """Routes requests to handlers. ``dispatch`` and ``handle`` never raise: every failure becomes
    a Response."""

    def __init__(
        self,
        config: Config,
        keys: Keys,
        policy: Policy,
        audit: Audit | None = None,
        clock: Callable[[], float] = time.time,
        stats: Stats | None = None,
        transit: Macs | None = None,
    ) -> None:
        self._stats: Stats = stats or NoStats()
        # Apps whose key stays in Vault's Transit engine: their HMACs come from ``transit``, later.
        self._transit = transit
        self._transit_apps = frozenset(name for name, app in config.apps.items() if app.transit)
        if self._transit_apps and transit is None:
            raise ValueError("transit apps are configured but no TransitMac was given")
        self._health_sections: dict[str, Callable[[], Any]] = {}
        self._keys = keys
        self._policy = policy
        self._audit: Audit = audit or NoAudit()
        self._clock = clock
        self._apps = config.apps
        self._default_app = config.default_app
        # Constant JSON fragments per app, encoded once.
        self._app_json = {
            name: (json.dumps(name), json.dumps(app.app_id)) for name, app in config.apps.items()
        }
        # path -> method -> route: the handler as ``_recorded`` wraps it, or one that records its
        # own metrics. Metric label per known path (_endpoints); anything else is "other", so no
        # caller text becomes a label.
        self._routes: dict[bytes, dict[bytes, Callable[[Request], Response]]] = {}
        self._endpoints: dict[bytes, str] = {}
        self.add_route(
            TOKENS_PATH,
            b"POST",
            lambda request: self.issue(request.caller, request.body, request.content_type),
            records_metrics=True,
        )
        self.add_route(b"/v1/health", b"GET", self.health)
        self.add_route(b"/v1/signatures", b"POST", self.signatures)
        self.add_route(b"/v1/webhooks/verify", b"POST", self.verify_webhook)
        # What follows the token in a 200 from /v1/tokens, up to expires_at, per (app, type).
        self._token_fields = {
            name: {
                kind: b'","type":"%s","app":%s,"app_id":%s,"expires_at":'
                % (kind.encode(), app_json.encode(), app_id_json.encode())
                for kind in ("user", "app")
            }
            for name, (app_json, app_id_json) in self._app_json.items()
        }
        # Path prefixes whose handler may answer later (the REST proxy): see add_prefix.
        self._prefixes: list[tuple[bytes, Callable[[Request], Response]]] = []
        # prefix -> its own body limit, and which callers it applies to
        self._body_limits: list[tuple[bytes, int, Callable[[Caller], bool]]] = []

    def add_route(
        self, path: bytes, method: bytes, handler: Callable[[Request], Response], records_metrics: bool = False
    ) -> None:
        """A route (and the extension point for optional endpoints: metrics). ``handler`` may raise
        ApiError; its answer and time are counted under ``path`` unless it ``records_metrics``
        itself (``issue``: one stats call per token) and never raises."""
        endpoint = path.decode()
        self._routes.setdefault(path, {})[method] = handler if records_metrics else self._recorded(endpoint, handler)
        self._endpoints[path] = endpoint

    def _recorded(self, endpoint: str, handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
        """``handler`` as a route: an ApiError it raises becomes the answer, and the answer is
        counted under ``endpoint`` (a Deferred, status 0, counts its own once it is answered)."""
        stats = self._stats

        def route(request: Request) -> Response:
            started = _perf_counter()
            try:
                response = handler(request)
            except ApiError as exc:
                stats.error(exc.code)
                response = error_response(exc)
            if response.status:
                stats.request(endpoint, response.status, _perf_counter() - started)
            return response

        return route

    def add_prefix(
        self,
        prefix: bytes,
        handler: Callable[[Request], Response],
        max_body: int = 0,
        may_send_more: Callable[[Caller], bool] = lambda caller: True,
    ) -> None:
        """Extension point: every method on paths under ``prefix``. The handler may answer with a
        ``Deferred``; it records its own metrics. ``max_body``: its body limit, when not
        server.max_body, for the callers ``may_send_more`` accepts (the REST proxy: a grant with the
        type rest); anyone else keeps server.max_body, so a caller with no grant cannot make keyd
        hold a large body per connection."""
        self._prefixes.append((prefix, handler))
        if max_body:
            self._body_limits.append((prefix, max_body, may_send_more))

    def has_grant(self, caller: Caller) -> bool:
        """Whether any grant matches the caller (without one, every request is refused)."""
        return self._policy.grant_for(caller) is not None

    def body_limit(self, target: bytes, caller: Caller | None) -> int:
        """The body limit of the prefix ``target`` is under for ``caller``, 0 for none
        (server.max_body applies). The server asks only about a body over server.max_body."""
        for prefix, limit, may_send_more in self._body_limits:
            if target.startswith(prefix):
                return limit if caller is not None and may_send_more(caller) else 0
        return 0

    def add_health(self, name: str, section: Callable[[], Any]) -> None:
        """Extension point: a section the daemon adds to GET /v1/health (``VaultHealth``: the Vault
        token's TTL and nodes), a typed value the document spells out field by field."""
        self._health_sections[name] = section

    def dispatch(
        self, caller: Caller, method: bytes, target: bytes, headers: Mapping[bytes, bytes], body: bytes
    ) -> Response:
        """Every request the server parsed; never raises for a bad request.

        ``POST /v1/tokens`` goes straight to ``issue``: keyd's hot path (docs/benchmarks.md) builds no
        Request and takes no route lookup. Everything else becomes a Request for ``handle``, whose
        route for the same path calls the same ``issue``.
        """
        if target == TOKENS_PATH and method == b"POST":
            return self.issue(caller, body, headers.get(b"content-type"))
        path, query, raw_query = target, {}, b""
        if b"?" in target:
            path, raw_query = target.split(b"?", 1)
            query = dict(parse_qsl(raw_query.decode("latin-1")))
        return self.handle(Request(method, path, query, headers, body, caller, raw_query))

    def handle(self, request: Request) -> Response:
        """One parsed request: its route (which records its metrics), or a 404 or 405."""
        methods = self._routes.get(request.path)
        if methods is None:
            started = _perf_counter()
            for prefix, prefixed in self._prefixes:
                if request.path.startswith(prefix):
                    return prefixed(request)
            self._stats.error("not_found")
            response = error_response(ApiError(404, "not_found", f"no such endpoint: {request.path_text}"))
            self._stats.request("other", 404, _perf_counter() - started)
            return response
        method = request.method
        if method == b"HEAD" and b"GET" in methods:
            method = b"GET"  # the server leaves the body out
        route = methods.get(method)
        if route is not None:
            return route(request)
        started = _perf_counter()
        allowed = ",".join(m.decode() for m in methods) + (",HEAD" if b"GET" in methods else "")
        response = Response(
            405,
            error_body("method_not_allowed", f"use {allowed} for {request.path_text}"),
            headers=((b"Allow", allowed.encode()),),
        )
        self._stats.error("method_not_allowed")
        self._stats.request(self._endpoints[request.path], 405, _perf_counter() - started)
        return response

    # -- helpers ---------------------------------------------------------------------------

    def _app(self, name: Any) -> str:
        if name is None:
            if self._default_app is None:
                raise _invalid("app is required: several apps are configured and none is named 'default'")
            return self._default_app
        if not isinstance(name, str):
            raise _invalid("app must be a string")
        if name not in self._apps:
            raise ApiError(404, "unknown_app", f"no app named {name[:64]!r} is configured")
        return name

    def _refuse(
        self,
        exc: Refusal | ApiError,
        caller: Caller,
        app: str,
        kind: str,
        sub: str | None,
        ttl: int | None,
    ) -> ApiError:
        """Record the refusal (one Decision, with the error's code); the ApiError to answer with."""
        error = exc if isinstance(exc, ApiError) else refusal_error(exc)
        self._decided(Decision(caller, app, kind, sub, ttl, REFUSED, error.code))
        return error

    def _decided(self, decision: Decision) -> None:
        self._audit.record(decision)
        self._stats.decision(decision)

    # -- routes ----------------------------------------------------------------------------

    def issue(self, caller: Caller, body: bytes, content_type: bytes | None) -> Response:
        """``POST /v1/tokens``: the token, or the error. Never raises ApiError.

        The one way into token issuing: ``dispatch`` calls it directly, without the generic
        Request and routing ``handle`` uses, and the route table's entry calls it for a Request.
        It is keyd's hot path (docs/benchmarks.md), hence one function and one metrics call per
        token.
        """
        started = _perf_counter()
        try:
            data = parse_json_object(body, content_type)
            if not data.keys() <= _TOKEN_FIELDS:
                check_fields(data, _TOKEN_FIELDS)
            kind = data.get("type", "user")
            if kind not in ("user", "app"):
                raise _invalid('type must be "user" or "app"')
            name = self._app(data.get("app"))
            app = self._apps[name]
            if kind == "user":
                user_id = valid_user_id(data.get("user_id"))
                default, maximum = app.user_ttl, app.max_user_ttl
            else:
                if "user_id" in data:
                    raise _invalid("app tokens take no user_id")
                user_id = None
                default, maximum = app.app_ttl, app.max_app_ttl
            explicit = "ttl" in data
            ttl = _ttl(data["ttl"], maximum) if explicit else int(default)
            try:
                # Only an explicit ttl can exceed the grant; a default one is lowered to it below.
                grant = self._policy.authorize(caller, app, kind, ttl if explicit else None, user_id)
                if not explicit and grant.max_ttl is not None and ttl > grant.max_ttl:
                    ttl = int(grant.max_ttl)  # the caller's own default is its grant's maximum
                snapshot = self._keys.signing(name) if name not in self._transit_apps else None
            except Refusal as exc:
                raise self._refuse(exc, caller, name, kind, user_id, ttl) from None
        except ApiError as exc:
            self._stats.error(exc.code)
            response = error_response(exc)
            self._stats.request(TOKENS_ENDPOINT, response.status, _perf_counter() - started)
            return response
        iat = int(self._clock())
        if snapshot is None:
            return self._issue_transit(caller, name, kind, user_id, ttl, iat, started)
        if user_id is not None:
            token = tokens.user_token(snapshot.signing, app.app_id, user_id, iat, ttl)
        else:
            token = tokens.app_token(snapshot.signing, app.app_id, iat, ttl)
        decision = Decision(caller, name, kind, user_id, ttl, "issued", None)
        self._audit.record(decision)
        version = snapshot.version
        answer = b'{"token":"%b%b%d,"key_version":%b}' % (
            token,
            self._token_fields[name][kind],
            iat + ttl,
            b"null" if version is None else b"%d" % version,
        )
        self._stats.issued(decision, _perf_counter() - started)
        return Response(200, answer)

    def _issue_transit(
        self, caller: Caller, name: str, kind: str, user_id: str | None, ttl: int, iat: int, started: float
    ) -> Response:
        """``issue`` for a transit app: the same token, its HMAC from Vault (a Deferred answer)."""
        app = self._apps[name]
        if user_id is not None:
            unsigned = tokens.user_token(tokens.UNSIGNED, app.app_id, user_id, iat, ttl)
        else:
            unsigned = tokens.app_token(tokens.UNSIGNED, app.app_id, iat, ttl)
        fields = self._token_fields[name][kind]

        def finish(result: TransitItem | KeyUnavailable) -> Response:
            if isinstance(result, KeyUnavailable) or result.error:
                error = self._refuse(_transit_refusal(result), caller, name, kind, user_id, ttl)
                self._stats.error(error.code)
                response = unavailable(error)
                self._stats.request(TOKENS_ENDPOINT, response.status, _perf_counter() - started)
                return response
            decision = Decision(caller, name, kind, user_id, ttl, "issued", None)
            self._audit.record(decision)
            answer = b'{"token":"%b%b%d,"key_version":%d}' % (
                tokens.complete(unsigned, result.digest),
                fields,
                iat + ttl,
                result.version,
            )
            self._stats.issued(decision, _perf_counter() - started)
            return Response(200, answer)

        assert self._transit is not None  # noqa: S101 - set whenever a transit app is configured
        return deferred(self._transit.mac(app, tokens.signing_input(unsigned), finish))

    def _later(
        self, request: Request, name: str, kind: str, sub: str | None, data: bytes,
        answer: Callable[[TransitItem], Response],
    ) -> Response:
        """A transit app's HMAC of ``data``, turned into the response by ``answer`` (which may raise
        ApiError: recorded as a refusal)."""
        started = _perf_counter()
        endpoint = self._endpoints[request.path]

        def finish(result: TransitItem | KeyUnavailable) -> Response:
            try:
                if isinstance(result, KeyUnavailable) or result.error:
                    error = self._refuse(_transit_refusal(result), request.caller, name, kind, sub, None)
                    self._stats.error(error.code)
                    response = unavailable(error)
                else:
                    response = answer(result)
            except ApiError as exc:
                self._stats.error(exc.code)
                response = error_response(exc)
            self._stats.request(endpoint, response.status, _perf_counter() - started)
            return response

        assert self._transit is not None  # noqa: S101 - set whenever a transit app is configured
        return deferred(self._transit.mac(self._apps[name], data, finish))

    def signatures(self, request: Request) -> Response:
        data = parse_json_object(request.body, request.content_type)
        check_fields(data, _SIGNATURE_FIELDS)
        user_id = valid_user_id(data.get("user_id"))
        uppercase = data.get("uppercase", False)
        if not isinstance(uppercase, bool):
            raise _invalid("uppercase must be true or false")
        name = self._app(data.get("app"))
        try:
            self._policy.authorize(request.caller, self._apps[name], "signature", None, user_id)
            if name in self._transit_apps:
                return self._signature_transit(request, name, user_id, uppercase)
            snapshot = self._keys.signing(name)
        except Refusal as exc:
            raise self._refuse(exc, request.caller, name, "signature", user_id, None) from None
        try:
            sig = tokens.signature(snapshot.signing, user_id, uppercase)
        except Unsignable as exc:
            why = _invalid(f"keyd does not sign this user_id: {exc}")
            raise self._refuse(why, request.caller, name, "signature", user_id, None) from None
        self._decided(Decision(request.caller, name, "signature", user_id, None, "issued", None))
        return Response(
            200,
            b'{"signature":"%s","app":%s,"key_version":%s}'
            % (sig.encode(), self._app_json[name][0].encode(), _version(snapshot).encode()),
        )

    def _signature_transit(self, request: Request, name: str, user_id: str, uppercase: bool) -> Response:
        reason = oracle.refusal(user_id)  # what tokens.signature checks for an in-memory key
        if reason is not None:
            why = _invalid(f"keyd does not sign this user_id: {reason}")
            raise self._refuse(why, request.caller, name, "signature", user_id, None)
        app_json = self._app_json[name][0].encode()

        def answer(result: TransitItem) -> Response:
            digest = result.digest.hex()
            self._decided(Decision(request.caller, name, "signature", user_id, None, "issued", None))
            return Response(
                200,
                b'{"signature":"%s","app":%s,"key_version":%d}'
                % ((digest.upper() if uppercase else digest).encode(), app_json, result.version),
            )

        return self._later(request, name, "signature", user_id, user_id.encode("utf-8"), answer)

    def verify_webhook(self, request: Request) -> Response:
        name = self._app(request.query.get("app"))
        app = self._apps[name]
        timestamp = request.headers.get(b"x-talkjs-timestamp")
        given = request.headers.get(b"x-talkjs-signature")
        for header, value in (("X-TalkJS-Timestamp", timestamp), ("X-TalkJS-Signature", given)):
            if not value:
                raise ApiError(400, "missing_header", f"the {header} header is required")
        assert timestamp is not None and given is not None  # noqa: S101 - checked just above
        # Digits only: float() alone would take "nan" (which no window comparison rejects), "inf",
        # "1e9" or surrounding spaces.
        if not _TIMESTAMP.fullmatch(timestamp):
            raise ApiError(400, "invalid_header", "X-TalkJS-Timestamp must be a number")
        stamp = float(timestamp)
        try:
            self._policy.authorize(request.caller, app, "webhook", None, None)
            snapshot = self._keys.signing(name) if name not in self._transit_apps else None
        except Refusal as exc:
            raise self._refuse(exc, request.caller, name, "webhook", None, None) from None
        if stamp > 1e11:
            stamp /= 1000.0  # milliseconds
        if snapshot is None:  # transit: the same checks, once Vault has computed the HMAC

            def answer(result: TransitItem) -> Response:
                valid = hmac.compare_digest(result.digest.hex().upper().encode(), given.strip().upper())
                return self._webhook_answer(request, name, valid, stamp)

            return self._later(request, name, "webhook", None, timestamp + b"." + request.body, answer)
        valid = tokens.webhook_signature_valid(snapshot.webhook, timestamp, request.body, given)
        return self._webhook_answer(request, name, valid, stamp)

    def _webhook_answer(self, request: Request, name: str, valid: bool, stamp: float) -> Response:
        app = self._apps[name]
        rejection = None
        if not valid:
            rejection = ApiError(401, "invalid_signature", "the webhook signature does not match")
        elif abs(self._clock() - stamp) > app.webhook_tolerance:
            rejection = ApiError(
                401, "stale_timestamp", "the webhook timestamp is outside the allowed window"
            )
        if rejection is not None:
            raise self._refuse(rejection, request.caller, name, "webhook", None, None)
        self._decided(Decision(request.caller, name, "webhook", None, None, "verified", None))
        return Response(200, b'{"valid":true,"app":%s}' % self._app_json[name][0].encode())

    def health(self, request: Request) -> Response:
        health = self._keys.health()
        doc = document(health, {name: section() for name, section in self._health_sections.items()})
        return Response(200 if health.can_sign else 503, json.dumps(doc).encode())


def _transit_refusal(result: TransitItem | KeyUnavailable) -> KeyUnavailable:
    if isinstance(result, KeyUnavailable):
        return result
    return KeyUnavailable(f"Vault's Transit engine refused this input: {result.error}")


def unavailable(error: ApiError) -> Response:
    """The answer to a failed Transit call: the error, with Retry-After (Vault may answer soon)."""
    return Response(error.status, error_body(error.code, error.message), headers=((b"Retry-After", b"1"),))


def _version(snapshot: KeySnapshot) -> str:
    return "null" if snapshot.version is None else str(snapshot.version)


@dataclass(slots=True)
class Request:
    """One parsed HTTP request, as Api.dispatch builds it for Api.handle."""

    method: bytes
    path: bytes
    query: Mapping[str, str]
    headers: Mapping[bytes, bytes]
    body: bytes
    caller: Caller
    raw_query: bytes = b""  # as received, after "?": the REST proxy forwards every parameter of it

    @property
    def content_type(self) -> bytes | None:
        return self.headers.get(b"content-type")

    @property
    def path_text(self) -> str:
        return self.path.decode("latin-1")[:200]

"""The TalkJS REST proxy: ``METHOD /v1/rest/APP/PATH`` -> ``METHOD {base_url}/v1/{app_id}/PATH``.

Loaded only when a grant has the type ``rest`` (wiring.py imports it lazily). For each request:
the path is validated (rejected, never rewritten, when it could mean two things), the caller's
grant must list a matching ``"METHOD /pattern"``, then an app token is minted for this one attempt
(``token_ttl`` seconds), sent upstream as ``Authorization: Bearer``, and forgotten. The caller gets
TalkJS's status, body, Content-Type and Retry-After; the token itself never leaves this module: it
is not returned, logged, audited or put in an error.

Everything up to the upstream call runs synchronously in ``handle``, so refusals are answered in
the same loop pass as a token request. The upstream call is a task on the same loop; ``handle``
returns it and the connection writes its answer when it is done (connection.py keeps answer order).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from keyd.config import REST_METHODS, AppConfig, Config, RestRule
from keyd.daemon.signing import tokens
from keyd.daemon.upstream import Pool, UpstreamError, UpstreamResponse, UpstreamTimeout
from keyd.errors import ApiError, KeyUnavailable, Refusal

if TYPE_CHECKING:
    from keyd.daemon.keys.vault import TransitItem
from keyd.daemon.backoff import backoff
from keyd.daemon.callers.caller import Caller
from keyd.daemon.http.types import Response, deferred, error_body
from keyd.daemon.policy.grants import Policy
from keyd.daemon.rest.paths import check_body, check_path, redact, upstream_query
from keyd.daemon.rest.stats import RestCollector, RestStats
from keyd.daemon.signing.api import Keys, Macs, Request, error_response, refusal_error
from keyd.daemon.signing.decisions import RestCall

log = logging.getLogger("keyd.rest")


PREFIX = b"/v1/rest/"
IDEMPOTENT = frozenset({b"GET", b"PUT", b"DELETE"})
_METHODS = frozenset(m.encode() for m in REST_METHODS)
_ALLOW = ",".join(REST_METHODS).encode()
_MAX_CONTENT_TYPE = 200
UPSTREAM_HEADER = (b"X-Keyd-Upstream", b"talkjs")
MAX_REFUSED_PATH = 200  # characters of a refused call's path in its audit line
MAX_LOGGED_PATH = 1024  # ... of a proxied call's (it matched a grant: seldom longer)


class _Seen:
    """What a refused call's audit line can name: the app and the path, once they passed."""

    __slots__ = ("app", "path")

    def __init__(self) -> None:
        self.app: str | None = None
        self.path: str | None = None


@dataclass(slots=True)
class _Call:
    """A REST call that passed every check: what the upstream part needs."""

    caller: Caller
    app: AppConfig
    method: bytes
    path: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    rule: RestRule
    started: float
    attempts: int = 0


def mint(key: tokens.Keyed, app_id: str, iat: int, ttl: int) -> bytes:
    """An app token for one upstream attempt: the claims TalkJS's snippet has, nothing more.

    Two attempts in the same second would otherwise be byte-identical; a random ``nonce`` in the
    JOSE header (which receivers ignore unless it is listed in ``crit``, RFC 7515 section 4) makes
    every token distinct without adding a claim.
    """
    return tokens.app_token(key, app_id, iat, ttl, nonce=os.urandom(12))


class RestAudit(Protocol):
    def rest(self, call: RestCall) -> None: ...


class Sender(Protocol):
    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        caller: Hashable = None,
    ) -> UpstreamResponse: ...

    def close(self) -> None: ...


class RestProxy:
    """Authorizes and forwards ``/v1/rest/...`` requests; one ``Pool`` per app, opened on first use."""

    def __init__(
        self,
        config: Config,
        keys: Keys,
        policy: Policy,
        audit: RestAudit,
        stats: RestStats | None = None,
        clock: Any = time.time,
        senders: Mapping[str, Sender] | None = None,
        transit: Macs | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._rand = rand  # the retries' jitter (backoff.py)
        self._transit = transit  # a transit app's upstream tokens are signed by Vault's Transit
        self._apps = config.apps
        self._keys = keys
        self._policy = policy
        self._audit = audit
        self.stats = stats or RestStats()
        self._clock = clock
        self._senders: dict[str, Sender] = dict(senders or {})
        self._in_flight: dict[int, int] = {}  # uid -> proxied requests in flight
        self._hash = config.audit.hash_user_ids
        # The socket layer's body limit for /v1/rest/: the largest of the apps' (each app checks its own).
        self.max_body = max(app.rest.max_body for app in config.apps.values())

    def collector(self) -> RestCollector:
        return RestCollector(self.stats)

    def close(self) -> None:
        for sender in self._senders.values():
            sender.close()

    def may_use(self, caller: Caller) -> bool:
        """Whether the caller's grant has the type ``rest``: only then is a REST-sized body read."""
        grant = self._policy.grant_for(caller)
        return grant is not None and "rest" in grant.types

    def in_flight(self) -> int:
        return sum(self._in_flight.values())

    def _sender(self, app: AppConfig) -> Sender:
        sender = self._senders.get(app.name)
        if sender is None:
            rest = app.rest
            sender = self._senders[app.name] = Pool(
                rest.base_url,
                rest.ca_file,
                rest.connect_timeout,
                rest.max_connections,
                rest.max_response_body,
                rest.idle_timeout,
            )
        return sender

    def _log_path(self, path: str | None, limit: int = MAX_LOGGED_PATH) -> str | None:
        """The path for the audit line: ids hashed with ``hash_user_ids``, then cut to ``limit``
        characters ("..." marks a cut). A URL may be 8 KiB (and each hashed id 71 characters): a
        caller with no grant must not write that much into the audit log per refused request."""
        if path is None:
            return None
        logged = redact(path) if self._hash else path
        return logged if len(logged) <= limit else logged[: limit - 3] + "..."

    # -- the synchronous part ----------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        """A Response for anything refused; otherwise a Deferred whose task produces TalkJS's answer."""
        started = time.perf_counter()
        seen = _Seen()
        try:
            call = self._admit(request, seen, started)
        except (ApiError, Refusal) as caught:
            return self._refuse(request, caught, seen, started)
        uid = call.caller.uid
        self._in_flight[uid] = self._in_flight.get(uid, 0) + 1
        return deferred(asyncio.get_running_loop().create_task(self._forward(call)))

    def _admit(self, request: Request, seen: _Seen, started: float) -> _Call:
        """Every check a REST call must pass, in order (raising ApiError or Refusal); ``seen``
        collects what a refusal's audit line can name. Changes nothing."""
        caller = request.caller
        if request.method not in _METHODS:
            raise ApiError(405, "method_not_allowed", f"the REST proxy accepts {_ALLOW.decode()}")
        method = request.method.decode("latin-1")
        app_part, slash, rest = request.path[len(PREFIX) :].partition(b"/")
        if not slash:
            raise ApiError(404, "not_found", "use /v1/rest/APP/PATH, e.g. /v1/rest/default/users/alice")
        app = self._apps.get(app_part.decode("latin-1"))
        if app is None:
            raise ApiError(
                404, "unknown_app", f"no app named {app_part[:64].decode('latin-1')!r} is configured"
            )
        seen.app = app.name
        path = seen.path = check_path(b"/" + rest)
        grant = self._policy.authorize(caller, app, "rest", None, None)
        rule = _match(grant.rest, method, path)
        if rule is None:
            raise ApiError(403, "forbidden", f"this caller may not {method} {path[:200]}")
        if len(request.body) > app.rest.max_body:
            raise ApiError(413, "body_too_large", f"the request body exceeds {app.rest.max_body} bytes")
        content_type = request.headers.get(b"content-type")
        if content_type is not None and not _plain_header(content_type):
            raise ApiError(
                422, "invalid_header", "Content-Type must be at most 200 printable ASCII characters"
            )
        check_body(request.body, content_type)
        if content_type is None and request.body:
            content_type = b"application/json"  # as keyd's own endpoints read a body without one
        if self._in_flight.get(caller.uid, 0) >= app.rest.max_concurrent:
            raise ApiError(
                429,
                "too_many_requests",
                f"this caller already has {app.rest.max_concurrent} REST requests in flight",
            )
        query = upstream_query(request)
        self._keys.signing(app.name)  # 503 key_unavailable now rather than after a wait
        headers = [] if content_type is None else [(b"Content-Type", content_type)]
        accept = request.headers.get(b"accept")
        headers.append((b"Accept", accept if accept and _plain_header(accept) else b"application/json"))
        target = b"/v1/%s%s" % (quote(app.app_id, safe="").encode(), path.encode())
        if query:
            target += b"?" + query
        return _Call(caller, app, request.method, path, target, headers, request.body, rule, started)

    def _refuse(self, request: Request, caught: ApiError | Refusal, seen: _Seen, started: float) -> Response:
        """The error answer for a refused call, counted and audited."""
        exc = caught if isinstance(caught, ApiError) else refusal_error(caught)
        response = error_response(exc)
        if exc.status == 405:
            response.headers = ((b"Allow", _ALLOW),)
        known = request.method in _METHODS
        method = request.method.decode("latin-1")
        self.stats.request(method if known else "other", "none", exc.status)
        self._audit.rest(
            RestCall(
                request.caller,
                seen.app,
                method[:16],
                self._log_path(seen.path, MAX_REFUSED_PATH),
                "refused",
                exc.code,
                None,
                time.perf_counter() - started,
                0,
            )
        )
        return response

    # -- the upstream part -------------------------------------------------------------------

    async def _forward(self, call: _Call) -> Response:
        app, uid = call.app, call.caller.uid
        code: str | None = None
        upstream: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(app.rest.timeout):
                upstream = await self._attempts(call)
            response = _relay(upstream)
        except TimeoutError:
            code = "upstream_timeout"
            response = Response(504, error_body(code, f"TalkJS did not answer within {app.rest.timeout:g}s"))
        except UpstreamTimeout as exc:
            code = "upstream_timeout"
            response = Response(504, error_body(code, exc.reason))
        except UpstreamError as exc:
            code = "upstream_error"
            response = Response(502, error_body(code, exc.reason))
        except KeyUnavailable as exc:  # the key became unavailable between attempts
            error = refusal_error(exc)
            code = error.code
            response = error_response(error)
        except asyncio.CancelledError:  # the caller went away; nothing to answer
            code = "cancelled"
            raise
        except Exception as exc:
            log.error("internal error in the REST proxy: %s", type(exc).__name__)
            code = "internal_error"
            response = Response(500, error_body(code, "keyd hit an internal error"))
        finally:
            left = self._in_flight.get(uid, 1) - 1
            if left:
                self._in_flight[uid] = left
            else:
                self._in_flight.pop(uid, None)
            status = upstream.status if upstream is not None else None
            self._audit.rest(
                RestCall(
                    call.caller,
                    app.name,
                    call.method.decode(),
                    self._log_path(call.path),
                    "proxied" if upstream is not None else "failed",
                    code,
                    status,
                    time.perf_counter() - call.started,
                    call.attempts,
                )
            )
        self.stats.request(call.method.decode(), str(call.rule), response.status)
        return response

    async def _mint_transit(self, app: AppConfig, ttl: int) -> bytes:
        """``mint`` for a transit app: the same token, its HMAC computed by Vault (KeyUnavailable
        when Vault cannot)."""
        assert self._transit is not None  # noqa: S101 - wiring passes it whenever a transit app exists
        unsigned = mint(tokens.UNSIGNED, app.app_id, int(self._clock()), ttl)

        def finish(result: TransitItem | KeyUnavailable) -> Response:
            if isinstance(result, KeyUnavailable):
                raise result
            if result.error:
                raise KeyUnavailable(f"Vault's Transit engine refused the upstream token: {result.error}")
            return Response(200, tokens.complete(unsigned, result.digest))

        answer = await self._transit.mac(app, tokens.signing_input(unsigned), finish)
        return answer.body

    async def _attempts(self, call: _Call) -> UpstreamResponse:
        """Send, retrying idempotent methods on connection errors and 5xx; the last answer or error.
        ``call.attempts`` counts the attempts made, for the audit line (also when this raises)."""
        app, method = call.app, call.method
        rest = app.rest
        tries = 1 + (rest.retries if method in IDEMPOTENT else 0)
        sender = self._sender(app)
        ttl = int(rest.token_ttl)
        for attempt in range(tries):
            if attempt:
                # Full jitter on an exponential backoff: retries from many callers do not align.
                # The one retry policy (backoff.py): exponential from retry_backoff, jittered, so
                # retries from many callers do not align; the whole call stays inside its timeout.
                await asyncio.sleep(backoff(attempt, rest.retry_backoff, rest.timeout, self._rand))
            call.attempts = attempt + 1
            # A fresh token per attempt, alive for token_ttl seconds, referenced only by this frame.
            if app.transit:
                bearer = b"Bearer " + await self._mint_transit(app, ttl)
            else:
                snapshot = self._keys.signing(app.name)
                bearer = b"Bearer " + mint(snapshot.signing, app.app_id, int(self._clock()), ttl)
            sent = time.perf_counter()
            try:
                response = await sender.request(
                    method,
                    call.target,
                    [(b"Authorization", bearer), *call.headers, (b"User-Agent", b"keyd")],
                    call.body,
                    call.caller.uid,
                )
            except UpstreamError as exc:
                self.stats.upstream(app.name, time.perf_counter() - sent)
                if exc.retryable and attempt + 1 < tries:
                    self.stats.retry(
                        app.name, "timeout" if isinstance(exc, UpstreamTimeout) else "connection"
                    )
                    continue
                raise
            finally:
                del bearer
            self.stats.upstream(app.name, time.perf_counter() - sent)
            if response.status >= 500 and attempt + 1 < tries:
                self.stats.retry(app.name, "5xx")
                continue
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover


def _plain_header(value: bytes) -> bool:
    """A header value safe to forward: at most 200 printable ASCII characters."""
    return len(value) <= _MAX_CONTENT_TYPE and all(0x20 <= c < 0x7F for c in value)


def _match(rules: Sequence[RestRule], method: str, path: str) -> RestRule | None:
    for rule in rules:
        if rule.method == method and rule.regex.fullmatch(path):
            return rule
    return None


def _relay(upstream: UpstreamResponse) -> Response:
    """TalkJS's answer as keyd's Response: status, body, Content-Type and Retry-After only."""
    status = upstream.status
    if not 200 <= status <= 599 or status not in _KNOWN_STATUS:
        raise UpstreamError(f"the upstream answered with an unusable status {status}", retryable=False)
    headers = [UPSTREAM_HEADER]
    retry_after = upstream.retry_after
    if retry_after is not None and len(retry_after) <= 64 and retry_after.isascii():
        headers.append((b"Retry-After", retry_after))
    content_type = upstream.content_type
    if content_type is None or len(content_type) > _MAX_CONTENT_TYPE or not content_type.isascii():
        content_type = b"application/octet-stream"
    return Response(status, upstream.body, content_type, tuple(headers))


_KNOWN_STATUS = frozenset(s.value for s in HTTPStatus)

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
import hashlib
import logging
import os
import random
import re
import time
import unicodedata
from bisect import bisect_left
from collections.abc import Hashable, Iterator, Mapping, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, quote, unquote, unquote_to_bytes, urlencode

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from keyd.config import REST_METHODS, AppConfig, Config, RestRule
from keyd.daemon import tokens
from keyd.daemon.api import (
    JSON,
    DuplicateKey,
    Keys,
    Macs,
    Request,
    Response,
    deferred,
    error_body,
    error_response,
    loads_unique,
    refusal_error,
)
from keyd.daemon.metrics import cumulative_buckets
from keyd.daemon.peers import Caller, Policy
from keyd.daemon.upstream import Pool, UpstreamError, UpstreamResponse, UpstreamTimeout
from keyd.errors import ApiError, KeyUnavailable, Refusal

if TYPE_CHECKING:
    from keyd.daemon.vault import TransitItem

log = logging.getLogger("keyd.rest")

PREFIX = b"/v1/rest/"
IDEMPOTENT = frozenset({b"GET", b"PUT", b"DELETE"})
_METHODS = frozenset(m.encode() for m in REST_METHODS)
_ALLOW = ",".join(REST_METHODS).encode()
# RFC 3986 pchar without "%" (checked separately): what a path segment may hold.
_PCHAR = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# Percent-encodings that are refused: "/" "\" "%" "." (a hidden separator, escape or dot segment),
# control characters, and unreserved characters (which have one spelling only, RFC 3986 6.2.2.2).
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_MAX_CONTENT_TYPE = 200
UPSTREAM_HEADER = (b"X-Keyd-Upstream", b"talkjs")
MAX_REFUSED_PATH = 200  # characters of a refused call's path in its audit line
MAX_LOGGED_PATH = 1024  # ... of a proxied call's (it matched a grant: seldom longer)
# Query parameters that method-override middleware (Rails, Laravel, Symfony, Express's
# method-override) reads as the real method: refused rather than forwarded (lower-cased).
METHOD_OVERRIDES = frozenset({"_method", "x-http-method-override", "x-http-method", "x-method-override"})
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _invalid_path(message: str) -> ApiError:
    return ApiError(400, "invalid_path", message)


def check_path(path: bytes) -> str:
    """The request's path below the app, unchanged, if it has exactly one meaning; else ApiError 400.

    Refused: empty segments (``//``, a trailing ``/``), ``.`` and ``..``, a backslash, anything
    outside RFC 3986's path characters, and percent-encodings of ``/``, ``\\``, ``%``, ``.``,
    control characters or unreserved characters, bytes that are not UTF-8 (an overlong "/"), and
    characters NFKC turns into "/", "\\" or a dot segment. Other percent-encodings (a space, UTF-8)
    pass through as sent: TalkJS decodes them once, as keyd's matching assumes.
    """
    if not path.startswith(b"/") or len(path) < 2:
        raise _invalid_path("the path must name a TalkJS resource, e.g. /v1/rest/default/users/alice")
    for segment in path[1:].split(b"/"):
        if not segment:
            raise _invalid_path("empty path segments (// or a trailing /) are not accepted")
        if segment in (b".", b".."):
            raise _invalid_path("dot segments (. and ..) are not accepted")
        if _dot_before_params(segment):
            raise _invalid_path(
                "a segment that is empty, . or .. before a ; (path parameters) is not accepted"
            )
        i = 0
        while i < len(segment):
            char = segment[i]
            if char == 0x25:  # %
                pair = segment[i + 1 : i + 3]
                if len(pair) != 2 or not _HEX.issuperset(pair):
                    raise _invalid_path("a % must start a percent-encoding such as %20")
                value = int(pair, 16)
                if value in (0x2F, 0x5C, 0x25, 0x2E) or value < 0x20 or value == 0x7F or value in _UNRESERVED:
                    raise _invalid_path(f"the percent-encoding %{pair.decode()} is not accepted here")
                i += 3
                continue
            if char not in _PCHAR:
                raise _invalid_path("the path holds a character that must be percent-encoded")
            i += 1
        if b"%" in segment:
            _check_decoded(segment)
    return path.decode("ascii")


_PARAMS = re.compile(rb";|%3[bB]")


def _dot_before_params(segment: bytes) -> bool:
    """Whether the segment is "", "." or ".." once its ``;params`` are dropped (raw or as %3B).

    Servers in the Tomcat/Jetty/Spring family drop path parameters and then resolve the dot
    segment, so ``/users/..;/conversations`` reaches ``/conversations`` there. Other uses of ``;``
    (a user id holding one) pass as sent.
    """
    found = _PARAMS.search(segment)
    return found is not None and segment[: found.start()] in (b"", b".", b"..")


def _check_decoded(segment: bytes) -> None:
    """A segment's percent-encoded bytes must be UTF-8 with no second spelling of "/", "\\" or a dot
    segment: an overlong sequence (%C0%AF is "/" to a lenient decoder) or a compatibility character
    that NFKC normalisation turns into one (%EF%BC%8F, the fullwidth solidus) is refused."""
    try:
        text = unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid_path(
            "percent-encoded bytes must be UTF-8 (no overlong or invalid sequences)"
        ) from None
    folded = unicodedata.normalize("NFKC", text)
    if folded != text and ("/" in folded or "\\" in folded or folded in (".", "..")):
        raise _invalid_path("the path holds a character that normalises to / or \\ or a dot segment")


def redact(path: str) -> str:
    """The path with every id segment (the 2nd, 4th, ... as in /users/ID/conversations/ID) hashed.

    TalkJS's REST paths alternate collection and id; an id is the SHA-256 hex of its decoded text,
    the same hash ``sub_sha256`` uses, so one user id can be followed across both kinds of line.
    """
    segments = path[1:].split("/")
    for i in range(1, len(segments), 2):
        segments[i] = "sha256:" + hashlib.sha256(unquote(segments[i]).encode("utf-8", "replace")).hexdigest()
    return "/" + "/".join(segments)


def mint(key: tokens.Keyed, app_id: str, iat: int, ttl: int) -> bytes:
    """An app token for one upstream attempt: the claims TalkJS's snippet has, nothing more.

    Two attempts in the same second would otherwise be byte-identical; a random ``nonce`` in the
    JOSE header (which receivers ignore unless it is listed in ``crit``, RFC 7515 section 4) makes
    every token distinct without adding a claim.
    """
    return tokens.app_token(key, app_id, iat, ttl, nonce=os.urandom(12))


def upstream_query(request: Request) -> bytes:
    """The query string sent to TalkJS: every parameter of the caller's, in order (repeated keys
    and keys without a value kept), decoded and percent-encoded again; b"" for none. A query
    that is not percent-encoded UTF-8 is 400 ``invalid_query`` rather than forwarded altered."""
    raw = request.raw_query
    if not raw and request.query:  # a Request built without its raw query (Api.handle's callers)
        pairs = list(request.query.items())
    elif not raw:
        return b""
    else:
        try:
            pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, encoding="utf-8", errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise ApiError(400, "invalid_query", "the query string must be percent-encoded UTF-8") from None
    for name, _ in pairs:
        if name.strip().lower() in METHOD_OVERRIDES:
            raise ApiError(
                400,
                "invalid_query",
                f"the query parameter {name[:64]!r} overrides the method in some frameworks; it is not forwarded",
            )
    return urlencode(pairs, quote_via=quote).encode()


def check_body(body: bytes, content_type: bytes | None) -> None:
    """A body is forwarded only as JSON with one meaning: a JSON media type (415 otherwise), valid
    JSON (400 malformed_json), each object's keys once (422 invalid_field). A form body such as
    ``_method=DELETE`` would turn a granted POST into a DELETE behind method-override middleware."""
    if content_type is not None:
        media = content_type.split(b";", 1)[0].strip().lower()
        if media != JSON and not (media.startswith(b"application/") and media.endswith(b"+json")):
            raise ApiError(
                415, "unsupported_media_type", "the REST proxy forwards JSON bodies only (application/json)"
            )
    if not body:
        return
    try:
        loads_unique(body)
    except DuplicateKey as exc:
        raise ApiError(
            422, "invalid_field", f"the field {exc.key[:64]!r} is given twice; give each field once"
        ) from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "malformed_json", "the request body is not valid JSON") from None


class RestAudit(Protocol):
    def rest(
        self,
        caller: Caller,
        app: str | None,
        method: str,
        path: str | None,
        outcome: str,
        code: str | None,
        upstream_status: int | None,
        seconds: float,
        attempts: int,
    ) -> None: ...


class RestStats:
    """Counters for the proxy's metrics, written on the loop, read at scrape time."""

    def __init__(self) -> None:
        # (method, route pattern, status) -> requests answered
        self.requests: dict[tuple[str, str, int], int] = {}
        # app -> [bucket counts..., +Inf, sum of seconds]: each upstream attempt's latency
        self.latency: dict[str, list[float]] = {}
        # (app, reason) -> retries
        self.retries: dict[tuple[str, str], int] = {}

    def request(self, method: str, route: str, status: int) -> None:
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def upstream(self, app: str, seconds: float) -> None:
        buckets = self.latency.get(app)
        if buckets is None:
            buckets = self.latency[app] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        buckets[-1] += seconds

    def retry(self, app: str, reason: str) -> None:
        key = (app, reason)
        self.retries[key] = self.retries.get(key, 0) + 1


class RestCollector:
    """The proxy's metric families, registered beside keyd's own collector."""

    def __init__(self, stats: RestStats) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        requests = CounterMetricFamily(
            "keyd_rest_requests", "REST proxy answers", labels=["method", "route", "status"]
        )
        for (method, route, status), count in sorted(stats.requests.items()):
            requests.add_metric([method, route, str(status)], count)
        yield requests
        latency = HistogramMetricFamily(
            "keyd_rest_upstream_seconds",
            "Time of each upstream attempt, to the whole response",
            labels=["app"],
        )
        for app, buckets in sorted(stats.latency.items()):
            latency.add_metric([app], cumulative_buckets(LATENCY_BUCKETS, buckets), buckets[-1])
        yield latency
        retries = CounterMetricFamily(
            "keyd_rest_retries",
            "Upstream attempts repeated (idempotent methods only)",
            labels=["app", "reason"],
        )
        for (app, reason), count in sorted(stats.retries.items()):
            retries.add_metric([app, reason], count)
        yield retries


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
    ) -> None:
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
        caller = request.caller
        content_type: bytes | None = None
        method = request.method.decode("latin-1")
        app_name: str | None = None
        path: str | None = None
        try:
            if request.method not in _METHODS:
                raise ApiError(405, "method_not_allowed", f"the REST proxy accepts {_ALLOW.decode()}")
            app_part, slash, rest = request.path[len(PREFIX) :].partition(b"/")
            if not slash:
                raise ApiError(404, "not_found", "use /v1/rest/APP/PATH, e.g. /v1/rest/default/users/alice")
            app_name = app_part.decode("latin-1")
            app = self._apps.get(app_name)
            if app is None:
                app_name = None
                raise ApiError(
                    404, "unknown_app", f"no app named {app_part[:64].decode('latin-1')!r} is configured"
                )
            path = check_path(b"/" + rest)
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
        except (ApiError, Refusal) as caught:
            exc = caught if isinstance(caught, ApiError) else refusal_error(caught)
            response = error_response(exc)
            if exc.status == 405:
                response.headers = ((b"Allow", _ALLOW),)
            self.stats.request(method if request.method in _METHODS else "other", "none", exc.status)
            self._audit.rest(
                caller,
                app_name,
                method[:16],
                self._log_path(path, MAX_REFUSED_PATH),
                "refused",
                exc.code,
                None,
                time.perf_counter() - started,
                0,
            )
            return response
        self._in_flight[caller.uid] = self._in_flight.get(caller.uid, 0) + 1
        headers = []
        if content_type is not None:
            headers.append((b"Content-Type", content_type))
        accept = request.headers.get(b"accept")
        headers.append((b"Accept", accept if accept and _plain_header(accept) else b"application/json"))
        target = b"/v1/%s%s" % (quote(app.app_id, safe="").encode(), path.encode())
        if query:
            target += b"?" + query
        return deferred(
            asyncio.get_running_loop().create_task(
                self._forward(caller, app, request.method, path, target, headers, request.body, rule, started)
            )
        )

    # -- the upstream part -------------------------------------------------------------------

    async def _forward(
        self,
        caller: Caller,
        app: AppConfig,
        method: bytes,
        path: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        rule: RestRule,
        started: float,
    ) -> Response:
        attempts = [0]
        code: str | None = None
        upstream: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(app.rest.timeout):
                upstream = await self._attempts(app, caller.uid, method, target, headers, body, attempts)
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
            left = self._in_flight.get(caller.uid, 1) - 1
            if left:
                self._in_flight[caller.uid] = left
            else:
                self._in_flight.pop(caller.uid, None)
            status = upstream.status if upstream is not None else None
            self._audit.rest(
                caller,
                app.name,
                method.decode(),
                self._log_path(path),
                "proxied" if upstream is not None else "failed",
                code,
                status,
                time.perf_counter() - started,
                attempts[0],
            )
        self.stats.request(method.decode(), str(rule), response.status)
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

    async def _attempts(
        self,
        app: AppConfig,
        uid: int,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        attempts: list[int],
    ) -> UpstreamResponse:
        """Send, retrying idempotent methods on connection errors and 5xx; the last answer or error."""
        rest = app.rest
        tries = 1 + (rest.retries if method in IDEMPOTENT else 0)
        sender = self._sender(app)
        ttl = int(rest.token_ttl)
        for attempt in range(tries):
            if attempt:
                # Full jitter on an exponential backoff: retries from many callers do not align.
                await asyncio.sleep(random.uniform(0.5, 1.0) * rest.retry_backoff * 2 ** (attempt - 1))  # noqa: S311 - jitter, not a secret
            attempts[0] = attempt + 1
            # A fresh token per attempt, alive for token_ttl seconds, referenced only by this frame.
            if app.transit:
                bearer = b"Bearer " + await self._mint_transit(app, ttl)
            else:
                snapshot = self._keys.signing(app.name)
                bearer = b"Bearer " + mint(snapshot.signing, app.app_id, int(self._clock()), ttl)
            sent = time.perf_counter()
            try:
                response = await sender.request(
                    method, target, [(b"Authorization", bearer), *headers, (b"User-Agent", b"keyd")], body, uid
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

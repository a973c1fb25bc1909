"""The REST proxy's path and query checks: one meaning per request, or a 400; redaction for logs."""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, unquote_to_bytes, urlencode

from keyd.errors import ApiError

if TYPE_CHECKING:
    pass
from keyd.daemon.http.types import JSON
from keyd.daemon.signing.api import Request
from keyd.daemon.signing.requests import DuplicateKey, loads_unique

# RFC 3986 pchar without "%" (checked separately): what a path segment may hold.
_PCHAR = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# Percent-encodings that are refused: "/" "\" "%" "." (a hidden separator, escape or dot segment),
# control characters, and unreserved characters (which have one spelling only, RFC 3986 6.2.2.2).
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Query parameters that method-override middleware (Rails, Laravel, Symfony, Express's
# method-override) reads as the real method: refused rather than forwarded (lower-cased).
METHOD_OVERRIDES = frozenset({"_method", "x-http-method-override", "x-http-method", "x-method-override"})


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
        if _override_name(name) in METHOD_OVERRIDES:
            raise ApiError(
                400,
                "invalid_query",
                f"the query parameter {name[:64]!r} overrides the method in some frameworks; it is not forwarded",
            )
    return urlencode(pairs, quote_via=quote).encode()


def _override_name(name: str) -> str:
    """A parameter name as frameworks may read it: lower-cased, cut at a NUL, and with PHP's
    rewriting of ".", " " and "[" (outside brackets) to "_", so ``.method`` and ``_method%00`` are
    the ``_method`` they become there."""
    name = name.split("\0", 1)[0].strip().lower()
    return name.replace(".", "_").replace(" ", "_").replace("[", "_")


def _standard_json(value: Any) -> bool:
    """No NaN/Infinity (Python's json accepts them, RFC 8259 does not) and no lone surrogate in a
    string or key (one that another parser replaces with U+FFFD could merge two keys)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


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
        data = loads_unique(body)
    except DuplicateKey as exc:
        raise ApiError(
            422, "invalid_field", f"the field {exc.key[:64]!r} is given twice; give each field once"
        ) from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "malformed_json", "the request body is not valid JSON") from None
    if not _standard_json(data):
        raise ApiError(400, "malformed_json", "the request body is not standard JSON (NaN, Infinity, a lone surrogate)")
    if isinstance(data, dict):
        for name in data:
            if _override_name(name) in METHOD_OVERRIDES:
                raise ApiError(
                    422,
                    "invalid_field",
                    f"the field {name[:64]!r} overrides the method in some frameworks; it is not forwarded",
                )

"""A request's JSON body and fields: parsed once, checked field by field."""

from __future__ import annotations

import json
import json.scanner
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from keyd.errors import ApiError

if TYPE_CHECKING:
    pass
from keyd.daemon.http.types import JSON

MAX_USER_ID = 256


def _invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_field", message)


class DuplicateKey(ValueError):
    """A JSON object names one key twice: which value counts would depend on the reader."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's pairs as a dict, refusing a key given twice (json.loads would keep the last)."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return data


# Every JSON keyd reads from a caller goes through this decoder: one meaning per request.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def loads_unique(body: bytes | str) -> Any:
    """json.loads with duplicate keys refused (DuplicateKey, a ValueError), at every depth."""
    text = body.decode(json.detect_encoding(body), "surrogatepass") if isinstance(body, bytes) else body
    return _DECODER.decode(text)


def _c_scanner() -> Callable[[str, int], tuple[Any, int]] | None:
    """The C scanner json.loads ends up in, or None where this Python has none to offer.

    Called directly for the usual body, a bare JSON object, it skips two regular-expression passes
    and three Python frames (0.8 -> 0.2 us per request). ``scan_once`` is set by
    ``JSONDecoder.__init__`` (CPython's json.scanner), not a documented API: without it, or with the
    pure-Python scanner (slower than json.loads itself), ``parse_json_object`` uses json.loads.
    """
    scanner = getattr(json.JSONDecoder(), "scan_once", None)
    c_make_scanner = getattr(json.scanner, "c_make_scanner", None)
    if scanner is None or c_make_scanner is None or not isinstance(scanner, c_make_scanner):
        return None
    return cast(Callable[[str, int], tuple[Any, int]], scanner)


_scan_json = _c_scanner()


def parse_json_object(body: bytes, content_type: bytes | None) -> dict[str, Any]:
    if content_type is not None and content_type != JSON:
        media = content_type.split(b";", 1)[0].strip().lower()
        if media != JSON and not (media.startswith(b"application/") and media.endswith(b"+json")):
            raise ApiError(
                415, "unsupported_media_type", "send the request body as Content-Type: application/json"
            )
    try:
        if _scan_json is not None and body[:1] == b"{" and body[-1:] == b"}":
            # Decoded exactly as json.loads(bytes) decodes UTF-8 ("surrogatepass" included).
            text = body.decode("utf-8", "surrogatepass")
            data, end = _scan_json(text, 0)
            if end != len(text):
                raise ValueError("extra data")
            # perf: every key has its colon, so a body with as many colons as the object has keys
            # has no nested pair and no key twice; any other body is decoded again, checking keys.
            if body.count(b":") != len(data):
                data = loads_unique(text)
        else:  # whitespace around it, a BOM, UTF-16/32, or not an object: the general path
            data = loads_unique(body)
    except DuplicateKey as exc:
        raise _invalid(f"the field {exc.key[:64]!r} is given twice; give each field once") from None
    except (ValueError, UnicodeDecodeError, StopIteration, RecursionError):
        raise ApiError(400, "malformed_json", "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "malformed_json", "the request body must be a JSON object")
    return data


def check_fields(data: Mapping[str, Any], allowed: frozenset[str]) -> None:
    for name in data:
        if name not in allowed:
            raise _invalid(f"unknown field {name!r}")


def valid_user_id(value: Any) -> str:
    """1 to 256 characters of valid UTF-8, no control characters."""
    if not isinstance(value, str):
        raise _invalid("user_id must be a string")
    if not value:
        raise _invalid("user_id must not be empty")
    if len(value) > MAX_USER_ID:
        raise _invalid(f"user_id must be at most {MAX_USER_ID} characters")
    if not value.isprintable() and any(
        ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029" for c in value
    ):
        raise _invalid("user_id must not contain control characters")
    if not value.isascii():  # ASCII is UTF-8 already; only other text can hold a lone surrogate
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _invalid("user_id must be valid UTF-8 (no lone surrogates)") from None
    return value


def _ttl(value: Any, maximum: float) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid("ttl must be a whole number of seconds")
    if value <= 0:
        raise _invalid("ttl must be greater than zero")
    if value > maximum:
        raise _invalid(f"ttl {value} exceeds this app's maximum of {int(maximum)} seconds")
    return value

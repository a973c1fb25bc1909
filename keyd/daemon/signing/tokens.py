"""TalkJS tokens, legacy signatures and webhook checks: pure functions over a key, no I/O.

The JWT is assembled by hand rather than through ``jwt.encode``: the header never changes, so its
base64 form is a constant, and the payload is a short template. That removes most of PyJWT's
per-token cost while producing exactly what TalkJS's own Node snippet produces
(``{"alg":"HS256","typ":"JWT"}`` and ``{"tokenType":...,"iss":...,"sub":...,"iat":...,"exp":...}``).
Tests decode these tokens with PyJWT on many random inputs.
"""

from __future__ import annotations

import binascii
import hmac
from json.encoder import encode_basestring_ascii as _json_str
from typing import Protocol

from keyd.daemon.signing import oracle

HEADER = b'{"alg":"HS256","typ":"JWT"}'
_URLSAFE = bytes.maketrans(b"+/", b"-_")
_b2a = binascii.b2a_base64


def b64url(data: bytes) -> bytes:
    """base64url without padding (what ``base64.urlsafe_b64encode(data).rstrip(b"=")`` returns).
    ``_sign`` inlines the same expression, on the hot path."""
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=")


_HEADER_B64 = b64url(HEADER) + b"."


class Mac(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...
    def hexdigest(self) -> str: ...


class Keyed(Protocol):
    """Anything that can hand out a fresh HMAC-SHA256 keyed with a secret (keystore.SecretKey)."""

    def hmac(self) -> Mac: ...


def _sign(key: Keyed, payload: bytes, header_b64: bytes = _HEADER_B64) -> bytes:
    # b64url inlined twice: one Python frame per token instead of three (this is the hot path).
    signing_input = header_b64 + _b2a(payload, newline=False).translate(_URLSAFE).rstrip(b"=")
    mac = key.hmac()
    mac.update(signing_input)
    return signing_input + b"." + _b2a(mac.digest(), newline=False).translate(_URLSAFE).rstrip(b"=")


def user_token(key: Keyed, app_id: str, user_id: str, iat: int, ttl: int) -> bytes:
    """A TalkJS user token (log a user into the chat UI), as ASCII bytes."""
    # _json_str is the C encoder json.dumps itself uses for a str (ensure_ascii=True): same bytes.
    return _sign(
        key,
        (
            f'{{"tokenType":"user","iss":{_json_str(app_id)},"sub":{_json_str(user_id)},'
            f'"iat":{iat:d},"exp":{iat + ttl:d}}}'
        ).encode("ascii"),
    )


def app_token(key: Keyed, app_id: str, iat: int, ttl: int, nonce: bytes | None = None) -> bytes:
    """A TalkJS app token (REST API access with full admin power), as ASCII bytes.

    ``nonce`` (the REST proxy's, rest.mint) goes into the JOSE header as ``"nonce"``, base64url."""
    header_b64 = _HEADER_B64
    if nonce is not None:
        header_b64 = b64url(b'{"alg":"HS256","typ":"JWT","nonce":"%s"}' % b64url(nonce)) + b"."
    return _sign(
        key,
        f'{{"tokenType":"app","iss":{_json_str(app_id)},"iat":{iat:d},"exp":{iat + ttl:d}}}'.encode("ascii"),
        header_b64,
    )


def signature(key: Keyed, user_id: str, uppercase: bool = False) -> str:
    """Legacy identity verification: hex HMAC-SHA256 of the user id.

    Raises Unsignable for a user id shaped like a JWT or webhook signing input (keyd.daemon.signing.oracle):
    its HMAC would be an admin token's or a webhook's signature."""
    reason = oracle.refusal(user_id)
    if reason is not None:
        raise oracle.Unsignable(reason)
    mac = key.hmac()
    mac.update(user_id.encode("utf-8"))
    digest = mac.hexdigest()
    return digest.upper() if uppercase else digest


def webhook_signature(key: Keyed, timestamp: bytes, body: bytes) -> str:
    """What TalkJS sends in X-TalkJS-Signature: upper-case hex HMAC of ``timestamp "." body``."""
    mac = key.hmac()
    mac.update(timestamp + b"." + body)
    return mac.hexdigest().upper()


def webhook_signature_valid(key: Keyed, timestamp: bytes, body: bytes, given: bytes) -> bool:
    """Constant-time comparison of a received signature (either hex case) with the expected one."""
    expected = webhook_signature(key, timestamp, body).encode("ascii")
    return hmac.compare_digest(expected, given.strip().upper())


class _Unsigned:
    """A Keyed whose MAC is empty (transit mode): a token built with it is its signing input and
    the final ``.``, byte for byte what the in-memory key's token starts with."""

    def hmac(self) -> _Unsigned:
        return self

    def update(self, data: bytes, /) -> None:
        return None

    def digest(self) -> bytes:
        return b""

    def hexdigest(self) -> str:
        return ""


UNSIGNED = _Unsigned()


def signing_input(unsigned: bytes) -> bytes:
    """What to MAC for a token built with ``UNSIGNED`` (header.payload, without the final dot)."""
    return unsigned[:-1]


def complete(unsigned: bytes, digest: bytes) -> bytes:
    """The token built with ``UNSIGNED``, signed with ``digest`` (the HMAC of its signing input)."""
    return unsigned + b64url(digest)

"""What every target is asked: the same user ids, app id and token lifetime for keyd, the reference
server, Transit and PyJWT, so their numbers compare like with like."""

from __future__ import annotations

import base64
import json
from typing import Any

from keyd import http1

USER_IDS = 1024  # distinct user ids cycled through, so no answer is a cached constant
APP_ID = "tBenchApp"
TOKEN_TTL = 3600
JSON = {"Content-Type": "application/json"}

HEADER_B64 = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=") + b"."


def user_ids(count: int = USER_IDS) -> list[str]:
    """The user ids requests cycle through."""
    return [f"user-{i:05d}" for i in range(count)]


def keyd_requests(kind: str = "user", count: int = USER_IDS) -> list[bytes]:
    """``POST /v1/tokens`` requests for keyd (and the reference server), one per user id."""
    bodies = (
        [json.dumps({"user_id": uid}).encode() for uid in user_ids(count)]
        if kind == "user"
        else [b'{"type":"app"}']
    )
    return [http1.encode_request("POST", "/v1/tokens", JSON, body) for body in bodies]


def b64url(data: bytes) -> bytes:
    """base64url without padding, as in a JWT."""
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def signing_input(kind: str, user_id: str, iat: int) -> bytes:
    """The JWT signing input (header.payload) of the token keyd would issue."""
    claims: dict[str, Any] = {"tokenType": kind, "iss": APP_ID}
    if kind == "user":
        claims["sub"] = user_id
    claims.update(iat=iat, exp=iat + TOKEN_TTL)
    return HEADER_B64 + b64url(json.dumps(claims, separators=(",", ":")).encode())

"""keyd.tokens: exactly what TalkJS's own Node snippet emits, checked with PyJWT and the hmac module."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyd.daemon.keys.keystore import SecretKey
from keyd.daemon.signing import oracle, tokens

# PyJWT warns about HMAC keys shorter than 32 bytes; TalkJS keys are longer, random test keys are not.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

KEY = "sk_test_" + "k" * 24
APP_ID = "tAppId42"

user_ids = st.text(min_size=1, max_size=300) | st.sampled_from(
    ['"', "\\", '\\"', "'", "a\"b\\c'd", "ユーザー", "\U0001f600", "\u2028\u2029", "</script>", "null", "0"]
)
keys = st.text(min_size=1, max_size=80)


def segments(token: bytes) -> tuple[bytes, bytes, bytes]:
    head, body, sig = token.split(b".")
    pad = lambda s: s + b"=" * (-len(s) % 4)  # noqa: E731 - tiny local helper
    return (
        base64.urlsafe_b64decode(pad(head)),
        base64.urlsafe_b64decode(pad(body)),
        base64.urlsafe_b64decode(pad(sig)),
    )


@settings(max_examples=300, deadline=None)
@given(user_id=user_ids, key=keys, ttl=st.integers(min_value=1, max_value=86400))
def test_user_tokens_are_what_jsonwebtoken_and_pyjwt_produce(user_id: str, key: str, ttl: int) -> None:
    iat = int(time.time())
    token = tokens.user_token(SecretKey.from_str(key), APP_ID, user_id, iat, ttl)
    header, payload, _ = segments(token)
    assert header == b'{"alg":"HS256","typ":"JWT"}'
    # Same claims, same order as jwt.sign({tokenType}, key, {issuer, subject, expiresIn}).
    assert list(json.loads(payload)) == ["tokenType", "iss", "sub", "iat", "exp"]
    expected = {"tokenType": "user", "iss": APP_ID, "sub": user_id, "iat": iat, "exp": iat + ttl}
    # leeway: a ttl of 1 s can end during the test when the wall clock ticks to the next second.
    claims = jwt.decode(token, key.encode(), algorithms=["HS256"], issuer=APP_ID, subject=user_id, leeway=5)
    assert claims == expected
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    # Byte for byte the token PyJWT itself builds from the same claims.
    assert token == jwt.encode(expected, key.encode(), algorithm="HS256").encode()


@settings(max_examples=100, deadline=None)
@given(app_id=st.text(min_size=1, max_size=40), key=keys, ttl=st.integers(min_value=1, max_value=300))
def test_app_tokens_carry_no_subject(app_id: str, key: str, ttl: int) -> None:
    iat = int(time.time())
    token = tokens.app_token(SecretKey.from_str(key), app_id, iat, ttl)
    _, payload, _ = segments(token)
    assert list(json.loads(payload)) == ["tokenType", "iss", "iat", "exp"]
    expected = {"tokenType": "app", "iss": app_id, "iat": iat, "exp": iat + ttl}
    assert jwt.decode(token, key.encode(), algorithms=["HS256"], leeway=5) == expected
    assert token == jwt.encode(expected, key.encode(), algorithm="HS256").encode()


def test_signature_is_hmac_sha256_over_the_signing_input() -> None:
    token = tokens.user_token(SecretKey.from_str(KEY), APP_ID, "alice", 1_700_000_000, 60)
    head, body, sig = token.split(b".")
    mac = hmac.new(KEY.encode(), head + b"." + body, hashlib.sha256).digest()
    assert sig == base64.urlsafe_b64encode(mac).rstrip(b"=")
    assert b"=" not in token


def test_a_token_does_not_verify_with_another_key() -> None:
    token = tokens.user_token(SecretKey.from_str(KEY), APP_ID, "alice", int(time.time()), 60)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "sk_test_other_key_of_enough_length__", algorithms=["HS256"])


def test_expired_tokens_are_expired() -> None:
    token = tokens.user_token(SecretKey.from_str(KEY), APP_ID, "alice", int(time.time()) - 120, 60)
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(token, KEY, algorithms=["HS256"])


@settings(max_examples=200, deadline=None)
@given(user_id=user_ids, key=keys)
def test_legacy_signature_matches_the_hmac_module(user_id: str, key: str) -> None:
    secret = SecretKey.from_str(key)
    if oracle.refusal(user_id) is not None:  # shaped like a JWT or webhook signing input
        with pytest.raises(oracle.Unsignable):
            tokens.signature(secret, user_id)
        return
    expected = hmac.new(key.encode(), user_id.encode(), hashlib.sha256).hexdigest()
    assert tokens.signature(secret, user_id) == expected
    assert tokens.signature(secret, user_id, uppercase=True) == expected.upper()


@settings(max_examples=200, deadline=None)
@given(key=keys, timestamp=st.integers(min_value=0, max_value=10**13), body=st.binary(max_size=500))
def test_webhook_signature_matches_the_hmac_module(key: str, timestamp: int, body: bytes) -> None:
    stamp = str(timestamp).encode()
    expected = hmac.new(key.encode(), stamp + b"." + body, hashlib.sha256).hexdigest().upper()
    secret = SecretKey.from_str(key)
    assert tokens.webhook_signature(secret, stamp, body) == expected
    assert tokens.webhook_signature_valid(secret, stamp, body, expected.encode())
    assert tokens.webhook_signature_valid(secret, stamp, body, expected.lower().encode())
    assert tokens.webhook_signature_valid(secret, stamp, body, b" " + expected.encode() + b"\n")
    assert not tokens.webhook_signature_valid(secret, stamp, body + b" ", expected.encode())
    assert not tokens.webhook_signature_valid(secret, stamp + b"0", body, expected.encode())
    assert not tokens.webhook_signature_valid(secret, stamp, body, expected[:-1].encode())
    assert not tokens.webhook_signature_valid(secret, stamp, body, b"")


def test_webhook_signature_is_over_the_raw_bytes() -> None:
    secret = SecretKey.from_str(KEY)
    compact = b'{"a":1}'
    spaced = b'{"a": 1}'
    sig = tokens.webhook_signature(secret, b"1700000000", compact)
    assert tokens.webhook_signature_valid(secret, b"1700000000", compact, sig.encode())
    assert not tokens.webhook_signature_valid(secret, b"1700000000", spaced, sig.encode())

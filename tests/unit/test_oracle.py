"""The signing-oracle check (keyd.daemon.signing.oracle): what /v1/signatures refuses to HMAC, and what it signs.

Property tests build JWT signing inputs (any JSON object as header, any payload, both base64
alphabets, with and without padding, whitespace, BOMs and UTF-16/32, extra dots) and webhook signing
inputs (timestamps in seconds, milliseconds, with fractions; any body) and require a refusal; the
canonical ones are also turned into a token PyJWT accepts, to show each one is a real attack.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyd.daemon.keys.keystore import SecretKey
from keyd.daemon.policy.grants import Policy
from keyd.daemon.signing import oracle, tokens
from keyd.daemon.signing.api import Api
from keyd.daemon.signing.decisions import Decision
from keyd.daemon.signing.oracle import Unsignable, refusal
from tests.unit.test_api import ALL_TYPES, CALLER, KEY, FakeKeys, make_config, request

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

ORDINARY = [
    "alice",
    "john.doe@example.com",
    "ezra.smith@example.com",  # "ez" decodes to "{": the header check needs the whole object
    "ewan.mcgregor@example.org",
    "eyal.k@example.io",
    "ewa.nowak@example.pl",
    "info.desk@example.com",
    "nan.jones@example.com",  # float("nan") is a number, but keyd and TalkJS want digits
    "inf.x@example.com",
    "2pac.shakur@example.com",
    "a.b",
    "a.b.c.d",
    "j.r.r.tolkien",
    "user.name",
    "v1.2.3",
    "e1.x",
    "ex.machina",
    "eyJohn.x",
    "mary-jane.watson@example.com",
    "o'brien.sean+chat@example.ie",
    "ü.ñ@例え.jp",
    "名前.名字",
    "Zoë.Ünal",
    "user_42.backup",
    "team/support.eu",
    "x.y=z",
    "first last.middle",
    ".leading.dot",
    "trailing.dot.",
    "...",
    "a..b",
]


@pytest.mark.parametrize("user_id", ORDINARY)
def test_ordinary_ids_are_signed(user_id: str) -> None:
    assert refusal(user_id) is None
    key = SecretKey.from_str(KEY)
    expected = hmac.new(KEY.encode(), user_id.encode(), hashlib.sha256).hexdigest()
    assert tokens.signature(key, user_id) == expected


@given(st.text(max_size=256).filter(lambda s: "." not in s))
@settings(max_examples=300, deadline=None)
def test_an_id_without_a_dot_is_always_signed(user_id: str) -> None:
    assert refusal(user_id) is None


# -- JWT signing inputs ---------------------------------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.text(max_size=12)
HEADERS = st.dictionaries(st.text(max_size=8), JSON_SCALARS, max_size=5) | st.fixed_dictionaries(
    {"alg": st.sampled_from(["HS256", "HS384", "none", "hs256"])},
    optional={"typ": st.sampled_from(["JWT", "jwt", "at+jwt"]), "kid": st.text(max_size=8)},
)
SPACE = st.text(alphabet=" \t\r\n", max_size=3)
ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])


def b64(data: bytes, urlsafe: bool, padded: bool) -> str:
    text = (base64.urlsafe_b64encode if urlsafe else base64.standard_b64encode)(data).decode()
    return text if padded else text.rstrip("=")


@st.composite
def jwt_signing_inputs(draw: Any) -> str:
    header = draw(HEADERS)
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (" , ", " : ")]))
    text = (
        draw(SPACE)
        + json.dumps(header, separators=separators, ensure_ascii=draw(st.booleans()))
        + draw(SPACE)
    )
    raw = text.encode(draw(ENCODINGS))
    head = b64(raw, draw(st.booleans()), draw(st.booleans()))
    payload = draw(st.dictionaries(st.text(max_size=8), JSON_SCALARS, max_size=6))
    tail = b64(json.dumps(payload).encode(), draw(st.booleans()), draw(st.booleans()))
    extra = "".join("." + draw(st.text(max_size=10)) for _ in range(draw(st.integers(0, 2))))
    lead: str = draw(st.sampled_from(["", " ", "\n"]))
    return lead + head + "." + tail + extra


@given(jwt_signing_inputs())
@settings(max_examples=1500, deadline=None)
def test_every_jwt_signing_input_is_refused(signing_input: str) -> None:
    assert refusal(signing_input) == oracle.JWT
    with pytest.raises(Unsignable):
        tokens.signature(SecretKey.from_str(KEY), signing_input)


@given(
    exp=st.integers(0, 2**40),
    sub=st.text(max_size=20),
    kind=st.sampled_from(["app", "user"]),
    header=st.sampled_from(
        [{"alg": "HS256", "typ": "JWT"}, {"alg": "HS256"}, {"typ": "JWT", "alg": "HS256"}]
    ),
)
@settings(max_examples=200, deadline=None)
def test_refused_inputs_are_real_attacks(exp: int, sub: str, kind: str, header: dict[str, str]) -> None:
    """What the property refuses is what a verifier takes: HMAC(key, input) makes a valid token."""
    claims = {"tokenType": kind, "iss": "tA", "sub": sub, "exp": exp}
    signing_input = (
        b64(json.dumps(header).encode(), True, False) + "." + b64(json.dumps(claims).encode(), True, False)
    )
    mac = hmac.new(KEY.encode(), signing_input.encode(), hashlib.sha256).digest()
    forged = signing_input + "." + b64(mac, True, False)
    decoded = jwt.decode(forged, KEY, algorithms=["HS256"], options={"verify_exp": False})
    assert decoded["tokenType"] == kind
    assert refusal(signing_input) == oracle.JWT


@pytest.mark.parametrize(
    "head",
    [
        "e30",  # {}
        "e30=",
        "e30=e30=",  # a decoder that stops at the first "="
        "ew==fQ==",  # one that decodes "="-separated chunks: "{" + "}"
        "e 3 0",  # whitespace a decoder skips
        "e%30",  # a character a decoder skips
        "ICB7fQ",  # "  {}": JSON whitespace first
        "77u/e30",  # a UTF-8 BOM, then {}
        "ewB9AA",  # UTF-16-LE "{}"
        "AHsAfQ",  # UTF-16-BE "{}"
        "e-30",  # a "-" a standard-alphabet decoder skips
        "eyJhbGciOiJIUzI1NiJ9",
        "eyJhbGciOiJIUzI1NiJ9ǂ",  # non-ASCII a decoder skips
        " eyJhbGciOiJIUzI1NiJ9",
    ],
)
def test_lenient_header_encodings_are_refused(head: str) -> None:
    assert refusal(head + ".eyJ0b2tlblR5cGUiOiJhcHAifQ") == oracle.JWT
    assert refusal(head + ".anything.else") == oracle.JWT


# -- webhook signing inputs -----------------------------------------------------------------------

TIMESTAMPS = (
    st.integers(0, 10**13).map(str)
    | st.builds(lambda s, f: f"{s}.{f}", st.integers(0, 10**13), st.integers(0, 10**9))
    | st.sampled_from(
        [
            str(int(time.time())),
            str(int(time.time() * 1000)),
            " 1764380000",
            "+17",
            "0x6929abcd",
            "1e9",
            "١٧٦٤",
        ]
    )
)


@given(TIMESTAMPS, st.text(max_size=200))
@settings(max_examples=500, deadline=None)
def test_every_webhook_signing_input_with_a_numeric_timestamp_is_refused(timestamp: str, body: str) -> None:
    assert refusal(f"{timestamp}.{body}") is not None


@given(st.text(max_size=20), st.dictionaries(st.text(max_size=8), JSON_SCALARS, max_size=5), SPACE)
@settings(max_examples=500, deadline=None)
def test_a_json_body_after_any_timestamp_is_refused(timestamp: str, body: dict[str, Any], space: str) -> None:
    """A receiver that does not check the timestamp at all takes any text before the dot."""
    assert refusal(f"{timestamp}.{space}{json.dumps(body)}") is not None
    assert refusal(f"{timestamp}.[{json.dumps(body)}]") is not None


# -- the API --------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.records: list[Decision] = []

    def record(self, decision: Decision) -> None:
        self.records.append(decision)


def test_the_api_refuses_with_422_and_audits_it() -> None:
    audit = Recorder()
    api = Api(make_config(), FakeKeys(), Policy(ALL_TYPES), audit=audit, clock=lambda: 1_700_000_000.0)
    signing_input = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ0b2tlblR5cGUiOiJhcHAiLCJleHAiOjk5OTk5OTk5OTl9"
    response = api.handle(request(path=b"/v1/signatures", body={"user_id": signing_input}))
    assert response.status == 422
    error = json.loads(response.body)["error"]
    assert error["code"] == "invalid_field"
    assert "JWT signing input" in error["message"] and "TalkJS token" in error["message"]
    assert (audit.records[-1].outcome, audit.records[-1].code) == ("refused", "invalid_field")
    assert audit.records[-1].caller is CALLER
    response = api.handle(request(path=b"/v1/signatures", body={"user_id": "1764380000.{}"}))
    assert response.status == 422 and "webhook" in json.loads(response.body)["error"]["message"]
    response = api.handle(request(path=b"/v1/signatures", body={"user_id": "john.doe@example.com"}))
    assert response.status == 200
    expected = hmac.new(KEY.encode(), b"john.doe@example.com", hashlib.sha256).hexdigest()
    assert json.loads(response.body)["signature"] == expected

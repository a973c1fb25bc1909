"""Inputs keyd must never HMAC for a caller: what a TalkJS verifier would take as a JWT or webhook.

The legacy signature is HMAC-SHA256(key, user_id), the very function that signs a JWT
(over ``b64url(header) "." b64url(payload)``) and a webhook (over ``timestamp "." body``). Handing it
out for a user_id shaped like either signing input would hand out an admin token or a forged
webhook, so ``refusal`` names the shapes keyd will not sign, whatever the grant's user_id_pattern:

- **JWT**: the text before the first ``.`` decodes, as some lenient base64 decoder reads it, to
  something a JSON parser could take for an object (``{`` ... ``}`` after whitespace, NULs and a
  BOM). Both alphabets, with or without padding, characters a decoder skips, one that stops at the
  first ``=`` and one that decodes ``=``-separated chunks are all tried. Any payload, any number of
  dots: a verifier always takes the header from the first segment.
- **webhook timestamp**: the text before some ``.`` is a number (``float``, or ``int(x, 0)`` for
  ``0x..``): every verifier that parses the timestamp, keyd's own included, accepts it.
- **webhook body**: the text after some ``.`` starts with ``{`` or ``[`` (after whitespace): a JSON
  event body, which a receiver that does not check the timestamp at all would act on.

Every such input contains a ``.``; an id without one, or like ``john.doe@example.com``, is signed.
"""

from __future__ import annotations

import binascii
import re

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_ALL = bytes(range(256))
_URL_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
# What each lenient decoder skips (bytes.translate's delete argument): everything outside its
# alphabet; non-ASCII bytes included. Each keeps "=" in a second variant.
_SKIP = {
    "both": bytes(c for c in _ALL if c not in _ALPHABET + b"+/-_"),
    "standard": bytes(c for c in _ALL if c not in _ALPHABET + b"+/"),
    "urlsafe": bytes(c for c in _ALL if c not in _ALPHABET + b"-_"),
}
_SKIP_KEEPING_PAD = {name: skip.replace(b"=", b"") for name, skip in _SKIP.items()}
_VALID = re.compile(rb"[A-Za-z0-9+/]*")
_PLAIN_HEAD = re.compile(r"[A-Za-z0-9]*")
_SPACE = b" \t\n\r\x0b\x0c\x00"
_BOMS = (b"\xef\xbb\xbf", b"\xfe\xff", b"\xff\xfe")
_NUMBER_START = re.compile(r"\s*[+-]?\.?\d")
_JSON_BODY = re.compile(r"\.[\s\ufeff]*[{\[]")

JWT = (
    "it has the shape of a JWT signing input (a base64 JSON header, '.', a payload): "
    "its signature would sign a TalkJS token"
)
WEBHOOK_TIMESTAMP = (
    "it has the shape of a webhook signing input (a numeric timestamp, '.', a body): "
    "its signature would sign a webhook"
)
WEBHOOK_BODY = (
    "it has the shape of a webhook signing input (a timestamp, '.', a JSON body): "
    "its signature would sign a webhook"
)


class Unsignable(ValueError):
    """A message whose HMAC a TalkJS verifier would accept: ``str(exc)`` says which shape."""


def refusal(message: str) -> str | None:
    """Why HMAC(key, message) must not be given to a caller, or None when it may be."""
    dot = message.find(".")
    if dot < 0:
        return None
    if _jwt_header(message[:dot]):
        return JWT
    if _NUMBER_START.match(message) and any(_number(part) for part in _dot_prefixes(message)):
        return WEBHOOK_TIMESTAMP
    if _JSON_BODY.search(message, dot):
        return WEBHOOK_BODY
    return None


def _dot_prefixes(message: str) -> list[str]:
    return [message[:i] for i, c in enumerate(message) if c == "."]


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        try:
            int(text.strip(), 0)
        except ValueError:
            return False
    return True


def _jwt_header(head: str) -> bool:
    if _PLAIN_HEAD.fullmatch(head):  # letters and digits only (most ids): every decoder agrees
        return _object(_decode(head.encode()))
    raw = head.encode("utf-8", "surrogatepass")
    candidates = set()
    # A standard-only decoder reads the head differently only when it has "-" or "_" (it skips
    # them), a URL-safe-only one only when it has "+" or "/".
    url, standard = b"-" in raw or b"_" in raw, b"+" in raw or b"/" in raw
    for name, skip in _SKIP.items():
        if (name == "standard" and not url) or (name == "urlsafe" and not standard):
            continue
        candidates.add(raw.translate(_URL_TO_STANDARD, skip))  # skips all else, "=" included
        if b"=" in raw:
            with_pad = raw.translate(_URL_TO_STANDARD, _SKIP_KEEPING_PAD[name])
            candidates.add(with_pad.split(b"=", 1)[0])  # stops at the first "="
            candidates.add(with_pad)  # "=" kept: decoded chunk by chunk below
    # A strict decoder that stops at the first byte it does not know.
    candidates.add(_VALID.match(raw.lstrip().translate(_URL_TO_STANDARD)).group())  # type: ignore[union-attr]  # matches b"" at worst
    for text in candidates:
        if b"=" in text:
            if _object(b"".join(_decode(chunk) for chunk in text.split(b"="))):
                return True
        elif _object(_decode(text)):
            return True
    return False


def _decode(text: bytes) -> bytes:
    """Lenient base64 (standard alphabet in ``text``): no padding needed, a lone last char dropped."""
    extra = len(text) % 4
    if extra == 1:
        text = text[:-1]
    elif extra:
        text += b"=" * (4 - extra)
    return binascii.a2b_base64(text)


def _object(data: bytes) -> bool:
    """Whether ``data`` or its whole-group prefix could parse as a JSON object in some encoding."""
    if b"{" not in data or b"}" not in data:  # the usual answer, quickly
        return False
    return _braced(data) or _braced(data[: len(data) - len(data) % 3])


def _braced(data: bytes) -> bool:
    data = data.strip(_SPACE)
    for bom in _BOMS:
        if data.startswith(bom):
            data = data[len(bom) :].strip(_SPACE)
    return data[:1] == b"{" and b"}" in data

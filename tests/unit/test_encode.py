"""connection.encode: the prepared start of the usual JSON answer writes what the general form does."""

from __future__ import annotations

from http import HTTPStatus

import pytest

from keyd.daemon.http.types import JSON, Response, encode

BODY = b'{"token":"a.b.c","key_version":1}'


@pytest.mark.parametrize("status", [s.value for s in HTTPStatus])
def test_the_prepared_json_answer_is_the_general_form(status: int) -> None:
    prepared = encode(Response(status, BODY), keep_alive=True)
    # One extra header sends the same answer through the general form; without it, the bytes match.
    general = encode(Response(status, BODY, headers=((b"X-Probe", b"1"),)), keep_alive=True)
    assert prepared == general.replace(b"X-Probe: 1\r\n", b"", 1)
    phrase = HTTPStatus(status).phrase.encode()
    assert prepared == (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (status, phrase, len(BODY), BODY)
    )


def test_an_equal_content_type_object_takes_the_prepared_start() -> None:
    same = bytes(bytearray(JSON))  # equal, not the same object
    assert same is not JSON
    assert encode(Response(200, BODY, content_type=same), True) == encode(Response(200, BODY), True)


def test_close_head_and_other_types_keep_the_general_form() -> None:
    closing = encode(Response(200, BODY), keep_alive=False)
    assert closing.endswith(b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BODY), BODY))
    head = encode(Response(200, BODY), keep_alive=True, with_body=False)
    assert head.endswith(b"Content-Length: %d\r\n\r\n" % len(BODY))  # HEAD: the length, no body
    text = encode(Response(404, b"no\n", b"text/plain"), keep_alive=True)
    assert text == b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nno\n"

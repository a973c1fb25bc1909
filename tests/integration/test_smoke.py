"""The end-to-end path a new user takes: keyd on a real OpenBao, a token that PyJWT verifies."""

from __future__ import annotations

import jwt

from tests.conftest import base_config


def test_user_token_verifies_against_the_key_in_vault(bao, secret_path, keyd_factory, short_dir):
    path, key = secret_path
    keyd = keyd_factory(base_config(bao, short_dir, path))
    status, doc = keyd.http().post_json("/v1/tokens", {"user_id": "alice"})
    assert status == 200, doc
    claims = jwt.decode(doc["token"], key, algorithms=["HS256"], issuer="tTestApp")
    assert claims["sub"] == "alice"
    assert claims["tokenType"] == "user"
    assert doc["key_version"] == 1

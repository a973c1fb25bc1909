"""`keyd vault setup --store-key APP` for a transit app: import the TalkJS key into Vault's Transit.

Transit's BYOK import: the mount's ``wrapping_key`` (RSA-4096, public) wraps an ephemeral AES-256
key with RSA-OAEP (SHA-256), and that AES key wraps the TalkJS key with AES-KWP (RFC 5649); Vault
unwraps both inside. The key is imported as an HMAC key with ``exportable = false`` and
``allow_plaintext_backup = false``, so no one, root token included, can read it back out; a second
run imports the key as a new version (``import_version``), which is how a rotated TalkJS key goes
in. Afterwards Transit's HMAC of a check message is compared with one computed here, so a wrong
import is caught before keyd uses it. Nothing printed holds the key.

hvac's client is the operator's (``vault_setup.Setup.client``); ``translate`` there turns its errors
into keyd's own, naming the step and path.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from typing import Any

from keyd.config import AppConfig
from keyd.errors import KeydError

CHECK_MESSAGE = b"keyd vault setup import check"


def wrap_for_import(key: bytes, wrapping_key_pem: str) -> str:
    """Wrap ``key`` for Transit's BYOK import: RSA-OAEP(SHA-256) of an ephemeral AES-256 key,
    followed by the key wrapped with that AES key (AES-KWP, RFC 5649); base64 of both."""
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import padding, rsa  # noqa: PLC0415
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding  # noqa: PLC0415

    public = serialization.load_pem_public_key(wrapping_key_pem.encode())
    if not isinstance(public, rsa.RSAPublicKey):
        raise KeydError("the Transit wrapping key is not an RSA key")
    ephemeral = secrets.token_bytes(32)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    wrapped = public.encrypt(ephemeral, oaep) + aes_key_wrap_with_padding(ephemeral, key)
    return base64.b64encode(wrapped).decode("ascii")


def ensure_mount(client: Any, mount: str) -> bool:
    """Enable the Transit engine at ``mount`` unless something is mounted there; True if enabled now."""
    mounts = client.sys.list_mounted_secrets_engines()
    mounts = mounts.get("data", mounts)
    found = mounts.get(f"{mount}/")
    if found is not None:
        if found.get("type") != "transit":
            raise KeydError(f"the mount {mount}/ holds a {found.get('type')!r} engine, not transit")
        return False
    client.sys.enable_secrets_engine("transit", path=mount)
    return True


def _existing(client: Any, app: AppConfig) -> dict[str, Any] | None:
    from hvac.exceptions import InvalidPath  # noqa: PLC0415

    try:
        data: dict[str, Any] = client.adapter.get(f"/v1/{app.transit_mount}/keys/{app.transit_key}")["data"]
    except InvalidPath:
        return None
    return data


def import_key(client: Any, app: AppConfig, key: str) -> str:
    """Import ``key`` for transit app ``app`` (a new key, or a new version of the existing one);
    returns the line to print (the key's name and version, never the key)."""
    mount, name = app.transit_mount, app.transit_key
    enabled = ensure_mount(client, mount)
    existing = _existing(client, app)
    adapter = client.adapter
    if existing is not None and existing.get("type") != "hmac":
        raise KeydError(f"the Transit key {mount}/keys/{name} exists with type {existing.get('type')!r}, not hmac")
    if existing is not None and (existing.get("exportable") or existing.get("allow_plaintext_backup")):
        raise KeydError(
            f"the Transit key {mount}/keys/{name} is exportable or allows plaintext backups, so its "
            "key can be read out of Vault: create a new key name for keyd"
        )
    pem = adapter.get(f"/v1/{mount}/wrapping_key")["data"]["public_key"]
    ciphertext = wrap_for_import(key.encode("utf-8"), pem)
    if existing is None:
        adapter.post(
            f"/v1/{mount}/keys/{name}/import",
            json={
                "ciphertext": ciphertext,
                "hash_function": "SHA256",
                "type": "hmac",
                "exportable": False,
                "allow_plaintext_backup": False,
            },
        )
    else:
        adapter.post(
            f"/v1/{mount}/keys/{name}/import_version",
            json={"ciphertext": ciphertext, "hash_function": "SHA256"},
        )
    answer = adapter.post(
        f"/v1/{mount}/hmac/{name}/sha2-256", json={"input": base64.b64encode(CHECK_MESSAGE).decode()}
    )["data"]["hmac"]
    version, _, digest = str(answer).removeprefix("vault:v").partition(":")
    expected = base64.b64encode(hmac.digest(key.encode("utf-8"), CHECK_MESSAGE, "sha256")).decode()
    if not hmac.compare_digest(digest, expected):
        raise KeydError(f"Transit's HMAC with {mount}/keys/{name} does not match the key given: not imported correctly")
    how = "imported" if existing is None else "imported as a new version"
    mounted = f" (enabled the Transit engine at {mount}/)" if enabled else ""
    return (
        f"key of app {app.name} -> Transit key {mount}/keys/{name}: {how} (version {version}, "
        f"not exportable, no plaintext backup){mounted}; keyd signs with the latest version from its next request"
    )

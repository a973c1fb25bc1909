"""`keyd vault setup` for ``method = "kubernetes"`` and ``"jwt"``: keyd's role on the mount, bound
to the service account(s) given with ``--service-account NAMESPACE/NAME``.

The mount's own configuration (the Kubernetes API address and CA for Kubernetes auth; the issuer's
public keys or JWKS URL for JWT auth) is the cluster operator's and is written only when asked with
``--kubernetes-host``/``--kubernetes-ca`` or ``--jwt-pubkey``/``--jwt-issuer``. Called by
``keyd.ops.vault_setup.Setup`` with its client, so it reads first and changes only what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keyd.errors import KeydError

# ``setup`` below is keyd.ops.vault_setup.Setup (not imported: that module imports this one).
Setup = Any


def _read(option: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise KeydError(f"{option}: cannot read {path!r}: {exc.strerror}") from None


def accounts(setup: Setup) -> tuple[list[str], list[str]]:
    """--service-account NAMESPACE/NAME values split into (namespaces, names)."""
    namespaces, names = [], []
    for value in setup.options.service_accounts:
        namespace, _, name = value.partition("/")
        if not namespace or not name or "/" in name:
            raise KeydError(f"--service-account: {value!r} is not NAMESPACE/NAME")
        namespaces.append(namespace)
        names.append(name)
    if not names:
        raise KeydError(
            f"method = {setup.auth.method}: give --service-account NAMESPACE/NAME, the pod's service "
            "account keyd's role is bound to"
        )
    return sorted(set(namespaces)), sorted(set(names))


def write_mount_config(setup: Setup) -> None:
    o, url = setup.options, f"/v1/auth/{setup.mount}/config"
    wanted: dict[str, Any] = {}
    if setup.auth.method == "kubernetes" and o.kubernetes_host:
        wanted = {"kubernetes_host": o.kubernetes_host}
        if o.kubernetes_ca:
            wanted["kubernetes_ca_cert"] = _read("--kubernetes-ca", o.kubernetes_ca)
    elif setup.auth.method == "jwt" and o.jwt_pubkeys:
        wanted = {"jwt_validation_pubkeys": [_read("--jwt-pubkey", p) for p in o.jwt_pubkeys]}
        if o.jwt_issuer:
            wanted["bound_issuer"] = o.jwt_issuer
    if not wanted:
        setup.say(f"auth/{setup.mount}/config: left as it is (no --kubernetes-host / --jwt-pubkey given)")
        return
    setup.client.adapter.post(url, json=wanted)
    setup.say(f"auth/{setup.mount}/config: written ({', '.join(sorted(wanted))})")


def write_role(setup: Setup) -> None:
    name = setup.auth.role or setup.options.role
    url = f"/v1/auth/{setup.mount}/role/{name}"
    namespaces, names = accounts(setup)
    # No secret_id to bind here: --cidr binds the role's tokens (every pod that uses this role).
    wanted = {**setup._token_params(), "token_bound_cidrs": list(setup.options.cidrs)}
    if setup.auth.method == "kubernetes":
        if len(namespaces) > 1 and len(names) > 1:
            # Vault checks names and namespaces each on its own: ns1/a with ns2/b admits ns1/b too.
            raise KeydError(
                "--service-account: accounts with different names in different namespaces cannot "
                "share one kubernetes role (Vault would admit every name in every namespace); "
                "use one namespace, or one role per namespace"
            )
        wanted |= {"bound_service_account_names": names, "bound_service_account_namespaces": namespaces}
    else:
        if len(setup.options.service_accounts) > 1:
            # One bound subject: an empty one would accept any token of the issuer and audience.
            raise KeydError('--service-account: method = "jwt" binds exactly one service account')
        wanted |= {
            "role_type": "jwt",
            "user_claim": "sub",
            "bound_audiences": [setup.options.audience],
            "bound_subject": _subject(namespaces, names),
        }
    found = _or_none(setup, url)
    changed = setup._differences(found, wanted)
    if not changed:
        setup.say(f"{setup.auth.method} role {name}: unchanged")
        return
    setup.client.adapter.post(url, json=wanted)
    state = "created" if found is None else "updated (" + ", ".join(changed) + ")"
    setup.say(f"{setup.auth.method} role {name}: {state}")


def _subject(namespaces: list[str], names: list[str]) -> str:
    return f"system:serviceaccount:{namespaces[0]}:{names[0]}"


def _or_none(setup: Setup, url: str) -> dict[str, Any] | None:
    import hvac  # noqa: PLC0415 - see keyd.ops.vault_setup's docstring

    try:
        answer = setup.client.adapter.get(url)
    except hvac.exceptions.InvalidPath:
        return None
    return dict(answer["data"]) if answer else None

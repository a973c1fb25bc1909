"""Transit HMAC calls on the event loop: keyd's Vault token, nodes and failover, the REST proxy's pool.

``TransitClient.hmac`` sends one ``POST <mount>/hmac/<key>/sha2-256`` with ``batch_input`` over a
pooled keep-alive connection (keyd.daemon.upstream.Pool, one per Vault node) and parses the
``batch_results``. No thread, no hvac: a call in a worker thread waits for the GIL behind the busy
event loop (measured: a third of the throughput). The token is the one keyd's ``Vault`` logged in
with (the refresher renews it); TLS verification uses ``vault.ca_cert`` and, for cert auth, the
client certificate. A node that cannot serve the call (unreachable, reset, 5xx, sealed, 429, 412)
is marked failed in the shared failover state and the batch goes to the next node, each node once.

Errors carry fixed text, the node and the path: never a response body (Vault's answer to a refused
item is passed on, cut to 200 characters: it describes the input's problem, never the key).
"""

from __future__ import annotations

import binascii
import json
import ssl
from typing import Protocol

from keyd.daemon.keys.nodes import Node
from keyd.daemon.keys.vault import TransitItem, transit_item
from keyd.daemon.upstream import Pool, UpstreamError, UpstreamTimeout, ssl_context
from keyd.errors import SecretError, VaultAuthError, VaultError, VaultUnavailable

_JSON = b"application/json"
_b64 = binascii.b2a_base64


class VaultNodes(Protocol):
    """What the client needs of keyd.daemon.keys.vault.Vault."""

    def current_token(self) -> str | None: ...
    def node_order(self) -> list[Node]: ...
    def node_failed(self, node: Node, error: str, cause: str) -> None: ...
    def node_succeeded(self, node: Node) -> None: ...
    def tls(self) -> tuple[str, tuple[str, str] | None]: ...


class TransitClient:
    def __init__(self, vault: VaultNodes, connect_timeout: float, max_connections: int = 4) -> None:
        self._vault = vault
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._pools: dict[str, Pool] = {}
        self._context: ssl.SSLContext | None = None

    def _pool(self, address: str) -> Pool:
        pool = self._pools.get(address)
        if pool is None:
            if self._context is None and address.startswith("https://"):
                ca_cert, cert = self._vault.tls()
                self._context = ssl_context(ca_cert)
                if cert is not None:
                    self._context.load_cert_chain(*cert)
            pool = self._pools[address] = Pool(
                address,
                connect_timeout=self._connect_timeout,
                max_connections=self._max_connections,
                context=self._context,
            )
        return pool

    async def hmac(self, mount: str, key: str, inputs: list[bytes]) -> list[TransitItem]:
        """One Transit call for ``inputs``; raises VaultError (VaultAuthError on 403, SecretError
        on 404, VaultUnavailable when no node could serve it). The caller bounds the time."""
        path = f"{mount}/hmac/{key}/sha2-256"
        token = self._vault.current_token()
        if token is None:
            raise VaultUnavailable(f"Transit HMAC on {path}: keyd is not logged in to Vault", "not logged in")
        body = b'{"batch_input":[%s]}' % b",".join(
            b'{"input":"%s"}' % _b64(data, newline=False) for data in inputs
        )
        headers = [(b"X-Vault-Token", token.encode("ascii")), (b"Content-Type", _JSON)]
        target = b"/v1/" + path.encode("ascii")
        failures: list[str] = []
        cause = "node unreachable"
        for node in self._vault.node_order():
            try:
                answer = await self._pool(node.address).request(b"POST", target, headers, body)
            except UpstreamTimeout:
                error, cause = "connecting timed out", "timeout"
            except UpstreamError as exc:
                error, cause = exc.reason.replace("upstream", "Vault node"), "node unreachable"
            else:
                status = answer.status
                if status == 200 or (status == 400 and b"batch_results" in answer.body):
                    self._vault.node_succeeded(node)
                    return _results(answer.body, len(inputs), node.address, path)
                if status in (401, 403):
                    self._vault.node_succeeded(node)
                    raise VaultAuthError(
                        f"Transit HMAC on {path} at {node.address}: permission denied ({status}): "
                        f"keyd's Vault policy must grant update on {path}",
                        f"permission denied on {path}",
                    )
                if status == 404:
                    self._vault.node_succeeded(node)
                    raise SecretError(
                        f"Transit HMAC on {path} at {node.address}: not found (404): no Transit key "
                        f"{key!r} at mount {mount!r}",
                        f"not found at {path}",
                    )
                if status == 400:
                    self._vault.node_succeeded(node)
                    raise VaultError(f"Transit HMAC on {path} at {node.address}: Vault rejected the request (400)")
                error = f"unexpected Vault answer ({status})"
                cause = "sealed" if status == 503 else "server error" if status >= 500 else "unexpected answer"
            self._vault.node_failed(node, f"{node.address}: {error}", cause)
            failures.append(f"{node.address}: {error}")
        raise VaultUnavailable(f"Transit HMAC on {path}: no Vault node could serve it: " + "; ".join(failures), cause)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


def _results(body: bytes, expected: int, address: str, path: str) -> list[TransitItem]:
    try:
        results = json.loads(body)["data"]["batch_results"]
    except (ValueError, KeyError, TypeError):
        try:  # a 400 carries batch_results at the top level (every item refused)
            results = json.loads(body)["batch_results"]
        except (ValueError, KeyError, TypeError):
            raise VaultUnavailable(
                f"Transit HMAC on {path} at {address}: malformed Vault response", "malformed answer"
            ) from None
    if not isinstance(results, list) or len(results) != expected:
        raise VaultUnavailable(f"Transit HMAC on {path} at {address}: malformed Vault response", "malformed answer")
    return [transit_item(result) for result in results]


"""``keyd status``: a running keyd's health, keys and Vault token, summarised for a person or a script.

It reads ``GET /v1/health`` (which holds no secret) through keyd.client. The exit status is the
verdict: 0 healthy, 1 degraded or unable to sign (starting, unavailable), 2 unreachable. cli.py
prints what ``summarize`` returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from keyd.client import ClientError, KeydClient
from keyd.logs import ago

EXIT_HEALTHY = 0
EXIT_DEGRADED = 1
EXIT_UNREACHABLE = 2

_GREEN, _YELLOW, _RED, _BOLD, _RESET = "\033[32m", "\033[33m", "\033[31m", "\033[1m", "\033[0m"
_STATUS_COLOUR = {"ok": _GREEN, "degraded": _YELLOW}


@dataclass(frozen=True)
class Summary:
    text: str
    exit_code: int


def exit_code_for(doc: dict[str, Any]) -> int:
    """0 only when healthy and the last reload (if any) applied everything."""
    reload_failed = (doc.get("reload") or {}).get("ok") is False
    return EXIT_HEALTHY if doc.get("status") == "ok" and not reload_failed else EXIT_DEGRADED


def _paint(text: str, colour: str, enabled: bool) -> str:
    return f"{colour}{text}{_RESET}" if enabled else text


def _app_line(name: str, app: dict[str, Any], width: int, colour: bool) -> str:
    transit = app.get("key_source") == "transit"
    if transit and not app.get("key_loaded"):
        state = "transit: " + _paint("no Transit HMAC has succeeded yet", _RED, colour)
    elif transit:
        state = (
            f"transit: key v{app.get('key_version')} in Vault (keyd holds no copy), "
            f"last probe {ago(app.get('since_last_refresh'))} ago"
        )
        if not app.get("can_sign"):
            state += ", " + _paint("NOT SIGNING (probes failing past max_stale)", _RED, colour)
        elif app.get("stale"):
            state += ", " + _paint("PROBES FAILING", _YELLOW, colour)
    elif not app.get("key_loaded"):
        state = _paint("no key loaded", _RED, colour)
    else:
        version = app.get("key_version")
        kv = app.get("kv_version")
        state = f"key {'v' + str(version) if version is not None else '(KV v1)'}"
        if kv == 2:
            state += " (KV v2)"
        state += (
            f", read {ago(app.get('key_age'))} ago, last refresh {ago(app.get('since_last_refresh'))} ago"
        )
        if not app.get("can_sign"):
            state += ", " + _paint("NOT SIGNING (past max_stale)", _RED, colour)
        elif app.get("stale"):
            state += ", " + _paint("STALE", _YELLOW, colour)
    failures = int(app.get("refresh_failures") or 0)
    if failures:
        state += f"; {failures} failed refresh{'es' if failures != 1 else ''} in a row"
    if app.get("last_error"):
        state += f"\n  {'':{width}}  last error: {app['last_error']}"
    return f"  {name:{width}}  {state}"


def _vault_lines(vault: dict[str, Any], width: int, colour: bool) -> list[str]:
    if not vault:
        return []
    label = "Vault token"
    if not vault.get("logged_in"):
        lifetime = _paint("not logged in", _RED, colour)
    elif vault.get("token_ttl_remaining") is None:
        lifetime = "no expiry"
    else:
        ttl = float(vault["token_ttl_remaining"])
        lifetime = f"{ago(ttl)} left" + (", renewable" if vault.get("token_renewable") else ", not renewable")
        if ttl < 300:
            lifetime = _paint(lifetime, _YELLOW, colour)
    logins = int(vault.get("login_failures") or 0)
    refreshes = int(vault.get("refresh_failures") or 0)
    failures = f"{logins} failed login{'s' if logins != 1 else ''}, {refreshes} failed refresh{'es' if refreshes != 1 else ''} since start"
    if logins or refreshes:
        failures = _paint(failures, _YELLOW, colour)
    lines = [f"  {label:{width}}  {lifetime}", f"  {'failures':{width}}  {failures}"]
    secret_id_left = vault.get("secret_id_ttl_remaining")
    if secret_id_left is not None:
        text = f"{ago(float(secret_id_left))} left"
        if float(secret_id_left) < 7 * 86400:
            text = _paint(text + " (rotate it: docs/deploy.md, A fleet)", _YELLOW, colour)
        lines.append(f"  {'secret_id':{width}}  {text}")
    return lines + _node_lines(vault.get("nodes") or [], width, colour)


def _node_lines(nodes: list[dict[str, Any]], width: int, colour: bool) -> list[str]:
    """One line per Vault node: which one keyd uses, its state and its last error."""
    lines = []
    for node in nodes:
        label = "Vault node"
        state = str(node.get("state") or "")
        text = f"{node.get('address')}: {state}"
        if node.get("in_use"):
            text += " (in use)"
        if not node.get("healthy"):
            text = _paint(text, _RED, colour)
        if node.get("last_error"):
            text += f"\n  {'':{width}}  last error {ago(node.get('since_last_error'))} ago: {node['last_error']}"
        lines.append(f"  {label:{width}}  {text}")
    return lines


def render(doc: dict[str, Any], socket_path: str, colour: bool = False) -> str:
    """The human summary of a health document."""
    status = str(doc.get("status", "unknown"))
    head = f"keyd at {socket_path}: " + _paint(status.upper(), _STATUS_COLOUR.get(status, _RED), colour)
    apps: dict[str, Any] = doc.get("apps") or {}
    labels = [f"app {name}" for name in apps]
    width = max([len(x) for x in labels] + [len("Vault token")])
    lines = [_paint(head, _BOLD, colour)]
    for name, app in apps.items():
        lines.append(_app_line(f"app {name}", app, width, colour))
    lines += _vault_lines(doc.get("vault") or {}, width, colour)
    reload = doc.get("reload") or {}
    if reload.get("ok") is False:
        text = _paint("FAILED, keeping the config and keys it had", _RED, colour)
        lines.append(f"  {'last reload':{width}}  {text}: {reload.get('error')}")
    elif reload:
        lines.append(f"  {'last reload':{width}}  ok")
    return "\n".join(lines)


def summarize(socket_path: str, as_json: bool = False, colour: bool = False, timeout: float = 5.0) -> Summary:
    """Ask keyd for its health and build the text (or JSON) and exit code for `keyd status`."""
    try:
        with KeydClient(socket_path, timeout=timeout) as client:
            _, doc = client.health()
    except ClientError as exc:
        if as_json:
            text = json.dumps({"status": "unreachable", "socket": socket_path, "error": exc.message})
        else:
            text = f"keyd at {socket_path}: " + _paint("UNREACHABLE", _RED, colour) + f"\n  {exc.message}"
        return Summary(text, EXIT_UNREACHABLE)
    if as_json:
        return Summary(json.dumps({**doc, "socket": socket_path}, indent=2), exit_code_for(doc))
    return Summary(render(doc, socket_path, colour), exit_code_for(doc))

"""What keyd decided about a request: one ``Decision`` record for the audit log and the metrics.

The key store and the policy refuse in the domain's own words (keyd.errors.Refusal:
KeyUnavailable, Forbidden, RateLimited); only the API turns a refusal into an HTTP status and error
code (``api.REFUSALS``, the one table). Each decision, issued or refused, then goes to the audit log
and the metrics as one ``Decision``.
"""

from __future__ import annotations

from dataclasses import dataclass

from keyd.daemon.callers.caller import Caller


@dataclass(frozen=True, slots=True)
class RestCall:
    """One REST proxy call, as the audit log receives it (``"type":"rest"``). Never holds a token,
    a body or a header value; ``path`` is already redacted when ``hash_user_ids`` is on."""

    caller: Caller
    app: str | None
    method: str
    path: str | None
    outcome: str  # "proxied", "failed" or "refused"
    code: str | None
    upstream_status: int | None
    seconds: float
    attempts: int


# Not frozen: one is built per request, and a frozen dataclass's __init__ costs five times as much
# (0.56 against 0.11 us). Nor a NamedTuple: its __new__ costs half as much again (0.16 us) and its
# fields read slower, on the hot path (audit.record, RequestStats.issued): about 2,400 instructions
# per token in all (docs/benchmarks.md). The invariant that stands in for frozen: a Decision is
# built whole by the API and never changed after (the audit log keeps it until it flushes).
@dataclass(slots=True)
class Decision:
    """One decision, as the audit log and the metrics receive it. Never holds a token or key."""

    caller: Caller
    app: str | None
    kind: str | None  # "user", "app", "signature", "webhook"
    sub: str | None  # the user id the decision is about
    ttl: int | None
    outcome: str  # "issued", "verified" or "refused"
    code: str | None  # the error code of a refusal

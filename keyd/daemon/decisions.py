"""What keyd decided about a request: one ``Decision`` record for the audit log and the metrics.

The key store and the policy refuse in the domain's own words (keyd.errors.Refusal:
KeyUnavailable, Forbidden, RateLimited); only the API turns a refusal into an HTTP status and error
code (``api.REFUSALS``, the one table). Each decision, issued or refused, then goes to the audit log
and the metrics as one ``Decision``.
"""

from __future__ import annotations

from typing import NamedTuple

from keyd.daemon.peers import Caller


class Decision(NamedTuple):
    """One decision, as the audit log and the metrics receive it. Never holds a token or key.

    A NamedTuple rather than a frozen dataclass: one is built per request, and a frozen dataclass's
    ``__init__`` costs about three times as much.
    """

    caller: Caller
    app: str | None
    kind: str | None  # "user", "app", "signature", "webhook"
    sub: str | None  # the user id the decision is about
    ttl: int | None
    outcome: str  # "issued", "verified" or "refused"
    code: str | None  # the error code of a refusal

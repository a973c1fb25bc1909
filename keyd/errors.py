"""keyd's own errors, sorted by what to do about them.

Messages never contain a secret key, a Vault token or a secret_id: they are built by keyd from
fixed text plus names (paths, app names, HTTP status codes), never from a Vault response body.
"""

from __future__ import annotations


class KeydError(Exception):
    """Base class of every error keyd raises on purpose."""


class ConfigError(KeydError):
    """The configuration is invalid; `problems` holds one line per problem, naming file and key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class VaultError(KeydError):
    """A Vault call failed.

    ``cause`` is a short phrase for status lines ("sealed", "node unreachable", "permission denied on
    secret/data/x"); the message holds the whole story (which node, which path, what happened).
    """

    cause = "Vault error"

    def __init__(self, message: str, cause: str | None = None) -> None:
        super().__init__(message)
        if cause is not None:
            self.cause = cause


class VaultUnavailable(VaultError):
    """Transient: Vault is down, sealed, slow or answered 5xx. Keep serving, retry with backoff."""

    cause = "Vault unavailable"


class VaultAuthError(VaultError):
    """The Vault token is missing, expired or revoked (401/403): log in again."""

    cause = "permission denied"


class VaultLoginError(VaultError):
    """Logging in to Vault failed (bad role_id, used secret_id, missing credential file)."""

    cause = "login failed"


class SecretError(VaultError):
    """The secret is missing or malformed (path, field, value): fix it in Vault; the last good key stays."""

    cause = "malformed secret"


class StartupError(KeydError):
    """The daemon cannot start (socket in use, bad permissions on the socket path)."""


class ApiError(KeydError):
    """A request cannot be answered; carries the HTTP status and the stable error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Refusal(KeydError):
    """A request keyd decided not to serve (domain words; only the API maps it to a status and
    code, api.REFUSALS). ``message`` is safe to show the caller: no key, no token."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Forbidden(Refusal):
    """No grant allows this caller what it asked for."""


class RateLimited(Refusal):
    """The caller's grant has a rate and its bucket is empty: slow down."""


class KeyUnavailable(Refusal):
    """The app's key is not loaded yet, or could not be refreshed for longer than max_stale."""


class ClientError(KeydError):
    """Raised by keyd.client when keyd answers with an error or cannot be reached."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if status else message)
        self.status = status
        self.code = code
        self.message = message

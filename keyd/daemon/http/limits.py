"""A listener's limits as one frozen value, read from its config once (``Limits.of``)."""

from __future__ import annotations

from dataclasses import dataclass

from keyd.config import ServerConfig


@dataclass(frozen=True, slots=True)
class Limits:
    """What one listener allows: its server holds it and each connection reads it (the same value
    for both, so no limit is read two ways). The fixed HTTP limits (URL and header sizes, the
    linger after a 413...) are constants in ``connection``."""

    request_timeout: float  # from a request's first byte to its last
    idle_timeout: float  # between requests on a kept-alive connection
    first_byte_timeout: float  # from connecting to the first request's first byte
    max_body: int  # every path's body limit (some targets allow more: Server.body_limit)
    max_connections: int  # in total
    max_connections_per_uid: int
    max_connections_without_grant: int  # per uid, for a caller no grant matches
    shutdown_timeout: float  # how long requests still being received may finish on shutdown

    @classmethod
    def of(cls, config: ServerConfig) -> Limits:
        return cls(
            request_timeout=config.request_timeout,
            idle_timeout=config.idle_timeout,
            first_byte_timeout=config.first_byte_timeout,
            max_body=config.max_body,
            max_connections=config.max_connections,
            max_connections_per_uid=config.max_connections_per_uid,
            max_connections_without_grant=config.max_connections_without_grant,
            shutdown_timeout=config.shutdown_timeout,
        )

    @property
    def sweep_interval(self) -> float:
        """How often the sweeper compares deadlines: a quarter of the shortest timeout, at most a
        second (a deadline fires never early and at most this late)."""
        return min(1.0, self.request_timeout / 4, self.idle_timeout / 4, self.first_byte_timeout / 4)

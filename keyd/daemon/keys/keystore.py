"""The in-memory keys: one immutable snapshot per app, swapped by a single reference assignment.

Signing reads ``KeyStore.signing(app)``: one dict lookup and one clock read, no lock, no I/O. A
refresh builds a complete new snapshot and assigns it; a request that already holds the old snapshot
finishes with it, so every token is signed wholly with one key.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from keyd.daemon.keys.health import AppHealth, Health, Status
from keyd.errors import KeyUnavailable

log = logging.getLogger("keyd.keystore")

_libc: Any = None
_mlock_warned = False


def _mlock(buffer: bytearray) -> bool:
    """Best effort: keep the key's page out of swap. Logs once when the memlock limit refuses."""
    global _libc, _mlock_warned  # noqa: PLW0603 - one process-wide libc handle and one warning
    if not buffer:
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        address = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
        if _libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(len(buffer))) == 0:
            return True
        errno = ctypes.get_errno()
    except (OSError, AttributeError, TypeError):
        errno = -1
    if not _mlock_warned:
        _mlock_warned = True
        log.warning(
            "could not mlock key material (errno %s): raise LimitMEMLOCK / ulimit -l to keep "
            "keys out of swap; continuing without it",
            errno,
        )
    return False


def _public_hmac(key: bytes | bytearray) -> Any:
    """HMAC-SHA256 through the public API (hmac.HMAC): the fallback of ``_new_hmac``."""
    return hmac.new(key, digestmod="sha256")


def _hmac_factory() -> Callable[[bytearray], Any]:
    """How SecretKey prepares its HMAC context: OpenSSL's object when CPython exposes it, else hmac.new.

    ``_hashlib.hmac_new`` is the OpenSSL HMAC object that hmac.new itself wraps: its copy, update
    and digest run without the Python frames hmac.HMAC adds (0.3 us of what was then a 12 us
    request). It is a private CPython module, so any Python without it gets the public hmac.new.
    The invariant both keep, and the one SecretKey relies on: the context copies the key when it is
    made (wiping the bytearray later leaves it intact), ``copy()`` gives an independent context
    keyed the same way, and the digests are the same HMAC-SHA256 bytes.
    """
    try:
        from _hashlib import hmac_new  # noqa: PLC0415 - private CPython module; may be absent
    except ImportError:
        return _public_hmac
    return lambda key: hmac_new(key, digestmod="sha256")


_new_hmac = _hmac_factory()


class SecretKey:
    """Key material. Its repr and str never show it; `wipe` overwrites it in place.

    The bytes live in a bytearray keyd owns (so they can be zeroed on replacement) and inside the
    OpenSSL HMAC context built from them. The str that hvac decoded from Vault's JSON is immutable
    and is left to the garbage collector: that is the limit of what CPython allows.
    """

    __slots__ = ("_material", "_prototype")

    def __init__(self, material: bytearray) -> None:
        self._material = material
        _mlock(material)
        self._prototype = _new_hmac(material)

    @classmethod
    def from_str(cls, value: str) -> SecretKey:
        return cls(bytearray(value.encode("utf-8")))

    def hmac(self) -> Any:
        """A fresh HMAC-SHA256 object keyed with this key (a copy of a prepared context)."""
        return self._prototype.copy()

    @property
    def size(self) -> int:
        return len(self._material)

    def write_to(self, fd: int) -> None:
        """Write the key's bytes to ``fd``: only the handover's sealed memfd, never a file."""
        view = memoryview(self._material)
        while view:
            view = view[os.write(fd, view) :]

    def same_as(self, other: SecretKey) -> bool:
        return hmac.compare_digest(self._material, other._material)

    def wipe(self) -> None:
        for i in range(len(self._material)):
            self._material[i] = 0

    def __repr__(self) -> str:
        return "SecretKey(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("SecretKey cannot be pickled")


class _TransitKey(SecretKey):
    """The stand-in "key" of a transit app's snapshot: no material, and no HMAC ever."""

    __slots__ = ()

    def __init__(self) -> None:
        self._material = bytearray()
        self._prototype = None

    def hmac(self) -> Any:
        raise KeyUnavailable("this app's key is in Vault's Transit engine; keyd holds no copy")


TRANSIT_KEY = _TransitKey()


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    """Everything needed to sign for one app, from one successful read of Vault."""

    app: str
    signing: SecretKey
    webhook: SecretKey
    version: int | None
    kv_version: int
    loaded_at: float


def _wipe(snapshot: KeySnapshot, keep: KeySnapshot) -> None:
    """Zero the keys of `snapshot` that `keep` does not share."""
    kept = (keep.signing, keep.webhook)
    for key in {id(k): k for k in (snapshot.signing, snapshot.webhook)}.values():
        if all(key is not k for k in kept):
            key.wipe()


@dataclass(frozen=True, slots=True)
class _AppRecord:
    """One app's key and refresh bookkeeping at one instant; replaced whole, never changed."""

    snapshot: KeySnapshot | None = None
    expires_at: float = 0.0  # past this, without a successful refresh, the key is not used
    last_success: float | None = None
    last_attempt: float | None = None
    last_error: str = ""
    cause: str = ""  # a short phrase for status lines: "sealed", "permission denied on secret/data/x"
    failures: int = 0  # failed refreshes since the last success

    def expired(self, now: float) -> bool:
        return self.snapshot is not None and now > self.expires_at


@dataclass(frozen=True, slots=True)
class Refreshed:
    """What ``KeyStore.record_success`` did: the refresher logs from this."""

    changed: bool  # a different key or version is in use now
    first: bool  # the app had no key before
    previous_version: int | None
    recovered: bool  # the refreshes before this one had failed


@dataclass(frozen=True, slots=True)
class RefreshFailed:
    """What ``KeyStore.record_failure`` recorded: the refresher logs and backs off from this."""

    failures: int  # in a row, this one included
    key_version: int | None  # of the last good key, still in use while not expired
    key_loaded: bool
    expired: bool  # past refresh.max_stale: the app does not sign until a refresh succeeds
    first: bool  # the first failure since the last success
    newly_expired: bool  # expired now and not at the previous failure (or this is the first)
    same_error: bool  # the previous failure had the same message


class KeyStore:
    """Current key per app, staleness, and the health picture built from them.

    Threading contract. Writers are the refresher's worker threads (``record_success``,
    ``record_failure``); readers are the event loop (``signing`` on every request, ``health``,
    ``app_health``, ``failing``) and any other thread. Each app's state is one frozen ``_AppRecord``:
    a writer builds a new one and stores it with one dict item assignment (atomic under the GIL, and
    the dict never grows after ``__init__``), so a reader that takes the record once sees one
    consistent state (never a failure count from one attempt with the error of another) without a
    lock. Writers take ``_write_lock`` so that two writes to one app (a refresh and a SIGHUP re-read)
    cannot lose each other's read-modify-write; the lock is never taken by a reader, and nothing
    holds it across I/O.
    """

    def __init__(
        self,
        apps: Iterable[str],
        max_stale: float,
        clock: Callable[[], float] = time.time,
        transit: Iterable[str] = (),
    ) -> None:
        self._transit = frozenset(transit)  # apps whose key is in Vault's Transit (health says so)
        self._max_stale = max_stale
        self._clock = clock
        self._records: dict[str, _AppRecord] = {name: _AppRecord() for name in apps}
        self._write_lock = threading.Lock()

    def signing(self, app: str) -> KeySnapshot:
        """The snapshot to sign with; KeyUnavailable when there is none or it is past max_stale."""
        record = self._records[app]
        snapshot = record.snapshot
        if snapshot is None:
            raise KeyUnavailable(f"the key for app {app!r} is not loaded yet")
        if self._clock() > record.expires_at:
            raise KeyUnavailable(
                f"the key for app {app!r} could not be refreshed for longer than refresh.max_stale"
            )
        return snapshot

    # -- writers: the refresher's worker threads ------------------------------------------------

    def record_success(self, snapshot: KeySnapshot) -> Refreshed:
        """Install a fresh snapshot (kept as is when the key and version did not change)."""
        with self._write_lock:
            old = self._records[snapshot.app]
            now = self._clock()
            previous = old.snapshot
            changed = (
                previous is None
                or previous.version != snapshot.version
                or not previous.signing.same_as(snapshot.signing)
                or not previous.webhook.same_as(snapshot.webhook)
            )
            self._records[snapshot.app] = _AppRecord(
                snapshot=snapshot if changed else previous,
                expires_at=now + self._max_stale,
                last_success=now,
                last_attempt=now,
            )
        if previous is not None:
            # Wipe whichever copy is not kept: the old snapshot after a change (a request on the
            # loop thread may still hold it, but it signs with its own HMAC copy, so wiping the raw
            # bytes cannot corrupt its token), or the fresh duplicate when nothing changed.
            if changed:
                _wipe(previous, keep=snapshot)
            else:
                _wipe(snapshot, keep=previous)
        return Refreshed(
            changed=changed,
            first=previous is None,
            previous_version=previous.version if previous is not None else None,
            recovered=old.failures > 0,
        )

    def record_failure(self, app: str, message: str, cause: str = "") -> RefreshFailed:
        """A refresh that failed: the last good key stays in use until max_stale."""
        with self._write_lock:
            old = self._records[app]
            now = self._clock()
            record = dataclasses.replace(
                old, last_attempt=now, last_error=message, cause=cause, failures=old.failures + 1
            )
            self._records[app] = record
        first = old.failures == 0
        expired = record.expired(now)
        was_expired = not first and old.last_attempt is not None and old.expired(old.last_attempt)
        return RefreshFailed(
            failures=record.failures,
            key_version=record.snapshot.version if record.snapshot is not None else None,
            key_loaded=record.snapshot is not None,
            expired=expired,
            first=first,
            newly_expired=expired and not was_expired,
            same_error=not first and old.last_error == message,
        )

    def note_cause(self, cause: str) -> None:
        """What a Vault probe found (no node serves, and why): the cause of every failing app now."""
        with self._write_lock:
            for name, record in list(self._records.items()):
                if record.failures and record.cause != cause:
                    self._records[name] = dataclasses.replace(record, cause=cause)

    def adopt(self, snapshot: KeySnapshot, fetched_at: float) -> bool:
        """Install a key the previous keyd handed over (keyd.daemon.keys.handover) as if this
        process had read it from Vault at ``fetched_at``: it signs until ``fetched_at + max_stale``
        like any last good key, and the failures already counted stay (health says degraded). Only
        while the app has no key (a fresh read always wins); False when nothing was installed."""
        with self._write_lock:
            old = self._records[snapshot.app]
            expires_at = fetched_at + self._max_stale
            if old.snapshot is not None or snapshot.app in self._transit or self._clock() > expires_at:
                return False
            self._records[snapshot.app] = dataclasses.replace(
                old, snapshot=snapshot, expires_at=expires_at, last_success=fetched_at
            )
        return True

    # -- readers --------------------------------------------------------------------------------

    def held(self) -> list[tuple[KeySnapshot, float]]:
        """Each KV app's snapshot that can sign now, with the time it was last read from Vault (what
        the handover measures max_stale from). Transit apps hold no key: never listed."""
        now = self._clock()
        return [
            (record.snapshot, record.last_success)
            for name, record in list(self._records.items())
            if name not in self._transit
            and record.snapshot is not None
            and record.last_success is not None
            and now <= record.expires_at
        ]

    def ready(self) -> bool:
        """Every app has a key loaded (the daemon's readiness for systemd)."""
        return all(r.snapshot is not None for r in self._records.values())

    def failing(self) -> list[str]:
        """The apps whose latest refresh failed."""
        return [name for name, record in self._records.items() if record.failures]

    def app_health(self, app: str) -> AppHealth:
        return _app_health(app, self._records[app], self._clock(), app in self._transit)

    def health(self) -> Health:
        """Every app's state and the overall status. Never contains key material."""
        now = self._clock()
        records = list(self._records.items())  # one record per app, each read once
        apps = tuple(_app_health(name, record, now, name in self._transit) for name, record in records)
        status: Status
        if all(app.can_sign for app in apps):
            status = "degraded" if any(app.stale for app in apps) else "ok"
        else:
            expired = any(record.expired(now) for _, record in records)
            starting = any(not app.key_loaded for app in apps)
            status = "unavailable" if expired or not starting else "starting"
        return Health(status=status, apps=apps)


def _app_health(name: str, record: _AppRecord, now: float, transit: bool = False) -> AppHealth:
    snap = record.snapshot
    return AppHealth(
        name=name,
        # A transit app has no stale key to sign with: it can sign while its last probe succeeded.
        can_sign=snap is not None and now <= record.expires_at and not (transit and record.failures),
        key_loaded=snap is not None,
        key_version=snap.version if snap else None,
        kv_version=snap.kv_version if snap else None,
        key_age=round(now - snap.loaded_at, 3) if snap else None,
        since_last_refresh=(
            round(now - record.last_success, 3) if record.last_success is not None else None
        ),
        stale=bool(record.failures) and snap is not None,
        refresh_failures=record.failures,
        last_error=record.last_error or None,
        cause=record.cause or None,
        key_source="transit" if transit else "kv",
    )

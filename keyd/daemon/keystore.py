"""The in-memory keys: one immutable snapshot per app, swapped by a single reference assignment.

Signing reads ``KeyStore.signing(app)``: one dict lookup and one clock read, no lock, no I/O. A
refresh builds a complete new snapshot and assigns it; a request that already holds the old snapshot
finishes with it, so every token is signed wholly with one key.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hmac
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

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


@dataclass(slots=True)
class AppState:
    """Refresh bookkeeping for one app; only the refresher thread writes it."""

    snapshot: KeySnapshot | None = None
    last_success: float | None = None
    last_attempt: float | None = None
    last_error: str = ""
    cause: str = ""  # a short phrase for status lines: "sealed", "permission denied on secret/data/x"
    failures: int = 0
    expires_at: float = 0.0


class KeyStore:
    """Current key per app, staleness, and the health picture built from them."""

    def __init__(self, apps: Iterable[str], max_stale: float, clock: Callable[[], float] = time.time) -> None:
        self._max_stale = max_stale
        self._clock = clock
        self._states: dict[str, AppState] = {name: AppState() for name in apps}

    def signing(self, app: str) -> KeySnapshot:
        """The snapshot to sign with; KeyUnavailable when there is none or it is past max_stale."""
        state = self._states[app]
        snapshot = state.snapshot
        if snapshot is None:
            raise KeyUnavailable(f"the key for app {app!r} is not loaded yet")
        if self._clock() > state.expires_at:
            raise KeyUnavailable(
                f"the key for app {app!r} could not be refreshed for longer than refresh.max_stale"
            )
        return snapshot

    def state(self, app: str) -> AppState:
        return self._states[app]

    def update(self, snapshot: KeySnapshot) -> bool:
        """Install a fresh snapshot; returns True when the key or its version changed."""
        state = self._states[snapshot.app]
        now = self._clock()
        old = state.snapshot
        changed = (
            old is None
            or old.version != snapshot.version
            or not old.signing.same_as(snapshot.signing)
            or not old.webhook.same_as(snapshot.webhook)
        )
        if changed:
            state.snapshot = snapshot
        state.last_success = now
        state.last_attempt = now
        state.last_error = ""
        state.cause = ""
        state.failures = 0
        state.expires_at = now + self._max_stale
        if old is not None:
            # Wipe whichever copy is not kept: the old snapshot after a change (a request on the
            # loop thread may still hold it, but it signs with its own HMAC copy, so wiping the raw
            # bytes cannot corrupt its token), or the fresh duplicate when nothing changed.
            if changed:
                _wipe(old, keep=snapshot)
            else:
                _wipe(snapshot, keep=old)
        return changed

    def record_failure(self, app: str, message: str, cause: str = "") -> None:
        state = self._states[app]
        state.last_attempt = self._clock()
        state.last_error = message
        state.cause = cause
        state.failures += 1

    def ready(self) -> bool:
        """Every app has a key loaded (the daemon's readiness for systemd)."""
        return all(s.snapshot is not None for s in self._states.values())

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(every app can sign, the health document). Never contains key material."""
        now = self._clock()
        apps: dict[str, Any] = {}
        can_sign_all = True
        starting = False
        degraded = False
        for name, state in self._states.items():
            snap = state.snapshot
            can_sign = snap is not None and now <= state.expires_at
            stale = bool(state.failures) and snap is not None
            can_sign_all &= can_sign
            starting |= snap is None
            degraded |= stale
            apps[name] = {
                "can_sign": can_sign,
                "key_loaded": snap is not None,
                "key_version": snap.version if snap else None,
                "kv_version": snap.kv_version if snap else None,
                "key_age": round(now - snap.loaded_at, 3) if snap else None,
                "since_last_refresh": (
                    round(now - state.last_success, 3) if state.last_success is not None else None
                ),
                "stale": stale,
                "refresh_failures": state.failures,
                "last_error": state.last_error or None,
                "cause": state.cause or None,
            }
        if can_sign_all:
            status = "degraded" if degraded else "ok"
        else:
            expired = any(s.snapshot is not None and now > s.expires_at for s in self._states.values())
            status = "unavailable" if expired or not starting else "starting"
        return can_sign_all, {"status": status, "apps": apps}

"""Keys across a restart, without Vault and without a file: systemd's file descriptor store.

When systemd stops keyd (SIGTERM: ``systemctl restart``, a package upgrade's try-restart), ``stash``
writes every key keyd can sign with into a sealed memfd (anonymous memory with no path anywhere,
sealed so that nothing can change it afterwards) and hands the fd to systemd: sd_notify
``FDSTORE=1 FDNAME=keyd-keys`` with SCM_RIGHTS. keyd.service's ``FileDescriptorStoreMax=1`` lets
systemd keep it while a restart is pending; systemd drops its store when the unit stops for good
(``systemctl stop``), and nothing survives a reboot.

At the next start systemd passes the fd back (LISTEN_FDS, LISTEN_FDNAMES) and ``take`` checks it: a
sealed memfd of bounded size in this format, apps whose key source in the config is unchanged, ages
measured on CLOCK_BOOTTIME (wall-clock steps change nothing; a fetch time in the future is refused).
Vault comes first: each app's first read decides (``after_attempt``). When it succeeds, the
handed-over key is wiped unused; when it fails, the app signs with the handed-over key until
``refresh.max_stale`` after that key's ORIGINAL read from Vault, exactly as a keyd that never
restarted would. Once no app depends on the stored copy, keyd asks systemd to drop it
(FDSTOREREMOVE=1). Transit apps hold no key, so there is nothing to hand over for them.

Only keyd's main process can put an fd into the store (``NotifyAccess=main``: systemd refuses
messages from any other process, by the kernel's SCM_CREDENTIALS), and only systemd and keyd hold it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from keyd.config import AppConfig
from keyd.daemon.keys.keystore import KeySnapshot, KeyStore, SecretKey
from keyd.logs import ago

log = logging.getLogger("keyd.handover")

FDNAME = "keyd-keys"
MAGIC = b"keyd-keys/1\n"
MAX_SIZE = 1 << 20  # far above any real set of TalkJS keys; a bigger fd is refused unread
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class Refused(Exception):
    """A stored fd keyd does not use (the message never holds key material)."""


class NotifierLike(Protocol):
    @property
    def enabled(self) -> bool: ...
    def notify(self, *lines: str) -> None: ...
    def send_fds(self, fds: list[int], *lines: str) -> bool: ...


def boottime() -> float:
    """Seconds since boot, suspend included: one clock for the old and the new keyd."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def source(app: AppConfig) -> list[Any]:
    """Where the app's key comes from: a handed-over key is used only if this is unchanged."""
    return [app.app_id, app.kv_mount, app.kv_version, app.path, app.field, *app.webhook_source]


class Handover:
    """The fd-store handover of one keyd process (``take`` at start, ``stash`` at stop)."""

    def __init__(
        self,
        apps: Mapping[str, AppConfig],
        store: KeyStore,
        notifier: NotifierLike,
        max_stale: float,
        clock: Callable[[], float] = time.time,
        boot_clock: Callable[[], float] = boottime,
    ) -> None:
        self._apps = {name: app for name, app in apps.items() if not app.transit}
        self._store = store
        self._notifier = notifier
        self._max_stale = max_stale
        self._clock = clock
        self._boot = boot_clock
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[KeySnapshot, float]] = {}  # app -> (snapshot, fetched_at)
        self._adopted: set[str] = set()  # apps signing with a handed-over key now
        self._stored = False  # systemd holds a keyd-keys fd
        self._stashed = False  # stopping: what systemd holds now is for the next keyd

    # -- start ----------------------------------------------------------------------------

    def take(self, fds: list[int]) -> None:
        """Read the keys systemd handed back (fds named ``FDNAME``), then close the fds."""
        if not fds:
            return
        self._stored = True
        for fd in fds:
            try:
                self._pending.update(self._read(fd))
            except Refused as exc:
                log.warning("systemd handed back an fd named %s that keyd does not use: %s", FDNAME, exc)
            finally:
                os.close(fd)
        if self._pending:
            log.info(
                "systemd handed back the key(s) of app(s) %s from the previous keyd; used only if Vault "
                "cannot be reached now",
                ", ".join(sorted(self._pending)),
                extra={"event": "handover_taken", "apps": sorted(self._pending)},
            )
        else:
            self._drop_stored()

    def _read(self, fd: int) -> dict[str, tuple[KeySnapshot, float]]:
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise Refused(f"not a sealed memfd ({exc.strerror})") from None
        if not where.startswith(f"/memfd:{FDNAME}"):
            raise Refused("not keyd's memfd")
        if seals & SEALS != SEALS:
            raise Refused("not sealed against writes")
        if not len(MAGIC) < size <= MAX_SIZE:
            raise Refused(f"{size} bytes")
        blob = bytearray(size)
        try:
            if os.preadv(fd, [blob], 0) != size:
                raise Refused("short read")
            return self._parse(blob)
        finally:
            blob[:] = bytes(size)  # the keys' bytes live on only in their SecretKeys

    def _parse(self, blob: bytearray) -> dict[str, tuple[KeySnapshot, float]]:
        end = blob.find(b"\n", len(MAGIC))
        if not blob.startswith(MAGIC) or end < 0:
            raise Refused("not in the keyd-keys/1 format")
        try:
            header = json.loads(bytes(blob[len(MAGIC) : end]))
            entries = list(header["apps"])
        except (ValueError, KeyError, TypeError):
            raise Refused("unreadable header") from None
        now, boot_now = self._clock(), self._boot()
        offset = end + 1
        taken: dict[str, tuple[KeySnapshot, float]] = {}
        for entry in entries:
            try:
                name, fetched, loaded = str(entry["app"]), float(entry["fetched"]), float(entry["loaded"])
                lengths = [int(entry["signing"])] + ([int(entry["webhook"])] if entry["webhook"] is not None else [])
                version, kv_version, where = entry["version"], int(entry["kv_version"]), entry["source"]
            except (KeyError, TypeError, ValueError):
                raise Refused("unreadable header") from None
            if name in taken:
                for snapshot, _ in taken.values():
                    _wipe(snapshot)
                raise Refused(f"app {name} is in it twice")
            if any(n <= 0 for n in lengths) or offset + sum(lengths) > len(blob):
                raise Refused("key lengths do not match the fd's size")
            keys = []
            for n in lengths:
                keys.append(SecretKey(bytearray(blob[offset : offset + n])))
                offset += n
            age = boot_now - fetched
            app = self._apps.get(name)
            why = ""
            if app is None:
                why = "the app is no longer configured (or is a transit app now)"
            elif where != source(app):
                why = "the config changed where its key comes from"
            elif age < 0 or loaded > fetched:
                why = "its read from Vault is dated in the future"
            elif age > self._max_stale:
                why = f"its read from Vault was {ago(age)} ago, more than refresh.max_stale"
            if why:
                log.warning("app %s: the handed-over key is not used: %s", name, why, extra={"app": name})
                for key in keys:
                    key.wipe()
                continue
            snapshot = KeySnapshot(
                app=name,
                signing=keys[0],
                webhook=keys[-1],
                version=version if isinstance(version, int) else None,
                kv_version=kv_version,
                loaded_at=now - (boot_now - loaded),
            )
            taken[name] = (snapshot, now - age)
        if offset != len(blob):
            for snapshot, _ in taken.values():
                _wipe(snapshot)
            raise Refused("key lengths do not match the fd's size")
        return taken

    def after_attempt(self, app: str) -> None:
        """After each refresh attempt (on the refresher's thread, before anyone hears of it): the
        app's first read decides whether the handed-over key is needed."""
        with self._lock:
            if self._stashed:  # a refresh that ended during the stop changes nothing stored
                return
            failed = self._store.app_health(app).refresh_failures > 0
            pending = self._pending.pop(app, None)
            if pending is not None:
                snapshot, fetched_at = pending
                if not failed:
                    _wipe(snapshot)
                elif self._store.adopt(snapshot, fetched_at):
                    self._adopted.add(app)
                    since = self._clock() - fetched_at
                    log.warning(
                        "app %s: Vault cannot be reached at start: signing with the key the previous "
                        "keyd handed over (version %s, read from Vault %s ago; refused after max_stale "
                        "%s from that read)",
                        app,
                        snapshot.version,
                        ago(since),
                        ago(self._max_stale),
                        extra={"app": app, "event": "handover_used", "key_version": snapshot.version},
                    )
                else:
                    _wipe(snapshot)
            elif app in self._adopted and not failed:
                self._adopted.discard(app)
                log.info(
                    "app %s: read from Vault again; the handed-over key is no longer used",
                    app,
                    extra={"app": app, "event": "handover_done"},
                )
            if not self._pending and not self._adopted:
                self._drop_stored()

    def _drop_stored(self) -> None:
        if self._stored:
            self._stored = False
            self._notifier.notify("FDSTOREREMOVE=1", f"FDNAME={FDNAME}")

    # -- stop -----------------------------------------------------------------------------

    def stash(self) -> None:
        """Hand every key keyd can sign with to systemd's fd store, for the next start."""
        if not self._notifier.enabled:
            return
        with self._lock:
            self._stashed = True
            keys = dict(self._pending)
            keys.update((snap.app, (snap, fetched)) for snap, fetched in self._store.held())
            self._drop_stored()  # the copy from this start, if any: one keyd-keys fd at a time
            if not keys:
                return
            fd = os.memfd_create(FDNAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                self._write(fd, keys)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
                self._stored = self._notifier.send_fds([fd], "FDSTORE=1", f"FDNAME={FDNAME}", "FDPOLL=0")
            finally:
                os.close(fd)
        if self._stored:
            log.info(
                "handed the key(s) of app(s) %s to systemd's fd store for the next start",
                ", ".join(sorted(keys)),
                extra={"event": "handover_stashed", "apps": sorted(keys)},
            )

    def _write(self, fd: int, keys: dict[str, tuple[KeySnapshot, float]]) -> None:
        now, boot_now = self._clock(), self._boot()
        entries = []
        for name, (snap, fetched_at) in sorted(keys.items()):
            separate = snap.webhook is not snap.signing
            entries.append(
                {
                    "app": name,
                    "source": source(self._apps[name]) if name in self._apps else None,
                    "version": snap.version,
                    "kv_version": snap.kv_version,
                    "fetched": boot_now - (now - fetched_at),
                    "loaded": boot_now - (now - snap.loaded_at),
                    "signing": snap.signing.size,
                    "webhook": snap.webhook.size if separate else None,
                }
            )
        os.write(fd, MAGIC + json.dumps({"apps": entries}).encode() + b"\n")
        for _, (snap, _) in sorted(keys.items()):
            snap.signing.write_to(fd)
            if snap.webhook is not snap.signing:
                snap.webhook.write_to(fd)


def _wipe(snapshot: KeySnapshot) -> None:
    snapshot.signing.wipe()
    snapshot.webhook.wipe()

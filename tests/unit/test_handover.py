"""The fd-store handover (keyd.daemon.keys.handover) with a fake notifier and fake clocks.

The real thing (systemd keeping the fd across `systemctl restart` and a package upgrade, Vault
stopped) is tests/systemd/test_handover.py.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hmac
import json
import logging
import os
import tempfile

import pytest

from keyd.config import AppConfig
from keyd.daemon.keys import handover
from keyd.daemon.keys.handover import FDNAME, MAGIC, SEALS, Handover
from keyd.daemon.keys.keystore import KeySnapshot, KeyStore, SecretKey
from keyd.errors import KeyUnavailable

KEY = "sk_test_handover_0123456789abcdef"
WEBHOOK = "sk_test_webhook_fedcba9876543210"
MAX_STALE = 3600.0


class Clock:
    def __init__(self, wall: float = 1_000_000.0, boot: float = 5_000.0) -> None:
        self.wall, self.boot = wall, boot

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.boot += seconds


class Notifier:
    """Records sd_notify lines; keeps a duplicate of each fd sent, as systemd's store would."""

    enabled = True

    def __init__(self) -> None:
        self.lines: list[tuple[str, ...]] = []
        self.stored: list[int] = []

    def notify(self, *lines: str) -> None:
        self.lines.append(lines)
        if "FDSTOREREMOVE=1" in lines:
            for fd in self.stored:
                os.close(fd)
            self.stored.clear()

    def send_fds(self, fds: list[int], *lines: str) -> bool:
        self.lines.append(lines)
        self.stored += [os.dup(fd) for fd in fds]
        return True

    def hand_back(self) -> list[int]:
        """What systemd passes at the next start: its copies (keyd closes what it is given)."""
        return [os.dup(fd) for fd in self.stored]


def apps(**changes: object) -> dict[str, AppConfig]:
    return {
        "live": dataclasses.replace(AppConfig(name="live", app_id="tLive"), **changes),  # type: ignore[arg-type]
        "edge": AppConfig(name="edge", app_id="tEdge", key_source="transit", transit_key="edge"),
    }


def keyd(
    clock: Clock, config: dict[str, AppConfig] | None = None, notifier: Notifier | None = None
) -> tuple[KeyStore, Handover]:
    """One keyd process's key store and handover (``notifier`` is systemd, shared across processes)."""
    config = config or apps()
    store = KeyStore(config, MAX_STALE, clock=lambda: clock.wall, transit=["edge"])
    notifier = notifier if notifier is not None else Notifier()
    return store, Handover(
        config, store, notifier, MAX_STALE, clock=lambda: clock.wall, boot_clock=lambda: clock.boot
    )


def loaded(store: KeyStore, clock: Clock, webhook: str | None = None) -> None:
    signing = SecretKey.from_str(KEY)
    store.record_success(
        KeySnapshot(
            app="live",
            signing=signing,
            webhook=SecretKey.from_str(webhook) if webhook else signing,
            version=7,
            kv_version=2,
            loaded_at=clock.wall,
        )
    )


def token_key(store: KeyStore) -> bytes:
    mac = store.signing("live").signing.hmac()
    mac.update(b"x")
    return bytes(mac.digest())


def expected_mac(key: str) -> bytes:
    return hmac.new(key.encode(), b"x", "sha256").digest()


def stashed(clock: Clock, webhook: str | None = None) -> Notifier:
    """A keyd that read its key at clock's time, ran 10 minutes, and was stopped."""
    notifier = Notifier()
    store, old = keyd(clock, notifier=notifier)
    loaded(store, clock, webhook)
    clock.advance(600)
    old.stash()
    assert notifier.stored
    return notifier


def test_stash_hands_systemd_one_sealed_memfd_named_keyd_keys() -> None:
    clock = Clock()
    notifier = stashed(clock)
    [fd] = notifier.stored
    assert notifier.lines[-1] == ("FDSTORE=1", f"FDNAME={FDNAME}", "FDPOLL=0")
    assert os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{FDNAME}")
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"forged", 0)  # sealed: not even a holder of the fd can change it
    blob = os.pread(fd, 1 << 20, 0)
    assert blob.startswith(MAGIC) and blob.endswith(KEY.encode())
    header = json.loads(blob[len(MAGIC) : blob.index(b"\n", len(MAGIC))])
    assert [entry["app"] for entry in header["apps"]] == ["live"]  # the transit app holds no key
    assert KEY not in json.dumps(header)


def test_vault_unreachable_at_start_signs_with_the_handed_over_key_until_max_stale_of_the_original_read() -> None:
    clock = Clock()
    read_at = clock.wall
    notifier = stashed(clock)
    clock.advance(5)
    store, new = keyd(clock, notifier=notifier)
    new.take(notifier.hand_back())
    with pytest.raises(KeyUnavailable):
        store.signing("live")  # nothing is used before Vault had its chance
    store.record_failure("live", "Vault node unreachable", "node unreachable")
    new.after_attempt("live")
    assert token_key(store) == expected_mac(KEY)
    state = store.app_health("live")
    assert state.stale and state.key_version == 7
    assert state.since_last_refresh == pytest.approx(605)  # measured from the original read
    assert state.key_age == pytest.approx(605)
    assert notifier.stored, "kept in systemd's store while this keyd depends on it"
    clock.wall = read_at + MAX_STALE - 1
    clock.boot += MAX_STALE
    assert token_key(store) == expected_mac(KEY)
    clock.wall = read_at + MAX_STALE + 1
    with pytest.raises(KeyUnavailable):
        store.signing("live")


def test_vault_reachable_at_start_reads_fresh_and_drops_the_stored_fd() -> None:
    clock = Clock()
    notifier = stashed(clock)
    store, new = keyd(clock, notifier=notifier)
    new.take(notifier.hand_back())
    signing = SecretKey.from_str("sk_test_rotated_meanwhile_00000000")
    store.record_success(KeySnapshot("live", signing, signing, 8, 2, clock.wall))
    new.after_attempt("live")
    assert token_key(store) == expected_mac("sk_test_rotated_meanwhile_00000000")
    assert notifier.lines[-1] == ("FDSTOREREMOVE=1", f"FDNAME={FDNAME}") and not notifier.stored


def test_a_handed_over_key_is_dropped_once_vault_answers_again() -> None:
    clock = Clock()
    notifier = stashed(clock)
    store, new = keyd(clock, notifier=notifier)
    new.take(notifier.hand_back())
    store.record_failure("live", "down", "node unreachable")
    new.after_attempt("live")
    store.record_failure("live", "down", "node unreachable")
    new.after_attempt("live")
    assert notifier.stored
    signing = SecretKey.from_str(KEY)
    store.record_success(KeySnapshot("live", signing, signing, 7, 2, clock.wall))
    new.after_attempt("live")
    assert not notifier.stored and notifier.lines[-1][0] == "FDSTOREREMOVE=1"
    assert not store.app_health("live").stale


def test_a_restart_during_the_outage_hands_over_the_original_read_time_again() -> None:
    clock = Clock()
    read_at = clock.wall
    notifier = stashed(clock)
    store, second = keyd(clock, notifier=notifier)
    second.take(notifier.hand_back())
    store.record_failure("live", "down", "node unreachable")
    second.after_attempt("live")
    clock.advance(1000)
    second.stash()
    assert len(notifier.stored) == 1  # the old copy was removed first (FileDescriptorStoreMax=1)
    store, third = keyd(clock, notifier=notifier)
    third.take(notifier.hand_back())
    store.record_failure("live", "down", "node unreachable")
    third.after_attempt("live")
    assert store.app_health("live").since_last_refresh == pytest.approx(clock.wall - read_at)
    clock.wall = read_at + MAX_STALE + 1  # restarts never extend max_stale
    with pytest.raises(KeyUnavailable):
        store.signing("live")


def test_a_sigterm_before_the_first_attempt_hands_over_what_was_taken() -> None:
    clock = Clock()
    notifier = stashed(clock)
    store, second = keyd(clock, notifier=notifier)
    second.take(notifier.hand_back())
    second.stash()  # stopped before Vault answered
    store, third = keyd(clock, notifier=notifier)
    third.take(notifier.hand_back())
    store.record_failure("live", "down", "node unreachable")
    third.after_attempt("live")
    assert token_key(store) == expected_mac(KEY)


def test_a_separate_webhook_key_is_handed_over_too() -> None:
    clock = Clock()
    config = apps(webhook_path="talkjs/webhook")
    notifier = Notifier()
    store, old = keyd(clock, config, notifier=notifier)
    loaded(store, clock, webhook=WEBHOOK)
    old.stash()
    store, new = keyd(clock, config, notifier=notifier)
    new.take(notifier.hand_back())
    store.record_failure("live", "down", "node unreachable")
    new.after_attempt("live")
    webhook = store.signing("live").webhook.hmac()
    webhook.update(b"x")
    assert webhook.digest() == expected_mac(WEBHOOK) and token_key(store) == expected_mac(KEY)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"path": "talkjs/other"}, "the config changed where its key comes from"),
        ({"app_id": "tOther"}, "the config changed where its key comes from"),
        ({"key_source": "transit", "transit_key": "live"}, "no longer configured (or is a transit app now)"),
    ],
)
def test_a_key_whose_source_changed_in_the_config_is_not_used(change, why, caplog) -> None:
    clock = Clock()
    notifier = stashed(clock)
    store, new = keyd(clock, apps(**change), notifier=notifier)
    with caplog.at_level(logging.INFO):
        new.take(notifier.hand_back())
    assert why in caplog.text
    assert notifier.lines[-1][0] == "FDSTOREREMOVE=1"
    store.record_failure("live", "down", "node unreachable")
    new.after_attempt("live")
    with pytest.raises(KeyUnavailable):
        store.signing("live")


def test_a_key_older_than_max_stale_is_refused(caplog) -> None:
    clock = Clock()
    notifier = stashed(clock)
    clock.advance(MAX_STALE)  # 600 s already went by before the stop
    store, new = keyd(clock, notifier=notifier)
    with caplog.at_level(logging.INFO):
        new.take(notifier.hand_back())
    assert "more than refresh.max_stale" in caplog.text
    store.record_failure("live", "down", "node unreachable")
    new.after_attempt("live")
    with pytest.raises(KeyUnavailable):
        store.signing("live")


def test_ages_are_measured_on_the_boot_clock_so_a_wall_clock_step_extends_nothing() -> None:
    clock = Clock()
    notifier = stashed(clock)
    clock.boot += MAX_STALE  # an hour went by ...
    clock.wall -= 7200  # ... while the wall clock was stepped back two hours
    store, new = keyd(clock, notifier=notifier)
    new.take(notifier.hand_back())
    store.record_failure("live", "down", "node unreachable")
    new.after_attempt("live")
    with pytest.raises(KeyUnavailable):
        store.signing("live")


def forged(blob: bytes, *, seal: bool = True, name: str = FDNAME) -> int:
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING)
    os.write(fd, blob)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


def blob_with(clock: Clock, **entry: object) -> bytes:
    header = {
        "app": "live",
        "source": handover.source(apps()["live"]),
        "version": 1,
        "kv_version": 2,
        "fetched": clock.boot,
        "loaded": clock.boot,
        "signing": len(KEY),
        "webhook": None,
    }
    header.update(entry)
    return MAGIC + json.dumps({"apps": [header]}).encode() + b"\n" + KEY.encode()


def refused(clock: Clock, fd: int, caplog: pytest.LogCaptureFixture) -> str:
    notifier = Notifier()
    store, new = keyd(clock, notifier=notifier)
    with caplog.at_level(logging.INFO):
        new.take([fd])
    store.record_failure("live", "down", "node unreachable")
    new.after_attempt("live")
    with pytest.raises(KeyUnavailable):
        store.signing("live")
    assert notifier.lines[-1] == ("FDSTOREREMOVE=1", f"FDNAME={FDNAME}")
    with pytest.raises(OSError):
        os.fstat(fd)  # closed
    return caplog.text


def test_a_fetch_time_in_the_future_is_refused(caplog) -> None:
    clock = Clock()
    text = refused(clock, forged(blob_with(clock, fetched=clock.boot + 3000, loaded=clock.boot)), caplog)
    assert "dated in the future" in text


@pytest.mark.parametrize(
    ("fd_maker", "why"),
    [
        (lambda blob: forged(blob, seal=False), "not sealed against writes"),
        (lambda blob: forged(blob, name="other"), "not keyd's memfd"),
        (lambda blob: forged(blob[:-3]), "key lengths do not match"),
        (lambda blob: forged(blob + b"x"), "key lengths do not match"),
        (lambda blob: forged(b"keyd-keys/2\n{}\n"), "not in the keyd-keys/1 format"),
        (lambda blob: forged(MAGIC + b"{not json\n"), "unreadable header"),
        (lambda blob: forged(MAGIC + b'{"apps": [{"app": "live"}]}\n'), "unreadable header"),
    ],
)
def test_an_fd_that_is_not_keyds_sealed_blob_is_refused_and_dropped(fd_maker, why, caplog) -> None:
    clock = Clock()
    text = refused(clock, fd_maker(blob_with(clock)), caplog)
    assert why in text
    assert KEY not in text


def test_a_regular_file_is_refused(caplog) -> None:
    clock = Clock()
    with tempfile.TemporaryFile() as file:
        file.write(blob_with(clock))
        file.flush()
        text = refused(clock, os.dup(file.fileno()), caplog)
    assert "not keyd's memfd" in text or "not a sealed memfd" in text


def test_nothing_to_hand_over_sends_nothing() -> None:
    clock = Clock()
    notifier = Notifier()
    _, nothing = keyd(clock, notifier=notifier)
    nothing.stash()  # no key loaded
    assert notifier.lines == []


def test_no_key_in_the_logs(caplog) -> None:
    clock = Clock()
    with caplog.at_level(logging.DEBUG):
        notifier = stashed(clock)
        store, new = keyd(clock, notifier=notifier)
        new.take(notifier.hand_back())
        store.record_failure("live", "down", "node unreachable")
        new.after_attempt("live")
    assert "handed the key(s) of app(s) live" in caplog.text
    assert "signing with the key the previous keyd handed over" in caplog.text
    assert KEY not in caplog.text and KEY not in repr(store.signing("live"))


def test_a_refresh_that_ends_during_the_stop_does_not_drop_what_was_stashed() -> None:
    clock = Clock()
    notifier = Notifier()
    store, old = keyd(clock, notifier=notifier)
    loaded(store, clock)
    old.stash()
    signing = SecretKey.from_str(KEY)
    store.record_success(KeySnapshot("live", signing, signing, 7, 2, clock.wall))  # a refresh thread
    old.after_attempt("live")
    assert len(notifier.stored) == 1 and notifier.lines[-1][0] == "FDSTORE=1"


def test_an_app_listed_twice_is_refused(caplog) -> None:
    clock = Clock()
    blob = blob_with(clock)
    header, keys = blob[len(MAGIC) :].split(b"\n", 1)
    doc = json.loads(header)
    doc["apps"] *= 2
    twice = MAGIC + json.dumps(doc).encode() + b"\n" + keys + keys
    assert "app live is in it twice" in refused(clock, forged(twice), caplog)

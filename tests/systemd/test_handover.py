"""Keys across restarts through systemd's fd store, on a Debian 12 booted with systemd as PID 1.

OpenBao runs on the host with persistent storage (it is really stopped and started again, its data
kept); the container shares the network. The tests run in file order: keyd serving, Vault stopped,
`systemctl restart` and a package upgrade under load, the key never in a file, Vault back, forged
fds from other processes, the max_stale bound, a full stop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from tests.conftest import new_key
from tests.resilience.support import PersistentBao
from tests.systemd.conftest import DEB_DIR, keyd_config
from tests.systemd.machine import Machine
from tests.systemd.test_package import CONFIG, SOCKET, health, load, main_pid

pytestmark = pytest.mark.root

KEY = new_key()
PATH = "talkjs/live"  # keyd_config's app "default"

# Run inside the container: a sealed memfd in keyd's format holding the attacker's key, sent to
# systemd's notify socket with FDSTORE=1 FDNAME=keyd-keys (and a MAINPID= claiming to be keyd).
FORGE = r"""
import array, fcntl, json, os, socket, sys, time
key, mainpid = sys.argv[1].encode(), sys.argv[2]
source = ["tTestApp", "secret", 2, "talkjs/live", "secret_key", "talkjs/live", "secret_key"]
now = time.clock_gettime(time.CLOCK_BOOTTIME)
entry = {"app": "default", "source": source, "version": 1, "kv_version": 2, "fetched": now,
         "loaded": now, "signing": len(key), "webhook": None}
blob = b"keyd-keys/1\n" + json.dumps({"apps": [entry]}).encode() + b"\n" + key
fd = os.memfd_create("keyd-keys", os.MFD_ALLOW_SEALING)
os.write(fd, blob)
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
message = f"FDSTORE=1\nFDNAME=keyd-keys\nMAINPID={mainpid}".encode()
try:
    sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())], 0, "/run/systemd/notify")
except OSError as exc:
    print("refused by the kernel:", exc.strerror)
else:
    print("sent", "from-keyd-cgroup" if "keyd.service" in open("/proc/self/cgroup").read() else "from-outside")
"""


@pytest.fixture(scope="module")
def vault() -> Iterator[PersistentBao]:
    """This module's OpenBao (persistent Raft storage: it can be stopped and started again)."""
    bao = PersistentBao()
    try:
        bao.first_start()
        bao.set_up_for_keyd()
        bao.write_key(KEY, PATH)
        yield bao
    finally:
        bao.cleanup()


def stored(box: Machine, pid: int = 1) -> list[str]:
    """The /proc/PID/fd/N of each keyd-keys memfd a process holds (PID 1: systemd's fd store)."""
    return box.run("find", f"/proc/{pid}/fd", "-lname", "/memfd:keyd-keys*").stdout.split()


def stored_in_pid1(box: Machine) -> int:
    return len(stored(box))


def restart(box: Machine, *flags: str) -> None:
    """systemctl restart, after reset-failed: this module restarts keyd more often than the unit's
    StartLimitBurst=5 in 10 minutes allows (every start counts, manual ones too)."""
    box.run("systemctl", "reset-failed", "keyd.service", check=False)
    box.run("systemctl", "restart", *flags, "keyd.service", timeout=95)


def token(box: Machine) -> str:
    done = box.run("keyd", "token", "--user-id", "alice", "--socket", SOCKET, user="webapp")
    return done.stdout.strip()


def signed_with(value: str, key: str) -> bool:
    try:
        jwt.decode(value, key, algorithms=["HS256"], options={"verify_aud": False})
    except jwt.InvalidSignatureError:
        return False
    return True


def journal(box: Machine, since: str) -> str:
    return box.run("journalctl", "-u", "keyd.service", "--since", since, "-o", "cat", "--no-pager").stdout


def now_in(box: Machine) -> str:
    return box.run("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()


@pytest.fixture(scope="module")
def box(machine: Machine, vault: PersistentBao) -> Machine:
    """keyd configured for this module's OpenBao, serving, with its first key read from Vault."""
    root = vault.client()
    role_id = root.auth.approle.read_role_id("keyd")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("keyd")["data"]["secret_id"]
    machine.write(CONFIG, keyd_config(vault))  # type: ignore[arg-type]  # uses only .address
    machine.write("/etc/keyd/role-id", role_id, mode=0o600)
    machine.write("/etc/keyd/secret-id", secret_id, mode=0o600)
    machine.run("systemctl", "enable", "--now", "keyd.socket")
    machine.wait_for("keyd ok", lambda: health(machine)["status"] == "ok", timeout=60)
    return machine


READ_AT: list[float] = []  # when keyd last read the key from Vault (the host shares the clock)


def test_the_unit_lets_only_keyds_main_process_fill_a_one_fd_store(box: Machine) -> None:
    assert box.show("keyd.service", "FileDescriptorStoreMax") == "1"
    assert box.show("keyd.service", "NotifyAccess") == "main"
    assert box.show("keyd.service", "TimeoutStartUSec") == "1min 30s"
    assert stored_in_pid1(box) == 0  # nothing stored while keyd runs
    READ_AT.append(time.time() - health(box)["apps"]["default"]["since_last_refresh"])


def test_restart_with_vault_stopped_serves_the_handed_over_key_without_a_failed_request(
    box: Machine, vault: PersistentBao
) -> None:
    since = now_in(box)
    vault.stop()
    before = main_pid(box)
    with load(box, seconds=8) as counts:
        started = time.monotonic()
        restart(box)
        took = time.monotonic() - started
    assert main_pid(box) not in (0, before)
    assert set(counts) == {"200"} and counts["200"] > 20, counts
    assert took < 15, f"systemctl restart took {took:.1f} s"
    assert box.show("keyd.service", "ActiveState") == "active"
    log = journal(box, since)
    assert "handed the key(s) of app(s) default to systemd's fd store" in log, log
    assert "Vault cannot be reached at start: signing with the key the previous keyd handed over" in log, log
    doc = health(box)
    assert doc["status"] == "degraded"
    # max_stale is measured from the original read, not from this start.
    assert doc["apps"]["default"]["since_last_refresh"] >= time.time() - READ_AT[0] - 2
    assert signed_with(token(box), KEY)
    assert stored_in_pid1(box) == 1  # kept while this keyd depends on it (a crash would need it)


def test_the_key_is_in_no_file_and_only_systemd_and_keyd_hold_the_memfd(box: Machine) -> None:
    search = ["grep", "-rlsF", "--devices=skip", "-e", KEY, "/run", "/var", "/tmp", "/etc", "/dev/shm"]
    found = box.run(*search, check=False)
    assert found.returncode == 1 and found.stdout == "", found.stdout  # 1: no match anywhere
    # The same search finds the key where it is written to a file (the check can fail).
    box.write("/var/tmp/control", f"x {KEY} y")
    assert box.run(*search, check=False).stdout.strip() == "/var/tmp/control"
    box.run("rm", "/var/tmp/control")
    # keyd closed its copy of the fd after reading it; another user cannot open systemd's.
    assert stored(box, main_pid(box)) == []
    [held] = stored(box)
    assert KEY.encode() in box.run("cat", held).stdout.encode()  # the right fd (root may read it)
    for user in ("outsider", "webapp"):
        done = box.run("cat", held, user=user, check=False)
        assert done.returncode != 0 and "Permission denied" in done.stderr, done
    # Sealed: even root, opening it again through /proc, cannot change what the next keyd reads.
    before = box.run("cat", held).stdout
    write = f"import os; os.write(os.open({held!r}, os.O_WRONLY | os.O_APPEND), b'forged')"
    done = box.run("python3", "-c", write, check=False)
    assert done.returncode != 0 and "PermissionError" in done.stderr, done  # EPERM: F_SEAL_WRITE
    assert box.run("cat", held).stdout == before


def test_package_upgrade_with_vault_stopped_keeps_signing(box: Machine, debs: tuple[Path, Path]) -> None:
    _, newer = debs
    since = now_in(box)
    before = main_pid(box)
    with load(box, seconds=12) as counts:
        box.run("dpkg", "-i", f"{DEB_DIR}/{newer.name}", timeout=120)
    assert box.run("dpkg-query", "-W", "-f=${Version}", "keyd").stdout.endswith("-99")
    assert main_pid(box) not in (0, before)
    assert set(counts) == {"200"} and counts["200"] > 20, counts
    log = journal(box, since)
    assert "signing with the key the previous keyd handed over" in log, log
    assert health(box)["apps"]["default"]["since_last_refresh"] >= time.time() - READ_AT[0] - 2
    assert signed_with(token(box), KEY)


def test_once_vault_is_back_keyd_reads_it_and_systemd_drops_the_stored_copy(
    box: Machine, vault: PersistentBao
) -> None:
    vault.start()
    box.wait_for("keyd ok", lambda: health(box)["status"] == "ok", timeout=30)
    box.wait_for("the stored copy dropped", lambda: stored_in_pid1(box) == 0, timeout=10)
    assert not health(box)["apps"]["default"]["stale"]
    # With Vault up a restart reads fresh and drops what it was handed at once.
    since = now_in(box)
    restart(box)
    box.wait_for("keyd ok", lambda: health(box)["status"] == "ok", timeout=30)
    assert stored_in_pid1(box) == 0
    log = journal(box, since)
    assert "used only if Vault cannot be reached now" in log
    assert "signing with the key the previous keyd handed over" not in log


def test_an_fd_sent_by_another_process_never_reaches_the_store(box: Machine, vault: PersistentBao) -> None:
    """NotifyAccess=main: a local user, and even a root process inside keyd.service's cgroup (as
    ExecReload= runs), cannot put a forged keyd-keys memfd (the attacker's key) into the store."""
    attacker = new_key()
    since = now_in(box)
    pid = str(main_pid(box))
    done = box.run("python3", "-c", FORGE, attacker, pid, user="outsider")
    assert done.stdout.strip() == "sent from-outside", done  # the socket is open to all: systemd must decide
    # Into keyd.service's cgroup in every hierarchy the container has (unified or hybrid).
    script = (
        f"moved=0; for line in $(cat /proc/{pid}/cgroup); do path=${{line#*:*:}};"
        " for root in /sys/fs/cgroup /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; do"
        ' if [ -e "$root$path/cgroup.procs" ]; then echo $$ > "$root$path/cgroup.procs" && moved=1; fi;'
        ' done; done; [ $moved = 1 ] && exec python3 -c "$1" "$2" "$3"'
    )
    done = box.run("sh", "-c", script, "forge", FORGE, attacker, pid)
    assert done.stdout.strip() == "sent from-keyd-cgroup", done
    assert stored_in_pid1(box) == 0
    system = box.run("journalctl", "--since", since, "-o", "cat", "--no-pager").stdout
    # The outsider is in no unit; the other is in keyd's but is not its main process.
    assert "Cannot find unit for notify message of PID" in system, system[-3000:]
    assert "but reception only permitted for main PID" in system, system[-3000:]
    assert system.count("Got extra auxiliary fds with notification message, closing them") >= 2
    # The next start with Vault down takes only what keyd itself handed over.
    vault.stop()
    try:
        restart(box)
        value = token(box)
        assert signed_with(value, KEY) and not signed_with(value, attacker)
    finally:
        vault.start()
    box.wait_for("keyd ok", lambda: health(box)["status"] == "ok", timeout=30)


def test_a_key_read_longer_than_max_stale_ago_is_refused_after_a_restart(
    box: Machine, vault: PersistentBao
) -> None:
    """The old keyd (max_stale 1 h) hands over a key read 5 s ago; the new one's config says
    max_stale = 4s: it refuses the key and answers 503 until Vault is back."""
    original = box.path(CONFIG).read_text()
    restart(box)  # Vault up: a fresh read
    box.wait_for("keyd ok", lambda: health(box)["status"] == "ok", timeout=30)
    vault.stop()
    try:
        time.sleep(5)
        box.write(CONFIG, original.replace('retry_max = "1s"', 'retry_max = "1s"\nmax_stale = "4s"'))
        since = now_in(box)
        restart(box, "--no-block")
        box.wait_for(
            "the handover refused", lambda: "more than refresh.max_stale" in journal(box, since), timeout=30
        )
        assert "handed the key(s) of app(s) default" in journal(box, since)
        done = box.run("keyd", "token", "--user-id", "alice", "--socket", SOCKET, user="webapp", check=False)
        assert done.returncode != 0 and "key_unavailable" in done.stderr + done.stdout, done
        assert stored_in_pid1(box) == 0  # nothing usable: dropped at once
    finally:
        box.write(CONFIG, original)
        vault.start()
    restart(box)
    box.wait_for("keyd ok", lambda: health(box)["status"] == "ok", timeout=30)


def test_a_full_stop_empties_the_store_so_the_next_start_needs_vault(box: Machine) -> None:
    since = now_in(box)
    box.run("systemctl", "stop", "keyd.service")
    assert "handed the key(s) of app(s) default" in journal(box, since)
    assert stored_in_pid1(box) == 0  # systemd released its store when the unit went inactive
    box.run("systemctl", "reset-failed", "keyd.service", check=False)
    box.run("systemctl", "start", "keyd.service")
    box.wait_for("keyd ok", lambda: health(box)["status"] == "ok", timeout=30)


def test_apt_remove_under_load_resets_no_connection_and_purge_keeps_the_operators_drop_in(
    box: Machine,
) -> None:
    """Issue 22: `apt remove` under load reset connections (the socket closed on connections queued
    while keyd stopped), and `apt purge` deleted the operator's `systemctl edit` drop-in."""
    override = "/etc/systemd/system/keyd.service.d/override.conf"
    box.write(override, "[Service]\nEnvironment=SITE=operator\n")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "reset-failed", "keyd.service", check=False)
    box.run("systemctl", "restart", "keyd.service")
    with load(box, seconds=8) as counts:
        box.run("apt-get", "remove", "-y", "keyd", timeout=120)
    # Answered, or told at once that there is no socket any more; never a reset or a dropped answer.
    assert counts.get("200", 0) > 20, counts
    assert set(counts) <= {"200", "FileNotFoundError", "ConnectionRefusedError"}, counts
    done = box.run("apt-get", "purge", "-y", "keyd", timeout=120)
    assert box.path(override).read_text() == "[Service]\nEnvironment=SITE=operator\n"
    assert f"keeping your drop-ins in {override.rsplit('/', 1)[0]}" in done.stderr + done.stdout
    assert not box.path("/etc/keyd").exists()

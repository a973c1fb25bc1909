"""keyd's Debian package on a Debian 12 booted with systemd as PID 1, against a real OpenBao.

One container for the module; the tests run in file order, as an operator's day would: install,
`keyd vault setup` with the shipped operator policy, socket activation, callers, reload, restart,
credentials encrypted with systemd-creds, logrotate, upgrade, stop, remove, purge.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from keyd.ops.dev import BaoServer
from tests.conftest import new_key
from tests.systemd.conftest import DEB_DIR, Operator, keyd_config
from tests.systemd.machine import Machine

pytestmark = pytest.mark.root

CONFIG = "/etc/keyd/config.toml"
SOCKET = "/run/keyd/keyd.sock"
LATER_PATH = "talkjs/later"  # the second app's key, stored only once Type=notify has been watched

# Fresh connections, one request each, from 4 threads for a while: a JSON count of outcomes.
LOAD = r"""
import http.client, json, socket, sys, threading, time
path, seconds = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + seconds
counts, lock = {}, threading.Lock()
body = json.dumps({"type": "user", "user_id": "alice"})
def worker():
    while time.monotonic() < deadline:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect(path)
            conn = http.client.HTTPConnection("keyd")
            conn.sock = sock
            conn.request("POST", "/v1/tokens", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = response.read()
            outcome = str(response.status)
            if response.status != 200:
                outcome += " " + json.loads(answer).get("error", {}).get("code", "?")
            conn.close()
        except OSError as exc:
            outcome = type(exc).__name__
        with lock:
            counts[outcome] = counts.get(outcome, 0) + 1
threads = [threading.Thread(target=worker) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(counts))
"""

CONNECT = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    print(exc.errno)
else:
    print("connected")
"""


def config(vault: BaoServer) -> str:
    later = f'\n[apps.later]\napp_id = "tLaterApp"\npath = "{LATER_PATH}"\n'
    text = keyd_config(vault)
    return text.replace("\n[[grant]]", later + "\n[[grant]]", 1)


def health(box: Machine) -> dict[str, Any]:
    done = box.run("keyd", "health", "--socket", SOCKET, user="webapp", check=False)
    assert done.stdout, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def main_pid(box: Machine) -> int:
    return int(box.show("keyd.service", "MainPID"))


def keyd_uid(box: Machine, pid: int) -> int:
    status = box.run("cat", f"/proc/{pid}/status").stdout
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def as_operator(box: Machine, operator: Operator, script: str, key: str) -> subprocess.CompletedProcess[str]:
    """``script`` with VAULT_TOKEN read from standard input (never in argv) and NEW_KEY after it."""
    prologue = "read -r VAULT_TOKEN; read -r NEW_KEY; export VAULT_TOKEN\n"
    return box.run("sh", "-ec", prologue + script, input=f"{operator.token}\n{key}\n", check=False)


@contextmanager
def load(box: Machine, seconds: float) -> Iterator[dict[str, int]]:
    """LOAD running as webapp inside the container; yields its counts once it has finished."""
    counts: dict[str, int] = {}
    proc = subprocess.Popen(
        box.command("python3", "-c", LOAD, SOCKET, str(seconds), user="webapp"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)  # requests are flowing before the caller's action
        yield counts
    finally:
        out, err = proc.communicate(timeout=seconds + 60)
    assert proc.returncode == 0, err
    counts.update(json.loads(out))


# -- the package as installed ----------------------------------------------------------------


def test_installed_package_starts_nothing_and_ships_a_checked_config(machine: Machine) -> None:
    box = machine
    for unit in ("keyd.socket", "keyd.service"):
        assert box.run("systemctl", "is-enabled", unit, check=False).stdout.strip() == "disabled"
        assert box.run("systemctl", "is-active", unit, check=False).stdout.strip() == "inactive"
    assert box.run("keyd", "--version").stdout.startswith("keyd ")
    assert box.run("readlink", "/usr/bin/keyd").stdout.strip() == "/opt/keyd/venv/bin/keyd"
    assert "keyd-clients" in box.run("getent", "group", "keyd-clients").stdout  # sysusers.d
    conffiles = box.run("dpkg-query", "-W", "-f=${Conffiles}", "keyd").stdout
    assert "/etc/keyd/config.toml" in conffiles and "/etc/logrotate.d/keyd" in conffiles
    assert box.path("/var/log/keyd").is_symlink()
    # The shipped config: checked as far as it can be outside systemd, credential files named as
    # "not checked here" (they exist only in $CREDENTIALS_DIRECTORY while keyd runs).
    done = box.run("keyd", "check-config", "-c", CONFIG)
    assert "ok (1 app(s): default)" in done.stdout
    assert "vault.auth.role_id_file: not checked here" in done.stderr
    assert "vault.auth.secret_id_file: not checked here" in done.stderr
    # With the directory LoadCredential= reads from, the files are checked (and missing yet).
    done = box.run("keyd", "check-config", "-c", CONFIG, "--credentials-dir", "/etc/keyd", check=False)
    assert done.returncode == 2 and "file '/etc/keyd/role-id' does not exist" in done.stderr
    # `keyd grants` never needs credential files.
    done = box.run("keyd", "grants", "-c", CONFIG, "--user", "www-data")
    assert "www-data" in done.stdout
    analyze = box.run("systemd-analyze", "verify", "keyd.service", "keyd.socket", check=False)
    assert analyze.returncode == 0, analyze.stderr


def test_vault_setup_with_the_operator_policy_and_the_printed_hint(
    machine: Machine, vault: BaoServer, operator: Operator
) -> None:
    box = machine
    box.write(CONFIG, config(vault))
    done = as_operator(
        box,
        operator,
        f'printf %s "$NEW_KEY" | keyd vault setup -c {CONFIG} --store-key default',
        operator.key,
    )
    assert done.returncode == 0, done.stderr
    assert operator.token not in done.stdout + done.stderr
    assert "role_id -> /etc/keyd/role-id: written (0600)" in done.stdout
    assert "stored (KV v2 version 1)" in done.stdout
    for name in ("role-id", "secret-id"):
        assert box.run("stat", "-c", "%a %U", f"/etc/keyd/{name}").stdout.split() == ["600", "root"]
    stored = vault.client().secrets.kv.v2.read_secret_version(
        path="talkjs/live", mount_point="secret", raise_on_deleted_version=True
    )
    assert stored["data"]["data"]["secret_key"] == operator.key  # no trailing newline
    hint = done.stdout.strip().splitlines()[-1]
    assert hint.startswith("done. Check with: keyd check-config"), hint
    checked = box.sh(hint.removeprefix("done. Check with: "), check=False)
    assert checked.returncode == 0, checked.stderr
    assert "not checked here" not in checked.stderr  # the files were really checked


# -- keyd under systemd ------------------------------------------------------------------------


def test_socket_activation_notify_readiness_and_watchdog(machine: Machine, vault: BaoServer) -> None:
    box = machine
    box.write("/etc/systemd/system/keyd.service.d/test-watchdog.conf", "[Service]\nWatchdogSec=2s\n")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "enable", "--now", "keyd.socket")
    assert box.run("systemctl", "is-active", "keyd.service", check=False).stdout.strip() == "inactive"
    assert box.run("stat", "-c", "%a %U %G", SOCKET).stdout.split() == ["660", "root", "keyd-clients"]
    # The first connection starts keyd. The app "later" has no key yet: keyd answers 503 and
    # systemd keeps it "activating" (no READY=1) until every app's key is loaded.
    doc = health(box)
    assert doc["status"] != "ok"
    time.sleep(1.5)
    assert box.run("systemctl", "is-active", "keyd.service", check=False).stdout.strip() == "activating"
    vault.client().secrets.kv.v2.create_or_update_secret(
        path=LATER_PATH, secret={"secret_key": new_key()}, mount_point="secret"
    )
    box.wait_for(
        "keyd.service active",
        lambda: box.run("systemctl", "is-active", "keyd.service", check=False).stdout.strip() == "active",
    )
    assert health(box)["status"] == "ok"
    # The watchdog (2 s here) is fed: well past it keyd is the same process, never restarted.
    pid = main_pid(box)
    assert box.show("keyd.service", "WatchdogUSec") == "2s"
    time.sleep(7)
    assert main_pid(box) == pid
    assert box.show("keyd.service", "NRestarts") == "0"
    assert box.show("keyd.service", "ActiveState") == "active"


def test_dynamic_user_with_credentials_only_in_its_credentials_directory(machine: Machine) -> None:
    box = machine
    pid = main_pid(box)
    uid = keyd_uid(box, pid)
    assert 61184 <= uid <= 65519, uid  # systemd's DynamicUser= range
    assert f":{uid}:" not in box.path("/etc/passwd").read_text()
    listing = box.run("ls", "/run/credentials/keyd.service").stdout.split()
    assert sorted(listing) == ["role-id", "secret-id"]
    env = box.run("cat", f"/proc/{pid}/environ").stdout.split("\0")
    assert "CREDENTIALS_DIRECTORY=/run/credentials/keyd.service" in env
    # keyd's uid cannot read the files LoadCredential= copied from, nor can another user read the copies.
    as_keyd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    for path in ("/etc/keyd/secret-id", "/etc/keyd/role-id"):
        done = box.run(*as_keyd, "cat", path, check=False)
        assert done.returncode != 0 and "Permission denied" in done.stderr, done
    for user in ("webapp", "outsider"):
        done = box.run("cat", "/run/credentials/keyd.service/secret-id", user=user, check=False)
        assert done.returncode != 0 and "Permission denied" in done.stderr, done


def test_sandbox_as_applied(machine: Machine) -> None:
    box = machine
    done = box.run("systemd-analyze", "security", "--no-pager", "keyd.service")
    exposure = float(re.search(r"Overall exposure level for keyd.service: ([0-9.]+)", done.stdout)[1])  # type: ignore[index]  # asserted by the match
    assert exposure <= 1.5, done.stdout[-2000:]
    pid = main_pid(box)
    uid = keyd_uid(box, pid)
    # In keyd's mount namespace even root cannot write to the system's directories ...
    inside = ["nsenter", f"--target={pid}", "--mount", "--"]
    for directory in ("/etc", "/usr", "/opt/keyd", "/var/lib", "/var/cache", "/srv", "/etc/keyd"):
        done = box.run(*inside, "sh", "-c", f"echo x > {directory}/probe", check=False)
        assert done.returncode != 0 and "Read-only file system" in done.stderr, (directory, done)
    for path in ("/root/probe", "/home/webapp/probe"):
        done = box.run(*inside, "sh", "-c", f"echo x > {path}", check=False)
        assert done.returncode != 0, (path, done)
    # ... and keyd's uid may write to exactly its logs directory and its private /tmp, /var/tmp,
    # /dev/shm: every directory it can write to, found by find -writable in its namespace.
    as_keyd = [*inside, "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    found = box.run(
        *as_keyd,
        "find",
        "/",
        "(",
        "-path",
        "/proc",
        "-o",
        "-path",
        "/sys",
        ")",
        "-prune",
        "-o",
        "-type",
        "d",
        "-writable",
        "-print",
        check=False,
    ).stdout.split()
    private = {"/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue"}
    assert set(found) - private == {"/var/log/private/keyd"}, found
    for path in ("/var/log/keyd/probe", "/tmp/probe", "/var/tmp/probe"):
        box.run(*as_keyd, "sh", "-c", f"echo x > {path} && rm {path}")
    box.run(*inside, "sh", "-c", "echo x > /tmp/private-probe")
    assert not box.path("/tmp/private-probe").exists()  # PrivateTmp=
    # Not dumpable: /proc/<pid>/* belongs to root, not to keyd's uid; no core dumps.
    for name in ("environ", "mem", "maps"):
        assert box.run("stat", "-c", "%u", f"/proc/{pid}/{name}").stdout.strip() == "0"
    limits = box.run("cat", f"/proc/{pid}/limits").stdout
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core


def test_callers_by_unit_group_and_socket_permission(machine: Machine) -> None:
    box = machine
    run = ["systemd-run", "--wait", "--pipe", "--quiet", "--collect"]
    # The README's grant: talkjs-sync.service (a system service) gets an app token ...
    done = box.run(*run, "--unit=talkjs-sync.service", "-p", "User=talksync", "keyd", "token", "--app-token")
    assert done.stdout.strip().count(".") == 2, done
    # ... the same user outside that unit does not (only the group grant's user tokens).
    done = box.run("keyd", "token", "--app-token", "--socket", SOCKET, user="talksync", check=False)
    assert done.returncode != 0 and "forbidden" in done.stderr.lower(), done
    done = box.run("keyd", "token", "--user-id", "alice", "--socket", SOCKET, user="talksync")
    assert done.stdout.strip().count(".") == 2
    # SupplementaryGroups=keyd-clients lets a service (a dynamic user) open the socket ...
    props = ["-p", "DynamicUser=yes", "-p", "SupplementaryGroups=keyd-clients"]
    done = box.run(*run, "--unit=with-group.service", *props, "keyd", "health")
    assert json.loads(done.stdout)["status"] == "ok"
    # ... without keyd-clients nobody connects at all: not a dynamic service, not a plain user.
    done = box.run(*run, "--unit=no-group.service", "-p", "DynamicUser=yes", "keyd", "health", check=False)
    assert done.returncode != 0 and "ermission denied" in done.stderr, done
    assert box.run("python3", "-c", CONNECT, SOCKET, user="outsider").stdout.strip() == "13"  # EACCES
    assert box.run("python3", "-c", CONNECT, SOCKET, user="webapp").stdout.strip() == "connected"


def test_service_with_supplementary_group_matches_the_group_grant(machine: Machine) -> None:
    box = machine
    run = ["systemd-run", "--wait", "--pipe", "--quiet", "--collect"]
    # A service (a dynamic user, in no group file) given keyd-clients by SupplementaryGroups= is
    # matched by the group grant.
    done = box.run(
        *run,
        "--unit=chat-web.service",
        "-p",
        "DynamicUser=yes",
        "-p",
        "SupplementaryGroups=keyd-clients",
        "keyd",
        "token",
        "--user-id",
        "bob",
    )
    assert done.stdout.strip().count(".") == 2, done


def test_reload_rotates_to_the_new_kv_version(machine: Machine, vault: BaoServer, operator: Operator) -> None:
    box = machine
    assert health(box)["apps"]["default"]["key_version"] == 1
    rotated = new_key()
    done = as_operator(
        box, operator, f'printf %s "$NEW_KEY" | keyd vault setup -c {CONFIG} --store-key default', rotated
    )
    assert done.returncode == 0, done.stderr
    assert "stored (KV v2 version 2)" in done.stdout
    stored = vault.client().secrets.kv.v2.read_secret_version(
        path="talkjs/live", mount_point="secret", raise_on_deleted_version=True
    )
    assert stored["data"]["data"]["secret_key"] == rotated
    pid = main_pid(box)
    box.run("systemctl", "reload", "keyd.service")
    box.wait_for("key_version 2", lambda: health(box)["apps"]["default"]["key_version"] == 2, timeout=15)
    assert main_pid(box) == pid


def test_a_reload_with_a_broken_config_fails_systemctl_reload_and_keeps_serving(machine: Machine) -> None:
    """systemctl reload used to return 0 (and keyd status say OK) while the journal said "grants
    not reloaded". Now ExecReload= is `keyd reload`, which waits for keyd's verdict."""
    box = machine
    config = box.path(CONFIG)
    original = config.read_text()
    pid = main_pid(box)
    try:
        config.write_text(original + "\n[[grant]]\nunit = 'not a unit'\ntypes = ['user']\n")
        done = box.run("systemctl", "reload", "keyd.service", check=False)
        assert done.returncode != 0, done.stdout + done.stderr
        journal = box.run("journalctl", "-u", "keyd.service", "-n", "30", "--no-pager").stdout
        assert "keyd reload failed, keeping what it had" in journal and "grant[" in journal, journal
        status = box.run("keyd", "status", "--socket", SOCKET, user="webapp", check=False)
        assert status.returncode == 1 and "last reload" in status.stdout and "FAILED" in status.stdout
        assert health(box)["reload"]["ok"] is False
        assert health(box)["status"] == "ok"  # still signing with what it had
        assert main_pid(box) == pid
    finally:
        config.write_text(original)
    box.run("systemctl", "reload", "keyd.service")  # fixed: succeeds again
    assert health(box)["reload"]["ok"] is True


def test_restart_under_load_fails_no_request(machine: Machine) -> None:
    box = machine
    before = main_pid(box)
    with load(box, seconds=6) as counts:
        box.run("systemctl", "restart", "keyd.service")
    after = main_pid(box)
    assert after != before
    assert set(counts) == {"200"} and counts["200"] > 20, counts


def test_audit_log_journal_and_keyds_own_rotation(machine: Machine) -> None:
    box = machine
    uid = keyd_uid(box, main_pid(box))
    stat = box.run("stat", "-L", "-c", "%a %u", "/var/log/keyd/audit.log").stdout.split()
    assert stat == ["600", str(uid)]
    lines = box.path("/var/log/private/keyd/audit.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert any("talkjs-sync.service" in json.dumps(record) for record in records)
    journal = box.run("journalctl", "-u", "keyd.service", "-o", "cat", "--no-pager").stdout
    assert "ready: every app has a key loaded" in journal
    assert "SIGHUP: refreshing every key now" in journal
    # keyd rotates the audit log itself, by size, under the sandbox (a dynamic uid, LogsDirectory=).
    original = box.path(CONFIG).read_text()
    box.write(CONFIG, original.replace("[audit]\n", '[audit]\nmax_size = "4K"\nkeep = 3\n', 1))
    try:
        box.run("systemctl", "reset-failed", "keyd.service")  # StartLimitBurst=5 counts every start
        box.run("systemctl", "restart", "keyd.service")
        ids = [f"rot{i}" for i in range(80)]
        box.sh(
            "for id in " + " ".join(ids) + "; do keyd token --user-id $id --socket " + SOCKET + " >/dev/null; done",
            user="webapp",
            timeout=120,
        )
        private = "/var/log/private/keyd"

        def last_line_written() -> bool:
            try:
                return any('"sub":"rot79"' in p.read_text() for p in box.path(private).iterdir())
            except FileNotFoundError:  # renamed by a rotation between the listing and the read
                return False

        # Lines are buffered for audit's flush interval (0.2 s) after the answer: wait for the last.
        box.wait_for("the last token's audit line", last_line_written, timeout=10)
        names = sorted(p.name for p in box.path(private).iterdir())
        assert names == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"], names
        uid = keyd_uid(box, main_pid(box))
        for name in names:
            assert box.run("stat", "-c", "%a %u", f"{private}/{name}").stdout.split() == ["600", str(uid)]
        kept = [
            json.loads(line).get("sub")
            for name in ("audit.log.3", "audit.log.2", "audit.log.1", "audit.log")
            for line in box.path(f"{private}/{name}").read_text().splitlines()
        ]
        issued = [sub for sub in kept if sub in ids]
        assert issued == ids[ids.index(issued[0]) :], "one unbroken run of lines up to the last token"
        assert "audit file /var/log/keyd/audit.log rotated at" in box.run(
            "journalctl", "-u", "keyd.service", "-o", "cat", "--no-pager"
        ).stdout
    finally:
        box.write(CONFIG, original)
        box.run("systemctl", "reset-failed", "keyd.service")
        box.run("systemctl", "restart", "keyd.service")
    # The shipped logrotate snippet is all comments (keyd rotates): logrotate reads it and does nothing.
    assert "rotate" in box.path("/etc/logrotate.d/keyd").read_text()
    done = box.run("logrotate", "-v", "-f", "/etc/logrotate.d/keyd")
    assert "rotating" not in done.stdout + done.stderr, done


def test_encrypted_credential_with_systemd_creds(machine: Machine) -> None:
    """docs/deploy.md, section 3, as written there."""
    box = machine
    secret_id = box.path("/etc/keyd/secret-id").read_bytes().strip()
    box.sh(
        "(umask 077; systemd-creds encrypt --name=secret-id /etc/keyd/secret-id /etc/keyd/secret-id.cred)"
        " && chmod 0600 /etc/keyd/secret-id.cred && shred -u /etc/keyd/secret-id"
    )
    check = ("keyd", "check-config", "-c", CONFIG, "--credentials-dir", "/etc/keyd")
    done = box.run(*check)
    assert "encrypted credential /etc/keyd/secret-id.cred (LoadCredentialEncrypted=)" in done.stderr, done
    box.run("chmod", "0644", "/etc/keyd/secret-id.cred")  # what systemd-creds leaves without the chmod
    done = box.run(*check, check=False)
    assert done.returncode == 2 and "chmod 0600 /etc/keyd/secret-id.cred" in done.stderr, done
    box.run("chmod", "0600", "/etc/keyd/secret-id.cred")
    box.write(
        "/etc/systemd/system/keyd.service.d/credentials.conf",
        "[Service]\nLoadCredential=\nLoadCredential=role-id:/etc/keyd/role-id\n"
        "LoadCredentialEncrypted=secret-id:/etc/keyd/secret-id.cred\n",
    )
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "restart", "keyd.service")
    assert not box.path("/etc/keyd/secret-id").exists()
    assert secret_id not in box.path("/etc/keyd/secret-id.cred").read_bytes()
    box.wait_for("keyd active", lambda: box.show("keyd.service", "ActiveState") == "active")
    assert health(box)["status"] == "ok"
    assert sorted(box.run("ls", "/run/credentials/keyd.service").stdout.split()) == ["role-id", "secret-id"]


def test_upgrade_restarts_keyd_without_a_failed_request(machine: Machine, debs: tuple[Path, Path]) -> None:
    box = machine
    _, newer = debs
    before = main_pid(box)
    with load(box, seconds=10) as counts:
        box.run("apt-get", "install", "-y", f"{DEB_DIR}/{newer.name}", timeout=120)
    assert box.run("dpkg-query", "-W", "-f=${Version}", "keyd").stdout.endswith("-99")
    assert main_pid(box) not in (0, before)
    assert set(counts) == {"200"} and counts["200"] > 20, counts
    assert box.show("keyd.service", "ActiveState") == "active"


def test_stop_leaves_no_process(machine: Machine) -> None:
    box = machine
    uid = keyd_uid(box, main_pid(box))
    box.run("systemctl", "stop", "keyd.socket", "keyd.service")
    assert box.show("keyd.service", "ActiveState") == "inactive"
    owners = box.sh("for d in /proc/[0-9]*; do stat -c %u $d 2>/dev/null; done").stdout.split()
    assert str(uid) not in owners
    cmdlines = box.sh("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '", check=False).stdout
    assert "keyd run" not in cmdlines
    assert not box.path(SOCKET).exists()


def test_remove_keeps_etc_keyd_and_purge_removes_it(machine: Machine) -> None:
    box = machine
    box.run("apt-get", "remove", "-y", "keyd", timeout=120)
    assert box.path(CONFIG).exists() and box.path("/etc/keyd/role-id").exists()
    for gone in ("/usr/bin/keyd", "/opt/keyd", "/lib/systemd/system/keyd.service"):
        assert not box.path(gone).exists() and not box.path(gone).is_symlink(), gone
    assert box.run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "keyd").stdout.strip() == "rc"
    box.run("apt-get", "purge", "-y", "keyd", timeout=120)
    assert not box.path("/etc/keyd").exists()
    # The operator's drop-ins (written earlier in this module) are theirs: purge keeps them.
    dropins = box.path("/etc/systemd/system/keyd.service.d")
    assert sorted(p.name for p in dropins.iterdir()) == ["credentials.conf", "test-watchdog.conf"]
    assert not box.path("/var/log/keyd").is_symlink() and not box.path("/var/log/private/keyd").exists()

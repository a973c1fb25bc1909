"""keyd under systemd's protocols, without systemd as PID 1 (this machine has none).

- sd_notify through a test-owned NOTIFY_SOCKET: READY only after the keys load, STATUS lines,
  WATCHDOG pings at the configured rate, RELOADING/READY around SIGHUP, STOPPING on SIGTERM.
- Socket activation through `systemd-socket-activate`, with keyd.socket's mode and group.
- The unit files: `systemd-analyze verify`, the security exposure score, and keyd running under
  the kernel-level equivalents of the unit's sandbox (seccomp allow list of SystemCallFilter=,
  RestrictAddressFamilies=, MemoryDenyWriteExecute= via PR_SET_MDWE, NoNewPrivileges=,
  CapabilityBoundingSet=, an unprivileged user, UMask=0077).
"""

from __future__ import annotations

import ctypes
import grp
import itertools
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from keyd.ops.dev import BaoServer
from tests import portable
from tests.conftest import base_config, new_key
from tests.helpers import ROOT, KeydProcess, wait_until

UNITS = ROOT / "deploy" / "systemd"
SERVICE = UNITS / "keyd.service"
SOCKET = UNITS / "keyd.socket"


# -- a test-owned NOTIFY_SOCKET ---------------------------------------------------------------------


class NotifyListener:
    """A datagram socket standing in for systemd's notify socket; records (time, sender pid, text)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        creds = struct.Struct("3i")
        while not self._stop.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds.size))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = creds.unpack(payload[: creds.size])[0]
            self.messages.append((time.monotonic(), pid, data.decode()))

    def lines(self) -> list[str]:
        return [line for _, _, text in self.messages for line in text.split("\n")]

    def times_of(self, line: str) -> list[float]:
        return [at for at, _, text in self.messages if line in text.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify(short_dir: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(short_dir / "notify.sock")
    try:
        yield listener
    finally:
        listener.close()


def test_sd_notify_ready_only_after_keys_load_then_watchdog_reload_and_stop(
    bao, root, short_dir, keyd_factory, notify
):
    path = "talkjs/notify-" + os.urandom(4).hex()  # nothing stored yet: keyd cannot load a key
    env = {
        "VAULT_TOKEN": root.auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"],
        "NOTIFY_SOCKET": notify.path,
        "WATCHDOG_USEC": "1000000",  # WatchdogSec=1s: keyd pings every 0.5 s
    }
    keyd = keyd_factory(base_config(bao, short_dir, path), env=env, wait_ready=False)
    wait_until(lambda: "STATUS=waiting for Vault" in notify.lines(), what="STATUS=waiting for Vault")
    wait_until(lambda: "app default: key refresh failed" in keyd.logs(), what="a failed key read")
    keyd.wait_health(503)
    assert "READY=1" not in notify.lines(), "READY before any key was loaded"

    key = new_key()
    stored_at = time.monotonic()
    root.secrets.kv.v2.create_or_update_secret(path=path, secret={"secret_key": key}, mount_point="secret")
    wait_until(lambda: notify.times_of("READY=1"), timeout=15, what="READY=1")
    assert notify.times_of("READY=1")[0] > stored_at
    ready_message = next(text for _, _, text in notify.messages if "READY=1" in text.split("\n"))
    assert "STATUS=serving 1 app(s), keys 0 s old" in ready_message.split("\n")
    status, doc = keyd.http().post_json("/v1/tokens", {"user_id": "alice"})
    assert status == 200 and jwt.decode(doc["token"], key, algorithms=["HS256"])["sub"] == "alice"

    # Watchdog: pings keep coming at about half of WATCHDOG_USEC, never near the 1 s deadline.
    wait_until(lambda: len(notify.times_of("WATCHDOG=1")) >= 5, timeout=10, what="5 watchdog pings")
    pings = notify.times_of("WATCHDOG=1")
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert all(0.3 < gap < 0.95 for gap in gaps), gaps

    # Reload: RELOADING=1 with MONOTONIC_USEC, then READY=1 once the keys were re-read.
    before = len(notify.messages)
    keyd.signal(signal.SIGHUP)
    wait_until(
        lambda: "READY=1" in [m for *_, t in notify.messages[before:] for m in t.split("\n")], what="READY"
    )
    after = [t for *_, t in notify.messages[before:]]
    reloading = next(i for i, t in enumerate(after) if "RELOADING=1" in t.split("\n"))
    ready = next(i for i, t in enumerate(after) if "READY=1" in t.split("\n"))
    assert reloading < ready
    usec = re.search(r"MONOTONIC_USEC=(\d+)", after[reloading])
    assert usec and abs(int(usec.group(1)) / 1e6 - time.monotonic()) < 30  # CLOCK_MONOTONIC, in µs

    # Stop: STOPPING=1, then a clean exit.
    keyd.signal(signal.SIGTERM)
    assert keyd.process is not None and keyd.process.wait(15) == 0
    wait_until(lambda: "STOPPING=1" in notify.lines(), what="STOPPING=1")
    assert notify.lines().index("STOPPING=1") > notify.lines().index("READY=1")
    # NotifyAccess=main: every message came from keyd's main process itself.
    assert {pid for _, pid, _ in notify.messages} == {keyd.pid}
    # STATUS lines only ever say what keyd is doing, in the documented words.
    statuses = {line for line in notify.lines() if line.startswith("STATUS=")}
    assert all(
        re.fullmatch(
            r"STATUS=(starting|waiting for Vault|stopping|serving 1 app\(s\), keys \d+ s old"
            r"|waiting for Vault: no key yet for app default \(secret not found at secret/talkjs/notify-\w+\)"
            r"|reloading: re-reading every app's key)",
            s,
        )
        for s in statuses
    ), statuses


def test_watchdog_meant_for_another_pid_is_not_pinged(
    bao, secret_path, short_dir, keyd_factory, root, notify
):
    env = {
        "VAULT_TOKEN": root.auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"],
        "NOTIFY_SOCKET": notify.path,
        "WATCHDOG_USEC": "200000",
        "WATCHDOG_PID": "1",
    }
    keyd_factory(base_config(bao, short_dir, secret_path[0]), env=env)
    wait_until(lambda: "READY=1" in notify.lines(), what="READY=1")
    time.sleep(0.5)  # five watchdog periods
    assert "WATCHDOG=1" not in notify.lines()


# -- socket activation --------------------------------------------------------------------------------


def _client_group() -> grp.struct_group | None:
    for name in ("keyd-clients", "nogroup", "daemon"):
        try:
            return grp.getgrnam(name)
        except KeyError:
            continue
    return None


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate is not installed"
)
def test_socket_activation_serves_on_the_inherited_socket_and_leaves_it_alone(
    bao, root, secret_path, short_dir
):
    path, key = secret_path
    sock_path = short_dir / "keyd.sock"
    config = base_config(bao, short_dir, path)
    token = root.auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
    # systemd-socket-activate starts the child with an empty environment except what -E passes.
    prefix = (
        "systemd-socket-activate",
        "-l",
        str(sock_path),
        "-E",
        "VAULT_TOKEN",
        "-E",
        "PYTHONUNBUFFERED",
        "--",
    )
    keyd = KeydProcess(short_dir, config, {"VAULT_TOKEN": token}, prefix=prefix)
    keyd.write_config()
    keyd_started = False
    try:
        keyd.start(wait_ready=False)
        keyd_started = True
        # What keyd.socket's SocketMode=0660 / SocketGroup=keyd-clients make systemd do (the test
        # tool does not): set them on the listening socket's path.
        group = _client_group()
        os.chmod(sock_path, 0o660)
        if group is not None:
            os.chown(sock_path, -1, group.gr_gid)
        before = os.stat(sock_path)
        keyd.wait_health(200)
        status, doc = keyd.http().post_json("/v1/tokens", {"user_id": "carol"})
        assert status == 200 and jwt.decode(doc["token"], key, algorithms=["HS256"])["sub"] == "carol"
        logs = keyd.logs()
        assert "Communication attempt on fd 3" in logs  # systemd-socket-activate handed over fd 3
        after = os.stat(sock_path)
        assert (after.st_ino, stat.S_IMODE(after.st_mode), after.st_gid) == (
            before.st_ino,
            0o660,
            before.st_gid,
        ), "keyd must serve on the inherited socket, not bind its own"
        assert not [p for p in short_dir.iterdir() if p.name.endswith(".tmp")]
        # The exec'd keyd has the pid systemd-socket-activate had (LISTEN_PID matched).
        assert keyd.process is not None
        assert (Path(f"/proc/{keyd.pid}/cmdline").read_bytes().split(b"\0")[1:3]) == [b"-m", b"keyd"]
    finally:
        code = keyd.stop() if keyd_started else None
    assert code == 0
    # The socket belongs to systemd (RemoveOnStop= in keyd.socket): keyd leaves the path in place.
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)


# -- the unit files --------------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """[Section] -> [(key, value)], keeping repeated keys (LoadCredential=, SystemCallFilter=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit[section] if k == key]


def test_units_set_what_the_deployment_relies_on():
    service = parse_unit(SERVICE)
    one = dict(service["Service"])
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecStart"].endswith(" run -c /etc/keyd/config.toml")
    assert one["ExecReload"] == "+/usr/bin/keyd reload --pid $MAINPID --socket /run/keyd/keyd.sock"
    assert one["TimeoutStartSec"] == "90s"
    unit = dict(service["Unit"])
    assert unit["StartLimitIntervalSec"] and int(unit["StartLimitBurst"]) > 0
    assert one["WatchdogSec"] and one["DynamicUser"] == "yes"
    assert one["UMask"] == "0077" and one["LimitCORE"] == "0"
    # DynamicUser= chowns a RuntimeDirectory= recursively at start: /run/keyd, the socket's, stays root's.
    assert "RuntimeDirectory" not in one
    assert one["MemoryDenyWriteExecute"] == "yes" and one["NoNewPrivileges"] == "yes"
    assert one["CapabilityBoundingSet"] == ""
    assert "secret-id:/etc/keyd/secret-id" in values(service, "Service", "LoadCredential")
    # Nothing secret in the unit or its environment; no option that would break keyd (see docs).
    assert not values(service, "Service", "Environment") and not values(service, "Service", "EnvironmentFile")
    for forbidden in ("PrivateUsers", "ProtectProc", "PrivateNetwork"):
        assert forbidden not in one, f"{forbidden}= breaks caller identification or Vault access"
    sock = dict(parse_unit(SOCKET)["Socket"])
    assert sock["ListenStream"] == "/run/keyd/keyd.sock"
    assert (sock["SocketMode"], sock["SocketGroup"]) == ("0660", "keyd-clients")


def test_every_service_option_is_explained_in_deploy_md():
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for section in ("Service", "Socket"):
        unit = parse_unit(SERVICE if section == "Service" else SOCKET)
        for key in {k for k, _ in unit[section]}:
            assert f"`{key}=" in doc, f"docs/deploy.md does not explain {key}="


def _analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd
    )


def test_systemd_analyze_verify_accepts_both_units(tmp_path):
    # verify checks that ExecStart's binary exists: point it at this checkout's keyd.
    keyd_bin = Path(sys.executable).parent / "keyd"
    for unit in (SERVICE, SOCKET):
        text = (
            unit.read_text()
            .replace("ExecStart=/usr/bin/keyd ", f"ExecStart={keyd_bin} ")
            .replace("ExecReload=+/usr/bin/keyd ", f"ExecReload=+{keyd_bin} ")
        )
        (tmp_path / unit.name).write_text(text)
    result = _analyze("verify", str(tmp_path / "keyd.socket"), str(tmp_path / "keyd.service"), cwd=tmp_path)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "keyd." in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
    # And it does complain about a broken copy, so the check above can fail.
    (tmp_path / "keyd.service").write_text(text.replace("Type=notify", "Type=notfy"))
    broken = _analyze("verify", str(tmp_path / "keyd.service"), cwd=tmp_path)
    assert "keyd.service" in broken.stdout + broken.stderr


def test_security_exposure_is_at_most_1_5(tmp_path):
    shutil.copy(SERVICE, tmp_path / "keyd.service")
    result = _analyze("security", "--offline=true", "--no-pager", "keyd.service", cwd=tmp_path)
    if "--offline" in result.stderr and result.returncode != 0:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    match = re.search(r"Overall exposure level for keyd\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 1.5, result.stdout


# -- keyd under the unit's sandbox, enforced by the kernel --------------------------------------------

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def syscall_groups() -> dict[str, list[str]]:
    """systemd's own syscall groups, as `systemd-analyze syscall-filter` lists them."""
    out = _analyze("syscall-filter", "--no-pager").stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = []
        elif current and line.strip() and not line.strip().startswith("#") and line.startswith(" "):
            groups[current].append(line.strip())
        elif not line.strip():
            current = None
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    result: set[str] = set()
    for name in names:
        result |= expand(groups[name], groups) if name.startswith("@") else {name}
    return result


def allowed_syscalls() -> set[str]:
    """The effective allow list of the unit's SystemCallFilter= lines (a ~deny list subtracts)."""
    groups = syscall_groups()
    allowed: set[str] = set()
    for line in values(parse_unit(SERVICE), "Service", "SystemCallFilter"):
        if line.startswith("~"):
            allowed -= expand(line[1:].split(), groups)
        else:
            allowed |= expand(line.split(), groups)
    return allowed


def address_families() -> list[int]:
    families = values(parse_unit(SERVICE), "Service", "RestrictAddressFamilies")[0].split()
    return [int(getattr(socket, name)) for name in families]


# Runs in the child before keyd is imported: what systemd would set up before exec'ing keyd.
SANDBOX = r"""
import ctypes, mmap, os, socket, sys
allowed, families, uid, gid = sys.argv[1].split(","), [int(f) for f in sys.argv[2].split(",")], int(sys.argv[3]), int(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
os.umask(0o077)                                          # UMask=0077
for cap in range(64):                                    # CapabilityBoundingSet=
    libc.prctl(24, cap, 0, 0, 0)
if uid:                                                  # DynamicUser=yes: an unprivileged user
    os.setgroups([]); os.setgid(gid); os.setuid(uid)
assert libc.prctl(38, 1, 0, 0, 0) == 0                   # NoNewPrivileges=yes
assert libc.prctl(65, 1, 0, 0, 0) == 0                   # MemoryDenyWriteExecute=yes
seccomp = ctypes.CDLL("libseccomp.so.2")
seccomp.seccomp_init.restype = ctypes.c_void_p
seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
seccomp.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1                # SystemCallErrorNumber=EPERM
ctx = seccomp.seccomp_init(EPERM)
for name in allowed:
    nr = seccomp.seccomp_syscall_resolve_name(name.encode())
    if nr >= 0 and name != "socket":
        assert seccomp.seccomp_rule_add_array(ctx, ALLOW, nr, 0, None) == 0, name
nr = seccomp.seccomp_syscall_resolve_name(b"socket")
for family in families:                                  # RestrictAddressFamilies=
    cmp = Cmp(0, 4, family, 0)                           # arg0 == family
    assert seccomp.seccomp_rule_add_array(ctx, ALLOW, nr, 1, ctypes.byref(cmp)) == 0
assert seccomp.seccomp_load(ctx) == 0
try:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)
except PermissionError:
    pass
else:
    raise SystemExit("sandbox: AF_NETLINK was not refused")
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    print("sandbox: seccomp, MDWE, no-new-privs and an empty capability set in force", flush=True)
else:
    raise SystemExit("sandbox: W+X memory was not refused")
# exec keyd: seccomp, no-new-privs and MDWE carry over; root's capabilities do not (the bounding
# set is empty), so even as uid 0 keyd runs with no capability at all.
os.execv(sys.executable, [sys.executable, "-m", "keyd", *sys.argv[5:]])
"""


def _mdwe_supported() -> bool:
    # Probe in a child: once set, MDWE cannot be cleared in this process.
    probe = "import ctypes,sys; sys.exit(0 if ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) == 0 else 1)"
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


def test_keyd_runs_under_the_units_sandbox_enforced_by_the_kernel():
    """The unit's SystemCallFilter=, RestrictAddressFamilies=, MemoryDenyWriteExecute=,
    NoNewPrivileges=, CapabilityBoundingSet= and UMask= as the kernel enforces them (seccomp via
    libseccomp, PR_SET_MDWE), around a whole keyd life: TLS-free Vault login, key load, signing,
    SIGHUP reload, SIGTERM shutdown. As root it also runs as an unprivileged user, like DynamicUser=."""
    try:
        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        pytest.skip("libseccomp.so.2 is not installed (apt-get install libseccomp2)")
    if not _mdwe_supported():
        pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3); MemoryDenyWriteExecute= untested here")
    allowed = allowed_syscalls()
    assert "setrlimit" not in allowed and "chown" not in allowed and "read" in allowed
    # A private Vault: the sandboxed child needs a fresh, fully owned server address and token.
    with BaoServer() as vault:
        client = vault.client()
        key = new_key()
        client.secrets.kv.v2.create_or_update_secret(path="talkjs/sandbox", secret={"secret_key": key})
        # Like RuntimeDirectory=keyd: a directory the (unprivileged) service user owns.
        run_dir = Path("/tmp") / f"kd-sbx-{os.getpid()}"
        run_dir.mkdir(mode=0o755)
        uid = gid = 0
        env: dict[str, str] = {}
        python = sys.executable
        if os.geteuid() == 0:
            uid = gid = 65534  # nobody/nogroup, as DynamicUser= would allocate some unused uid
            os.chown(run_dir, uid, gid)
            # The checkout may be unreadable to nobody (a clone under /root or in mktemp -d).
            shared = portable.for_other_users()
            python = shared.python(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
            env["PYTHONPATH"] = shared.pythonpath
        try:
            config = base_config(vault, run_dir, "talkjs/sandbox")
            token = client.auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
            args = (
                "-c",
                SANDBOX,
                ",".join(sorted(allowed)),
                ",".join(map(str, address_families())),
                str(uid),
                str(gid),
            )
            keyd = KeydProcess(run_dir, config, {"VAULT_TOKEN": token, **env}, python_args=args)
            keyd.python = python
            try:
                keyd.start()
                assert (
                    "sandbox: seccomp, MDWE, no-new-privs and an empty capability set in force" in keyd.logs()
                )
                status_lines = dict(
                    line.split(":\t", 1) for line in Path(f"/proc/{keyd.pid}/status").read_text().splitlines()
                )
                assert status_lines["Seccomp"].strip() == "2" and status_lines["NoNewPrivs"].strip() == "1"
                assert int(status_lines["CapEff"], 16) == 0 and int(status_lines["CapBnd"], 16) == 0
                status, doc = keyd.http().post_json("/v1/tokens", {"user_id": "dave"})
                assert status == 200, doc
                assert jwt.decode(doc["token"], key, algorithms=["HS256"])["sub"] == "dave"
                status, doc = keyd.http().post_json("/v1/tokens", {"type": "app"})  # a refusal path too
                assert status == 403, doc
                stat_result = os.stat(config["server"]["socket"])
                assert stat_result.st_uid == uid
                client.secrets.kv.v2.create_or_update_secret(
                    path="talkjs/sandbox", secret={"secret_key": new_key()}
                )
                keyd.signal(signal.SIGHUP)
                keyd.wait_health(200, field="status", value="ok")
                wait_until(
                    lambda: "rotated from version 1 to 2" in keyd.logs(), what="reload under the sandbox"
                )
            finally:
                code = keyd.stop()
            logs = keyd.logs()
            assert code == 0, logs
            for bad in ("Operation not permitted", "PermissionError", "Traceback", "Bad system call"):
                assert bad not in logs, logs
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)


def test_sandbox_filter_really_blocks_what_the_unit_denies():
    """The check above can fail: under the same filter, a denied syscall (setrlimit, @resources)
    and a W+X mapping are refused."""
    try:
        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        pytest.skip("libseccomp.so.2 is not installed")
    if not _mdwe_supported():
        pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3)")
    allowed = allowed_syscalls()
    probe = SANDBOX.split("# exec keyd:", 1)[0] + (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print('setpriority', libc.setpriority(0, 0, 5), ctypes.get_errno(), flush=True)\n"
        # What keyd gets after the wrapper's exec: MDWE is still in force.
        "child = 'import mmap\\ntry:\\n mmap.mmap(-1, 4096, prot=7)\\nexcept PermissionError: print(\"W+X refused after exec\")'\n"
        "os.execv(sys.executable, [sys.executable, '-c', child])\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            ",".join(sorted(allowed)),
            ",".join(map(str, address_families())),
            "0",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "in force" in result.stdout
    assert "setpriority -1 1" in result.stdout  # EPERM from the filter (setpriority is in @resources)
    assert "W+X refused after exec" in result.stdout

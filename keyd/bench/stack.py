"""A self-contained stack for a run without ``--socket``: an OpenBao dev server with a random demo
key, keyd on it, and the reference server; all children of the bench, all stopped by ``close``.
The key and every token stay in memory; nothing secret is printed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from keyd import http1
from keyd.bench.options import BenchError
from keyd.bench.workload import APP_ID


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, group: bool = False) -> float:
    """User + system CPU time of ``pid`` (every thread of it) so far, from /proc/PID/stat; with
    ``group``, of every process in its process group (a server started in its own session, such as
    OpenBao, with whatever it spawned). 0.0 for a process that is gone."""
    total = 0
    for path in _group_stats(pid) if group else [f"/proc/{pid}/stat"]:
        try:
            with open(path, encoding="ascii", errors="replace") as handle:
                fields = handle.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return total / _TICKS


def _group_stats(pgid: int) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                    if int(handle.read().rpartition(")")[2].split()[2]) == pgid:  # field 5: pgrp
                        found.append(f"/proc/{entry}/stat")
            except (OSError, ValueError, IndexError):
                continue
    return found


class CpuMeter:
    """CPU seconds each part of a run used between ``start`` and ``stop``: parts are names for a
    pid (with whether to count its whole process group). With ``metrics_socket`` (a transit keyd's
    socket), also the Transit calls keyd made meanwhile and the inputs they carried, from its
    ``keyd_transit_batch_size`` histogram."""

    def __init__(self, parts: dict[str, tuple[int, bool]], metrics_socket: str = "") -> None:
        self.parts = parts
        self.metrics_socket = metrics_socket
        self._before: dict[str, float] = {}
        self._batches_before = (0.0, 0.0)
        self.calls = 0  # after stop: Transit calls during the run, and their inputs
        self.inputs = 0

    def _now(self) -> dict[str, float]:
        return {name: cpu_seconds(pid, group) for name, (pid, group) in self.parts.items()}

    def start(self) -> None:
        self._batches_before = transit_batches(self.metrics_socket) if self.metrics_socket else (0.0, 0.0)
        self._before = self._now()

    def stop(self) -> dict[str, float]:
        used = {name: used - self._before.get(name, 0.0) for name, used in self._now().items()}
        if self.metrics_socket:
            count, total = transit_batches(self.metrics_socket)
            self.calls = int(count - self._batches_before[0])
            self.inputs = int(total - self._batches_before[1])
        return used


_METRICS = http1.encode_request("GET", "/metrics", {"Connection": "close"})


def transit_batches(path: str) -> tuple[float, float]:
    """(calls, inputs) so far from keyd's ``keyd_transit_batch_size`` histogram on its socket."""
    chunks = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(path)
        sock.sendall(_METRICS)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    found = {}
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        name, _, value = line.partition(" ")
        if name in ("keyd_transit_batch_size_count", "keyd_transit_batch_size_sum"):
            found[name] = float(value)
    if len(found) != 2:
        raise BenchError(f"keyd on {path} serves no keyd_transit_batch_size histogram")
    return found["keyd_transit_batch_size_count"], found["keyd_transit_batch_size_sum"]


_HEALTH = http1.encode_request("GET", "/v1/health", {"Connection": "close"})


def health_status(path: str) -> int:
    """Status code of GET /v1/health on a Unix socket, 0 when nobody answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(path)
            sock.sendall(_HEALTH)
            head = sock.recv(64)
        return http1.parse_response_head(head.partition(b"\r\n")[0]).status
    except (OSError, http1.MalformedResponse):
        return 0


_KEYD_CONFIG = """\
[server]
socket = {socket}
socket_mode = "0600"

[vault]
address = {address}
timeout = "5s"

[vault.auth]
method = "token"

[refresh]
interval = "5m"
max_stale = "1h"

[log]
level = "warning"

[apps.default]
app_id = "{app_id}"
{source}

[[grant]]
uid = {uid}
types = ["user", "app"]
"""


class Stack:
    """The processes a self-contained run needs, all children of the bench, all stopped by close."""

    PATH = "talkjs/bench"

    def __init__(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="kb-", dir="/tmp")  # short: socket paths <= 107 bytes
        self.bao: Any = None
        self.key = b""
        self.keyd: subprocess.Popen[bytes] | None = None
        self.keyd_transit: subprocess.Popen[bytes] | None = None  # the same keyd, in transit mode
        self.keyd_transit_socket = os.path.join(self.workdir, "keyd-transit.sock")
        self.delay_proxy: subprocess.Popen[bytes] | None = None
        self.reference: subprocess.Popen[bytes] | None = None
        self.keyd_socket = os.path.join(self.workdir, "keyd.sock")
        self.reference_socket = os.path.join(self.workdir, "ref.sock")
        self.config_path = os.path.join(self.workdir, "keyd.toml")

    def start_vault(self) -> None:
        from keyd.ops.dev import BaoServer, demo_key  # noqa: PLC0415 - needs the dev extra

        self.bao = BaoServer().start()
        key = demo_key()
        self.key = key.encode()
        self.bao.client().secrets.kv.v2.create_or_update_secret(
            path=self.PATH, secret={"secret_key": key}, mount_point="secret"
        )
        with open(self.config_path, "w", encoding="utf-8") as handle:
            handle.write(
                _KEYD_CONFIG.format(
                    socket=json.dumps(self.keyd_socket),
                    address=json.dumps(self.bao.address),
                    app_id=APP_ID,
                    source=f"path = {json.dumps(self.PATH)}",
                    uid=os.getuid(),
                )
            )

    def start_keyd(self, timeout: float = 20.0) -> tuple[float, float]:
        """Start keyd and wait until it can sign: (seconds to listening, seconds to ready)."""
        self.keyd, listening, ready = self._launch(self.config_path, self.keyd_socket, timeout)
        return listening, ready

    def start_keyd_transit(self, mount: str, key: str, timeout: float = 20.0, delay: float = 0.0) -> None:
        """A second keyd on the same OpenBao whose app signs with the Transit key ``mount/key``;
        with ``delay``, it reaches OpenBao through keyd.bench.delay (that much added each way)."""
        self.stop_keyd_transit()
        address = self.bao.address
        if delay:
            address = self._start_delay(delay)
        path = os.path.join(self.workdir, "keyd-transit.toml")
        source = f'key_source = "transit"\ntransit_mount = {json.dumps(mount)}\ntransit_key = {json.dumps(key)}'
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(
                _KEYD_CONFIG.format(
                    socket=json.dumps(self.keyd_transit_socket),
                    address=json.dumps(address),
                    app_id=APP_ID,
                    source=source,
                    uid=os.getuid(),
                )
            )
        self.keyd_transit, _, _ = self._launch(path, self.keyd_transit_socket, timeout)

    def _launch(self, config: str, sock: str, timeout: float) -> tuple[subprocess.Popen[bytes], float, float]:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")}
        env["VAULT_TOKEN"] = self.bao.root_token  # a throwaway dev server's token, read once by keyd
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        log = open(os.path.join(self.workdir, "keyd.log"), "ab")  # noqa: SIM115 - owned by the child
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "keyd", "run", "-c", config],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
        )
        log.close()
        listening = 0.0
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if process.poll() is not None:
                raise BenchError(f"keyd exited with {process.returncode}:\n{self._keyd_log_tail()}")
            status = health_status(sock)
            if status and not listening:
                listening = time.perf_counter() - started
            if status == 200:
                return process, listening, time.perf_counter() - started
            time.sleep(0.002)
        _stop(process)
        raise BenchError(f"keyd was not ready within {timeout:.0f}s:\n{self._keyd_log_tail()}")

    def _keyd_log_tail(self, lines: int = 15) -> str:
        """The end of keyd's log, for an error message: the work directory is removed on exit."""
        try:
            with open(os.path.join(self.workdir, "keyd.log"), encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:]).rstrip() or "(keyd wrote nothing)"
        except OSError:
            return "(no keyd log)"

    def stop_keyd_transit(self) -> None:
        _stop(self.keyd_transit)
        self.keyd_transit = None
        _stop(self.delay_proxy)
        self.delay_proxy = None

    def _start_delay(self, delay: float) -> str:
        """keyd.bench.delay in front of OpenBao; its address."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        target = urlsplit(self.bao.address).port
        self.delay_proxy = subprocess.Popen(
            [sys.executable, "-m", "keyd.bench.delay", str(port), str(target), repr(delay)],
            stdout=subprocess.PIPE,
            cwd=self.workdir,
        )
        assert self.delay_proxy.stdout is not None  # noqa: S101 - stdout=PIPE just above
        if self.delay_proxy.stdout.readline().strip() != b"ready":
            raise BenchError("the delay proxy did not start")
        return f"http://127.0.0.1:{port}"

    def meter(self, target: str) -> CpuMeter | None:
        """The CPU meter of a run against ``target``: the load generator (this process), the keyd or
        reference server it drives and, where a target uses it, OpenBao. None for a target this
        stack did not start (``--socket``)."""
        server = {
            "keyd": self.keyd,
            "reference": self.reference,
            "keyd-transit": self.keyd_transit,
            "keyd-transit-1ms": self.keyd_transit,
        }.get(target)
        parts: dict[str, tuple[int, bool]] = {"client": (os.getpid(), False)}
        if server is not None:
            parts["keyd" if target.startswith("keyd") else target] = (server.pid, False)
        elif target != "transit":
            return None
        if target.startswith(("keyd", "transit")) and self.bao is not None and self.bao.process is not None:
            parts["vault"] = (self.bao.process.pid, True)  # keyd's refreshes, or the Transit calls
        if self.delay_proxy is not None and target == "keyd-transit-1ms":
            parts["delay"] = (self.delay_proxy.pid, False)
        return CpuMeter(parts, self.keyd_transit_socket if target.startswith("keyd-transit") else "")

    def stop_keyd(self) -> None:
        _stop(self.keyd)
        self.keyd = None

    def start_reference(self, timeout: float = 10.0) -> None:
        self.reference = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from keyd.bench.reference import serve_reference; serve_reference({self.reference_socket!r})",
            ],
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
                sock.connect(self.reference_socket)
                return
            if self.reference.poll() is not None:
                break
            time.sleep(0.02)
        raise BenchError("the reference server did not start")

    def close(self) -> None:
        _stop(self.reference)
        _stop(self.keyd)
        self.stop_keyd_transit()  # and its delay proxy
        if self.bao is not None:
            self.bao.cleanup()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def stack() -> Iterator[Stack]:
    """A Stack that is closed (every child stopped, the work directory removed) on the way out."""
    s = Stack()
    try:
        yield s
    finally:
        s.close()


# -- the command ---------------------------------------------------------------------------------

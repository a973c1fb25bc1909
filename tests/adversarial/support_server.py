"""What the socket/connection/audit attacks share: keyd's config, attacker scripts run as other
uids with setpriv (the raw HTTP reader is tests.helpers.read_response).

The attacker scripts are stdlib-only Python run by `SysUsers.python(user)` under
`setpriv --reuid --regid --init-groups`, so each attack really comes from another uid.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import base_config
from tests.integration.sysusers import SysUsers

TOKENS = b"POST /v1/tokens HTTP/1.1\r\nHost: keyd\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"


def token_request(user_id: str) -> bytes:
    body = json.dumps({"user_id": user_id}).encode()
    return TOKENS % (len(body), body)


def open_config(bao: Any, directory: Path, path: str, granted: str) -> dict[str, Any]:
    """keyd on `bao` whose socket every local user can open (0666); only `granted` has a grant."""
    config = base_config(bao, directory, path)
    config["server"]["socket_mode"] = "0666"
    config["grant"] = [{"user": granted, "types": ["user"]}]
    return config


# Opens N connections and holds them without sending a byte. After SETTLE seconds prints which
# were answered (503 + code) and which are held; then, if asked, waits WATCH more seconds and
# prints how many keyd has closed since; then holds what is left until stdin closes.
HOG = r"""
import json, socket, sys, time
path, count, settle, watch = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
socks, out = [], {"connected": 0, "refused_codes": [], "held": 0}
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as exc:
        out.setdefault("connect_errors", []).append(exc.errno)
        continue
    socks.append(s)
out["connected"] = len(socks)
time.sleep(settle)
held = []
for s in socks:
    s.setblocking(False)
    try:
        data = s.recv(65536)
    except BlockingIOError:
        held.append(s)
        continue
    except OSError:
        data = b""
    body = data.partition(b"\r\n\r\n")[2]
    try:
        out["refused_codes"].append(json.loads(body)["error"]["code"])
    except Exception:
        out["refused_codes"].append("closed:" + repr(data[:40]))
out["held"] = len(held)
if watch:
    time.sleep(watch)
    closed = 0
    for s in held:
        try:
            if s.recv(65536) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    out["closed_after_watch"] = closed
print(json.dumps(out), flush=True)
sys.stdin.read()
"""


class Hog:
    """The HOG script running as `user`: ``report`` is its first line; ``release`` ends it."""

    def __init__(
        self, users: SysUsers, user: str, socket_path: str, count: int, settle: float, watch: float = 0.0
    ) -> None:
        self.process = subprocess.Popen(
            [
                *users.as_user(user),
                users.python(user),
                "-c",
                HOG,
                socket_path,
                str(count),
                str(settle),
                str(watch),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.release()
            raise AssertionError(
                f"the hog printed nothing: {self.process.stderr.read() if self.process.stderr else ''}"
            )
        self.report: dict[str, Any] = json.loads(line)

    def release(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# Sends COUNT token requests with long user ids, pipelined on one connection (a thread writes while
# the main thread reads), and prints the statuses and error codes it got back.
FLOOD = r"""
import json, socket, sys, threading
from collections import Counter
path, count = sys.argv[1], int(sys.argv[2])
body_tpl = '{"user_id": "%s"}'
reqs = []
for i in range(count):
    body = (body_tpl % (("\u00e9" * 200) + ("%08d" % i) + "x" * 48)).encode()
    reqs.append(b"POST /v1/tokens HTTP/1.1\r\nHost: keyd\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(60)
s.connect(path)
def send():
    batch = 200
    for i in range(0, count, batch):
        s.sendall(b"".join(reqs[i:i + batch]))
threading.Thread(target=send, daemon=True).start()
statuses, codes = Counter(), Counter()
buf = b""
done = 0
while done < count:
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(1 << 20)
        if not chunk:
            raise SystemExit("eof after %d answers" % done)
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0].split(b":")[1])
    while len(rest) < length:
        rest += s.recv(1 << 20)
    statuses[int(head.split(b" ")[1])] += 1
    codes[json.loads(rest[:length])["error"]["code"]] += 1
    buf = rest[length:]
    done += 1
print(json.dumps({"statuses": statuses, "codes": codes}))
"""


def flood(users: SysUsers, user: str, socket_path: str, count: int) -> dict[str, Any]:
    done = subprocess.run(
        [*users.as_user(user), users.python(user), "-c", FLOOD, socket_path, str(count)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def flood_while_timing(
    users: SysUsers, attacker: str, socket_path: str, connections: int, reconnect: bool = False
) -> tuple[dict[str, Any], dict[str, float]]:
    """keyd.bench.flood's attack run as ``attacker`` for 12 s (its source passed with -c, so any
    user can run it), while this process times 100 fresh connections' first answers: (the flood's
    counts, the victim's latencies)."""
    from keyd.bench import flood

    args = ["flood", socket_path, "--connections", str(connections), "--seconds", "12"]
    attack = subprocess.Popen(
        [*users.as_user(attacker), users.python(attacker), "-c", Path(flood.__file__).read_text(), *args]
        + (["--reconnect"] if reconnect else []),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)  # the flood is under way
        measured = flood.victim(socket_path, count=100, pause=0.02)
    finally:
        out, _ = attack.communicate(timeout=60)
    result: dict[str, Any] = json.loads(out)
    return result, measured

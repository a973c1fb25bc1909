"""The audit sink: one JSON line per decision (issued, verified or refused), to a file or stderr.

A line looks like (one line, wrapped here)::

    {"time":"2025-01-31T12:00:00.123Z","outcome":"issued","code":null,"app":"default",
     "type":"user","ttl":3600,"pid":4242,"uid":33,"gid":33,"user":"www-data",
     "unit":"php-fpm.service","sub":"alice"}

With ``[audit] hash_user_ids`` the ``sub`` field is replaced by ``sub_sha256`` (hex). A line never
holds a token, a signature or a key: ``record`` is not given any of them.

The hot path stays cheap: ``record`` appends the decision's raw fields to an in-memory buffer; the
lines are formatted by hand when the buffer is flushed (the caller part cached per caller, the time
prefix per second) and written with one ``write(2)`` after a short delay (``flush_interval``) or
once 256 decisions are pending, never fsynced. A crash can lose the last fraction of a second of audit lines; that is the trade for
signing at full speed. A failing write is logged (at most once a minute) and does not stop signing.

Every issued token, verified webhook and proxied REST call gets its own line. Refusals (token and
REST proxy alike) are bounded per caller: a
caller without a grant must not be able to fill the disk with them. Per uid and error code, a burst
of ``refusal_burst`` lines, then ``refusal_rate`` lines a second; the rest are counted and written
as one ``refused_folded`` line per uid and code every ``refusal_summary_every``::

    {"time":"2025-01-31T12:00:10.000Z","outcome":"refused_folded","code":"forbidden","uid":1001,
     "user":"mallory","pid":4711,"unit":"","folded":19979,"since":"2025-01-31T12:00:00.120Z"}

A refused line's user id is cut to 64 characters (``"sub_chars"`` then gives its full length);
names from the system (user, unit) to 256.

Size bound: when a write takes the file to ``max_size`` bytes, keyd renames it to ``FILE.1`` (the
older ones move up to ``FILE.<keep>``, the oldest is deleted) and goes on in a fresh 0600 file. It
happens between two writes on the one thread that writes, so no line is lost or split; no SIGHUP,
no Vault read. ``max_size = 0`` leaves rotation to logrotate (SIGHUP reopens the file).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _json_str

from keyd.config import AuditConfig
from keyd.daemon.callers.caller import Caller
from keyd.daemon.safefiles import open_audit_file
from keyd.daemon.signing.decisions import Decision, RestCall
from keyd.errors import StartupError

log = logging.getLogger("keyd.audit")

FLUSH_INTERVAL = 0.2
FLUSH_RECORDS = 256  # about 64 KiB of lines
_MAX_CACHED_CALLERS = 1024
_MILLIS = [f".{ms:03d}Z" for ms in range(1000)] + [".999Z"]  # the last entry absorbs float rounding
_ERROR_EVERY = 60.0
MAX_REFUSED_SUB = 64  # characters of a refused request's user id kept in its line
_MAX_NAME = 256  # characters of a user or unit name (systemd's own limit for unit names)
_MAX_REFUSAL_KEYS = 4096  # (uid, code) pairs tracked at once; beyond, idle ones are forgotten


# (time, decision): one decision, formatted at flush time.
_Record = tuple[float, Decision]


def _opt(value: str | None) -> str:
    return "null" if value is None else _json_str(value)


def _timestamp(now: float) -> str:
    second = int(now)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + _MILLIS[int((now - second) * 1000)]


class _Refusals:
    """One (uid, code)'s refusal lines: a token bucket, and how many were folded since ``since``."""

    __slots__ = ("caller", "folded", "since", "stamp", "tokens")

    def __init__(self, tokens: float, now: float, caller: Caller) -> None:
        self.tokens = tokens
        self.stamp = now
        self.folded = 0
        self.since = now
        self.caller = caller


class AuditLog:
    """Writes audit lines to ``config.file`` (or standard error when it is empty).

    ``attach(loop)`` makes flushing lazy (one timer per burst); without a loop every line is
    written at once, which is what unit tests and short-lived tools want.
    """

    def __init__(
        self,
        config: AuditConfig,
        clock: Callable[[], float] = time.time,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self.path = config.file
        self._hash = config.hash_user_ids
        self._clock = clock
        self._flush_interval = flush_interval
        self._pending: list[_Record | str] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._middles: dict[tuple[Caller, str, str | None, str | None, str | None, int | None], str] = {}
        self._second = -1
        self._prefix = ""
        self._last_error = -_ERROR_EVERY
        self._burst = float(config.refusal_burst)
        self._rate = config.refusal_rate
        self._summary_every = config.refusal_summary_every
        self._refusals: dict[tuple[int, str | None], _Refusals] = {}
        self._summary_scheduled = False
        self._fd = self._open()
        self._max_size = config.max_size if self.path else 0
        self._keep = config.keep
        self._size = os.fstat(self._fd).st_size if self.path else 0

    def _open(self) -> int:
        """The audit file's descriptor (never through a symlink; see safefiles), or stderr's."""
        if not self.path:
            return sys.stderr.fileno()
        return open_audit_file(self.path)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Buffer lines and flush them from ``loop`` shortly after they are recorded."""
        self._loop = loop

    # -- the hot path ------------------------------------------------------------------------

    def record(self, decision: Decision) -> None:
        """Append one decision. Never raises for a write problem (see the module docstring).

        Only the raw fields are kept here; lines are formatted in ``flush``, many at a time. Measured
        in keyd's request path (docs/benchmarks.md) formatting each line as it was recorded cost
        more than signing the token, because it interleaved with everything else a request does.
        """
        if decision.outcome == "refused":
            # A refusal: its own line (formatted now) while the (uid, code) bucket allows, else counted.
            now = self._clock()
            if not self._refusal_allowed(decision.caller, decision.code, now):
                return
            entry: _Record | str = self._refused_line(now, decision)
        else:
            entry = (self._clock(), decision)
        self._pending.append(entry)
        if len(self._pending) >= FLUSH_RECORDS or self._loop is None:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_later(self._flush_interval, self.flush)

    def _refusal_allowed(self, caller: Caller, code: str | None, now: float) -> bool:
        """Take a line from the (uid, code) bucket: True when the refusal gets its own line; False
        when it is folded into the next ``refused_folded`` summary (token and REST refusals alike)."""
        key = (caller.uid, code)
        state = self._refusals.get(key)
        if state is None:
            if len(self._refusals) >= _MAX_REFUSAL_KEYS:
                self._forget_idle(now)
                if len(self._refusals) >= _MAX_REFUSAL_KEYS:
                    key = (-1, code)  # every uid beyond the table shares one bucket per code
                    state = self._refusals.get(key)
            if state is None:
                state = self._refusals[key] = _Refusals(self._burst, now, caller)
        if state.tokens < self._burst:
            state.tokens = min(self._burst, state.tokens + max(0.0, now - state.stamp) * self._rate)
        state.stamp = now
        if state.tokens >= 1.0:
            state.tokens -= 1.0
            return True
        if state.folded == 0:
            state.since = now
        state.folded += 1
        state.caller = caller
        if self._loop is not None and not self._summary_scheduled:
            self._summary_scheduled = True
            self._loop.call_later(self._summary_every, self.summarise)
        return False

    def _refused_line(self, now: float, decision: Decision) -> str:
        """A refusal's line, formatted now (refusal lines are few): the user id is cut short."""
        caller, app, kind, sub = decision.caller, decision.app, decision.kind, decision.sub
        ttl, code = decision.ttl, decision.code
        middle = self._middles.get((caller, "refused", code, app, kind, ttl)) or self._middle(
            (caller, "refused", code, app, kind, ttl)
        )
        head = '{"time":"' + _timestamp(now) + middle
        if sub is None:
            return head + '"sub":null}\n'
        if self._hash:
            digest = hashlib.sha256(sub.encode("utf-8", "replace")).hexdigest()
            return head + f'"sub_sha256":"{digest}"}}\n'
        if len(sub) > MAX_REFUSED_SUB:
            return head + f'"sub":{_json_str(sub[:MAX_REFUSED_SUB])},"sub_chars":{len(sub)}}}\n'
        return head + f'"sub":{_json_str(sub)}}}\n'

    def summarise(self) -> None:
        """Write one ``refused_folded`` line per (uid, code) that had refusals folded; forget idle ones."""
        self._summary_scheduled = False
        now = self._clock()
        stamp = _timestamp(now)
        for (uid, code), state in self._refusals.items():
            if state.folded:
                caller = state.caller
                # uid -1: the shared bucket of uids beyond the table; its last caller says little.
                user, pid, unit = (caller.user, caller.pid, caller.unit) if uid >= 0 else ("", 0, "")
                self._pending.append(
                    f'{{"time":"{stamp}","outcome":"refused_folded","code":{_opt(code)},'
                    f'"uid":{uid},"user":{_json_str(user[:_MAX_NAME])},"pid":{pid},'
                    f'"unit":{_json_str(unit[:_MAX_NAME])},"folded":{state.folded},'
                    f'"since":"{_timestamp(state.since)}"}}\n'
                )
                state.folded = 0
        self._forget_idle(now)
        self.flush()

    def _forget_idle(self, now: float) -> None:
        """Drop the buckets that have refilled and hold no folded count: they are as new."""
        burst, rate = self._burst, self._rate
        for key in [
            key
            for key, state in self._refusals.items()
            if not state.folded and state.tokens + (now - state.stamp) * rate >= burst
        ]:
            del self._refusals[key]

    def _lines(self, records: list[_Record | str]) -> str:
        """The lines for ``records``, formatted in one loop (a call per line cost a third more)."""
        out: list[str] = []
        append = out.append
        millis = _MILLIS
        hashed = self._hash
        current, prefix = self._second, self._prefix
        # Everything but the time and the subject repeats from line to line (few callers, apps,
        # types, outcomes and ttls): that part is encoded once, cached, and reused as long as
        # consecutive records share it.
        last: Decision | None = None
        middle = ""
        for record in records:
            if isinstance(record, str):  # a refusal or summary line, formatted when recorded
                append(record)
                continue
            now, decision = record
            caller, app, kind, sub = decision.caller, decision.app, decision.kind, decision.sub
            ttl, outcome, code = decision.ttl, decision.outcome, decision.code
            second = int(now)
            if second != current:
                current = second
                prefix = time.strftime('{"time":"%Y-%m-%dT%H:%M:%S', time.gmtime(second))
            if (
                last is None
                or caller is not last.caller
                or app != last.app
                or kind != last.kind
                or ttl != last.ttl
                or outcome != last.outcome
                or code != last.code
            ):
                key = (caller, outcome, code, app, kind, ttl)
                middle = self._middles.get(key) or self._middle(key)
                last = decision
            stamp = millis[int((now - second) * 1000)]
            if sub is None:
                append(f'{prefix}{stamp}{middle}"sub":null}}\n')
            elif hashed:
                digest = hashlib.sha256(sub.encode("utf-8", "replace")).hexdigest()
                append(f'{prefix}{stamp}{middle}"sub_sha256":"{digest}"}}\n')
            else:
                append(f'{prefix}{stamp}{middle}"sub":{_json_str(sub)}}}\n')
        self._second, self._prefix = current, prefix
        return "".join(out)

    def _middle(self, key: tuple[Caller, str, str | None, str | None, str | None, int | None]) -> str:
        caller, outcome, code, app, kind, ttl = key
        if len(self._middles) >= _MAX_CACHED_CALLERS:
            self._middles.clear()
        middle = self._middles[key] = (
            f'","outcome":{_json_str(outcome)},"code":{_opt(code)},"app":{_opt(app)},'
            f'"type":{_opt(kind)},"ttl":{"null" if ttl is None else int(ttl)},'
            f'"pid":{caller.pid},"uid":{caller.uid},"gid":{caller.gid},'
            f'"user":{_json_str(caller.user[:_MAX_NAME])},"unit":{_json_str(caller.unit[:_MAX_NAME])},'
        )
        return middle

    def rest(self, call: RestCall) -> None:
        """One REST proxy call (``"type":"rest"``): written at once, after the pending decisions."""
        caller = call.caller
        now = self._clock()
        if call.outcome == "refused" and not self._refusal_allowed(caller, call.code, now):
            return  # counted in the (uid, code) summary, as token refusals are
        status = call.upstream_status
        line = (
            f'{{"time":"{_timestamp(now)}","outcome":{_json_str(call.outcome)},"code":{_opt(call.code)},'
            f'"app":{_opt(call.app)},"type":"rest","method":{_json_str(call.method)},"path":{_opt(call.path)},'
            f'"upstream_status":{"null" if status is None else int(status)},'
            f'"duration_ms":{call.seconds * 1000:.3f},"attempts":{call.attempts},'
            f'"pid":{caller.pid},"uid":{caller.uid},"gid":{caller.gid},'
            f'"user":{_json_str(caller.user[:_MAX_NAME])},"unit":{_json_str(caller.unit[:_MAX_NAME])}}}\n'
        )
        self.flush()
        self._write(line.encode("utf-8", "replace"))

    # -- writing -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every pending line with as few write(2) calls as the kernel allows."""
        self._scheduled = False
        if not self._pending or self._fd < 0:  # nothing to write, or closed (a late timer)
            return
        pending, self._pending = self._pending, []
        self._write(self._lines(pending).encode("utf-8", "replace"))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                self._size += written
        except OSError as exc:
            now = time.monotonic()
            if now - self._last_error >= _ERROR_EVERY:
                self._last_error = now
                log.error(
                    "could not write %d bytes of audit lines to %s: %s",
                    len(view),
                    self.path or "stderr",
                    exc.strerror,
                )
        if self._max_size and self._size >= self._max_size:
            self._rotate()

    def _rotate(self) -> None:
        """FILE -> FILE.1 -> ... -> FILE.<keep> (the oldest goes), then a fresh FILE (0600)."""
        size, self._size = self._size, 0  # a failure below is retried after another max_size
        try:
            for n in range(self._keep - 1, 0, -1):
                if os.path.lexists(f"{self.path}.{n}"):
                    os.replace(f"{self.path}.{n}", f"{self.path}.{n + 1}")
            if os.path.lexists(self.path):  # gone after an earlier rotation could not open a new one
                os.replace(self.path, f"{self.path}.1")
            fd = open_audit_file(self.path)
        except (OSError, StartupError) as exc:
            log.error("could not rotate the audit file %s (%s); still writing to the one it has", self.path, exc)
            return
        old, self._fd = self._fd, fd
        os.close(old)
        log.info(
            "audit file %s rotated at %d bytes (audit.max_size); the previous lines are in %s.1",
            self.path,
            size,
            self.path,
            extra={"event": "audit_rotated"},
        )

    def reopen(self) -> None:
        """After log rotation (SIGHUP): flush to the old file, then continue in a fresh one."""
        self.flush()
        if not self.path:
            return
        try:
            fd = open_audit_file(self.path)
        except StartupError as exc:
            log.error("could not reopen the audit file (%s); still writing to the old one", exc)
            return
        old, self._fd = self._fd, fd
        os.close(old)
        self._size = os.fstat(fd).st_size
        log.info("audit file %s reopened", self.path)

    def close(self) -> None:
        """Summarise folded refusals, flush what is pending and close the file (stderr stays open)."""
        self.summarise()
        if self.path and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

"""How keyd.config reads a TOML table: the ``Reader`` that records each problem under its full key
path, the ``setting`` a dataclass field is declared with, and the converters from TOML values.

A converter takes the value as TOML gave it and returns the Python value, or raises ValueError or
TypeError with a text that names what is wrong (``must be an integer, not str``); the reader puts
the file and the key in front of it. Converters touch no file: ``${VAR}`` expansion reads only the
environment (the files a config names are checked by keyd.config_files).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
D = TypeVar("D", bound="DataclassInstance")

MAX_DURATION = 10 * 365 * 86400.0  # keeps scheduling arithmetic finite
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_CONVERT = "keyd.config.convert"  # the dataclass field metadata key ``setting`` writes


# -- reading a table ---------------------------------------------------------------------------


class Reader:
    """Walks one TOML table, records problems with their full key path, rejects unknown keys."""

    def __init__(self, source: str, problems: list[str], prefix: str, table: Mapping[str, Any]):
        self.source = source
        self.problems = problems
        self.prefix = prefix
        self.table = table
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def problem(self, name: str, text: str) -> None:
        self.problems.append(f"{self.source}: {self.key(name)}: {text}")

    def get(self, name: str, default: T, convert: Callable[[Any], T]) -> T:
        self.seen.add(name)
        if name not in self.table:
            return default
        try:
            return convert(self.table[name])
        except (ValueError, TypeError) as exc:
            self.problem(name, str(exc))
            return default

    def failed(self, name: str) -> bool:
        """Whether a problem was already recorded for ``name`` (so one mistake gives one line)."""
        prefix = f"{self.source}: {self.key(name)}:"
        return any(problem.startswith(prefix) for problem in self.problems)

    def sub(self, name: str) -> Reader:
        self.seen.add(name)
        value = self.table.get(name, {})
        if not isinstance(value, dict):
            self.problem(name, "must be a table")
            value = {}
        return Reader(self.source, self.problems, self.key(name), value)

    def finish(self) -> None:
        """Every key this table holds that nothing read is unknown: say so, with the nearest known
        key when one is close ("did you mean"). Call after reading every key of the table."""
        known = sorted(self.seen)
        for name in self.table:
            if name not in self.seen:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = f"; did you mean {self.key(close[0])!r}?" if close else ""
                self.problem(name, f"unknown key{hint}")


def setting(default: T, convert: Callable[[Any], T]) -> T:
    """A dataclass field that is a setting: read from the TOML key of its own name by ``convert``,
    ``default`` when the key is absent (and, with a problem recorded, when its value is wrong)."""
    return dataclasses.field(default=default, metadata={_CONVERT: convert})


def read_settings(
    r: Reader, cls: type[D], tables: Mapping[str, Callable[[Reader], object]] | None = None, **given: object
) -> D:
    """``cls`` from the table ``r`` walks: each field declared with ``setting`` read by its
    converter, each field named in ``tables`` read from the sub-table of its name, in the order
    the fields are declared (so problems are listed in that order); ``given`` fields as they are.
    A field that is none of these keeps its default."""
    values = dict(given)
    for item in dataclasses.fields(cls):
        if tables and item.name in tables:
            values[item.name] = tables[item.name](r.sub(item.name))
        elif _CONVERT in item.metadata:
            values[item.name] = r.get(item.name, item.default, item.metadata[_CONVERT])
    return cls(**values)


# -- converters --------------------------------------------------------------------------------


def parse_duration(value: object) -> float:
    """Seconds from an integer, or from a string such as ``"30s"``, ``"5m"``, ``"1h30m"``, ``"1d"``."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as 30, "30s", "5m", "1h" or "1d"')
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        if not value <= MAX_DURATION:  # also catches nan and inf, which TOML allows
            raise ValueError("must be a number of seconds of at most 10 years")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit():
            return parse_duration(int(text))
        pos, total = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if text and pos == len(text):
            if total > MAX_DURATION:
                raise ValueError(f"{value!r} is longer than 10 years")
            return total
    raise ValueError(
        f'{value!r} is not a duration (use seconds, or a string such as "30s", "5m", "1h", "1d")'
    )


def parse_rate(value: object) -> float:
    """Requests per second from ``"50/s"``, ``"600/m"`` or ``"1000/h"``."""
    match = _RATE.match(value) if isinstance(value, str) else None
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f'{value!r} is not a rate (use "50/s", "600/m" or "1000/h")')
    return float(match.group(1)) / {"s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2)]


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"must be a string, not {type(value).__name__}")
    return value


def nonempty(value: Any) -> str:
    text = string(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"must be true or false, not {type(value).__name__}")
    return value


def integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"must be an integer, not {type(value).__name__}")
    return value


def positive_int(value: Any) -> int:
    number = integer(value)
    if number <= 0:
        raise ValueError("must be greater than zero")
    return number


def bounded_int(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        number = integer(value)
        if not low <= number <= high:
            raise ValueError(f"must be from {low} to {high}")
        return number

    return convert


def kv_version(value: Any) -> int:
    version = integer(value)
    if version not in (1, 2):
        raise ValueError("must be 1 or 2")
    return version


_SIZE = re.compile(r"(\d+)\s*([KMG]?)", re.IGNORECASE)


def size(value: Any) -> int:
    """A size in bytes: an integer, or a string such as "100M", "512K", "1G" (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return int(value)
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f'{value!r} is not a size (use bytes or a string such as "100M", "1G"; 0 = off)')
    power: int = " KMG".index(match[2].upper() or " ")
    return int(match[1]) << (10 * power)


def positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def mode(value: Any) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value.strip()):
        return int(value.strip(), 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise ValueError(f'{value!r} is not a file mode (use a string such as "0660")')


def group_or_gid(value: Any) -> str:
    """A group name, or a gid (an integer, kept as its digits)."""
    return str(integer(value)) if isinstance(value, int) else string(value)


def choice(*options: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = string(value)
        if text not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}")
        return text

    return convert


def string_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("must be a list of strings")
    return tuple(value)


def expand(value: Any) -> str:
    """A file path with ``${VAR}`` expanded; an unset variable is an error, not an empty string."""
    text = string(value)

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ValueError(f"refers to ${{{name}}}, which is not set in the environment")
        return os.environ[name]

    return _ENV_REF.sub(replace, text)


def nonempty_path(value: Any) -> str:
    return expand(nonempty(value))


def optional_path(value: Any) -> str:
    """A path with ``${VAR}`` expanded; any false value (``""``, ``0``, ``false``) means none."""
    return expand(string(value)) if value else ""


def vault_path(value: Any) -> str:
    """A Vault mount or path, without leading or trailing slashes (not empty)."""
    return nonempty(value).strip("/")


def optional_vault_path(value: Any) -> str:
    return string(value).strip("/")


def https_origin(value: Any) -> str:
    """``https://HOST`` or ``https://HOST:PORT``, a trailing slash dropped."""
    url = nonempty(value).rstrip("/")
    if not re.fullmatch(r"https://[A-Za-z0-9.-]+(:\d{1,5})?", url):
        # Not quoted back when it holds an "@": that part may be a password.
        shown = "the value" if "@" in url else repr(url)
        raise ValueError(f"{shown} must be https://HOST or https://HOST:PORT, with no path")
    return url


def loopback_address(value: Any) -> str:
    text = string(value)
    if text and not re.fullmatch(r"(127\.\d+\.\d+\.\d+|\[::1\]|localhost):\d{1,5}", text):
        raise ValueError(f'{text!r} is not a loopback address such as "127.0.0.1:9464"')
    return text


_TRANSIT_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def transit_key_name(value: Any) -> str:
    name = string(value)
    if name and not _TRANSIT_KEY.match(name):
        raise ValueError("must be 1 to 128 letters, digits, '_', '.' or '-' (a Transit key name)")
    return name


_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\-]+(?:@[A-Za-z0-9:_.\\-]+)?\.(?:service|scope|socket|mount|swap)$")


def unit_name(value: Any) -> str:
    name = nonempty(value)
    if len(name) > 255 or not _UNIT_NAME.match(name):
        raise ValueError(
            f"{name!r} is not the name of a systemd unit that runs processes "
            "(such as php-fpm.service, talkjs-sync.service or session-1.scope)"
        )
    return name


class UserIdPattern(Protocol):
    """A grant's ``user_id_pattern``: RE2 (linear in the user id's length), or re in unit tests."""

    @property
    def pattern(self) -> str: ...

    def fullmatch(self, text: str) -> object | None: ...


@functools.cache
def _re2() -> tuple[Any, Any]:
    """google-re2 and its options, imported when a config first has a pattern: the CLI's client
    commands (`keyd health`, `keyd token`) then run where only the keyd package is on the path."""
    import re2  # noqa: PLC0415

    options = re2.Options()
    options.log_errors = False  # the ValueError below says it, naming the file and the grant
    return re2, options


def user_id_pattern(value: Any) -> UserIdPattern:
    """RE2, not Python's re: matching takes time linear in the user id whatever the pattern, so
    an operator's ``^(a+)+$`` cannot let one crafted user_id stall the event loop for every caller.
    RE2 has no backreferences or lookaround (refused here), and its \\w, \\d, \\s are ASCII."""
    text = nonempty(value)
    re2, options = _re2()
    try:
        compiled: UserIdPattern = re2.compile(text, options)
    except re2.error as exc:
        reason = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(
            f"is not a pattern keyd can match in linear time (RE2 syntax: no backreferences or "
            f"lookaround): {reason}"
        ) from None
    return compiled

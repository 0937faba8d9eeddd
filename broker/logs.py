"""Configure structlog: JSON lines on stderr, with a redaction step no event can bypass.

Redaction runs after exceptions are formatted and before rendering, so a token inside a
traceback, an error message or a nested field is scrubbed too. It removes three things:
values of secret-named keys, anything shaped like a bearer token, a JWT or an amoCRM refresh
token, and every exact secret the process has registered (the client secret, each token it
held), which catches opaque tokens no pattern knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_SECRET_KEYS = frozenset(
    {
        "access_token",
        "refresh_token",
        "client_secret",
        "authorization",
        "proxy-authorization",
        "cookie",
        "password",
        "encryption_key",
        "x-broker-key",
    }
)
# The shapes of secrets, in one pattern so each string is scanned once per event.
_SHAPES = re.compile(
    r"(?P<bearer>(?i:\bbearer)\s+[A-Za-z0-9._~+/=-]+)"
    r"|(?P<jwt>eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*)"
    r"|(?P<refresh>def50200[0-9a-fA-F]{16,})"
    r"|(?P<caller>amb_[A-Za-z0-9_-]{16,})"
)
_SHAPE_REPLACEMENTS = {
    "bearer": "Bearer [redacted]",
    "jwt": "[redacted-jwt]",
    "refresh": "[redacted-refresh-token]",
    "caller": "[redacted-caller-secret]",
}
_OURS = "_amo_broker_handler"
_MIN_SECRET_LEN = 8  # shorter values would scrub ordinary words out of every line
_KEEP_TOKENS = 64  # the newest tokens remembered for exact scrubbing


class Redactor:
    """A structlog processor that removes secrets from every value of an event.

    Exact secrets are indexed by their first `_MIN_SECRET_LEN` characters, and one pattern of
    those *heads* finds where one may start. Tokens share their heads (every amoCRM JWT starts
    alike, every refresh token with def50200), so registering a rotated token changes nothing
    but a dict entry; the pattern is rebuilt only when a new head appears (a client secret at
    start), lazily, at the next scrub. A pattern of whole secrets, rebuilt at each
    registration, made a thousand accounts take minutes to start.
    """

    def __init__(self, keep: int = _KEEP_TOKENS) -> None:
        self._keep = keep
        self._permanent: set[str] = set()
        self._recent: OrderedDict[str, None] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self._index: dict[str, frozenset[str]] = {}  # head -> secrets
        self._heads: re.Pattern[str] | None = None
        self._heads_stale = False

    def register(self, *values: str | None, permanent: bool = False) -> None:
        """Remember exact secret values to scrub from now on.

        Tokens rotate, so only the newest `keep` are remembered (the patterns still catch any
        JWT or refresh token): remembering every token ever seen would grow the index for the
        life of the process. Configured secrets (each account's client secret) are
        `permanent`.
        """
        fresh = [v for v in values if v and len(v) >= _MIN_SECRET_LEN]
        if not fresh:
            return
        with self._lock:
            gone: list[str] = []
            if permanent:
                self._permanent.update(fresh)
            else:
                for value in fresh:
                    self._recent[value] = None
                    self._recent.move_to_end(value)
                while len(self._recent) > self._keep:
                    gone.append(self._recent.popitem(last=False)[0])
            for value in fresh:
                head = value[:_MIN_SECRET_LEN]
                known = self._index.get(head)
                self._index[head] = (known or frozenset()) | {value}
                self._heads_stale = self._heads_stale or known is None
            for value in gone:
                if value not in self._permanent and value not in self._recent:
                    head = value[:_MIN_SECRET_LEN]
                    left = self._index.get(head, frozenset()) - {value}
                    if left:
                        self._index[head] = left
                    else:
                        self._index.pop(head, None)
                        self._heads_stale = True

    def _current_heads(self) -> re.Pattern[str] | None:
        if self._heads_stale:
            with self._lock:
                heads = sorted(self._index)
                self._heads = re.compile("|".join(map(re.escape, heads))) if heads else None
                self._heads_stale = False
        return self._heads

    def scrub(self, value: Any) -> Any:
        """Return `value` with every secret in it replaced."""
        if isinstance(value, str):
            return self._scrub_text(value)
        if isinstance(value, dict):
            return {k: "[redacted]" if _secret_key(k) else self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.scrub(v) for v in value)
        if isinstance(value, bytes):
            return self._scrub_text(value.decode("utf-8", "replace"))
        if isinstance(value, BaseException):
            return self._scrub_text(f"{type(value).__name__}: {value}")
        return value

    def _scrub_text(self, text: str) -> str:
        if len(text) < _MIN_SECRET_LEN:  # too short to hold a secret or a shape of one
            return text
        heads = self._current_heads()
        if heads is not None:
            text = self._scrub_secrets(text, heads)
        return _SHAPES.sub(_shape_replacement, text)

    def _scrub_secrets(self, text: str, heads: re.Pattern[str]) -> str:
        """Replace each registered secret, the longest first where two start at one place."""
        found = heads.search(text)
        if found is None:
            return text
        index, done = self._index, 0
        out: list[str] = []
        while found is not None:
            at = found.start()
            candidates = index.get(text[at : at + _MIN_SECRET_LEN], ())
            secret = max((s for s in candidates if text.startswith(s, at)), key=len, default="")
            if secret:
                out += (text[done:at], "[redacted]")
                done = at + len(secret)
                found = heads.search(text, done)
            else:
                found = heads.search(text, at + 1)
        return "".join(out) + text[done:]

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in list(event_dict.items()):
            if _secret_key(key):
                event_dict[key] = "[redacted]"
            elif not isinstance(value, _PLAIN):  # numbers and flags hold no secret
                event_dict[key] = self.scrub(value)
        return event_dict


_PLAIN = (int, float, type(None))  # bool is an int


def _shape_replacement(match: re.Match[str]) -> str:
    return _SHAPE_REPLACEMENTS[match.lastgroup or ""]


def _secret_key(key: object) -> bool:
    return isinstance(key, str) and key.lower() in _SECRET_KEYS


redactor = Redactor()


# The one line per proxied call is written in batches: flushing each is a system call per call.
_BATCHED = '"event": "request",'
FLUSH_EVERY = 0.1


class LineOutput:
    """Write rendered events as lines; flush at once, except `request` lines, within 0.1 s.

    Any other line (an audit event, a warning, `stopped`) flushes everything before it, so
    what auditors and on-call read is never held back; a SIGKILL loses at most 0.1 s of
    `request` lines.
    """

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    def msg(self, message: str) -> None:
        self._pending.append(message + "\n")
        if _BATCHED in message and self._flush_later():
            return
        self.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg

    def flush(self) -> None:
        """Write what is pending in one write (stderr flushes once per write, not per line)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._pending = "".join(self._pending), []
        with contextlib.suppress(ValueError, OSError):  # closed at interpreter exit
            self._file.write(lines)
            self._file.flush()

    def _flush_later(self) -> bool:
        if self._timer is not None:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._timer = loop.call_later(FLUSH_EVERY, self.flush)
        return True


def configure_logging(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Send structlog events to `stream` (stderr) as JSON lines or, for a person, console text."""
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer(ensure_ascii=False)
    )
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.format_exc_info,
            redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # Batched only on stderr, the service's log: a stream given here is read back at once.
        logger_factory=_output_factory(
            stream or sys.stderr, batched=stream is None and fmt == "json"
        ),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(stream or sys.stderr, numeric_level, stamp, renderer)


def _output_factory(stream: TextIO, *, batched: bool) -> Any:
    if not batched:
        return structlog.PrintLoggerFactory(file=stream)
    output = LineOutput(stream)
    return lambda *args: output


def _route_stdlib_logging(stream: TextIO, level: int, stamp: Any, renderer: Any) -> None:
    """Send the standard library's records (aiohttp, asyncio) through the same redaction.

    aiohttp logs a request its parser refused with the offending line verbatim: without this,
    a caller secret or token in that line would reach stderr unredacted, through logging's
    last-resort handler.
    """
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_log_level, stamp],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redactor,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for previous in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(previous)  # reconfiguring replaces our handler, and only ours
    setattr(handler, _OURS, True)
    root.addHandler(handler)
    # Warnings and errors only: aiohttp's parser errors are errors, while its INFO access
    # lines and DEBUG dumps would duplicate the `request` events (and echo whole requests).
    root.setLevel(max(level, logging.WARNING))


def get_logger() -> Any:
    """Return the broker's logger (bound lazily, so configure_logging may run later)."""
    return structlog.get_logger("amo-broker")

"""Structured logging: one line per event, JSON (for collectors) or text (for people).

Field values can be client-chosen (a message ``type``, a query parameter in a refusal reason),
so the text format escapes them: control characters (C0, DEL, C1) and the Unicode line and
paragraph separators become ``\\n``, ``\\x1b``, ``\\u2028``..., a backslash is doubled, and a
value holding a space, ``=``, ``"`` (or nothing) is quoted. One event is one line, and a value
cannot forge another ``key=value`` pair or reach the terminal as an escape sequence.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

from rtcsignal.config import ConfigError


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\\\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
_QUOTE = re.compile('[ ="]')


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def escape(text: str) -> str:
    """``text`` with no control characters left: one line, no terminal escape sequences."""
    return _UNSAFE.sub(_escape_char, text)


def text_value(value: Any) -> str:
    """A field value for the text format: escaped, and quoted when it could be misread."""
    text = escape(str(value))
    if not text or _QUOTE.search(text):
        return '"' + text.replace('"', '\\"') + '"'
    return text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{escape(str(k))}={text_value(v)}" for k, v in fields.items())
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        event = escape(record.getMessage())
        text = f"{stamp} {record.levelname.lower():7} {event} {extra}".rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class FileHandler(logging.StreamHandler):
    """Appends to ``path``, one line per write (line-buffered), so a line is never split
    across a rotation; ``reopen()`` (on SIGHUP) starts writing to whatever file ``path``
    names now, after logrotate moved the old one away."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(self._open())

    def _open(self) -> Any:
        try:
            return open(self.path, "a", buffering=1, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"log_file: cannot open {self.path}: "
                              f"{exc.strerror or exc}") from None

    def reopen(self) -> None:
        """Write to a fresh open of ``path``; keeps the old file if that fails (ConfigError)."""
        fresh = self._open()
        self.acquire()
        try:
            old, self.stream = self.stream, fresh
        finally:
            self.release()
        old.close()


def configure(level: str = "info", fmt: str = "auto", stream: Any = None,
              path: str = "") -> None:
    """Send the ``rtcsignal`` logger to ``path`` (a file, see FileHandler) or ``stream``
    (stderr) in the chosen format; ``auto`` is text on a terminal only."""
    handler: logging.StreamHandler
    if path:
        handler = FileHandler(path)
        if fmt == "auto":
            fmt = "json"
    else:
        stream = stream or sys.stderr
        if fmt == "auto":
            fmt = "text" if stream.isatty() else "json"
        handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger = logging.getLogger("rtcsignal")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def reopen() -> None:
    """Reopen the log file (if logging goes to one); raises ConfigError if it cannot be
    opened, and the old one is kept."""
    for handler in logging.getLogger("rtcsignal").handlers:
        if isinstance(handler, FileHandler):
            handler.reopen()


def set_level(level: str) -> None:
    logging.getLogger("rtcsignal").setLevel(level.upper())


def raw_output() -> Any:
    """The binary stream log lines go to now (the supervisor copies its workers' lines
    there whole); the text layer above it is line-buffered, so nothing is held back."""
    for handler in logging.getLogger("rtcsignal").handlers:
        buffer = getattr(getattr(handler, "stream", None), "buffer", None)
        if buffer is not None:
            return buffer
    return sys.stderr.buffer

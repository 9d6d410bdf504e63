"""The text log format: client-chosen strings cannot forge lines or fields, or reach the
terminal as escape sequences (issue 8, item 9)."""

from __future__ import annotations

import json
import logging
import re

import pytest

from rtcsignal.logs import JsonFormatter, TextFormatter

# key=value pairs as TextFormatter writes them: a value is quoted ("...", with \" and \\
# inside) or has no space, quote or '='.
PAIR = re.compile(r' ([^ =]+)=("(?:[^"\\]|\\.)*"|[^ "=]+)')
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def record(event: str, **fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("rtcsignal", logging.INFO, __file__, 1, event, None, None)
    rec.fields = fields  # type: ignore[attr-defined]
    return rec


def pairs(line: str, event: str) -> dict[str, str]:
    """The fields of one text line, failing unless the whole line is stamp, level, event and
    well-formed pairs."""
    head = re.match(r"\d\d:\d\d:\d\d \S+ +", line)
    assert head, line
    rest = line[head.end():]
    assert rest.startswith(event), (rest, event)
    rest = rest[len(event):]
    found = {}
    pos = 0
    for m in PAIR.finditer(rest):
        assert m.start() == pos, f"junk between fields: {rest[pos:m.start()]!r}"
        found[m.group(1)] = m.group(2)
        pos = m.end()
    assert pos == len(rest), f"junk after fields: {rest[pos:]!r}"
    return found


FORGERIES = [
    "offer\n12:00:00 info    connect peer=forged addr=6.6.6.6",  # a forged log line
    "offer\r\n12:00:00 error   stopped",
    "\x1b[2J\x1b[31mred\x1b]0;title\x07",  # ANSI: clear screen, colour, window title
    "\x9b31m",  # C1 CSI
    "a\u2028b\u2029c",
    "a\x00b\x7fc\tz",
    "x peer=forged addr=6.6.6.6",  # fields forged with spaces
    'x" peer="forged',
    "trailing\\",
    "",
]


@pytest.mark.parametrize("value", FORGERIES)
def test_text_format_escapes_client_strings(value: str) -> None:
    line = TextFormatter().format(record("relayed", peer="p1", type=value, recipients=2))
    assert "\n" not in line and "\r" not in line
    assert not CONTROL.search(line), line
    found = pairs(line, "relayed")
    assert list(found) == ["peer", "type", "recipients"], line
    assert found["peer"] == "p1" and found["recipients"] == "2"
    # The value reads back: unquote, then undo the escapes.
    raw = found["type"]
    if raw.startswith('"'):
        raw = raw[1:-1].replace('\\"', '"')
    assert raw.encode().decode("unicode_escape") == value


def test_text_format_escapes_the_event_too() -> None:
    line = TextFormatter().format(record("rejected\n12:00:00 info    forged\x1b[2J", code=1))
    assert "\n" not in line and "\x1b" not in line
    assert "rejected\\n12:00:00 info    forged\\x1b[2J code=1" in line


def test_plain_values_stay_unquoted() -> None:
    line = TextFormatter().format(record("connect", peer="kq3Zr0f1X2c9bW4s", addr="127.0.0.1",
                                         clients=3, duration_s=1.5))
    assert line.endswith(" connect peer=kq3Zr0f1X2c9bW4s addr=127.0.0.1 clients=3 duration_s=1.5")
    line = TextFormatter().format(record("rejected", a="a b", b="k=v", c="", d="x\\y"))
    assert line.endswith(' rejected a="a b" b="k=v" c="" d=x\\\\y')


def test_json_format_keeps_the_value_exactly() -> None:
    value = FORGERIES[0] + FORGERIES[2]
    line = JsonFormatter().format(record("relayed", type=value))
    assert "\n" not in line and "\x1b" not in line
    assert json.loads(line)["type"] == value

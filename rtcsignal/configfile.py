"""Settings written back out: ``--help`` defaults, ``config example`` and ``config check``.

Reading settings is ``config.load_config`` alone (flags, environment, TOML file); this module
only renders them, walking ``config.SETTINGS``, so a setting declared there shows up in the
help, the example file and the check output without an edit here.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

from rtcsignal.config import SETTINGS, Config, Setting

#: Settings whose value is a credential, by name, so a new ``*_secret`` or ``*_token``
#: setting is masked without anyone remembering to flag it (``*_file`` paths are not).
SECRET_SUFFIXES = ("_secret", "_token", "_password", "_key")
MASK = "********"
#: ``scheme://user:password@host``: the password part of a URL (a Redis broker URL, say).
_URL_PASSWORD = re.compile(r"(?<=://)([^/@:]*):[^/@]*@")


def is_secret(setting: Setting) -> bool:
    return setting.name.endswith(SECRET_SUFFIXES)


def _mask_urls(text: str) -> str:
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{MASK}@", text)


def masked(setting: Setting, value: Any) -> Any:
    """``value`` safe to print: secrets replaced, passwords in URLs hidden."""
    if is_secret(setting) and value:
        return MASK
    if isinstance(value, str):
        return _mask_urls(value)
    if isinstance(value, tuple):
        return tuple(_mask_urls(x) if isinstance(x, str) else x for x in value)
    return value


def _toml_string(s: str) -> str:
    """A TOML basic string; escapes what TOML forbids raw (quote, backslash, controls)."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    """``value`` as TOML that ``load_config`` parses back to the same setting."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(x) for x in value) + "]"
    return _toml_string(str(value))  # str, and ip networks as their CIDR text


def flag_value(value: Any) -> str:
    """``value`` as it would be typed after the flag (for ``--help``)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(x) for x in value) or "none"
    if value == "":
        return "none"
    return str(value)


def allowed(setting: Setting) -> str:
    return getattr(setting.parse, "allowed", "a valid value")


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, 96, initial_indent="# ", subsequent_indent="#   ",
                         break_on_hyphens=False, break_long_words=False)


def _groups() -> dict[str, list[Setting]]:
    groups: dict[str, list[Setting]] = {}
    for s in SETTINGS:
        groups.setdefault(s.group, []).append(s)
    return groups


def example() -> str:
    """A commented settings file holding every setting at its default.

    Secrets are left commented out with a placeholder: an example must not set a secret
    anyone could copy, and an empty one would read as "set" to a reader of the file.
    """
    lines = [
        "# rtcsignal settings: rtcsignal serve --config FILE (or env RTCSIGNAL_CONFIG=FILE).",
        "# Every setting at its default. Flags and RTCSIGNAL_<NAME> environment variables",
        "# override this file. Check a file with: rtcsignal config check FILE",
    ]
    for group, settings in _groups().items():
        lines += ["", f"# === {group}"]
        for s in settings:
            lines.append("")
            lines += _comment(f"{s.help}.")
            lines += _comment(f"Allowed: {allowed(s)}. Flag {s.flag}, env {s.env}.")
            if is_secret(s):
                lines.append(f'# {s.name} = "<{s.name.replace("_", "-")}>"')
            else:
                lines.append(f"{s.name} = {toml_value(s.default)}")
    return "\n".join(lines) + "\n"


def effective(config: Config) -> str:
    """Every resolved setting as TOML, secrets masked (``config check``)."""
    lines = ["# effective settings (secrets masked)"]
    for group, settings in _groups().items():
        lines += ["", f"# --- {group}"]
        for s in settings:
            value = masked(s, getattr(config, s.name))
            lines.append(f"{s.name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"

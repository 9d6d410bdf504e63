"""Issue 12, point 2: ``rtcsignal config example`` and ``rtcsignal config check``.

The round trip runs the real command line; the error cases call ``cli.main`` in-process (one
per setting would be a minute of interpreter start-ups) with the same arguments.
"""

from __future__ import annotations

import base64
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from rtcsignal import cli
from rtcsignal.config import SETTINGS, Config, load_config
from rtcsignal.configfile import MASK, is_secret
from tests.test_cli_config import run_cli

SECRETS = [s for s in SETTINGS if is_secret(s)]


@pytest.fixture(autouse=True)
def no_rtcsignal_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """``config check`` reads RTCSIGNAL_* as serve would: none may leak in from the shell."""
    for name in list(os.environ):
        if name.startswith("RTCSIGNAL_"):
            monkeypatch.delenv(name)


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["config", "check", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return str(path)


def test_example_round_trips_through_check(tmp_path):
    example = run_cli("config", "example")
    assert example.returncode == 0 and example.stderr == "", example.stderr
    example_file = write(tmp_path, example.stdout)

    checked = run_cli("config", "check", example_file)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    effective_file = tmp_path / "effective.toml"
    effective_file.write_text(checked.stdout)

    # Both files are every default: read back, each is exactly Config().
    assert load_config({}, env={}, file=example_file) == Config()
    assert load_config({}, env={}, file=str(effective_file)) == Config()
    # The check prints every setting; the example sets every one but the secrets.
    assert set(tomllib.loads(checked.stdout)) == {s.name for s in SETTINGS}
    assert set(tomllib.loads(example.stdout)) == {s.name for s in SETTINGS if s not in SECRETS}
    for s in SECRETS:  # shown, commented out, with a placeholder rather than a value
        assert f"# {s.name} = " in example.stdout, s.name
    for s in SETTINGS:  # each documented with its flag and environment variable
        assert s.flag in example.stdout and s.env in example.stdout, s.name


def wrong_type(default: Any) -> str:
    """A TOML value of the wrong type for a setting whose default is ``default``."""
    if isinstance(default, bool):
        return "1"
    if isinstance(default, int):
        return "1.5"  # an integer setting must not round a float
    if isinstance(default, float):
        return "[1.0]"
    if isinstance(default, tuple):
        return "[1, 2]"
    return "5"


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
def test_wrong_type_for_each_setting_is_one_line_naming_it(tmp_path, capsys, setting):
    path = write(tmp_path, f"{setting.name} = {wrong_type(setting.default)}\n")
    code, out, err = check(capsys, path)
    assert (code, out) == (2, ""), (code, out, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"rtcsignal: {setting.name} (file {path})"), err


@pytest.mark.parametrize(("text", "key"), [
    ("prot = 8083\n", "prot"),  # a typo
    ("[rtcsignal]\nport = 8083\nmax_conections = 5\n", "max_conections"),
    ('port = 8083\n[rtcsignal]\nhost = "::1"\n', "port"),  # outside the [rtcsignal] table
    ("[limits]\nrate_limit = 5\n", "limits"),  # settings are not grouped in tables
    ("port = 70000\n", "port"),  # right type, out of range
    ('log_level = "loud"\n', "log_level"),
    ('allowed_origins = "https://a.example, not a pattern"\n', "allowed_origins"),
    ("max_message_size = 1048576\nrate_burst_bytes = 1024\n", "rate_burst_bytes"),
    ('auth = "jwt"\n', "auth"),  # needs a key
    ('auth = "jwt"\njwt_public_key_file = ["{missing}"]\n', "jwt_public_key_file"),
    ('certfile = "{missing}"\nkeyfile = "{missing}"\n', "certfile"),
])
def test_invalid_config_is_one_line_naming_the_key(tmp_path, capsys, text, key):
    path = write(tmp_path, text.format(missing=tmp_path / "missing.pem"))
    code, out, err = check(capsys, path)
    assert (code, out) == (2, ""), (code, out, err)
    assert len(err.splitlines()) == 1, err
    line = err.removeprefix("rtcsignal: ")
    assert line.startswith(key) or f"'{key}'" in line, line


def test_unknown_key_suggests_the_setting_it_resembles(tmp_path, capsys):
    code, _, err = check(capsys, write(tmp_path, "max_conections = 5\n"))
    assert code == 2 and "did you mean 'max_connections'" in err, err


def test_not_toml_says_where(tmp_path, capsys):
    path = write(tmp_path, "port = 8083\nhost = \n")
    code, _, err = check(capsys, path)
    assert code == 2 and len(err.splitlines()) == 1 and "line 2" in err, err


def test_check_masks_secrets_from_file_env_and_flags(tmp_path, capsys, monkeypatch):
    """Every secret setting, set in each source, comes out masked; so does the password in
    a broker URL. Nothing secret appears anywhere in the output."""
    values = {s.name: f"{s.name}-{base64.b32encode(os.urandom(10)).decode()}" for s in SECRETS}
    assert values, "no setting is a secret: is_secret() no longer matches jwt_secret?"
    password = "pw-" + os.urandom(6).hex()
    lines = [f'broker = "redis://rtc:{password}@redis.internal:6379/0"']
    sources: list[str] = []
    for i, s in enumerate(SECRETS):  # spread over the three sources
        if i % 3 == 0:
            lines.append(f'{s.name} = "{values[s.name]}"')
            sources.append("file")
        elif i % 3 == 1:
            monkeypatch.setenv(s.env, values[s.name])
            sources.append("env")
        else:
            sources.append("flag")
    flags = [arg for s, src in zip(SECRETS, sources, strict=True) if src == "flag"
             for arg in (s.flag, values[s.name])]
    path = write(tmp_path, "\n".join(lines) + "\n")
    code, out, err = check(capsys, path, *flags)
    assert code == 0, err
    for secret in (*values.values(), password):
        assert secret not in out and secret not in err, secret
    shown = tomllib.loads(out)
    for s in SECRETS:
        assert shown[s.name] == MASK, (s.name, shown[s.name])
    assert shown["broker"] == f"redis://rtc:{MASK}@redis.internal:6379/0", shown["broker"]


def test_check_shows_what_serve_would_run_flag_over_env_over_file(tmp_path, capsys,
                                                                 monkeypatch):
    path = write(tmp_path, 'port = 9001\nhost = "127.0.0.2"\nlog_level = "error"\n')
    monkeypatch.setenv("RTCSIGNAL_PORT", "9002")
    monkeypatch.setenv("RTCSIGNAL_LOG_LEVEL", "warning")
    code, out, err = check(capsys, path, "--log-level", "debug")
    assert code == 0, err
    shown = tomllib.loads(out)
    assert (shown["host"], shown["port"], shown["log_level"]) == ("127.0.0.2", 9002, "debug")
    # The file named by RTCSIGNAL_CONFIG when none is given, as serve reads it.
    monkeypatch.setenv("RTCSIGNAL_CONFIG", path)
    monkeypatch.delenv("RTCSIGNAL_PORT")
    code, out, err = check(capsys)
    assert code == 0 and tomllib.loads(out)["port"] == 9001, err


def test_check_takes_a_dash_leading_secret_as_a_value(capsys):
    secret = "-" + base64.b64encode(os.urandom(33)).decode()
    code, out, err = check(capsys, "--jwt-secret", secret, "--auth", "jwt")
    assert code == 0, err
    assert secret not in out and tomllib.loads(out)["auth"] == "jwt"


def test_check_repeats_the_start_up_warnings(tmp_path, capsys):
    """A public listener without an origin allow-list is legal but worth a warning."""
    code, out, err = check(capsys, write(tmp_path, 'host = "0.0.0.0"\n'))
    assert code == 0 and tomllib.loads(out)["host"] == "0.0.0.0"
    assert err.startswith("rtcsignal: warning:") and "--allowed-origins" in err, err

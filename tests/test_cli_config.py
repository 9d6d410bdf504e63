"""Issue 2, point 2: CLI flags, RTCSIGNAL_* environment, --config TOML, precedence, bad values."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from rtcsignal import cli
from rtcsignal.config import Config, ConfigError, load_config
from tests.helpers import close_all, get, http_request, open_client
from tests.rawws import RawWS

RTCSIGNAL = str(Path(sys.executable).with_name("rtcsignal"))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTCSIGNAL_")}
    env.update(extra)
    return env


def toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "rtcsignal.toml"
    path.write_text(text)
    return str(path)


# --- load_config: defaults, each source, precedence -----------------------------------------


def test_defaults():
    cfg = load_config({}, env={})
    assert cfg == Config()
    assert (cfg.host, cfg.port, cfg.path) == ("127.0.0.1", 8083, "/signaling")
    assert cfg.heartbeat_interval == 30.0
    assert cfg.drain_timeout == 10.0
    assert cfg.log_level == "info"
    assert cfg.log_format == "auto"


@pytest.mark.parametrize(("name", "raw", "value"), [
    ("host", "0.0.0.0", "0.0.0.0"),
    ("port", "9123", 9123),
    ("path", "/ws", "/ws"),
    ("heartbeat_interval", "2.5", 2.5),
    ("drain_timeout", "0.5", 0.5),
    ("log_level", "debug", "debug"),
    ("log_format", "text", "text"),
])
def test_each_setting_from_flag_env_and_file(tmp_path, name, raw, value):
    assert getattr(load_config({name: raw}, env={}), name) == value
    assert getattr(load_config({}, env={f"RTCSIGNAL_{name.upper()}": raw}), name) == value
    file_value = value if not isinstance(value, str) else json.dumps(value)
    path = toml(tmp_path, f"{name} = {file_value}\n")
    assert getattr(load_config({}, env={}, file=path), name) == value


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    path = toml(tmp_path, 'port = 9003\npath = "/from-file"\nheartbeat_interval = 3.0\n'
                          'log_level = "warning"\n')
    env = {"RTCSIGNAL_PORT": "9002", "RTCSIGNAL_PATH": "/from-env"}
    flags = {"port": "9001"}
    cfg = load_config(flags, env=env, file=path)
    assert cfg.port == 9001  # flag beats env and file
    assert cfg.path == "/from-env"  # env beats file
    assert cfg.heartbeat_interval == 3.0  # file beats default
    assert cfg.host == "127.0.0.1"  # default
    assert load_config({}, env=env, file=path).port == 9002
    assert load_config({}, env={}, file=path).port == 9003
    assert load_config({}, env={}).port == 8083
    # A flag left unset (None, as argparse gives) does not hide the lower sources.
    assert load_config({"port": None}, env=env, file=path).port == 9002


def test_config_file_from_env_variable(tmp_path):
    path = toml(tmp_path, "port = 9444\n")
    assert load_config({}, env={"RTCSIGNAL_CONFIG": path}).port == 9444


def test_config_file_rtcsignal_table(tmp_path):
    path = toml(tmp_path, "[rtcsignal]\nport = 9555\nheartbeat_interval = 1\n")
    cfg = load_config({}, env={}, file=path)
    assert (cfg.port, cfg.heartbeat_interval) == (9555, 1.0)


@pytest.mark.parametrize(("flags", "env", "setting"), [
    ({"port": "70000"}, {}, "port"),
    ({"port": "abc"}, {}, "port"),
    ({}, {"RTCSIGNAL_PORT": "-1"}, "port"),
    ({"heartbeat_interval": "0"}, {}, "heartbeat_interval"),
    ({"heartbeat_interval": "soon"}, {}, "heartbeat_interval"),
    ({}, {"RTCSIGNAL_HEARTBEAT_INTERVAL": "nan"}, "heartbeat_interval"),
    ({"log_level": "loud"}, {}, "log_level"),
    ({"log_format": "xml"}, {}, "log_format"),
    ({"path": "no-slash"}, {}, "path"),
    ({"drain_timeout": "-3"}, {}, "drain_timeout"),
])
def test_bad_values_raise_config_error_naming_setting(flags, env, setting):
    with pytest.raises(ConfigError) as info:
        load_config(flags, env=env)
    assert str(info.value).startswith(setting), str(info.value)


def test_bad_file_value_names_setting(tmp_path):
    path = toml(tmp_path, 'port = "eighty"\n')
    with pytest.raises(ConfigError, match="port"):
        load_config({}, env={}, file=path)


# --- the real command line ---------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rtcsignal", *args], capture_output=True,
                          text=True, timeout=20, env=env or clean_env())


def test_help_lists_the_documented_flags():
    out = run_cli("serve", "--help")
    assert out.returncode == 0, out.stderr
    for flag in ("--host", "--port", "--path", "--heartbeat-interval", "--log-level",
                 "--log-format", "--config", "--drain-timeout"):
        assert flag in out.stdout, flag


@pytest.mark.parametrize(("args", "env", "setting", "allowed"), [
    (["--port", "70000"], {}, "port", "65535"),
    (["--heartbeat-interval", "zero"], {}, "heartbeat_interval", "number"),
    (["--log-format", "xml"], {}, "log_format", "json"),
    (["--log-level", "verbose"], {}, "log_level", "debug"),
    ([], {"RTCSIGNAL_PORT": "http"}, "port", "integer"),
    ([], {"RTCSIGNAL_LOG_FORMAT": "yaml"}, "log_format", "text"),
])
def test_bad_value_exits_2_with_one_line(args, env, setting, allowed):
    out = run_cli("serve", *args, env=clean_env(**env))
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert setting in lines[0] and allowed in lines[0], lines[0]


def test_bad_value_in_config_file_exits_2(tmp_path):
    path = toml(tmp_path, 'log_level = "shouty"\n')
    out = run_cli("serve", "--config", path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "log_level" in lines[0], out.stderr


async def test_subprocess_precedence_flag_env_file(run_server, tmp_path):
    path = toml(tmp_path, 'path = "/from-file"\nheartbeat_interval = 0.2\n')
    # env beats file for path; the file's heartbeat interval applies; flag beats env below.
    server = run_server("--config", path, env={"RTCSIGNAL_PATH": "/from-env"})
    assert server.wait_for(lambda e: e.get("event") == "listening")["url"].endswith("/from-env")
    ws, greeting = await open_client(server.url(path="/from-env"))
    assert greeting["clientsCount"] == 1
    status, _, _ = await get(server, "/from-file")
    assert status == 404
    await close_all([ws])

    server2 = run_server("--config", path, "--path", "/from-flag",
                         env={"RTCSIGNAL_PATH": "/from-env"})
    ws, _ = await open_client(server2.url(path="/from-flag"))
    status, _, _ = await get(server2, "/from-env")
    assert status == 404
    await close_all([ws])


async def test_env_port_and_default_json_logs_when_not_a_terminal(run_server):
    # --log-format auto with a pipe for stderr: JSON lines (the fixture parses them).
    server = run_server("--log-format", "auto", env={"RTCSIGNAL_HEARTBEAT_INTERVAL": "0.25"})
    assert server.raw and all(line.lstrip().startswith("{") for line in server.raw)
    ws, _ = await open_client(server.url())
    await close_all([ws])


def test_rtcsignal_entry_point_and_env_port(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([RTCSIGNAL, "serve", "--log-format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=clean_env(RTCSIGNAL_PORT=str(port)))
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        assert line["event"] == "listening", line
        assert line["url"] == f"ws://127.0.0.1:{port}/signaling"
        # An HTTP answer proves the server loop is running before we stop it.
        status, _, _ = asyncio.run(http_request("127.0.0.1", port, "/healthz"))
        assert status == 200
    finally:
        proc.terminate()
        assert proc.wait(15) == 0


def test_sigterm_right_after_listening_line_exits_0():
    """Once the server says it is listening, SIGTERM must drain and exit 0 (not die of the
    signal). Repeated because the window between the two is short (about 40% of starts
    lose the race while the signal handlers are installed after the line)."""
    for _ in range(12):
        proc = subprocess.Popen(
            [sys.executable, "-m", "rtcsignal", "serve", "--port", "0", "--log-format", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env())
        try:
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline())["event"] == "listening"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0, "killed by SIGTERM instead of a graceful exit"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


# --- values starting with '-' (issue 8, item 12) --------------------------------------------


async def test_jwt_secret_starting_with_dash_works(run_server):
    """One random base64 secret in 64 starts with '-'; argparse took it for a flag and the
    server exited 2. Both subcommands must take it as the value."""
    secret = "-" + base64.b64encode(os.urandom(48)).decode()
    server = run_server("--auth", "jwt", "--jwt-secret", secret)
    minted = run_cli("token", "--jwt-secret", secret, "--sub", "alice", "--ttl", "60")
    assert minted.returncode == 0, minted.stderr
    by_cli = minted.stdout.strip()
    by_lib = jwt.encode({"sub": "bob", "exp": int(time.time()) + 60}, secret, algorithm="HS256")
    assert jwt.decode(by_cli, secret, algorithms=["HS256"])["sub"] == "alice"
    wa, _ = await open_client(server.url(f"token={by_cli}"))
    wb, gb = await open_client(server.url(f"token={by_lib}"))
    assert gb["clientsCount"] == 2
    # The secret is the whole argument, not the argument without its '-'.
    wrong = jwt.encode({"sub": "eve", "exp": int(time.time()) + 60}, secret[1:],
                       algorithm="HS256")
    raw = await RawWS.connect(server.host, server.port)
    try:
        assert (await raw.handshake(f"token={wrong}")).status == 401
    finally:
        raw.close()
    await close_all([wa, wb])


@pytest.mark.parametrize(("argv", "want"), [
    (["serve", "--jwt-secret", "-abc", "--port", "0"],
     ["serve", "--jwt-secret=-abc", "--port", "0"]),
    (["token", "--sub", "-x", "--jwt-secret", "--b64==", "--ttl", "-5"],
     ["token", "--sub=-x", "--jwt-secret=--b64==", "--ttl=-5"]),
    (["serve", "--jwt-audience", "-"], ["serve", "--jwt-audience=-"]),
    # Left for argparse: a known option (exact, with a value, abbreviated), a flag without
    # a value, an ambiguous abbreviation, the end-of-options marker, another subcommand's
    # option never taken as one here.
    (["serve", "--jwt-secret", "--port", "0"], None),
    (["serve", "--jwt-secret", "--port=0"], None),
    (["serve", "--jwt-secret", "--po", "0"], None),
    (["serve", "--jwt-secret", "-h"], None),
    (["serve", "--require-origin", "-x"], None),
    (["serve", "--jwt-secr", "-abc"], None),
    (["serve", "--jwt-secret", "--"], None),
    (["--help"], None),
])
def test_dash_values_are_joined_to_their_flag(argv, want):
    assert cli.join_dash_values(cli.build_parser(), argv) == (argv if want is None else want)


def test_missing_value_still_exits_2():
    out = run_cli("serve", "--jwt-secret", "--port", "0")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "--jwt-secret" in out.stderr and "expected one argument" in out.stderr

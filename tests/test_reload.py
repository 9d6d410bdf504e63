"""Issue 12: SIGHUP reloads the settings file without dropping a connection (also through the
``--workers`` supervisor), a bad file keeps the old settings with one line saying why, and
``--log-file`` is reopened on SIGHUP so logrotate works. Real processes, real signals; every
wait is for a log line, a frame or an HTTP answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.helpers import close_all, metrics, open_client, recv_json, send_json

A = "https://a.example"
B = "https://b.example"


async def log_line(server: Any, pred: Any, timeout: float = 15.0) -> dict[str, Any]:
    return await asyncio.to_thread(server.wait_for, pred, timeout)


def settings(file: Path, **values: Any) -> str:
    """Write a TOML settings file; returns its path."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    file.write_text("\n".join(lines) + "\n")
    return str(file)


async def refused(url: str, origin: str) -> int:
    """The HTTP status a handshake from ``origin`` gets (101 if it is accepted)."""
    try:
        ws = await connect(url, origin=origin, open_timeout=5)
    except InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return 101


async def test_sighup_refuses_a_newly_forbidden_origin_and_keeps_open_connections(
        run_server, tmp_path):
    config = settings(tmp_path / "rtcsignal.toml", allowed_origins=[A, B])
    server = run_server("--config", config)
    url = server.url("room=r")
    (b1, g1), (b2, g2) = [await open_client(url, origin=B) for _ in range(2)]
    await recv_json(b1)  # joined
    await recv_json(b2)  # joined
    assert (await recv_json(b1))["type"] == "peer-joined"

    settings(tmp_path / "rtcsignal.toml", allowed_origins=[A])
    server.proc.send_signal(signal.SIGHUP)
    reloaded = await log_line(server, lambda e: e.get("event") == "reloaded")
    assert reloaded["changed"] == ["allowed_origins"], reloaded

    assert await refused(server.url(), B) == 403
    assert await refused(server.url(), A) == 101
    # The open connections from B stay, and still talk.
    await send_json(b1, {"type": "offer", "sdp": "x"})
    got = await recv_json(b2)
    assert (got["type"], got["from"]) == ("offer", g1["peerId"])
    assert not [e for e in server.lines if e.get("event") == "disconnect"
                and e["peer"] in (g1["peerId"], g2["peerId"])]
    await close_all([b1, b2])


async def test_sighup_with_a_bad_file_keeps_the_old_settings(run_server, tmp_path):
    path = tmp_path / "rtcsignal.toml"
    config = settings(path, allowed_origins=[A], rate_limit=1000.0)
    server = run_server("--config", config)
    url = server.url()
    ws, _ = await open_client(url, origin=A)

    for bad in ("allowed_origins = [1]\n", "rate_limit = \n", "no_such_setting = 1\n"):
        path.write_text(bad)
        before = len([e for e in server.lines if e.get("level") == "error"])
        server.proc.send_signal(signal.SIGHUP)
        failed = await log_line(server, lambda e, n=before: e.get("event") == "reload failed"
                                and len([x for x in server.lines
                                         if x.get("level") == "error"]) > n)
        assert failed["level"] == "error" and str(path) in failed["reason"], failed
        # One line per failed reload, naming the problem; nothing was applied.
        assert [e["event"] for e in server.lines if e.get("level") == "error"][before:] == [
            "reload failed"]
        assert await refused(url, B) == 403
        assert await refused(url, A) == 101
    assert not any(e.get("event") == "reloaded" for e in server.lines)

    # The connection from before is untouched and its rate limit is the old one.
    for i in range(20):
        await send_json(ws, {"type": "ping", "id": i})
    for i in range(20):
        assert await recv_json(ws) == {"type": "pong", "ref": i}
    # A good file afterwards applies, limits included, to the open connection too.
    settings(path, allowed_origins=[A, B], rate_limit=1.0, rate_burst=2.0)
    server.proc.send_signal(signal.SIGHUP)
    reloaded = await log_line(server, lambda e: e.get("event") == "reloaded")
    assert set(reloaded["changed"]) == {"allowed_origins", "rate_limit", "rate_burst"}
    assert await refused(url, B) == 101
    codes = []
    for i in range(4):
        await send_json(ws, {"type": "ping", "id": i})
    for _ in range(4):
        reply = await recv_json(ws)
        codes.append(reply.get("code", reply["type"]))
    assert "rate-limited" in codes, codes
    await ws.close()


async def test_a_restart_only_setting_is_named_and_not_applied(run_server, tmp_path):
    path = tmp_path / "rtcsignal.toml"
    server = run_server("--config", settings(path, path="/signaling"))
    settings(path, path="/elsewhere", heartbeat_interval=20.0)
    server.proc.send_signal(signal.SIGHUP)
    reloaded = await log_line(server, lambda e: e.get("event") == "reloaded")
    assert reloaded["changed"] == ["heartbeat_interval"], reloaded
    assert reloaded["needs_restart"] == ["path"], reloaded
    ws, _ = await open_client(server.url())  # still /signaling
    await ws.close()


# --- --log-file and rotation ---------------------------------------------------------------


class LogFileServer:
    """``rtcsignal serve --log-file PATH``: nothing on stderr; lines read from the file."""

    def __init__(self, log: Path, *flags: str) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rtcsignal", "serve", "--port", "0", "--log-file", str(log),
             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        listening = self.wait_for(log, lambda e: e.get("event") == "listening"
                                  and "worker" not in e)
        self.port = int(listening["url"].rsplit(":", 1)[1].split("/", 1)[0])
        self.host = "127.0.0.1"

    def lines(self, path: Path) -> list[dict[str, Any]]:
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text()
            assert text == "" or text.endswith("\n"), "a partial line in the log"
            return [json.loads(line) for line in text.splitlines()]
        return []

    def wait_for(self, path: Path, pred: Any, timeout: float = 15.0) -> dict[str, Any]:
        """Poll ``path`` until a line matches (the file is all there is to watch)."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.lines(path):
                if pred(entry):
                    return entry
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.stderr.read()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no such line in {path}: {self.lines(path)[-5:]}")
            time.sleep(0.02)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def log_file_server():
    started: list[LogFileServer] = []

    def start(log: Path, *flags: str) -> LogFileServer:
        server = LogFileServer(log, *flags)
        started.append(server)
        return server

    yield start
    for server in started:
        with contextlib.suppress(Exception):
            server.stop()


async def rotate(server: LogFileServer, log: Path, rotated: Path, reloads: int = 1) -> None:
    """What logrotate does: rename the file, SIGHUP, and the next lines go to a new one."""
    os.rename(log, rotated)
    server.proc.send_signal(signal.SIGHUP)
    await asyncio.to_thread(server.wait_for, log, lambda e: e.get("event") == "reloaded")
    # Every reload line (one per worker) is in the new file, none in the old one.
    await asyncio.to_thread(
        server.wait_for, log,
        lambda e: len([x for x in server.lines(log) if x.get("event") == "reloaded"])
        == reloads)


async def test_log_file_is_reopened_on_sighup(log_file_server, tmp_path):
    log, rotated = tmp_path / "rtcsignal.log", tmp_path / "rtcsignal.log.1"
    server = log_file_server(log)
    assert server.proc.stderr is not None
    url = f"ws://127.0.0.1:{server.port}/signaling"
    ws, _ = await open_client(url)
    await asyncio.to_thread(server.wait_for, log, lambda e: e.get("event") == "connect")

    await rotate(server, log, rotated)
    ws2, second = await open_client(url)
    await asyncio.to_thread(server.wait_for, log, lambda e: e.get("event") == "connect"
                            and e.get("peer") == second["peerId"])
    await close_all([ws, ws2])
    assert server.stop() == 0
    old = [e["event"] for e in server.lines(rotated)]
    new = [e["event"] for e in server.lines(log)]
    assert old == ["listening", "connect"], old
    assert new[:2] == ["reloaded", "connect"] and new[-1] == "stopped", new
    assert server.proc.stderr.read() == ""  # nothing went to stderr


async def test_workers_get_the_sighup_and_their_lines_follow_the_rotation(
        log_file_server, tmp_path):
    log, rotated = tmp_path / "rtcsignal.log", tmp_path / "rtcsignal.log.1"
    config = settings(tmp_path / "rtcsignal.toml", allowed_origins=[A, B])
    server = log_file_server(log, "--workers", "2", "--broker", "redis://127.0.0.1:1/0",
                             "--config", config, "--drain-timeout", "5")
    url = f"ws://127.0.0.1:{server.port}/signaling"
    for worker in (0, 1):
        await asyncio.to_thread(server.wait_for, log, lambda e, w=worker: e.get("event")
                                == "listening" and e.get("worker") == w)
    opened = [await open_client(url, origin=B) for _ in range(6)]

    settings(tmp_path / "rtcsignal.toml", allowed_origins=[A])
    await rotate(server, log, rotated, reloads=2)
    reloaded = [e for e in server.lines(log) if e.get("event") == "reloaded"]
    assert sorted(e["worker"] for e in reloaded) == [0, 1], reloaded
    assert not any(e.get("event") == "reloaded" for e in server.lines(rotated))
    for _ in range(4):  # whichever worker takes it, the new origins apply
        assert await refused(url, B) == 403
    for ws, _ in opened:  # and no connection was dropped
        await send_json(ws, {"type": "ping"})
        assert await recv_json(ws) == {"type": "pong"}
    await close_all([ws for ws, _ in opened])
    assert server.stop() == 0
    assert server.lines(log)[-1]["event"] == "stopped"
    assert any(e.get("event") == "disconnect" for e in server.lines(log))


async def test_sighup_changes_the_log_level(log_file_server, tmp_path):
    log = tmp_path / "rtcsignal.log"
    path = tmp_path / "rtcsignal.toml"
    server = log_file_server(log, "--config", settings(path, log_level="info"))
    url = f"ws://127.0.0.1:{server.port}/signaling"

    settings(path, log_level="debug")
    server.proc.send_signal(signal.SIGHUP)
    reloaded = await asyncio.to_thread(
        server.wait_for, log, lambda e: e.get("event") == "reloaded")
    assert reloaded["changed"] == ["log_level"]
    ws, _ = await open_client(url)
    await send_json(ws, {"type": "hello"})
    line = await asyncio.to_thread(server.wait_for, log, lambda e: e.get("event") == "message")
    assert line["level"] == "debug" and "hello" not in json.dumps(line)  # never the body
    await ws.close()

    settings(path, log_level="warning")  # its own "reloaded" line is info: not written
    server.proc.send_signal(signal.SIGHUP)
    while (await metrics(server))['rtcsignal_config_reloads_total{outcome="applied"}'] < 2:
        await asyncio.sleep(0.02)  # polled: the reload itself logs nothing now
    ws, greeting = await open_client(url)
    path.write_text("log_level = 1\n")  # a bad file logs an error, after the connect
    server.proc.send_signal(signal.SIGHUP)
    await asyncio.to_thread(server.wait_for, log, lambda e: e.get("event") == "reload failed")
    assert not [e for e in server.lines(log) if e.get("peer") == greeting["peerId"]]
    await ws.close()


async def test_sighup_rotates_the_jwt_secret_and_open_connections_stay(run_server, tmp_path):
    from rtcsignal.config import Config
    from rtcsignal.security.tokens import mint

    old_secret, new_secret = "o" * 48, "n" * 48
    secret_file = tmp_path / "jwt.secret"
    secret_file.write_text(old_secret)
    server = run_server("--auth", "jwt", "--jwt-secret-file", str(secret_file))
    old_token = mint(Config(auth="jwt", jwt_secret=old_secret), sub="alice")
    new_token = mint(Config(auth="jwt", jwt_secret=new_secret), sub="bob")
    alice, _ = await open_client(server.url(f"token={old_token}"))
    assert await refused(server.url(f"token={new_token}"), A) == 401

    secret_file.write_text(new_secret)
    server.proc.send_signal(signal.SIGHUP)
    await log_line(server, lambda e: e.get("event") == "reloaded")
    assert await refused(server.url(f"token={old_token}"), A) == 401
    bob, _ = await open_client(server.url(f"token={new_token}"))
    await send_json(alice, {"type": "hello"})  # the default room: alice's connection stays
    got = await recv_json(bob)
    assert got["type"] == "hello"
    secret_file.unlink()  # an unreadable key file: nothing changes, one line says why
    server.proc.send_signal(signal.SIGHUP)
    failed = await log_line(server, lambda e: e.get("event") == "reload failed")
    assert "jwt_secret_file" in failed["reason"], failed
    assert await refused(server.url(f"token={new_token}"), A) == 101
    raw = "".join(server.raw)
    assert old_secret not in raw and new_secret not in raw and new_token not in raw
    await close_all([alice, bob])

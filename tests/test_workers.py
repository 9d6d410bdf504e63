"""Issue 9, item 6: ``serve --workers N``, real processes over real sockets.

The broker URL points where nobody listens: these tests check the process model only (one
port, spread connections, restart, drain), which must work whether or not the broker is
reachable. Every wait is for a log line, a frame or a process exit.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from typing import Any

import psutil
import pytest
from websockets.exceptions import ConnectionClosed

from tests.helpers import close_all, get, open_client, recv_json, send_json

BROKER = "redis://127.0.0.1:1/0"  # nobody listens there
DRAIN = 5.0


async def log_line(server: Any, pred: Any, timeout: float = 15.0) -> dict[str, Any]:
    """``server.wait_for`` off the event loop, so clients keep answering meanwhile."""
    return await asyncio.to_thread(server.wait_for, pred, timeout)


async def start_workers(run_server: Any, *flags: str) -> tuple[Any, dict[int, int]]:
    """A supervisor with two workers, once it says it listens; and {worker index: pid}."""
    server = run_server("--workers", "2", "--broker", BROKER, "--drain-timeout", str(DRAIN),
                        *flags)
    listening = await log_line(server, lambda e: e.get("event") == "listening"
                               and "workers" in e)
    assert listening["workers"] == 2
    assert listening["url"] == f"ws://127.0.0.1:{server.port}/signaling"
    pids = {e["worker"]: e["pid"] for e in server.lines if e.get("event") == "worker started"}
    assert sorted(pids) == [0, 1] and len(set(pids.values())) == 2
    return server, pids


async def open_on_workers(server: Any, n: int) -> list[tuple[Any, str, int]]:
    """``n`` clients, each with its peer id and the pid of the worker that accepted it."""
    clients = await asyncio.gather(*(open_client(server.url()) for _ in range(n)))
    out = []
    for ws, greeting in clients:
        peer = greeting["peerId"]
        line = await log_line(server, lambda e, p=peer: e.get("event") == "connect"
                              and e.get("peer") == p)
        out.append((ws, peer, line["pid"]))
    return out


async def closed_code(ws: Any, timeout: float = DRAIN + 5) -> int | None:
    """The close code the server sent, or None when the connection just dropped."""
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), timeout)
    return ws.protocol.close_rcvd.code if ws.protocol.close_rcvd is not None else None


async def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    return await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)


def test_workers_without_broker_exit_2_with_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "rtcsignal", "serve", "--workers", "2", "--port", "0"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "--broker" in lines[0], lines


def test_port_taken_exits_2_before_any_worker_starts():
    with socket.socket() as taken:  # no SO_REUSEPORT: nobody may share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "rtcsignal", "serve", "--workers", "2", "--broker", BROKER,
             "--port", str(port), "--log-format", "json"],
            capture_output=True, text=True, timeout=30,
        )
    assert out.returncode == 2, (out.stdout, out.stderr)  # a setting's fault (--port)
    assert "worker started" not in out.stderr
    assert out.stderr.splitlines()[-1].startswith("rtcsignal: port:"), out.stderr


def test_a_worker_that_cannot_start_stops_the_supervisor_with_its_status(tmp_path):
    missing = str(tmp_path / "missing.pem")  # read by each worker as it binds, not before
    out = subprocess.run(
        [sys.executable, "-m", "rtcsignal", "serve", "--workers", "2", "--broker", BROKER,
         "--port", "0", "--log-format", "json", "--certfile", missing, "--keyfile", missing],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "rtcsignal: cannot start:" in out.stderr
    lines = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    # The supervisor's own lines: its "worker ..." events, and those with no worker field.
    events = [e["event"] for e in lines if e["event"].startswith("worker") or "worker" not in e]
    assert "worker failed to start" in events and "listening" not in events, events
    assert events.count("worker started") == 2, events  # not restarted
    assert lines[-1]["event"] == "stopped" and lines[-1]["status"] == 1


async def test_two_workers_share_the_port_restart_and_drain(run_server):
    server, pids = await start_workers(run_server)
    for _ in range(4):
        status, _, body = await get(server, "/healthz")
        assert status == 200, body

    # The kernel spreads connections over both workers.
    clients = await open_on_workers(server, 20)
    by_pid = {pid: [c for c in clients if c[2] == pid] for pid in pids.values()}
    assert all(by_pid.values()), {pid: len(c) for pid, c in by_pid.items()}

    # SIGKILL worker 0: its clients drop, it is restarted as a new process.
    victim = pids[0]
    psutil.Process(victim).kill()
    for ws, _, _ in by_pid[victim]:
        assert await closed_code(ws) is None  # no close frame from a killed process
    exited = await log_line(server, lambda e: e.get("event") == "worker exited"
                            and e.get("pid") == victim)
    assert (exited["worker"], exited["signal"], exited["restart_in_s"]) == (0, "SIGKILL", 0.5)
    started = await log_line(server, lambda e: e.get("event") == "worker started"
                             and e.get("worker") == 0 and e.get("pid") != victim)
    reborn = started["pid"]
    await log_line(server, lambda e: e.get("event") == "listening" and e.get("pid") == reborn)

    # Clients on the other worker were undisturbed: still open, still answered.
    survivors = by_pid[pids[1]]
    for ws, _, _ in survivors:
        await send_json(ws, {"type": "ping"})
        assert await recv_json(ws) == {"type": "pong"}

    # The restarted worker takes connections again.
    fresh = await open_on_workers(server, 20)
    assert {pid for _, _, pid in fresh} == {reborn, pids[1]}

    # SIGTERM to the supervisor: every client gets 1001, exit 0 after the drain.
    server.proc.send_signal(signal.SIGTERM)
    open_clients = [ws for ws, _, _ in survivors + fresh]
    codes = await asyncio.gather(*(closed_code(ws) for ws in open_clients))
    assert codes == [1001] * len(open_clients)
    assert await wait_exit(server.proc, DRAIN + 5) == 0
    stopped = await log_line(server, lambda e: e.get("event") == "stopped" and "status" in e)
    assert stopped["status"] == 0
    await close_all(open_clients)


async def test_restart_backoff_doubles_and_second_sigint_keeps_draining(run_server):
    server, pids = await start_workers(run_server)
    pid = pids[1]
    seen = {pid}
    for delay in (0.5, 1.0):
        psutil.Process(pid).kill()
        exited = await log_line(server, lambda e, p=pid: e.get("event") == "worker exited"
                                and e.get("pid") == p)
        assert exited["restart_in_s"] == delay
        started = await log_line(server, lambda e: e.get("event") == "worker started"
                                 and e.get("worker") == 1 and e.get("pid") not in seen)
        pid = started["pid"]
        seen.add(pid)
        await log_line(server, lambda e, p=pid: e.get("event") == "listening"
                       and e.get("pid") == p)

    clients = await open_on_workers(server, 4)
    server.proc.send_signal(signal.SIGINT)
    await log_line(server, lambda e: e.get("event") == "shutting down" and "workers" in e)
    server.proc.send_signal(signal.SIGINT)  # a second signal: still a clean drain
    codes = await asyncio.gather(*(closed_code(ws) for ws, _, _ in clients))
    assert codes == [1001] * len(clients)
    assert await wait_exit(server.proc, DRAIN + 5) == 0
    shutting = [e for e in server.lines if e.get("event") == "shutting down" and "workers" in e]
    assert len(shutting) == 1


async def test_killed_supervisor_leaves_no_workers(run_server):
    server, pids = await start_workers(run_server)
    clients = await open_on_workers(server, 6)
    server.proc.kill()
    # The workers see their stdin close, drain their clients and exit.
    codes = await asyncio.gather(*(closed_code(ws) for ws, _, _ in clients))
    assert codes == [1001] * len(clients)
    for pid in pids.values():
        assert await asyncio.wait_for(gone(pid), DRAIN + 5)


async def gone(pid: int) -> bool:
    """Polls until ``pid`` has exited (a zombie counts: its reaper is not ours to run)."""
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        await asyncio.sleep(0.05)

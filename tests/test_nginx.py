"""rtcsignal behind a real nginx (issue 5: "document the nginx path", trusted proxies).

nginx runs as a child process on a free port with a configuration modelled on
deploy/nginx.conf (plain HTTP instead of TLS) and proxies to a ``rtcsignal serve``
subprocess. Clients connect through it from different loopback source addresses
(127.0.0.2, 127.0.0.3, ...), so the address the server logs and limits can be told apart
from nginx's own socket address (127.0.0.1).

nginx is required: without it these tests fail (``make test`` installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.rawws import RawWS

TIMEOUT = 5.0
NGINX = os.environ.get("NGINX", "/usr/sbin/nginx")

CONF = """\
{user}
worker_processes 1;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;

    upstream rtcsignal {{
        server 127.0.0.1:{upstream};
    }}

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    server {{
        listen 127.0.0.1:{port};

        location /signaling {{
            proxy_pass http://rtcsignal;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
        }}

        location ~ ^/(healthz|readyz|test-signaling\\.html|ice-servers)$ {{
            proxy_pass http://rtcsignal;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    def __init__(self, binary: str, tmp: Path, upstream: int) -> None:
        self.port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(CONF.format(
            user="user root;" if os.geteuid() == 0 else "", tmp=tmp, upstream=upstream,
            port=self.port))
        self.proc = subprocess.Popen(
            [binary, "-p", str(tmp), "-c", str(conf), "-e", "stderr",
             "-g", f"daemon off; pid {tmp}/nginx.pid; error_log stderr notice;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        # nginx logs "start worker process N" once it listens and a worker is up.
        if not self._ready.wait(15) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("nginx did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "start worker process" in line:
                self._ready.set()
        self._ready.set()

    def url(self, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}/signaling" + (f"?{query}" if query else "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def nginx_for(tmp_path: Path) -> Iterator[Callable[[Any], Nginx]]:
    binary = NGINX if os.path.exists(NGINX) else shutil.which("nginx")
    if binary is None:
        pytest.fail(f"nginx not found at {NGINX}: these tests need a real nginx; "
                    "`make test` installs it (Debian package nginx)")
    started: list[Nginx] = []

    def start(server: Any) -> Nginx:
        n = Nginx(binary, tmp_path, server.port)
        started.append(n)
        return n

    yield start
    for n in started:
        n.stop()


async def open_via(nginx: Nginx, query: str = "", source: str = "127.0.0.1",
                   headers: dict[str, str] | None = None
                   ) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(nginx.url(query), ping_interval=None, compression=None,
                       open_timeout=TIMEOUT, local_addr=(source, 0),
                       additional_headers=headers)
    greeting = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert greeting.get("type") == "connected", greeting
    return ws, greeting


async def recv(ws: ClientConnection, kind: str) -> dict[str, Any]:
    msg = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert msg.get("type") == kind, msg
    return msg


async def connect_log(server: Any, peer_id: str) -> dict[str, Any]:
    return await asyncio.to_thread(
        server.wait_for, lambda e: e.get("event") == "connect" and e.get("peer") == peer_id)


async def test_client_through_nginx_is_greeted_relays_and_logged_with_its_address(
        run_server, nginx_for):
    server = run_server()
    nginx = nginx_for(server)
    room = "nginx-" + os.urandom(3).hex()
    a, ga = await open_via(nginx, f"room={room}")  # from 127.0.0.1
    await recv(a, "joined")
    b, gb = await open_via(nginx, f"room={room}", source="127.0.0.2")
    await recv(b, "joined")
    assert (await recv(a, "peer-joined"))["peerId"] == gb["peerId"]

    await a.send(json.dumps({"type": "offer", "sdp": "v=0", "to": gb["peerId"]}))
    got = await recv(b, "offer")
    assert got["from"] == ga["peerId"] and got["sdp"] == "v=0"
    await b.send(json.dumps({"type": "answer", "sdp": "v=0 answer", "to": ga["peerId"]}))
    assert (await recv(a, "answer"))["from"] == gb["peerId"]

    # The server's socket peer is nginx (127.0.0.1) for both; it logs the address nginx
    # forwarded for each client.
    assert (await connect_log(server, ga["peerId"]))["addr"] == "127.0.0.1"
    assert (await connect_log(server, gb["peerId"]))["addr"] == "127.0.0.2"

    http = await RawWS.connect("127.0.0.1", nginx.port)
    http.send_raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await http.read_answer()
    http.close()
    assert answer.status == 200 and json.loads(answer.body) == {"status": "ok"}, answer
    await a.close()
    await b.close()
    assert server.alive()


async def test_per_address_limit_counts_the_hop_nginx_appended(run_server, nginx_for):
    """Only nginx (127.0.0.1) is a trusted proxy here. A client at 127.0.0.2 forges a
    different X-Forwarded-For on each connection; nginx appends 127.0.0.2, the nearest
    untrusted hop, and that is the address the server counts: the third connection is
    refused with 429 whatever the forged part says."""
    server = run_server("--trusted-proxies", "127.0.0.1/32", "--max-connections-per-ip", "2")
    nginx = nginx_for(server)
    open_: list[ClientConnection] = []
    try:
        for forged in ("203.0.113.1", "203.0.113.2"):
            ws, greeting = await open_via(nginx, source="127.0.0.2",
                                          headers={"X-Forwarded-For": forged})
            open_.append(ws)
            assert (await connect_log(server, greeting["peerId"]))["addr"] == "127.0.0.2"
        with pytest.raises(InvalidStatus) as refused:
            await open_via(nginx, source="127.0.0.2",
                           headers={"X-Forwarded-For": "203.0.113.3"})
        response = refused.value.response
        assert response.status_code == 429, response
        assert int(response.headers["Retry-After"]) >= 1, response.headers
        assert b"too many connections" in response.body, response.body

        # Another client address through the same nginx is not affected, and its forged
        # header is ignored just the same.
        other, greeting = await open_via(nginx, source="127.0.0.3",
                                         headers={"X-Forwarded-For": "127.0.0.2"})
        open_.append(other)
        assert (await connect_log(server, greeting["peerId"]))["addr"] == "127.0.0.3"
        assert server.alive()
    finally:
        for ws in open_:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), TIMEOUT)

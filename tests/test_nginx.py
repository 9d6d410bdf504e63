"""rtcsignal behind a real nginx (issue 5: "document the nginx path", trusted proxies).

nginx runs as a child process on a free port with the shipped deploy/nginx.conf and
deploy/nginx-upstream.conf (listening on loopback, plain HTTP instead of TLS) and proxies to
a ``rtcsignal serve`` subprocess. Clients connect through it from different loopback source addresses
(127.0.0.2, 127.0.0.3, ...), so the address the server logs and limits can be told apart
from nginx's own socket address (127.0.0.1).

nginx is required: without it these tests fail (``make test`` installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from ssl import SSLContext
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.rawws import RawWS

TIMEOUT = 5.0
NGINX = os.environ.get("NGINX", "/usr/sbin/nginx")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"

#: The main nginx.conf around the shipped site and upstream files, as Debian's and the nginx
#: image's include them inside http {}; temporary files stay in the test's directory.
MAIN = """\
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
    include {tmp}/upstream.conf;
    include {tmp}/site.conf;
}}
"""


def one_sub(pattern: str, replacement: str, text: str) -> str:
    """Replace the one line ``pattern`` matches; failing loudly when the shipped file no
    longer has exactly one (the helper would otherwise test something else)."""
    out, n = re.subn(pattern, lambda _: replacement, text, flags=re.M)
    assert n == 1, f"expected one match of {pattern!r} in the shipped nginx files, found {n}"
    return out


def local_upstream(*ports: int) -> str:
    """deploy/nginx-upstream.conf with its instances' server lines replaced by one line per
    port in ``ports``, in that order."""
    text = (DEPLOY / "nginx-upstream.conf").read_text()
    lines = re.findall(r"^[ \t]*server[ \t]+127\.0\.0\.1:\d+;[ \t]*\n", text, flags=re.M)
    assert lines, "no `server 127.0.0.1:PORT;` line in deploy/nginx-upstream.conf"
    ours = "".join(f"    server 127.0.0.1:{port};\n" for port in ports)
    first = text.index(lines[0])
    for line in lines:
        text = text.replace(line, "", 1)
    return text[:first] + ours + text[first:]


def loopback_config(tmp: Path, port: int, upstream: str,
                    tls: tuple[Path, Path] | None = None) -> Path:
    """The shipped deploy/nginx.conf, in a whole nginx.conf with ``upstream``, listening on
    127.0.0.1:``port``: only its listen line and certificate paths change (TLS with the
    ``tls`` certificate and key, plain HTTP without)."""
    site = (DEPLOY / "nginx.conf").read_text()
    site = one_sub(r"^\s*listen\s+443\s+ssl;",
                   f"    listen 127.0.0.1:{port}{' ssl' if tls else ''};", site)
    cert, key = (f"    ssl_certificate {tls[0]};", f"    ssl_certificate_key {tls[1]};") if tls \
        else ("", "")
    site = one_sub(r"^\s*ssl_certificate\s+\S+;", cert, site)
    site = one_sub(r"^\s*ssl_certificate_key\s+\S+;", key, site)
    (tmp / "site.conf").write_text(site)
    (tmp / "upstream.conf").write_text(upstream)
    conf = tmp / "nginx.conf"
    conf.write_text(MAIN.format(user="user root;" if os.geteuid() == 0 else "", tmp=tmp))
    return conf


def nginx_binary() -> str:
    binary = NGINX if os.path.exists(NGINX) else shutil.which("nginx")
    if binary is None:
        pytest.fail(f"nginx not found at {NGINX}: these tests need a real nginx; "
                    "`make test` installs it (Debian package nginx)")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """nginx running ``conf`` (from ``loopback_config``) in the foreground on ``port``."""

    def __init__(self, binary: str, conf: Path, port: int, scheme: str = "ws") -> None:
        self.port = port
        self.scheme = scheme
        tmp = conf.parent
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
        return f"{self.scheme}://127.0.0.1:{self.port}/signaling" + (f"?{query}" if query else "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def nginx_for(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """``start(server)``: the shipped config in front of ``server`` (or of each server of a
    list: the shipped upstream with their ports), plain HTTP; ``tls=(cert, key)``: TLS;
    ``start(upstream=TEXT, ...)``: another upstream block."""
    binary = nginx_binary()
    started: list[Nginx] = []

    def start(server: Any = None, *, upstream: str | None = None,
              tls: tuple[Path, Path] | None = None) -> Nginx:
        port = free_port()
        if upstream is None:
            servers = server if isinstance(server, list | tuple) else [server]
            upstream = local_upstream(*(s.port for s in servers))
        conf = loopback_config(tmp_path, port, upstream, tls)
        n = Nginx(binary, conf, port, "wss" if tls else "ws")
        started.append(n)
        return n

    yield start
    for n in started:
        n.stop()


async def open_via(nginx: Nginx, query: str = "", source: str = "127.0.0.1",
                   headers: dict[str, str] | None = None, ssl: SSLContext | None = None,
                   ) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(nginx.url(query), ping_interval=None, compression=None,
                       open_timeout=TIMEOUT, local_addr=(source, 0),
                       additional_headers=headers, ssl=ssl)
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

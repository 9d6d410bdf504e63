"""Issue 11, item 4: the demo's screen share through nginx with TLS, two instances behind it.

Debian's nginx runs the shipped deploy/nginx.conf (TLS with a throwaway self-signed
certificate) and deploy/nginx-upstream.conf (its server lines pointed at two ``rtcsignal
serve`` instances on one real Redis) on loopback. Headless Chromium (with
``--ignore-certificate-errors``) loads the demo page, ``/rtcsignal.js`` and the WebSocket
through it: ``https://`` and ``wss://`` only. The presenter's session and the viewers'
sessions are on different instances (told by each instance's ``connect`` log line), so every
offer, answer and ICE candidate crosses Redis. Then the presenter's instance restarts: the
presenter follows ``reconnect``/1012 through nginx to the other instance and resumes there.
The Python client (rtcsignal.client) does the same over ``wss://``.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest

from rtcsignal.client import SignalingClient
from tests.browser import (  # noqa: F401  (pages_fixture: a fixture)
    chromium_with,
    pages_fixture,
    record_timing,
    requires_chromium,
    screenshot,
    wait_js,
)
from tests.test_auth_tls_turn import self_signed
from tests.test_demo import SCREENS, SHOWS, members, open_demo, share
from tests.test_nginx import nginx_for  # noqa: F401  (the fixture)

pytestmark = [requires_chromium, pytest.mark.asyncio(loop_scope="module")]

chromium_fixture = chromium_with("--ignore-certificate-errors")


class Site:
    """The demo's origin as Chromium sees it: nginx's TLS listener."""

    def __init__(self, port: int) -> None:
        self.port = port

    def http(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"


async def open_on(pages: Any, site: Site, cluster: Any, room: str, name: str,
                  wanted: int) -> tuple[Any, str]:
    """A demo page in ``room`` whose session is on instance ``wanted``. nginx balances
    round-robin over page loads, script loads and WebSockets alike, so a page that landed on
    the other instance is closed and opened again (a handful of tries at most)."""
    landed = []
    for _ in range(6):
        page = await open_demo(pages, site, room, name)
        peer = await page.evaluate("demo.client.peerId")
        instance = await asyncio.to_thread(cluster.instance_of, peer)
        if instance == wanted:
            return page, peer
        landed.append(instance)
        await page.context.close()
    raise AssertionError(f"{name} never landed on instance {wanted}: {landed}")


async def test_screen_share_over_nginx_wss_with_two_instances(
        make_cluster, nginx_for, pages, tmp_path: Path):  # noqa: F811 (the fixture)
    cluster = make_cluster(2, "--drain-spread", "1")
    nginx = nginx_for(cluster.instances, tls=self_signed(tmp_path))
    site = Site(nginx.port)

    ann = await open_demo(pages, site, "demo", "Ann")
    ann_id = await ann.evaluate("demo.client.peerId")
    home = await asyncio.to_thread(cluster.instance_of, ann_id)
    other = 1 - home
    viewers = []
    for name in ("Bob", "Cy"):
        page, _ = await open_on(pages, site, cluster, "demo", name, other)
        viewers.append(page)
    for page in [ann, *viewers]:
        await members(page, 3)
        # Everything came through nginx: the page, the client module, the socket.
        assert await page.evaluate("location.origin") == site.http("")
        socket_url = await page.evaluate("demo.client.socket.url")
        assert socket_url.startswith(f"wss://127.0.0.1:{nginx.port}/signaling"), socket_url
        assert await page.evaluate(
            "performance.getEntriesByType('resource').some((e) => "
            "new URL(e.name).pathname === '/rtcsignal.js')")

    assert await share(ann, viewers, "nginx wss 1+2") == ann_id
    await wait_js(ann, "() => demo.calls.size === 2 && [...demo.calls]"
                       ".every((c) => c.pc.connectionState === 'connected')")
    # Each instance logged its own: the presenter on one, the viewers on the other.
    viewer_ids = [await v.evaluate("demo.client.peerId") for v in viewers]
    assert [await asyncio.to_thread(cluster.instance_of, p) for p in viewer_ids] == [other] * 2
    assert cluster.instance_of(ann_id) == home
    await screenshot(viewers[0], "demo-viewer-nginx.png")

    # A rolling restart of the presenter's instance: it tells the presenter to reconnect
    # (after_ms, then 1012) and answers new requests 503 while it drains; nginx passes the
    # reconnect on to the other instance, where the session resumes with the same peer id.
    assert await asyncio.to_thread(cluster.terminate, home, 30) == 0
    await asyncio.to_thread(cluster.instance(other).wait_for,
                            lambda e: e.get("event") == "resume" and e.get("peer") == ann_id, 15)
    await wait_js(ann, "() => demo.client.state === 'open' && demo.client.greeting.resumed")
    assert await ann.evaluate("demo.client.peerId") == ann_id
    assert "closed 1012" in await ann.text_content("#log")
    for viewer in viewers:
        lines = await viewer.evaluate("[...document.querySelectorAll('#log div')]"
                                      ".map((d) => d.textContent)")
        assert not [line for line in lines if "peer-left" in line and ann_id in line], lines
        await wait_js(viewer, SHOWS, ann_id)
        frames = (await viewer.evaluate(SCREENS))[0][2]
        await wait_js(viewer, "(n) => document.querySelector('#screens figure video')"
                              ".getVideoPlaybackQuality().totalVideoFrames > n + 10", frames)
    # Signaling still crosses: a note from the presenter reaches both viewers.
    await ann.fill("#type", "note")
    await ann.fill("#data", "after the restart")
    await ann.click("#sendbtn")
    for viewer in viewers:
        await wait_js(viewer, "() => document.getElementById('log').textContent"
                              ".includes('after the restart')")
    assert pages.errors == []


async def test_python_client_resumes_through_nginx_wss(make_cluster, nginx_for,  # noqa: F811
                                                       tmp_path: Path):
    """rtcsignal.client over wss:// through nginx (trusting the throwaway certificate): a
    dropped socket resumes with the same peer id, and when its instance restarts, nginx
    takes the reconnect to the other one (the draining one answers 503, then refuses)."""
    cluster = make_cluster(2, "--drain-spread", "1")
    cert, key = self_signed(tmp_path)
    nginx = nginx_for(cluster.instances, tls=(cert, key))
    trusting = ssl.create_default_context(cafile=str(cert))
    a = SignalingClient(nginx.url(), ssl=trusting)
    b = SignalingClient(nginx.url(), ssl=trusting)
    try:
        await a.connect(timeout=10)
        await b.connect(timeout=10)
        await a.join("py-nginx")
        await b.join("py-nginx")
        peer = a.peer_id
        assert a.socket.request.path.startswith("/signaling")
        reopened = a.wait_for("open", timeout=10)
        a.socket.transport.abort()
        assert (await reopened)["resumed"] and a.peer_id == peer

        # The instance that holds the session now: where it resumed.
        home, _ = await asyncio.to_thread(
            cluster.logged, lambda e: e.get("event") == "resume" and e.get("peer") == peer)
        reopened = a.wait_for("open", timeout=30)
        assert await asyncio.to_thread(cluster.terminate, home, 30) == 0
        opened = await reopened
        assert opened["resumed"] and a.peer_id == peer
        await asyncio.to_thread(cluster.instance(1 - home).wait_for, lambda e: e.get(
            "event") == "resume" and e.get("peer") == peer, 10)
        reply = asyncio.ensure_future(b.recv(timeout=10))
        a.send(b.peer_id, {"type": "after-restart"})
        assert (await reply)["from"] == peer
    finally:
        await a.close()
        await b.close()

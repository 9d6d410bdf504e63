"""Issue 11, item 3: the demo page (/test-signaling.html) in headless Chromium against the
server subprocess: screen sharing from one presenter to several viewers (one
RTCPeerConnection each), two rooms side by side, a presenter who reloads, a viewer whose
network drops and who resumes its session. Screenshots go to build/screenshots/, the time
from the click on "Share" to each viewer's first frame to build/negotiation-times.jsonl.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.browser import (  # noqa: F401  (chromium_fixture, pages_fixture: fixtures)
    PHONE,
    chromium_fixture,
    pages_fixture,
    record_timing,
    requires_chromium,
    screenshot,
    wait_js,
)

pytestmark = [requires_chromium, pytest.mark.asyncio(loop_scope="module")]

XSS = "<img src=x onerror=window.__pwned=1>"

# The remote screens a page shows: [peer id, videoWidth, decoded frames, first frame time].
SCREENS = """() => [...document.querySelectorAll('#screens figure:not(.local)')].map((f) => {
  const v = f.querySelector('video');
  return [f.dataset.peer, v.videoWidth, v.getVideoPlaybackQuality().totalVideoFrames,
          Number(v.dataset.firstFrame || 0)];
})"""

# True once the page shows exactly one remote screen, from `peer`, with frames decoded.
SHOWS = """(peer) => {
  const figs = [...document.querySelectorAll('#screens figure:not(.local)')];
  if (figs.length !== 1 || figs[0].dataset.peer !== peer) return false;
  const v = figs[0].querySelector('video');
  return v.videoWidth > 0 && v.getVideoPlaybackQuality().totalVideoFrames > 0;
}"""


async def open_demo(pages: Any, server: Any, room: str, name: str, *,
                    viewport: dict[str, int] | None = None) -> Any:
    query = urlencode({"room": room, "name": name})
    page = await pages.new(server.http(f"/test-signaling.html?{query}"), viewport=viewport)
    await wait_js(page, "(room) => window.demo && demo.room === room && "
                        "demo.client.rooms.includes(room) && demo.client.state === 'open'", room)
    return page


async def members(page: Any, n: int) -> None:
    """Wait until the page lists ``n`` people in its room (itself included)."""
    await wait_js(page, "(n) => document.querySelectorAll('#people li').length === n", n)


async def share(presenter: Any, viewers: list[Any], label: str) -> str:
    """Click "Share my screen" on ``presenter``; wait until every viewer shows its screen.
    Records click-to-first-frame per viewer; returns the presenter's peer id."""
    peer = await presenter.evaluate("demo.client.peerId")
    clicked = time.time() * 1000
    await presenter.click("#share")
    for i, viewer in enumerate(viewers):
        await wait_js(viewer, SHOWS, peer)
        [[_, _, _, first]] = await viewer.evaluate(SCREENS)
        record_timing(label, "click to first frame", first - clicked, viewer=i,
                      viewers=len(viewers))
    return peer


async def test_one_presenter_three_viewers_and_another_room(server, pages):
    ann = await open_demo(pages, server, "demo", "Ann")
    bob = await open_demo(pages, server, "demo", "Bob")
    cy = await open_demo(pages, server, "demo", "Cy", viewport=PHONE)
    dee = await open_demo(pages, server, "demo", XSS)  # a hostile name, shown as text
    eve = await open_demo(pages, server, "other", "Eve")
    fay = await open_demo(pages, server, "other", "Fay", viewport=PHONE)
    demo_room, other_room = [ann, bob, cy, dee], [eve, fay]
    for page in demo_room:
        await members(page, 4)
    for page in other_room:
        await members(page, 2)

    # Both rooms share at the same time.
    ann_id, eve_id = await asyncio.gather(share(ann, [bob, cy, dee], "demo 1+3"),
                                          share(eve, [fay], "demo 1+1"))
    # One connection per viewer on the presenter's side, all connected.
    await wait_js(ann, "() => demo.calls.size === 3 && [...demo.calls]"
                       ".every((c) => c.pc.connectionState === 'connected')")
    assert await ann.evaluate("demo.calls.size") == 3
    # Viewers show exactly one screen, the presenter's (and no screen of their own).
    for viewer in (bob, cy, dee):
        shown = await viewer.evaluate(SCREENS)
        assert [s[0] for s in shown] == [ann_id] and shown[0][1] > 0
        assert await viewer.evaluate("document.querySelectorAll('#screens figure').length") == 1
    assert [s[0] for s in await fay.evaluate(SCREENS)] == [eve_id]
    for presenter in (ann, eve):  # a local preview only
        assert await presenter.evaluate(SCREENS) == []
        await wait_js(presenter, "() => document.querySelector('#screens figure.local video')"
                                 ".videoWidth > 0")
    # The presence list marks the presenter and each connection's state.
    badges = await bob.evaluate(
        "() => [...document.querySelectorAll('#people li')].map((li) => li.textContent)")
    assert any("Ann" in b and "sharing" in b and "connected" in b for b in badges), badges
    # The other room never heard of this one.
    for page in other_room:
        log = await page.text_content("#log")
        assert ann_id not in log and "Ann" not in log
        assert await page.evaluate("demo.client.peers('other').length") == 1

    # The hostile name is text everywhere.
    names = await ann.evaluate("[...document.querySelectorAll('#people .name')]"
                               ".map((n) => n.textContent)")
    assert XSS in names
    for page in demo_room + other_room:
        assert await page.evaluate("document.querySelectorAll('#people img, #screens img,"
                                   " #log img').length") == 0
        assert await page.evaluate("typeof window.__pwned") == "undefined"

    await screenshot(ann, "demo-presenter.png")
    await screenshot(bob, "demo-viewer.png")
    await screenshot(cy, "demo-viewer-phone.png")
    # The phone-sized page has no horizontal scrolling.
    assert await cy.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert pages.errors == []


async def test_presenter_reloads_and_viewers_recover_without_reloading(server, pages):
    ann = await open_demo(pages, server, "demo", "Ann")
    viewers = [await open_demo(pages, server, "demo", n) for n in ("Bob", "Cy")]
    for page in [ann, *viewers]:
        await members(page, 3)
    first = await share(ann, viewers, "reload: before")
    for viewer in viewers:
        await viewer.evaluate("window.notReloaded = true")

    await ann.reload()  # back in the same room (the URL keeps it), as a new peer
    await wait_js(ann, "() => window.demo && demo.room === 'demo' && "
                       "document.querySelectorAll('#people li').length === 3")
    again = await ann.evaluate("demo.client.peerId")
    assert again != first
    # Viewers dropped the old screen (its connection closed) without any help.
    for viewer in viewers:
        await wait_js(viewer, "() => !document.querySelector('#screens figure')")
        await wait_js(viewer, "() => demo.calls.size === 0")
    await share(ann, viewers, "reload: after")
    for viewer in viewers:
        assert await viewer.evaluate("window.notReloaded") is True
        assert await viewer.evaluate("demo.calls.size") == 1
    await screenshot(viewers[0], "demo-viewer-recovered.png")
    # A viewer leaves: the presenter's connection to it ends, the other viewer keeps its own.
    await viewers[1].click("#leavebtn")
    await wait_js(ann, "() => demo.calls.size === 1 && "
                       "document.querySelectorAll('#people li').length === 2")
    await wait_js(viewers[1], "() => !document.querySelector('#screens figure') && "
                              "!location.search.includes('room=')")
    await wait_js(viewers[0], SHOWS, again)
    assert pages.errors == []


async def test_viewer_resumes_after_its_network_drops_for_3_s(server, pages):
    ann = await open_demo(pages, server, "demo", "Ann")
    bob = await open_demo(pages, server, "demo", "Bob")
    await members(ann, 2)
    ann_id = await share(ann, [bob], "resume")
    bob_id = await bob.evaluate("demo.client.peerId")
    assert await bob.evaluate("demo.client.greeting.resumeToken") is not None

    # The network goes away: the page's socket is closed (with 3000: a drop, not the clean
    # end 1000 that would end the session) and no new connection can be made for 3 s.
    context = bob.context
    await context.set_offline(True)
    await bob.evaluate("demo.client.socket.close(3000, 'network down')")
    await wait_js(bob, "() => demo.client.state === 'reconnecting'")
    frames_before = (await bob.evaluate(SCREENS))[0][2]
    # Meanwhile the presenter writes to the room; it waits for Bob.
    await ann.fill("#type", "note")
    await ann.fill("#data", "while you were away")
    await ann.click("#sendbtn")
    await asyncio.sleep(3)  # the outage itself, not a wait for something to happen
    await context.set_offline(False)

    await wait_js(bob, "() => demo.client.state === 'open'")
    assert await bob.evaluate("demo.client.peerId") == bob_id
    assert await bob.evaluate("demo.client.greeting.resumed") is True
    await wait_js(bob, "() => document.getElementById('log').textContent"
                       ".includes('while you were away')")
    assert "session resumed" in await bob.text_content("#log")
    # Nobody saw Bob leave; the screen share went on (peer to peer) and still does.
    assert "peer-left" not in await ann.text_content("#log")
    assert await ann.evaluate("demo.calls.size") == 1
    await wait_js(bob, SHOWS, ann_id)
    await wait_js(bob, "(n) => document.querySelector('#screens figure video')"
                       ".getVideoPlaybackQuality().totalVideoFrames > n + 10", frames_before)
    assert pages.errors == []


async def test_viewer_follows_a_server_restart_to_another_instance(make_cluster, pages):
    """Two instances on Redis behind a round-robin balancer. The instance holding the viewer
    is restarted (SIGTERM: `reconnect` with after_ms, then close 1012): the viewer's page
    reconnects through the balancer, lands on the other instance and resumes there, same
    peer id, while the screen keeps playing."""
    cluster = make_cluster(2, "--drain-spread", "1")
    front = cluster.front
    ann = await open_demo(pages, front, "demo", "Ann")
    bob = await open_demo(pages, front, "demo", "Bob")
    await members(ann, 2)
    ann_id = await share(ann, [bob], "restart")
    bob_id = await bob.evaluate("demo.client.peerId")
    home = await asyncio.to_thread(cluster.instance_of, bob_id)
    other = 1 - home

    status = await asyncio.to_thread(cluster.terminate, home, 30)
    assert status == 0  # drained: its sessions resumed elsewhere
    await asyncio.to_thread(cluster.instance(other).wait_for,
                            lambda e: e.get("event") == "resume" and e.get("peer") == bob_id, 10)
    await wait_js(bob, "() => demo.client.state === 'open' && demo.client.greeting.resumed")
    assert await bob.evaluate("demo.client.peerId") == bob_id
    # It waited as long as the server said, then came back.
    log = await bob.evaluate("() => [...document.querySelectorAll('#log div')]"
                             ".map((d) => d.textContent)")
    [after_ms] = [json.loads(line[2:])["after_ms"] for line in log if '"reconnect"' in line]
    assert any(line.startswith("· closed 1012") and f"reconnecting in {after_ms} ms" in line
               for line in log), log
    # The presenter (wherever it was) is still there, nobody saw anybody leave, and the
    # screen keeps playing.
    await wait_js(ann, "() => demo.client.state === 'open'")
    assert await ann.evaluate("demo.client.peerId") == ann_id
    for page in (ann, bob):
        assert "peer-left" not in await page.text_content("#log")
    frames = (await bob.evaluate(SCREENS))[0][2]
    await wait_js(bob, "(n) => document.querySelector('#screens figure video')"
                       ".getVideoPlaybackQuality().totalVideoFrames > n + 10", frames)
    assert pages.errors == []

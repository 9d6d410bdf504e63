"""Issue 11, item 5: a Python WebRTC peer (examples/aiortc_peer.py: aiortc signaled through
rtcsignal.client) and the demo page in headless Chromium, through a ``rtcsignal serve``
subprocess. No STUN server: host candidates only.

- receive: the browser shares its screen; the example, run as a user runs it, answers,
  decodes the video and writes PNG files, whose decoded size is what the browser sent;
- send: the example offers a synthetic 640x360 track to everyone in the room; the demo's
  viewers (one there before it, one joining after) show it at that size, playing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import av
import pytest

from tests.browser import (  # noqa: F401  (chromium_fixture, pages_fixture: fixtures)
    chromium_fixture,
    pages_fixture,
    record_timing,
    requires_chromium,
    screenshot,
    wait_js,
)
from tests.test_demo import SCREENS, SHOWS, members, open_demo

pytestmark = [requires_chromium, pytest.mark.asyncio(loop_scope="module")]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "aiortc_peer.py"
WAIT = 30.0

# Watches the browser's outgoing video to `peer`: every frame size it encoded, from the RTP
# statistics, sampled every 50 ms into window.sentSizes while the call lasts.
WATCH_SENT = """(peer) => {
  window.sentSizes = [];
  const timer = setInterval(async () => {
    const call = demo.calls.get(peer);
    if (!call) return;
    for (const s of (await call.pc.getStats()).values()) {
      if (s.type !== 'outbound-rtp' || s.kind !== 'video' || !s.frameWidth) continue;
      const size = [s.frameWidth, s.frameHeight];
      if (!sentSizes.some(([w, h]) => w === size[0] && h === size[1])) sentSizes.push(size);
    }
  }, 50);
  window.stopWatching = () => clearInterval(timer);
}"""


class Example:
    """examples/aiortc_peer.py as a child process; ``events`` are its JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self._errors = asyncio.create_task(self._read_stderr())

    @classmethod
    async def start(cls, *args: str) -> Example:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))
            self._changed.set()
        self._changed.set()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = await self.proc.stderr.read()

    async def wait(self, pred: Callable[[dict[str, Any]], bool],
                   timeout: float = WAIT) -> dict[str, Any]:
        """The first event ``pred`` accepts (waiting for it); fails if the program ends."""
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events:
                    if pred(event):
                        return event
                if self._reader.done():
                    await self._errors
                    raise AssertionError(f"the example ended: {self.events}\n"
                                         f"{self.stderr.decode(errors='replace')[-3000:]}")
                self._changed.clear()
                await self._changed.wait()

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    async def finish(self, sig: int | None = None, timeout: float = 15) -> int:
        if sig is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(asyncio.gather(self._reader, self._errors), timeout)
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for task in (self._reader, self._errors):
            task.cancel()


@contextlib.asynccontextmanager
async def example(*args: str) -> AsyncIterator[Example]:
    ex = await Example.start(*args)
    try:
        yield ex
    finally:
        await ex.kill()


def decoded_size(path: Path) -> tuple[int, int]:
    """Width and height of the PNG at ``path``, decoded (not read from its header); it must
    be a picture, not a flat fill."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
    luma = bytes(frame.reformat(format="gray").planes[0])
    assert len(set(luma)) > 8, f"{path}: {len(set(luma))} grey levels"
    return frame.width, frame.height


async def test_python_receives_the_browser_screen_share_as_png(server, pages, tmp_path):
    room = "aiortc-" + os.urandom(3).hex()
    out = tmp_path / "frames"
    async with example("receive", "--url", server.url(), "--room", room, "--out", str(out),
                       "--frames", "3", "--every", "3") as rx:
        joined = await rx.wait(lambda e: e["event"] == "joined")
        py = joined["peerId"]
        ann = await open_demo(pages, server, room, "Ann")
        await members(ann, 2)
        await ann.evaluate(WATCH_SENT, py)
        clicked = time.monotonic()
        await ann.click("#share")
        first = await rx.wait(lambda e: e["event"] == "frame")
        record_timing("aiortc receive", "click to first PNG",
                      (time.monotonic() - clicked) * 1000)
        frames = [await rx.wait(lambda e, n=n: e["event"] == "frame" and e["n"] == n)
                  for n in (1, 2, 3)]
        assert frames[0] == first and {f["peer"] for f in frames} == {
            await ann.evaluate("demo.client.peerId")}
        # The PNG files hold frames (decoded from VP8/H.264 and written by the example) of
        # a size the browser encoded for this peer; that is the screen it captured, or the
        # same shape scaled down (the encoder may scale, never crop or stretch).
        captured = await ann.evaluate("() => { const s = document.querySelector('#screens "
                                      "figure.local video').srcObject.getVideoTracks()[0]"
                                      ".getSettings(); return [s.width, s.height]; }")
        sent = await wait_js(ann, "() => sentSizes.length > 0 && sentSizes")
        for f in frames:
            size = decoded_size(Path(f["path"]))
            assert size == (f["width"], f["height"]), (size, f)
            assert size[0] > 0 and size[1] > 0
            assert list(size) in sent, (size, sent)
            assert abs(size[0] / size[1] - captured[0] / captured[1]) < 0.02, (size, captured)
        assert sorted(p.name for p in out.iterdir()) == sorted(
            Path(f["path"]).name for f in frames)

        # Three frames written: it hangs up (a bye the presenter's page acts on) and exits.
        assert await rx.finish() == 0
        assert rx.of("done") == [{"event": "done", "frames": 3}]
        assert [e["state"] for e in rx.of("state")][:2] == ["connecting", "connected"]
        await wait_js(ann, "() => demo.calls.size === 0")
    assert pages.errors == []


async def test_browser_viewers_show_the_python_synthetic_track(server, pages):
    room = "aiortc-" + os.urandom(3).hex()
    bob = await open_demo(pages, server, room, "Bob")  # in the room before the sender
    async with example("send", "--url", server.url(), "--room", room,
                       "--size", "640x360", "--fps", "15") as tx:
        joined = await tx.wait(lambda e: e["event"] == "joined")
        py = joined["peerId"]
        assert joined["peers"] == [await bob.evaluate("demo.client.peerId")]
        cy = await open_demo(pages, server, room, "Cy")  # joins after it: offered on arrival
        for viewer in (bob, cy):
            await wait_js(viewer, SHOWS, py)
            [[peer, width, frames, _]] = await viewer.evaluate(SCREENS)
            height = await viewer.evaluate(
                "document.querySelector('#screens figure video').videoHeight")
            assert (peer, width, height) == (py, 640, 360)
            await wait_js(viewer, "(n) => document.querySelector('#screens figure video')"
                                  ".getVideoPlaybackQuality().totalVideoFrames > n + 10", frames)
            badges = await viewer.evaluate(
                "() => [...document.querySelectorAll('#people li')].map((li) => li.textContent)")
            assert any("aiortc sender" in b and "sharing" in b for b in badges), badges
        await members(bob, 3)
        await screenshot(bob, "demo-viewer-aiortc.png")
        assert [e["peer"] for e in tx.of("offered")] == [
            await bob.evaluate("demo.client.peerId"), await cy.evaluate("demo.client.peerId")]

        # Stopped (SIGTERM), it hangs up: the screens go, the viewers stay.
        assert await tx.finish(signal.SIGTERM) == 0
        for viewer in (bob, cy):
            await wait_js(viewer, "() => !document.querySelector('#screens figure') && "
                                  "demo.calls.size === 0")
    assert pages.errors == []

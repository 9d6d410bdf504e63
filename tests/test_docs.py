"""Issue 2, points 1, 5 and 10: the README's two commands, CI entry, and the protocol docs."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from rtcsignal.core import messages
from rtcsignal.core.messages import ErrorCode
from tests.helpers import open_client

ROOT = Path(__file__).resolve().parent.parent


def test_readme_gives_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^make serve\b", readme, re.M)
    assert re.search(r"^make test\b", readme, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in ci.splitlines()
                if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    assert commands == ["make test", "make conformance"], commands


def test_protocol_doc_lists_every_error_code_and_reserved_type():
    doc = (ROOT / "docs" / "protocol.md").read_text()
    codes = [v for k, v in vars(ErrorCode).items() if k.isupper()]
    assert len(codes) >= 4
    for code in codes:
        assert f"`{code}`" in doc, code
    for kind in sorted(messages.RESERVED_TYPES):
        assert f"`{kind}`" in doc, kind
    assert "Connected to signaling server" in doc


def test_design_doc_and_api_example_exist():
    assert (ROOT / "docs" / "design.md").read_text().strip()
    docs = (ROOT / "README.md").read_text() + "".join(
        p.read_text() for p in (ROOT / "docs").glob("*.md"))
    for name in ("broadcast_to_all", "clients_count", "send_to_peer", "shutdown",
                 "rtcsignal.serve"):
        assert name in docs, name


async def test_embedding_example_runs():
    """examples/embed.py (the README's runnable example) serves, then shuts down with 1001."""
    env = {**os.environ, "PORT": "0", "SECONDS": "2"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "examples" / "embed.py"), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        port = int(re.fullmatch(r"listening on port (\d+)\s*", first).group(1))
        ws, greeting = await open_client(f"ws://127.0.0.1:{port}/signaling")
        assert greeting["clientsCount"] == 1
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1001
        rest = (await asyncio.wait_for(proc.stdout.read(), 10)).decode()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert "stopped" in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

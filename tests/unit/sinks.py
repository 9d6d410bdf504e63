"""The recording sink shared by the pure-Hub tests (and the hub fuzzer in tests/fuzz_core.py).

The hub's ``frame`` is the identity, so every frame a sink gets is the JSON bytes of one
message; ``drain`` hands them back decoded.
"""

from __future__ import annotations

import json
from typing import Any


class Recorder:
    """A sink that keeps every frame sent to it and every close asked of it."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closed: list[tuple[int, str]] = []

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def drain(self) -> list[dict[str, Any]]:
        out = [json.loads(f) for f in self.frames]
        self.frames.clear()
        return out

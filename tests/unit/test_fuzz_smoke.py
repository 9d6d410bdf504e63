"""A few seconds of the fuzz target (tests/fuzz_core.py); the full run is ``make fuzz``."""

from __future__ import annotations

from tests import fuzz_core


def test_fuzz_core_briefly() -> None:
    # 0 = nothing found; on a failure the falsifying example is printed (see -rA / -s).
    assert fuzz_core.run(seconds=3.0, batch=50, shrink=False) == 0

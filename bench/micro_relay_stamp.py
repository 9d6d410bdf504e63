#!/usr/bin/env python3
"""Per-message cost of the ways to turn a client's text into the relayed text.

Issue 8, item 10: relaying the client's bytes with ``"from"`` spliced in lets a receiver whose
JSON parser keeps the *first* duplicate key read a different ``type``/``to`` than the server
(orjson keeps the last). This times the candidate fixes on the relay path, per message:

- ``splice``            the old way: the client's bytes with ``"from":"<id>",`` after ``{``
- ``dumps``             re-serialise always: ``obj["from"] = id; orjson.dumps(obj)`` (from last)
- ``dumps-from-first``  re-serialise, ``"from"`` spliced in front of orjson's output
- ``dumps+e+``          ``dumps-from-first``, then the exact slow path only if the output has
                        ``e+<digit>``: orjson writes every float of magnitude >= 1e16 so, and
                        an integer outside [-2**63, 2**64) is such a float after orjson.loads.
                        Searched as one memchr for ``+``, then a regex from there (rtcsignal)
- ``dumps+"e+"in``      the same test as ``b"e+" in out`` (CPython's two-byte search is slow)
- ``dumps+digits``      ``dumps-from-first`` + a filter on the input: 20 digits in a row or
                        ``-`` and 19 (``bytes.translate`` + two ``in`` searches)
- ``dumps+regex``       the same input filter as one compiled regex
- ``exact-check+splice`` keep the client's bytes, but first prove there is no duplicate key
                        and no out-of-range integer with a second, exact parse
                        (``json.loads`` with ``object_pairs_hook`` and ``parse_int``)
- ``orjson.loads``      the parse the relay does anyway, for scale
- ``current``           ``rtcsignal.core.messages.stamp_from`` as it is in this checkout

Messages: a ~220-byte ICE candidate, the ~4 KB SDP offer from ``bench/payloads/sdp.json``
(its ``o=`` session id and ``ts`` are 19-digit strings), the same with a 20-digit session id
(trips the digit filters, not ``e+``: the slow path must say "fine"), the same with ``+`` in
its ice-pwd (base64; ``+`` is common in real SDPs), the ICE candidate with a float ``1e20``
(trips ``e+``: slow path, relayed) and with a 30-digit integer (refused).

    .venv/bin/python bench/micro_relay_stamp.py [--repeat 31] [--budget 0.02] [--json]

Each figure is the median (and min) over ``--repeat`` timeit runs of ~``--budget`` seconds;
the runs are interleaved across candidates, so a noisy neighbour hits all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import timeit
from typing import Any

import orjson

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from rtcsignal.core import messages  # noqa: E402

PEER = "kq3Zr0f1X2c9bW4s"
PEER_B = PEER.encode()

ICE = (b'{"type":"ice-candidate","candidate":{"candidate":"candidate:842163049 1 udp 1677729535'
       b' 203.0.113.7 46154 typ srflx raddr 0.0.0.0 rport 0 generation 0 ufrag sXC4'
       b' network-cost 999","sdpMid":"0","sdpMLineIndex":0,"usernameFragment":"sXC4"},'
       b'"to":"abcdefghijklmnop"}')


def _sdp() -> bytes:
    with open(os.path.join(HERE, "payloads", "sdp.json"), "rb") as f:
        obj = orjson.loads(f.read())
    obj["to"] = "abcdefghijklmnop"
    return orjson.dumps(obj)


SDP = _sdp()
SDP_20 = SDP.replace(b"o=- 7345081934571234567 ", b"o=- 18345081934571234567 ", 1)
SDP_PLUS = SDP.replace(b"w2Jx9pL4cV8mR1tK6zY3hN0s", b"w2Jx9+L4cV8m/1tK6Y+3hN0s")
FLOAT = ICE.replace(b'"sdpMLineIndex":0', b'"sdpMLineIndex":0,"x":1e20')
BIGINT = ICE.replace(b'"sdpMLineIndex":0', b'"sdpMLineIndex":123456789012345678901234567890')
assert SDP_20 != SDP != SDP_PLUS and FLOAT != ICE and BIGINT != ICE

CASES = {"ice": ICE, "sdp": SDP, "sdp-20-digit-o=": SDP_20, "sdp-pwd-with-+": SDP_PLUS,
         "ice-float-1e20": FLOAT, "ice-30-digit-int": BIGINT}

# --- the candidates ------------------------------------------------------------------------


def splice(text: bytes, obj: dict[str, Any]) -> bytes:
    i = text.find(b"{") + 1
    return b"".join((text[:i], b'"from":"', PEER_B, b'",', text[i:]))


def dumps(text: bytes, obj: dict[str, Any]) -> bytes:
    obj["from"] = PEER
    return orjson.dumps(obj)


_FROM_FIRST = b'{"from":"' + PEER_B + b'",'


def dumps_from_first(text: bytes, obj: dict[str, Any]) -> bytes:
    obj.pop("from", None)
    return _FROM_FIRST + orjson.dumps(obj)[1:]


# Filter: an integer outside [-2**63, 2**64) has >= 20 digits, or is negative with >= 19.
_DIGITS = bytes.maketrans(b"0123456789", b"0000000000")
_TABLE = bytes(b if b in b"0-" else ord("x") for b in _DIGITS)
_RUN20 = b"0" * 20
_NEG19 = b"-" + b"0" * 19


def suspicious(text: bytes) -> bool:
    t = text.translate(_TABLE)
    return _RUN20 in t or _NEG19 in t


_REGEX = re.compile(rb"\d{20}|-\d{19}")


def suspicious_regex(text: bytes) -> bool:
    return _REGEX.search(text) is not None


class Refused(Exception):
    pass


def _int_in_range(s: str) -> int:
    n = int(s)
    if not -(2**63) <= n < 2**64:
        raise Refused("integer out of range")
    return n


def exact_ints(text: bytes) -> None:
    json.loads(text, parse_int=_int_in_range)


_EXPONENT = re.compile(rb"e\+[0-9]")


def dumps_eplus(text: bytes, obj: dict[str, Any]) -> bytes:
    out = dumps_from_first(text, obj)
    plus = out.find(b"+")
    if plus > 0 and _EXPONENT.search(out, plus - 1) is not None:
        exact_ints(text)
    return out


def dumps_eplus_in(text: bytes, obj: dict[str, Any]) -> bytes:
    out = dumps_from_first(text, obj)
    if b"e+" in out:
        exact_ints(text)
    return out


def dumps_digits(text: bytes, obj: dict[str, Any]) -> bytes:
    if suspicious(text):
        exact_ints(text)
    return dumps_from_first(text, obj)


def dumps_regex(text: bytes, obj: dict[str, Any]) -> bytes:
    if suspicious_regex(text):
        exact_ints(text)
    return dumps_from_first(text, obj)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise Refused("duplicate key")
    return d


def exact_check_splice(text: bytes, obj: dict[str, Any]) -> bytes:
    json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_int_in_range)
    return splice(text, obj)


def parse_only(text: bytes, obj: dict[str, Any]) -> Any:
    return orjson.loads(text)


def current(text: bytes, obj: dict[str, Any]) -> bytes:
    return messages.stamp_from(text, obj, PEER)


CANDIDATES = {
    "splice": splice,
    "dumps": dumps,
    "dumps-from-first": dumps_from_first,
    "dumps+e+": dumps_eplus,
    'dumps+"e+"in': dumps_eplus_in,
    "dumps+digits": dumps_digits,
    "dumps+regex": dumps_regex,
    "exact-check+splice": exact_check_splice,
    "exact ints alone (slow path)": lambda text, obj: exact_ints(text),
    "orjson.loads": parse_only,
    "messages.stamp_from (checkout)": current,
}

# --- measuring -------------------------------------------------------------------------------


def make_timer(fn: Any, text: bytes, budget: float) -> tuple[timeit.Timer, int] | None:
    obj = orjson.loads(text)
    try:
        fn(text, obj)
    except (Refused, messages.MessageError):
        return None  # refused: no relay cost to speak of
    timer = timeit.Timer(lambda: fn(text, obj))
    n, t = timer.autorange()
    return timer, max(1, int(n * budget / t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=31)
    ap.add_argument("--budget", type=float, default=0.02, help="seconds per timeit run")
    ap.add_argument("--json", action="store_true", help="one JSON line per figure")
    ap.add_argument("--only", default="", help="comma-separated candidate names")
    args = ap.parse_args()
    names = [n for n in CANDIDATES if not args.only or n in args.only.split(",")]
    # Round-robin: every repetition times every (candidate, message) once, so a noisy
    # neighbour slows all of them alike instead of whichever ran during the noise.
    timers = {(name, case): make_timer(CANDIDATES[name], text, args.budget)
              for name in names for case, text in CASES.items()}
    runs: dict[tuple[str, str], list[float]] = {k: [] for k, v in timers.items() if v}
    for _ in range(args.repeat):
        for key, tn in timers.items():
            if tn is not None:
                timer, number = tn
                runs[key].append(timer.timeit(number) / number * 1e6)
    if args.json:
        for (name, case), us in runs.items():
            print(json.dumps({"candidate": name, "message": case, "bytes": len(CASES[case]),
                              "median_us": round(statistics.median(us), 3),
                              "min_us": round(min(us), 3)}))
        return
    sizes = "  ".join(f"{k}={len(v)} B" for k, v in CASES.items())
    print(f"python {sys.version.split()[0]}, orjson {orjson.__version__}; {sizes}")
    print(f"µs per message: median (min) of {args.repeat} interleaved runs\n")
    width = max(len(c) for c in CASES)
    print(f"| {'candidate':30} | " + " | ".join(f"{c:>{width}}" for c in CASES) + " |")
    print(f"| {'-' * 30} | " + " | ".join("-" * width for _ in CASES) + " |")
    for name in names:
        cells = []
        for case in CASES:
            us = runs.get((name, case))
            cells.append("refused" if us is None else
                         f"{statistics.median(us):.2f} ({min(us):.2f})")
        print(f"| {name:30} | " + " | ".join(f"{c:>{width}}" for c in cells) + " |")


if __name__ == "__main__":
    main()

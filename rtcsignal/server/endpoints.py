"""Plain HTTP routes served on the WebSocket port: health, readiness, metrics, the demo page
and the browser client (``/rtcsignal.js`` with its ``/rtcsignal.d.ts``)."""

from __future__ import annotations

import time
from functools import cache
from importlib import resources

import orjson

from rtcsignal.config import Config
from rtcsignal.core.metrics import Metrics
from rtcsignal.protocol.http import HttpError, Request
from rtcsignal.security.admission import Admission
from rtcsignal.security.turn import ice_servers

JSON = "application/json"
Answer = tuple[int, bytes, str, dict[str, str]]


PAGE_CSP = ("default-src 'self'; connect-src 'self' ws: wss:; "
            "style-src 'unsafe-inline'; script-src 'self' 'unsafe-inline'")
# The browser client may be imported from other origins (module scripts are fetched with CORS).
SHARED = {"Access-Control-Allow-Origin": "*"}
# path -> (file in rtcsignal/static, Content-Type, extra headers)
STATIC: dict[str, tuple[str, str, dict[str, str]]] = {
    "/test-signaling.html": ("test-signaling.html", "text/html; charset=utf-8",
                             {"Content-Security-Policy": PAGE_CSP}),
    "/rtcsignal.js": ("rtcsignal.js", "text/javascript; charset=utf-8",
                      {**SHARED, "X-TypeScript-Types": "/rtcsignal.d.ts"}),
    "/rtcsignal.d.ts": ("rtcsignal.d.ts", "application/typescript; charset=utf-8", SHARED),
}


@cache
def static_file(name: str) -> bytes:
    return resources.files("rtcsignal").joinpath("static", name).read_bytes()


def handle(
    request: Request,
    address: str,
    *,
    config: Config,
    metrics: Metrics,
    admission: Admission,
    unready: str | None,
    now: float,
) -> Answer:
    """Answer one HTTP request; HttpError propagates to the caller's error response."""
    if request.method not in ("GET", "HEAD"):
        raise HttpError(405, "method not allowed", {"Allow": "GET, HEAD"})
    path = request.path
    if path == "/healthz":
        return 200, b'{"status":"ok"}', JSON, {}
    if path == "/readyz":
        if unready == "draining":
            return 503, b'{"status":"draining"}', JSON, {}
        if unready is not None:
            return 503, orjson.dumps({"status": "unready", "reason": unready}), JSON, {}
        return 200, b'{"status":"ready"}', JSON, {}
    if path == "/metrics":
        return 200, metrics.render().encode(), "text/plain; version=0.0.4", {}
    if path in STATIC:
        name, content_type, headers = STATIC[path]
        return 200, static_file(name), content_type, headers
    if path == "/ice-servers":
        admitted = admission.authenticate(request, address, now)
        servers = ice_servers(config, admitted.user or "anonymous", time.time())
        return 200, orjson.dumps({"iceServers": servers}), JSON, {}
    raise HttpError(404, "not found")

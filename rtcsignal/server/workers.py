"""``serve --workers N``: one supervisor process runs N single-process servers on one port.

Each worker is an ordinary ``rtcsignal serve`` (its own event loop, hub and drain) started
with the same arguments; the kernel spreads new connections over them because they all
listen with SO_REUSEPORT. Rooms span workers only through ``--broker``. The supervisor
holds the port, forwards the workers' log lines to its own stderr (one stream for log
collectors), restarts a worker that dies and drains them all on SIGTERM/SIGINT.

Supervisor and worker talk over the worker's stdin and stdout, never through the logs (which
``--log-level`` may silence): the worker writes ``ready`` on stdout once it listens, and
treats end-of-file on stdin as "the supervisor is gone" and drains, so a SIGKILLed
supervisor leaves no orphans behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from rtcsignal import logs
from rtcsignal.config import Config, ConfigError

log = logging.getLogger("rtcsignal")

#: Set in a worker's environment (0 .. N-1): the process is a worker, not a supervisor.
WORKER_ENV = "RTCSIGNAL_WORKER_INDEX"
#: A directory only the supervisor's user can enter, where each worker serves its metrics
#: on a unix socket so that one scrape shows every worker (server/scrape.py).
DIR_ENV = "RTCSIGNAL_WORKER_DIR"
READY = b"ready\n"

#: Restart delay after an unasked exit: doubles from the first to the max, and starts over
#: once a worker has run this long (a crash loop backs off, a rare crash restarts at once).
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
BACKOFF_RESET = 30.0
#: On shutdown, workers still running this long after --drain-timeout are killed.
STOP_GRACE = 10.0
LINE_LIMIT = 1 << 20  # a longer log line is forwarded in pieces


# --- in a worker -------------------------------------------------------------------------


def worker_index() -> int | None:
    """This process's worker index, or None when it was not started by a supervisor."""
    raw = os.environ.get(WORKER_ENV)
    return int(raw) if raw is not None and raw.isdigit() else None


class _Tag(logging.Filter):
    """Adds ``worker`` and ``pid`` to every line, so the merged stream says who logged it."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.fields = {"worker": index, "pid": os.getpid()}

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {**getattr(record, "fields", {}), **self.fields}
        return True


#: Seconds a worker whose supervisor is gone may spend draining before it exits anyway.
ORPHAN_EXIT_AFTER = 30.0


def tag_logs(index: int) -> None:
    """Tag the ``rtcsignal`` handlers (records of child loggers skip logger filters)."""
    for handler in logging.getLogger("rtcsignal").handlers:
        handler.addFilter(_Tag(index))


def serving(shutdown: Any) -> None:
    """Tell the supervisor we listen, and call ``shutdown()`` if it goes away (stdin EOF)."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Future[Any]] = []  # a reference, so the drain is not collected

    def on_stdin() -> None:
        try:
            data = os.read(0, 512)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
            log.warning("supervisor gone")
            tasks.append(asyncio.ensure_future(shutdown()))
            # No orphan, whatever the drain does: exit for good after a generous bound.
            loop.call_later(ORPHAN_EXIT_AFTER, os._exit, 1)

    loop.add_reader(0, on_stdin)
    with contextlib.suppress(OSError):
        os.write(1, READY)


# --- in the supervisor -------------------------------------------------------------------


def hold_port(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Bind (not listen) SO_REUSEPORT sockets on every address of ``host``: picks the port
    when ``port`` is 0, fails early and once when it is taken, and keeps it ours for as long
    as the supervisor runs (even while every worker is down). Only listening sockets are
    handed connections, so holding it takes none from the workers."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    held: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # as asyncio's create_server does
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr[0], port, *addr[2:]))
            port = sock.getsockname()[1]
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return held, port


def exit_fields(code: int) -> dict[str, Any]:
    """``code`` or ``signal`` of an exit status as asyncio reports it (negative = signal)."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return {"signal": signal.Signals(-code).name}
        return {"signal": -code}
    return {"code": code}


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = False  # the current process has said it listens
        self.reload = False  # a SIGHUP came before it could take one: send it once ready


class Supervisor:
    """Starts the workers, waits for all to listen, restarts the ones that die, drains all
    on SIGTERM/SIGINT. ``run()`` returns the exit status."""

    def __init__(self, config: Config, argv: Sequence[str], port: int, log_format: str,
                 load: Callable[[], Config] | None = None, directory: str = "") -> None:
        self.config = config
        self.port = port
        self.load = load
        self.directory = directory
        # The same arguments; later flags win, so these pin what every worker must share.
        # Workers log to their stderr, which we copy to our log stream (--log-file too).
        self.command = [sys.executable, "-m", "rtcsignal", *argv, f"--port={port}",
                        f"--workers={config.workers}", f"--log-format={log_format}",
                        "--log-file="]
        self.workers = [_Worker(i) for i in range(config.workers)]
        self.listening = False  # every worker has been ready once: from now on, restart
        self.stopping = asyncio.Event()
        self.all_ready = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        slots = [asyncio.create_task(self._keep(w)) for w in self.workers]
        ready = asyncio.create_task(self.all_ready.wait())
        stop = asyncio.create_task(self.stopping.wait())
        await asyncio.wait([ready, stop, *slots], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        # Before stopping, a slot only ends when its worker failed to start.
        failed = None if self.stopping.is_set() else next((t for t in slots if t.done()), None)
        if failed is None and not self.stopping.is_set():
            scheme = "wss" if self.config.certfile else "ws"
            log.info("listening", extra={"fields": {
                "url": f"{scheme}://{self.config.host}:{self.port}{self.config.path}",
                "workers": len(self.workers)}})
            await stop
        stop.cancel()
        self.stop()
        await asyncio.wait(slots, timeout=self.config.drain_timeout + STOP_GRACE)
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                log.warning("worker killed", extra={"fields": {
                    "worker": w.index, "pid": w.proc.pid, "reason": "drain overran"}})
                with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                    w.proc.kill()
        codes = await asyncio.gather(*slots)
        if failed is not None:  # a worker could not start: its status is ours
            code = failed.result()
            status = code if code > 0 else 1
        else:
            status = 0 if all(c == 0 for c in codes) else 1
        log.info("stopped", extra={"fields": {"status": status}})
        return status

    def stop(self) -> None:
        """SIGTERM to every worker, once; a second signal only keeps waiting."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        log.info("shutting down", extra={"fields": {"workers": len(self.workers)}})
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
                    w.proc.send_signal(signal.SIGTERM)

    def reload(self) -> None:
        """SIGHUP: reopen our log file, take the new log level, and pass the signal to
        every worker (each reloads its settings and logs ``reloaded`` or ``reload
        failed``). A worker still starting gets it once it listens: before that it has no
        handler, and SIGHUP would kill it."""
        try:
            logs.reopen()
        except ConfigError as exc:
            log.error("log file not reopened", extra={"fields": {"reason": str(exc)}})
        if self.load is not None:
            with contextlib.suppress(ConfigError):  # the workers say why, once each
                logs.set_level(self.load().log_level)
        for w in self.workers:
            if w.ready:
                self._hup(w)
            else:
                w.reload = True

    @staticmethod
    def _hup(w: _Worker) -> None:
        w.reload = False
        if w.proc is not None and w.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGHUP)

    async def _keep(self, w: _Worker) -> int:
        """Run one worker slot until stopping. Returns 0 after a clean exit (or nothing to
        stop), the exit status otherwise; returns at once if the worker fails to start."""
        loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST
        while True:
            started = loop.time()
            code = await self._run_once(w)
            fields = {"worker": w.index, "pid": w.proc.pid if w.proc else None,
                      **exit_fields(code)}
            if self.stopping.is_set():
                # Killed by our SIGTERM before it could install its handler: it had no
                # clients, so that is a clean stop too.
                clean = code == 0 or (code == -signal.SIGTERM and not w.ready)
                (log.info if clean else log.warning)("worker exited", extra={"fields": fields})
                return 0 if clean else code
            if not self.listening:
                log.error("worker failed to start", extra={"fields": fields})
                return code
            if loop.time() - started >= BACKOFF_RESET:
                delay = BACKOFF_FIRST
            log.warning("worker exited", extra={"fields": {**fields, "restart_in_s": delay}})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return 0
            delay = min(delay * 2, BACKOFF_MAX)

    async def _run_once(self, w: _Worker) -> int:
        """Start the worker's process, forward its log lines, wait for it to exit."""
        w.ready, w.proc, w.reload = False, None, False  # a new process reads the file anew
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, WORKER_ENV: str(w.index), DIR_ENV: self.directory},
                limit=LINE_LIMIT,
                start_new_session=True,  # a terminal's Ctrl-C reaches us; we tell the workers
            )
        except OSError as exc:  # out of processes or memory: counts as a failed worker
            log.error("cannot start worker", extra={"fields": {"worker": w.index,
                                                               "reason": str(exc)}})
            return 1
        w.proc = proc
        log.info("worker started", extra={"fields": {"worker": w.index, "pid": proc.pid}})
        if self.stopping.is_set():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        assert proc.stdout is not None and proc.stderr is not None
        await asyncio.gather(self._watch_ready(w, proc.stdout), _forward(proc.stderr))
        return await proc.wait()

    async def _watch_ready(self, w: _Worker, stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            if line == READY:
                w.ready = True
                if w.reload:
                    self._hup(w)
                if not self.listening and all(x.ready for x in self.workers):
                    self.listening = True
                    self.all_ready.set()


async def _forward(reader: asyncio.StreamReader) -> None:
    """Copy a worker's stderr to ours a whole line at a time, so lines never interleave."""
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:  # end of stream
            if exc.partial:
                _write_line(exc.partial + b"\n")
            return
        except asyncio.LimitOverrunError as exc:
            line = await reader.readexactly(exc.consumed)
        _write_line(line)


def _write_line(line: bytes) -> None:
    out = logs.raw_output()  # asked each time: a SIGHUP may have reopened the log file
    out.write(line)
    out.flush()


def supervise(config: Config, argv: Sequence[str],
              load: Callable[[], Config] | None = None) -> int:
    """Hold the port, run the supervisor, return the exit status (OSError: cannot bind)."""
    fmt = config.log_format
    if fmt == "auto":  # resolved here: a worker's stderr is our pipe, never a terminal
        fmt = "json" if config.log_file or not sys.stderr.isatty() else "text"
    held, port = hold_port(config.host, config.port)
    directory = tempfile.mkdtemp(prefix="rtcsignal-")  # mode 0700
    try:
        supervisor = Supervisor(config, argv, port, fmt, load, directory)
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
            return asyncio.run(supervisor.run())
        return uvloop.run(supervisor.run())
    finally:
        for sock in held:
            sock.close()
        shutil.rmtree(directory, ignore_errors=True)

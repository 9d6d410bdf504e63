"""Command line: ``rtcsignal serve``, ``token`` and ``config``; flags derive from config.SETTINGS."""

from __future__ import annotations

import argparse
import asyncio
import errno
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Sequence

from rtcsignal import logs
from rtcsignal.config import BY_NAME, SETTINGS, Config, ConfigError, Setting, load_config
from rtcsignal.configfile import allowed, effective, example, flag_value


def metavar(s: Setting) -> str:
    """What the flag's value looks like, so the usage line says more than VALUE."""
    text = allowed(s)
    if text.startswith("one of "):
        return "{" + text.removeprefix("one of ").replace(", ", ",") + "}"
    default = s.default
    if isinstance(default, tuple):
        return "LIST"
    if "size" in text:
        return "SIZE"
    if "auto" in text:
        return "N|auto"
    if isinstance(default, int | float):
        return "SECONDS" if s.help.startswith("seconds") else "N"
    if "URL" in text:
        return "PATH" if "path" in text else "URL"
    return "FILE" if s.name.endswith("file") else "TEXT"


def _add_settings(parser: argparse.ArgumentParser) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for s in SETTINGS:
        if s.group not in groups:
            groups[s.group] = parser.add_argument_group(s.group)
        group = groups[s.group]
        kind = ("A flag without a value (true or false in env and file)" if s.flag_only_true
                else f"Allowed: {allowed(s)}")
        help_text = (f"{s.help}. {kind}. Default: {flag_value(s.default)}. "
                     f"Env {s.env}.").replace("%", "%%")
        if s.flag_only_true:
            group.add_argument(s.flag, dest=s.name, action="store_const", const=True,
                               default=None, help=help_text)
        else:
            group.add_argument(s.flag, dest=s.name, default=None, metavar=metavar(s),
                               help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtcsignal", description="WebRTC signaling server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--config", metavar="FILE",
                       help="TOML settings file (env RTCSIGNAL_CONFIG); flags and env override it")
    _add_settings(serve)
    token = sub.add_parser("token", help="mint a test JWT with the configured HMAC secret")
    token.add_argument("--sub", required=True, metavar="TEXT", help="subject (user id)")
    token.add_argument("--rooms", default=None, metavar="LIST",
                       help="comma list of rooms or prefix* patterns. Default: any room")
    token.add_argument("--ttl", type=int, default=3600, metavar="SECONDS",
                       help="seconds until exp. Default: 3600")
    token.add_argument("--config", metavar="FILE", help="TOML settings file")
    _add_settings(token)
    config = sub.add_parser("config", help="print an example settings file, or check one")
    actions = config.add_subparsers(dest="config_command", required=True)
    actions.add_parser("example", help="print a commented TOML settings file with every "
                       "setting at its default")
    check = actions.add_parser(
        "check", help="validate a settings file as serve would read it (with RTCSIGNAL_* and "
        "these flags over it) and print the effective settings, secrets masked")
    check.add_argument("config", nargs="?", metavar="FILE",
                       help="TOML settings file (default: env RTCSIGNAL_CONFIG)")
    _add_settings(check)
    from rtcsignal import loadtest

    bench = sub.add_parser(
        "bench", help="drive a realistic signaling load against a server and report "
        "throughput, latency and errors",
        description="A realistic signaling load: rooms of a few peers exchanging "
        "offer/answer/candidate bursts addressed with `to`; a live progress line; "
        "throughput, p50/p99/max latency and errors at the end (docs/operations.md).")
    loadtest.add_arguments(bench)
    return parser


def join_dash_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``--flag VALUE`` as ``--flag=VALUE`` when VALUE starts with ``-``.

    argparse takes a separate argument starting with ``-`` for an option, so ``--jwt-secret
    -abc`` failed with "expected one argument" (one random base64 secret in 64 starts with
    ``-``). After each value-taking long option of the chosen subcommand (abbreviations
    included), a following argument that starts with ``-`` and is none of that subcommand's
    options (exactly, as ``--opt=value``, or abbreviated) is joined to it, which argparse reads
    as the value. Anything else is left for argparse to accept or refuse as before.
    """
    argv = list(argv)
    start = -1
    chosen = parser
    while True:  # down to the innermost subcommand named (``config check``)
        subparsers = next((a for a in chosen._actions
                           if isinstance(a, argparse._SubParsersAction)), None)
        if subparsers is None:
            break
        found = next((i for i in range(start + 1, len(argv))
                      if argv[i] in subparsers.choices), None)
        if found is None:
            break
        start, chosen = found, subparsers.choices[argv[found]]
    if start < 0:
        return argv
    options = chosen._option_string_actions
    longs = [opt for opt in options if opt.startswith("--")]

    def long_option(arg: str) -> argparse.Action | None:
        """The action a long option names, exactly or by an unambiguous prefix."""
        if not arg.startswith("--") or len(arg) < 3:
            return None
        if arg in options:
            return options[arg]
        matches = [opt for opt in longs if opt.startswith(arg)]
        return options[matches[0]] if len(matches) == 1 else None

    def is_option(arg: str) -> bool:
        name = arg.split("=", 1)[0]
        return name in options or (len(name) > 2 and name.startswith("--")
                                   and any(opt.startswith(name) for opt in longs))

    out = argv[: start + 1]
    i = start + 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.extend(argv[i:])
            break
        action = long_option(arg)
        if action is not None and action.nargs is None and i + 1 < len(argv):
            value = argv[i + 1]
            if value.startswith("-") and value != "--" and not is_option(value):
                out.append(f"{arg}={value}")
                i += 2
                continue
        out.append(arg)
        i += 1
    return out


def _resolve(args: argparse.Namespace) -> Config:
    flags = {s.name: getattr(args, s.name) for s in SETTINGS}
    return load_config(flags, file=args.config)


def _serve(config: Config, argv: Sequence[str], load: Callable[[], Config]) -> int:
    """One server process; with ``--workers`` > 1, a supervisor re-running ``argv`` in
    each worker (``server.workers``; a worker knows itself by its environment). ``load``
    reads the settings again (SIGHUP, ``server.reload``)."""
    from rtcsignal.server import gctune, reload, workers
    from rtcsignal.server.service import SignalingService

    logs.configure(config.log_level, config.log_format, path=config.log_file)
    index = workers.worker_index()
    if index is not None:
        workers.tag_logs(index)
    service = SignalingService(config)  # raises ConfigError for unreadable keys, bad patterns
    if config.workers > 1 and index is None:
        return workers.supervise(config, argv, load)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # before start(): no window without them
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(service.shutdown()))
        loop.add_signal_handler(signal.SIGHUP, reload.reload, service, load)
        await service.start()
        gctune.settle()
        if index is not None and not service.draining:
            workers.serving(service.shutdown)
        await service.wait_closed()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        asyncio.run(main())
    else:
        uvloop.run(main())
    return 0


def _token(config: Config, args: argparse.Namespace) -> int:
    from rtcsignal.security.tokens import mint

    rooms = [r.strip() for r in args.rooms.split(",") if r.strip()] if args.rooms else None
    print(mint(config, sub=args.sub, rooms=rooms, ttl=args.ttl))
    return 0


def _check(config: Config) -> int:
    """``config check``: what serve checks before it binds (building the service reads the
    JWT keys and origin patterns), plus the TLS files, which serve reads only as it binds."""
    from rtcsignal.server.service import SignalingService

    service = SignalingService(config)
    if config.certfile:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(config.certfile, config.keyfile)
        except OSError as exc:  # ssl.SSLError included
            reason = exc.strerror or getattr(exc, "reason", None) or exc
            raise ConfigError(f"certfile: cannot load {config.certfile} with keyfile "
                              f"{config.keyfile}: {reason}") from None
    for line in service.admission.warnings():
        print(f"rtcsignal: warning: {line}", file=sys.stderr)
    sys.stdout.write(effective(config))
    return 0


def bind_error(config: Config, exc: OSError) -> str | None:
    """The setting to blame when the listening socket cannot be had, as one line; None when
    ``exc`` is not about the listening address."""
    port, host = BY_NAME["port"], BY_NAME["host"]
    where = f"{config.host}:{config.port}"
    if exc.errno == errno.EADDRINUSE:
        return (f"port: {where} is already in use; choose another with {port.flag} "
                f"(env {port.env}) or stop what listens there")
    if exc.errno == errno.EACCES and exc.filename is None:
        return (f"port: not allowed to listen on {where} (ports below 1024 need root or "
                f"CAP_NET_BIND_SERVICE); choose another with {port.flag}")
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        why = ("no such host name" if isinstance(exc, socket.gaierror)
               else "not an address of this machine")
        return (f"host: cannot listen on {config.host!r}, {why}; choose another with "
                f"{host.flag} (env {host.env})")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(join_dash_values(parser, argv))
    if args.command == "config" and args.config_command == "example":
        sys.stdout.write(example())
        return 0
    if args.command == "bench":
        from rtcsignal import loadtest

        return loadtest.main(args)
    config: Config | None = None
    try:
        config = _resolve(args)
        if args.command == "token":
            return _token(config, args)
        if args.command == "config":
            return _check(config)
        return _serve(config, argv, lambda: _resolve(args))
    except ConfigError as exc:
        print(f"rtcsignal: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        message = bind_error(config, exc) if config is not None else None
        if message is not None:  # a setting's fault, like a bad value: exit 2
            print(f"rtcsignal: {message}", file=sys.stderr)
            return 2
        print(f"rtcsignal: cannot start: {exc}", file=sys.stderr)
        return 1

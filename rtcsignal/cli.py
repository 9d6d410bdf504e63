"""Command line: ``rtcsignal serve`` and ``rtcsignal token``; flags derive from config.SETTINGS."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from rtcsignal import logs
from rtcsignal.config import SETTINGS, Config, ConfigError, load_config


def _add_settings(parser: argparse.ArgumentParser) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for s in SETTINGS:
        if s.group not in groups:
            groups[s.group] = parser.add_argument_group(s.group)
        group = groups[s.group]
        help_text = f"{s.help} (env {s.env}; default {s.default!r})"
        if s.flag_only_true:
            group.add_argument(s.flag, dest=s.name, action="store_const", const=True,
                               default=None, help=help_text)
        else:
            group.add_argument(s.flag, dest=s.name, default=None, metavar="VALUE",
                               help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtcsignal", description="WebRTC signaling server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--config", help="TOML settings file (env RTCSIGNAL_CONFIG)")
    _add_settings(serve)
    token = sub.add_parser("token", help="mint a test JWT with the configured HMAC secret")
    token.add_argument("--sub", required=True, help="subject (user id)")
    token.add_argument("--rooms", default=None, help="comma list of rooms or prefix* patterns")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until exp")
    token.add_argument("--config", help="TOML settings file")
    _add_settings(token)
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
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    start = next((i for i, arg in enumerate(argv) if arg in subparsers.choices), None)
    if start is None:
        return argv
    options = subparsers.choices[argv[start]]._option_string_actions
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


def _serve(config: Config, argv: Sequence[str]) -> int:
    """One server process; with ``--workers`` > 1, a supervisor re-running ``argv`` in
    each worker (``server.workers``; a worker knows itself by its environment)."""
    from rtcsignal.server import workers
    from rtcsignal.server.service import SignalingService

    logs.configure(config.log_level, config.log_format)
    index = workers.worker_index()
    if index is not None:
        workers.tag_logs(index)
    service = SignalingService(config)  # raises ConfigError for unreadable keys, bad patterns
    if config.workers > 1 and index is None:
        return workers.supervise(config, argv)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # before start(): no window without them
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(service.shutdown()))
        await service.start()
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(join_dash_values(parser, argv))
    try:
        config = _resolve(args)
        if args.command == "token":
            return _token(config, args)
        return _serve(config, argv)
    except ConfigError as exc:
        print(f"rtcsignal: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"rtcsignal: cannot start: {exc}", file=sys.stderr)
        return 1

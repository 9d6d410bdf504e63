"""Issue 12, point 1: the files in deploy/ are checked with what this machine has.

No container engine and no systemd as init run here, so: nginx checks (``nginx -t``) and
runs the shipped site config; ``systemd-analyze verify`` checks the unit (the ``systemd``
package provides it; ``make test`` installs it); the Dockerfile and compose.yaml are parsed
and the commands they would run are resolved by the real command-line parser and
``config check``. Then the compose topology itself runs on loopback: the compose file's two
``rtcsignal serve`` commands on a real Redis, behind nginx with the shipped site config, TLS
and the compose file's own upstream block.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from rtcsignal import cli
from rtcsignal.config import Config
from rtcsignal.server.workers import STOP_GRACE
from tests.cluster import first_logged
from tests.test_auth_tls_turn import self_signed
from tests.test_nginx import (
    DEPLOY,
    loopback_config,
    nginx_binary,
    nginx_for,  # noqa: F401 (the fixture, shared with test_nginx)
    one_sub,
    open_via,
    recv,
)

ROOT = DEPLOY.parent


# --- reading the deploy files ---------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        lines.append((word.upper(), rest.strip()))
        pending = ""
    return lines


def instruction(name: str) -> list[str]:
    return [rest for word, rest in dockerfile() if word == name]


def exec_form(text: str) -> list[str]:
    """A JSON-array command: the process itself is PID 1 and gets the SIGTERM (a shell form
    puts /bin/sh there, which does not pass it on, so nothing would drain)."""
    argv = json.loads(text)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), text
    return argv


def docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in instruction("ENV"):
        for item in shlex.split(rest):
            key, sep, value = item.partition("=")
            assert sep, f"ENV {rest}: use KEY=VALUE"
            env[key] = value
    return env


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def compose_instances() -> dict[str, dict[str, Any]]:
    """The compose services built from deploy/Dockerfile."""
    services = compose()["services"]
    found = {name: svc for name, svc in services.items()
             if (svc.get("build") or {}).get("dockerfile") == "deploy/Dockerfile"}
    assert len(found) >= 2, f"two rtcsignal instances in compose.yaml: {list(services)}"
    return found


def instance_command(service: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """What the container runs: ENTRYPOINT + (the service's command or CMD), and its
    environment (the image's ENV, then the service's)."""
    entrypoint = exec_form(instruction("ENTRYPOINT")[-1])
    command = service.get("command") or exec_form(instruction("CMD")[-1])
    assert isinstance(command, list), f"exec form (a list), not a shell string: {command!r}"
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return [*entrypoint, *command], {**docker_env(), **environment}


def unit() -> dict[str, dict[str, list[str]]]:
    """deploy/rtcsignal.service as {section: {key: [values]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in (DEPLOY / "rtcsignal.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(span: str) -> float:
    """A systemd or compose time span of the forms used here: 30, 30s, 1min, 1m30s."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span.strip())
    assert parts and "".join(n + u for n, u in parts) == span.replace(" ", ""), span
    return sum(float(n) * units[u] for n, u in parts)


def resolve(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Config:
    """The settings ``argv`` (``rtcsignal serve ...``) runs with in ``env``, as the real CLI
    reads them: its parser (an unknown flag fails the test), then what ``config check``
    does (service built, keys and TLS files read). Any error fails with its one line."""
    assert Path(argv[0]).name == "rtcsignal" and argv[1] == "serve", argv
    for name in list(os.environ):
        if name.startswith("RTCSIGNAL_"):
            monkeypatch.delenv(name)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    parser = cli.build_parser()
    try:
        args = parser.parse_args(cli.join_dash_values(parser, argv[1:]))
    except SystemExit as exc:
        raise AssertionError(f"rtcsignal refuses {argv}") from exc
    config = cli._resolve(args)
    assert cli._check(config) == 0
    return config


def drain_bound(config: Config) -> float:
    """Longest a SIGTERM'd rtcsignal may take to exit on its own: the drain, plus the grace
    a supervisor gives a worker before killing it (with --workers). Checks on the way that
    the reconnects are spread over less than the drain, or the last ones would be cut."""
    spread = getattr(config, "drain_spread", 0.0)
    assert spread < config.drain_timeout, (spread, config.drain_timeout)
    return config.drain_timeout + STOP_GRACE


# --- nginx ------------------------------------------------------------------------------------


def test_nginx_accepts_the_shipped_config(tmp_path):
    """``nginx -t`` on deploy/nginx.conf and deploy/nginx-upstream.conf as shipped, TLS
    included (only the certificate paths point at a generated pair)."""
    conf = loopback_config(tmp_path, 443, (DEPLOY / "nginx-upstream.conf").read_text(),
                           tls=self_signed(tmp_path))
    site = (tmp_path / "site.conf").read_text()
    assert "listen 127.0.0.1:443 ssl;" in site  # the TLS listener, not a plain one
    out = subprocess.run(
        [nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(conf), "-e", "stderr",
         "-g", f"pid {tmp_path}/nginx.pid;"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "test is successful" in out.stderr, out.stderr


def test_compose_nginx_reads_the_shipped_files_where_the_site_expects_them():
    nginx = compose()["services"]["nginx"]
    site = (DEPLOY / "nginx.conf").read_text()
    mounts = dict(v.removesuffix(":ro").split(":", 1)[::-1] for v in nginx["volumes"])
    site_target = next(t for t, src in mounts.items() if src == "./nginx.conf")
    assert re.fullmatch(r"/etc/nginx/conf\.d/[\w.-]+\.conf", site_target), site_target
    for directive in ("ssl_certificate", "ssl_certificate_key"):
        path = re.search(rf"^\s*{directive}\s+(\S+);", site, re.M).group(1)
        assert path in mounts, f"{directive} {path} is not mounted in the nginx service"
    (config,) = nginx["configs"]
    assert re.fullmatch(r"/etc/nginx/conf\.d/[\w.-]+\.conf", config["target"]), config
    assert config["source"] in compose()["configs"]
    assert "443:443" in nginx["ports"]


def compose_upstream() -> list[tuple[str, int]]:
    """The (host, port) servers of compose.yaml's inline upstream for the site config."""
    configs = compose()["configs"]
    (name,) = [c["source"] for c in compose()["services"]["nginx"]["configs"]]
    text = configs[name]["content"]
    assert re.search(r"^\s*upstream\s+rtcsignal\s*\{", text, re.M), text
    return [(h, int(p)) for h, p in re.findall(r"^\s*server\s+([\w.-]+):(\d+)\b", text, re.M)]


def test_compose_upstream_names_each_instance_at_its_port(monkeypatch):
    instances = compose_instances()
    servers = compose_upstream()
    assert sorted(h for h, _ in servers) == sorted(instances), servers
    for host, port in servers:
        config = resolve(*instance_command(instances[host]), monkeypatch)
        assert config.port == port, (host, config.port, port)
        assert config.host == "0.0.0.0", "reachable from nginx's container"


# --- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_is_a_slim_python_image_run_by_a_user_it_creates():
    (base,) = instruction("FROM")
    match = re.fullmatch(r"python:(\d+)\.(\d+)-slim(?:-\w+)?", base)
    assert match, f"a slim Python base image: {base}"
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    least = tuple(int(x) for x in re.fullmatch(r">=(\d+)\.(\d+)", required).groups())
    assert tuple(int(x) for x in match.groups()) >= least, (base, required)
    user = instruction("USER")[-1].split(":")[0]
    assert user not in ("root", "0"), user
    assert any(re.search(rf"useradd\b.*\b{re.escape(user)}$", run) for run in instruction("RUN"))


def test_dockerfile_command_is_what_the_cli_accepts_on_the_exposed_port(monkeypatch):
    argv, env = instance_command({})
    config = resolve(argv, env, monkeypatch)
    assert str(config.port) in " ".join(instruction("EXPOSE")).split()
    assert config.host == "0.0.0.0" and config.log_format == "json"
    assert instruction("STOPSIGNAL") == ["SIGTERM"]


def healthcheck() -> list[str]:
    (rest,) = instruction("HEALTHCHECK")
    options, _, command = rest.partition("CMD ")
    assert all(opt.startswith("--") for opt in options.split()), options
    argv = exec_form(command)
    assert argv[0] == "python", argv  # the image's own interpreter
    return [sys.executable, *argv[1:]]


async def test_dockerfile_healthcheck_passes_on_the_served_image_command_and_fails_without(
        run_server):
    """The image's command, served here (on a free port), answers the image's HEALTHCHECK
    on /healthz; once it is stopped the same check fails."""
    argv, env = instance_command({})
    check = healthcheck()
    assert "/healthz" in check[-1], check
    server = run_server(*argv[2:], env={**env, "RTCSIGNAL_HOST": "127.0.0.1"})
    env = {**os.environ, **env, "RTCSIGNAL_PORT": str(server.port)}
    ok = subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    server.stop()
    down = subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode != 0


# --- compose.yaml -----------------------------------------------------------------------------


def test_compose_instances_share_the_compose_redis_and_outlast_their_drain(monkeypatch):
    services = compose()["services"]
    nginx_address = services["nginx"]["networks"]["default"]["ipv4_address"]
    for name, service in compose_instances().items():
        config = resolve(*instance_command(service), monkeypatch)
        broker = urlparse(config.broker)
        assert broker.scheme == "redis" and broker.hostname in services, (name, config.broker)
        redis = services[broker.hostname]
        assert str(redis["image"]).startswith("redis:"), redis
        assert (broker.port or 6379) == 6379 and "--port" not in redis.get("command", [])
        assert "redis" in service["depends_on"], name
        # nginx, and only nginx, is believed about the client's address.
        assert [str(n) for n in config.trusted_proxies] == [f"{nginx_address}/32"], name
        grace = seconds(service["stop_grace_period"])
        assert grace > drain_bound(config), (name, grace, drain_bound(config))


async def test_compose_topology_runs_on_loopback(
        run_server, nginx_for,  # noqa: F811 (the fixture imported above)
        redis_server, broker_prefix, monkeypatch, tmp_path):
    """compose.yaml's instances, as their commands say, on this machine's Redis (for the
    compose service "redis"), behind the shipped site config with TLS and compose's own
    upstream block: two clients through nginx land on the two instances and talk."""
    instances = compose_instances()
    started = {}
    for name, service in instances.items():
        argv, env = instance_command(service)
        broker = resolve(argv, env, monkeypatch).broker
        args = [redis_server.url if a == broker else a for a in argv[2:]]
        env = {k: redis_server.url if v == broker else v for k, v in env.items()}
        started[name] = run_server(*args, "--broker-prefix", broker_prefix,
                                   env={**env, "RTCSIGNAL_HOST": "127.0.0.1"})
    (name,) = [c["source"] for c in compose()["services"]["nginx"]["configs"]]
    upstream = compose()["configs"][name]["content"]
    for host, port in compose_upstream():  # the compose names, on this machine
        upstream = one_sub(rf"\b{re.escape(host)}:{port}\b",
                           f"127.0.0.1:{started[host].port}", upstream)
    cert, key = self_signed(tmp_path)
    nginx = nginx_for(upstream=upstream, tls=(cert, key))
    trusting = ssl.create_default_context(cafile=str(cert))
    room = "deploy-" + os.urandom(3).hex()
    a, ga = await open_via(nginx, f"room={room}", ssl=trusting)
    await recv(a, "joined")
    b, gb = await open_via(nginx, f"room={room}", ssl=trusting)
    await recv(b, "joined")
    assert (await recv(a, "peer-joined"))["peerId"] == gb["peerId"]
    await b.send(json.dumps({"type": "offer", "sdp": "v=0", "to": ga["peerId"]}))
    assert (await recv(a, "offer"))["from"] == gb["peerId"]

    names = list(started)
    hosts = {}
    for peer in (ga["peerId"], gb["peerId"]):
        i, _ = await asyncio.to_thread(first_logged, [started[n] for n in names], lambda e, p=peer:
                                       e.get("event") == "connect" and e.get("peer") == p)
        hosts[peer] = names[i]
    assert sorted(hosts.values()) == sorted(instances), hosts  # one client on each
    await a.close()
    await b.close()


# --- systemd ----------------------------------------------------------------------------------


def test_unit_restarts_hardens_and_outlasts_the_drain(monkeypatch):
    service = unit()["Service"]

    def one(key: str) -> str:
        (value,) = service[key]
        return value

    assert one("Restart") == "on-failure"
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("PrivateTmp") == "yes"
    assert service.get("DynamicUser") == ["yes"] or service.get("User", ["root"]) != ["root"]
    # systemd signals only the main process; with --workers it stops its own workers.
    assert one("KillMode") == "mixed" and one("KillSignal") == "SIGTERM"
    config = resolve(*unit_command(), monkeypatch)
    assert seconds(one("TimeoutStopSec")) > drain_bound(config)


def unit_command() -> tuple[list[str], dict[str, str]]:
    """ExecStart with the shipped deploy/rtcsignal.toml where it reads /etc/rtcsignal/...,
    and the unit's Environment=."""
    service = unit()["Service"]
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start.lstrip("-@+!:"))
    i = argv.index("--config")
    assert argv[i + 1] == "/etc/rtcsignal/rtcsignal.toml", argv
    argv[i + 1] = str(DEPLOY / "rtcsignal.toml")
    env = dict(item.split("=", 1) for value in service.get("Environment", [])
               for item in shlex.split(value))
    return argv, env


def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path):
    """Unknown keys and bad values are only warnings to systemd (exit 0), so any output
    fails. ExecStart must exist: it points at this checkout's rtcsignal instead."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze not found: `make test` installs it (Debian package "
                    "systemd); it checks deploy/rtcsignal.service")
    text = (DEPLOY / "rtcsignal.service").read_text()
    here = str(Path(sys.executable).with_name("rtcsignal"))
    text = one_sub(r"^ExecStart=/opt/rtcsignal/\.venv/bin/rtcsignal\b",
                   f"ExecStart={here}", text)
    path = tmp_path / "rtcsignal.service"
    path.write_text(text)
    out = subprocess.run([analyze, "verify", "--man=no", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert (out.returncode, out.stdout + out.stderr) == (0, ""), out.stdout + out.stderr

"""Issue 12, point 5: what a new user meets on a first run (help, a taken port, packaging, the
README's token example)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import jwt
import pytest
from packaging.licenses import canonicalize_license_expression
from packaging.requirements import Requirement

from rtcsignal.config import SETTINGS
from rtcsignal.configfile import allowed, flag_value
from tests.test_cli_config import clean_env, run_cli

ROOT = Path(__file__).resolve().parent.parent


def help_entries(text: str) -> dict[str, str]:
    """``--help`` output as {option: its help text}, wrapped lines joined."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^  (--[a-z0-9-]+)(.*)", line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2)
        elif current is not None and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_help_shows_each_settings_allowed_values_default_and_env():
    out = run_cli("serve", "--help", env=clean_env(COLUMNS="10000"))  # no wrapping
    assert out.returncode == 0, out.stderr
    entries = help_entries(out.stdout)
    usage = out.stdout.split("\n\n", 1)[0]
    assert "VALUE" not in usage, usage
    for s in SETTINGS:
        entry = entries.get(s.flag)
        assert entry is not None, f"{s.flag} missing from --help"
        assert f"Default: {flag_value(s.default)}." in entry, entry
        assert s.env in entry, entry
        if not s.flag_only_true:
            assert " ".join(allowed(s).split()) in entry, entry


def occupied_port() -> socket.socket:
    """A listening socket without SO_REUSEPORT: nobody may share its port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("extra", [[], ["--workers", "2", "--broker", "redis://127.0.0.1:1/0"]],
                         ids=["one-process", "workers"])
def test_port_in_use_is_one_line_naming_port_with_the_config_error_status(extra):
    bad_value = run_cli("serve", "--port", "70000")
    with occupied_port() as taken:
        port = taken.getsockname()[1]
        out = run_cli("serve", "--port", str(port), "--log-format", "json", *extra)
    assert out.returncode == bad_value.returncode != 0, (out.returncode, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert "--port" in lines[0] and f":{port} " in lines[0], lines[0]
    assert "worker started" not in out.stderr


def readme_block(containing: str) -> str:
    blocks = re.findall(r"^```sh\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"one README sh block with {containing!r}: {found}"
    return found[0]


def test_readme_token_example_mints_a_token_without_warnings(tmp_path):
    """Run as the README shows it: the secret it makes is long enough for PyJWT (a short one
    prints InsecureKeyLengthWarning on stderr) and the token verifies with it."""
    script = readme_block("rtcsignal token")
    env = clean_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    PYTHONWARNINGS="always")
    out = subprocess.run(["sh", "-ec", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", out.stderr
    secrets = [p for p in tmp_path.iterdir() if p.is_file()]
    assert len(secrets) == 1, secrets
    token = out.stdout.strip().splitlines()[-1]
    claims = jwt.decode(token, secrets[0].read_bytes().rstrip(b"\r\n"), algorithms=["HS256"])
    assert "exp" in claims and "sub" in claims, claims


def test_license_is_an_spdx_expression_and_the_build_backend_reads_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    license_ = project["project"]["license"]
    assert isinstance(license_, str), license_
    assert canonicalize_license_expression(license_) == license_
    # setuptools reads a string license only from 77 on (older ones refuse the file).
    backend = [Requirement(r) for r in project["build-system"]["requires"]]
    setuptools = next(r for r in backend if r.name == "setuptools")
    assert not setuptools.specifier.contains("76.9"), setuptools

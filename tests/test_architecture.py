"""The folders are the architecture: arrows point inward, no import cycles, pure layers
stay light. Checked statically (every import, TYPE_CHECKING ones included) and by importing
the pure modules in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rtcsignal"

#: What each layer may import from the project (besides itself).
ALLOWED = {
    "protocol": set(),
    "core": set(),
    "config": set(),
    "security": {"config", "protocol", "core"},
    "redis": {"config", "protocol", "core"},
    "server": {"config", "protocol", "core", "security", "logs", "redis"},
    # The Python client (rtcsignal.client) is the outermost layer: it speaks the wire
    # protocol over the websockets library and shares no code with the server.
    "client": set(),
}
#: Layers nothing else in the package may import.
OUTERMOST = {"client"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules that ``path`` imports (``from a import b`` is ``a.b`` when that is a
    module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    # The package root is a lazy facade (PEP 562 __getattr__): nothing runs at import.
    return {m: imports(p, known) - {m} for m, p in known.items() if m != "rtcsignal"}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles() -> None:
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n):], n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_layers_import_only_inward() -> None:
    bad = []
    for m, deps in graph().items():
        rules = ALLOWED.get(layer(m))
        if rules is None:
            continue
        for d in deps:
            if layer(d) != layer(m) and layer(d) not in rules:
                bad.append(f"{m} -> {d}")
    assert not bad, bad


def test_pure_modules_import_no_io_or_crypto() -> None:
    code = (
        "import sys, rtcsignal.protocol.frames, rtcsignal.protocol.session, "
        "rtcsignal.protocol.http, rtcsignal.core.hub; "
        "print(' '.join(m for m in ('asyncio', 'ssl', 'jwt', 'cryptography', 'uvloop') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"pure modules pulled in: {out}"


def test_nothing_imports_the_client() -> None:
    bad = [f"{m} -> {d}" for m, deps in graph().items() for d in deps
           if layer(d) in OUTERMOST and layer(m) != layer(d)]
    assert not bad, bad


def test_client_and_server_load_without_each_other() -> None:
    """The client pulls in no server module, the server and the CLI not the client nor
    the websockets library it runs on."""
    code = (
        "import sys, importlib; importlib.import_module(sys.argv[1]); "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'websockets' "
        "or m.startswith('rtcsignal.'))))"
    )

    def loaded(module: str) -> set[str]:
        out = subprocess.run([sys.executable, "-c", code, module], capture_output=True,
                             text=True, check=True).stdout
        return set(out.split())

    client = loaded("rtcsignal.client")
    assert "rtcsignal.client" in client and "websockets" in client
    assert client - {"rtcsignal.client"} <= {m for m in client if m.startswith("websockets")}
    for server in ("rtcsignal.server.service", "rtcsignal.cli"):
        mods = loaded(server)
        assert server in mods, mods
        assert not {m for m in mods if m == "rtcsignal.client" or m.startswith("websockets")}

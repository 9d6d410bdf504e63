"""Issue 12: docs/troubleshooting.md names only log events, metrics, reasons and error codes
the server really emits (a renamed one would send operators grepping for nothing)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from rtcsignal.config import Config
from rtcsignal.core.messages import ErrorCode
from rtcsignal.server.service import SignalingService

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "troubleshooting.md").read_text()
SOURCES = sorted((ROOT / "rtcsignal").rglob("*.py"))
HOLE = "\x00"  # where an f-string has a value


def named(pattern: str) -> list[str]:
    """What ``pattern`` captures in the doc, a line break inside it read as a space."""
    return sorted({" ".join(m.split()) for m in re.findall(pattern, DOC)})


def literals() -> set[str]:
    """Every string constant in the package; an f-string with HOLE for each value."""
    found: set[str] = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
            elif isinstance(node, ast.JoinedStr):
                found.add("".join(v.value if isinstance(v, ast.Constant) else HOLE
                                  for v in node.values))
    return found


def log_events() -> set[str]:
    """The ``event`` of every log call: its first argument."""
    events: set[str] = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "log"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                events.add(node.args[0].value)
    return events


def metric_families() -> dict[str, str]:
    """{metric name: its sample lines} of a service with a broker (not started: the broker's
    metrics exist from construction), so every family is listed, labelled ones included."""
    service = SignalingService(Config(broker="redis://127.0.0.1:1/0"))
    text = service.metrics.render()
    return {name: text for name in re.findall(r"^# TYPE (\w+) ", text, re.M)}


def test_the_doc_names_events_metrics_codes_and_reasons():
    assert re.findall(r'"event":"', DOC) and re.findall(r"\brtcsignal_\w+", DOC)


@pytest.mark.parametrize("event", named(r'"event":"([^"]+)"'))
def test_each_log_event_named_is_logged_by_the_server(event):
    assert event in log_events(), f"no log call emits event {event!r}"


@pytest.mark.parametrize("name", named(r"\b(rtcsignal_\w+)"))
def test_each_metric_named_is_exported(name):
    assert name in metric_families(), f"/metrics has no {name}"


@pytest.mark.parametrize(("name", "label"),
                         sorted(set(re.findall(r"\b(rtcsignal_\w+)\{(\w+)", DOC))))
def test_each_metric_label_named_is_the_metrics_label(name, label):
    source = (ROOT / "rtcsignal" / "core" / "metrics.py").read_text()
    family = re.search(rf'metric\("{name}".*?\n.*?\n', source, re.S)
    assert family is not None and f'by("{label}"' in family.group(0), (name, label)


@pytest.mark.parametrize("code", named(r'\bcode(?:":"|=")([a-z-]+)"'))
def test_each_error_code_named_exists(code):
    codes = {v for k, v in vars(ErrorCode).items() if k.isupper()}
    assert code in codes, code


@pytest.mark.parametrize("reason", named(r'"reason":"([^"]+)"'))
def test_each_reason_named_is_one_the_server_writes(reason):
    """``...`` in the doc stands for the variable part (an exception's text, say)."""
    pattern = ".*".join(re.escape(part) for part in reason.split("..."))
    assert any(re.fullmatch(pattern, lit, re.S) for lit in literals()), reason

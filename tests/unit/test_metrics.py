"""Metric labels for client-chosen message types (issue 8, item 9)."""

from __future__ import annotations

from rtcsignal.core import metrics
from rtcsignal.core.metrics import OTHER_TYPE, Metrics
from tests.helpers import parse_metrics


def test_documented_types_keep_their_label_after_junk_fills_the_cap() -> None:
    m = Metrics(max_types=2)
    for i in range(10):
        m.count_received(f"junk-{i}")
        m.count_relayed(f"junk-{i}", 1)
    for kind in ("offer", "answer", "ice-candidate", "join", "ping", "pong"):
        m.count_received(kind)
    m.count_relayed("offer", 3)
    assert m.received == {"junk-0": 1, "junk-1": 1, OTHER_TYPE: 8, "offer": 1, "answer": 1,
                          "ice-candidate": 1, "join": 1, "ping": 1, "pong": 1}
    assert m.relayed == {"junk-0": 1, "junk-1": 1, OTHER_TYPE: 8, "offer": 1}
    samples = parse_metrics(m.render())
    assert samples['rtcsignal_messages_received_total{type="offer"}'] == 1
    assert samples['rtcsignal_messages_relayed_total{type="offer"}'] == 1
    assert samples['rtcsignal_messages_relayed_total{type="_other"}'] == 8


def test_documented_types_do_not_use_up_the_cap() -> None:
    m = Metrics(max_types=2)
    for kind in sorted(metrics.DOCUMENTED_TYPES):
        m.count_received(kind)
    m.count_received("custom-a")
    m.count_received("custom-b")
    m.count_received("custom-c")
    assert m.received["custom-a"] == m.received["custom-b"] == 1
    assert "custom-c" not in m.received and m.received[OTHER_TYPE] == 1
    assert len(m.received) == len(metrics.DOCUMENTED_TYPES) + 3  # bounded: cap + documented + _other


def test_documented_set_is_the_protocol_doc_and_can_be_replaced() -> None:
    assert {"offer", "answer", "ice-candidate", "join", "leave", "ping"} <= metrics.DOCUMENTED_TYPES
    m = Metrics(max_types=1, always_labelled={"hello"})
    m.count_received("x")
    m.count_received("offer")  # not always-labelled here: over the cap
    m.count_received("hello")
    assert m.received == {"x": 1, OTHER_TYPE: 1, "hello": 1}


def test_zero_cap_labels_only_documented_types() -> None:
    m = Metrics(max_types=0)
    m.count_received("junk")
    m.count_received("offer")
    assert m.received == {OTHER_TYPE: 1, "offer": 1}

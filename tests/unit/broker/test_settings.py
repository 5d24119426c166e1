"""Broker annotations are untrusted: each malformed value is refused naming the key and the value,
with an audit line, and the container is then left alone (no idle release, never parked)."""
from __future__ import annotations

import logging

import pytest

from broker import GPU_PRIORITY, IDLE_RELEASE_AFTER, WAKE_PORT
from broker.settings import Policy, parse_duration, policy_of


@pytest.mark.parametrize("text,seconds", [
    ("300s", 300.0), ("5m", 300.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("250ms", 0.25),
    (" 2s ", 2.0), ("1m30s", 90.0), ("2h0m5s", 7205.0),
])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "300", "5 m", "-5s", "5x", "s", "1e3s", "5m-3s", "abc", "5mm", "0x10s"])
def test_malformed_durations_are_value_errors(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_no_annotations_mean_no_idle_release_and_the_default_front():
    p = policy_of({}, "c1", "default")
    assert p == Policy()
    assert not p.managed and p.wake_ports is None and p.priority == 0


def test_a_full_policy():
    p = policy_of({IDLE_RELEASE_AFTER: "90s", WAKE_PORT: "8080, 9090,8080", GPU_PRIORITY: "-7"}, "c1", "ns")
    assert p == Policy(idle_release_after=90.0, wake_ports=(8080, 9090), priority=-7)
    assert p.managed


def test_wake_port_none_turns_the_front_off():
    assert policy_of({WAKE_PORT: "None"}, "c1", "ns").wake_ports == ()


@pytest.mark.parametrize("key,value,why", [
    (IDLE_RELEASE_AFTER, "soon", "not a duration"),
    (IDLE_RELEASE_AFTER, "300", "not a duration"),
    (IDLE_RELEASE_AFTER, "0s", "between 1 s and 30 days"),
    (IDLE_RELEASE_AFTER, "100000h", "between 1 s and 30 days"),
    (WAKE_PORT, "http", "TCP port numbers"),
    (WAKE_PORT, "0", "TCP port numbers"),
    (WAKE_PORT, "65536", "TCP port numbers"),
    (WAKE_PORT, "80;81", "TCP port numbers"),
    (WAKE_PORT, ",".join(str(p) for p in range(1000, 1020)), "at most 16 ports"),
    (GPU_PRIORITY, "high", "whole number from -1000 to 1000"),
    (GPU_PRIORITY, "1.5", "whole number"),
    (GPU_PRIORITY, "5000", "whole number"),
    (GPU_PRIORITY, "", "whole number"),
])
def test_malformed_values_are_refused_naming_the_key(key, value, why, caplog):
    ann = {IDLE_RELEASE_AFTER: "60s", key: value}
    with caplog.at_level(logging.WARNING, logger="kybernate.audit"):
        p = policy_of(ann, "web", "k8s.io")
    assert p.refused and key in p.refused and repr(value)[:40] in p.refused and why in p.refused
    assert "web" in p.refused
    assert not p.managed, "a container with a refused annotation is never parked"
    audit = [r.getMessage() for r in caplog.records if r.name == "kybernate.audit"]
    assert len(audit) == 1
    assert f"key={key}" in audit[0] and "container=web" in audit[0] and "namespace=k8s.io" in audit[0]


def test_values_of_any_type_are_refused_not_raised():
    p = policy_of({IDLE_RELEASE_AFTER: ["60s"], GPU_PRIORITY: None}, "c", "ns")
    assert p.refused and IDLE_RELEASE_AFTER in p.refused

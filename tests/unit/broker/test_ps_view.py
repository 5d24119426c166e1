"""`kybernate ps`'s per-GPU view of the broker's status: resident first, then parked, since when."""
from __future__ import annotations

from kybernate.ps import render_gpus

GiB = 1 << 30


def test_render_gpus():
    view = {"gpus": {"GPU-0": {"total": 80 * GiB, "free": 60 * GiB}}, "containers": [
        {"namespace": "k8s.io", "id": "b", "name": "team/web-1/server", "phase": "parked", "since": 0,
         "vram": {"GPU-0": 4 * GiB}, "gpus": ["GPU-0"], "idle_s": 99, "reason": "idle 300 s",
         "wake_ports": [8080], "refused": "", "gpu": True},
        {"namespace": "k8s.io", "id": "a", "name": "team/web-0/server", "phase": "resident", "since": 0,
         "vram": {"GPU-0": 16 * GiB}, "gpus": ["GPU-0"], "idle_s": 12.4, "reason": "", "wake_ports": [],
         "refused": "", "gpu": True},
        {"namespace": "default", "id": "c", "name": "default/c", "phase": "resident", "since": 0, "vram": {},
         "gpus": [], "idle_s": 1, "reason": "", "wake_ports": [],
         "refused": "broker: manage container c: kybernate.io/gpu-priority='high': must be a whole number",
         "gpu": False},
    ]}
    lines = render_gpus(view).splitlines()
    assert lines[0].split() == ["GPU", "STATE", "CONTAINER", "VRAM", "SINCE", "IDLE", "NOTE"]
    assert lines[1].split()[:2] == ["-", "resident"] and "kybernate.io/gpu-priority='high'" in lines[1]
    assert lines[2].split()[:6] == ["GPU-0", "resident", "team/web-0/server", "16.00", "GiB", "-"]
    assert lines[2].split()[6:8] == ["12", "s"]
    assert lines[3].split()[:5] == ["GPU-0", "parked", "team/web-1/server", "4.00", "GiB"]
    assert lines[3].endswith("idle 300 s; wakes on port 8080")
    assert lines[4] == "GPU-0: 60.00 GiB free of 80.00 GiB"

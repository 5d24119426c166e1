"""Mapping the plain stats to containerd's Metrics messages, packed as containerd packs them.

Kept apart from the readers so those stay testable without protobuf, and so the proto modules are
imported only when Stats is actually called. Fields are set by name and only if the message has
them, so a counter the kernel reports but the proto lacks is dropped rather than failing.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

from . import stats_v1 as v1
from . import stats_v2 as v2

V1_TYPE_URL = "io.containerd.cgroups.v1.Metrics"
V2_TYPE_URL = "io.containerd.cgroups.v2.Metrics"


def _modules():
    from proto.io.containerd.cgroups.v1 import metrics_pb2 as m1
    from proto.io.containerd.cgroups.v2 import metrics_pb2 as m2
    return m1, m2


def _set_scalars(msg: Any, values: Mapping[str, Any]) -> None:
    fields = msg.DESCRIPTOR.fields_by_name
    for k, v in values.items():
        if k in fields and v is not None and not isinstance(v, (list, dict)) \
                and not dataclasses.is_dataclass(v):
            setattr(msg, k, v)


def _scalars_of(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def v1_message(stats: v1.V1Stats, m1: Any = None) -> Any:
    """io.containerd.cgroups.v1.Metrics for ``stats``."""
    if m1 is None:
        m1 = _modules()[0]
    out = m1.Metrics()
    for h in stats.hugetlb:
        _set_scalars(out.hugetlb.add(), _scalars_of(h))
    if stats.pids is not None:
        _set_scalars(out.pids, _scalars_of(stats.pids))
    if stats.cpu is not None:
        u = stats.cpu.usage
        _set_scalars(out.cpu.usage, {"total": u.total, "kernel": u.kernel, "user": u.user})
        out.cpu.usage.per_cpu.extend(u.per_cpu)
        _set_scalars(out.cpu.throttling, _scalars_of(stats.cpu.throttling))
    if stats.memory is not None:
        mem = stats.memory
        _set_scalars(out.memory, mem.counters)
        for name in ("usage", "swap", "kernel", "kernel_tcp"):
            entry = getattr(mem, name)
            if entry is not None:
                _set_scalars(getattr(out.memory, name), _scalars_of(entry))
    if stats.memory_oom_control is not None:
        _set_scalars(out.memory_oom_control, _scalars_of(stats.memory_oom_control))
    if stats.blkio is not None:
        out.blkio.SetInParent()
        for f in dataclasses.fields(stats.blkio):
            target = getattr(out.blkio, f.name)
            for e in getattr(stats.blkio, f.name):
                _set_scalars(target.add(), _scalars_of(e))
    return out


def _psi(target: Any, psi: Optional[v2.PSIStats]) -> None:
    if psi is None:
        return
    for part in ("some", "full"):
        data = getattr(psi, part)
        if data is not None:
            _set_scalars(getattr(target, part), _scalars_of(data))


def v2_message(stats: v2.V2Stats, m2: Any = None) -> Any:
    """io.containerd.cgroups.v2.Metrics for ``stats``."""
    if m2 is None:
        m2 = _modules()[1]
    out = m2.Metrics()
    if stats.pids is not None:
        _set_scalars(out.pids, _scalars_of(stats.pids))
    out.cpu.SetInParent()
    _set_scalars(out.cpu, stats.cpu)
    if stats.cpu_psi is not None and "psi" in out.cpu.DESCRIPTOR.fields_by_name:
        _psi(out.cpu.psi, stats.cpu_psi)
    out.memory.SetInParent()
    _set_scalars(out.memory, stats.memory)
    if stats.memory_psi is not None and "psi" in out.memory.DESCRIPTOR.fields_by_name:
        _psi(out.memory.psi, stats.memory_psi)
    if stats.memory_events is not None:
        out.memory_events.SetInParent()
        _set_scalars(out.memory_events, stats.memory_events)
    out.io.SetInParent()
    for e in stats.io:
        _set_scalars(out.io.usage.add(), _scalars_of(e))
    if stats.io_psi is not None and "psi" in out.io.DESCRIPTOR.fields_by_name:
        _psi(out.io.psi, stats.io_psi)
    for h in stats.hugetlb:
        _set_scalars(out.hugetlb.add(), _scalars_of(h))
    return out


def metrics_any(stats: Union[v1.V1Stats, v2.V2Stats]) -> Any:
    """The Any Stats returns: type URL ``io.containerd.cgroups.v1.Metrics`` (or v2), no prefix."""
    from proto.anyutil import pack
    msg = v1_message(stats) if isinstance(stats, v1.V1Stats) else v2_message(stats)
    return pack(msg)

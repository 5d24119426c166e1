"""The container's cgroup seen from its pid: stats (containerd Metrics), pids, OOM, freeze state.

    cg = Cgroup.for_pid(pid)          # v1 (legacy/hybrid) or v2 (unified), detected from mountinfo
    cg.pids(); cg.stats(); cg.metrics()   # metrics(): Any of io.containerd.cgroups.v{1,2}.Metrics
    cg.freeze_state()                 # FreezeState.THAWED / FREEZING / FROZEN / UNKNOWN
    OomWatcher(cg, on_oom).start()    # inside the event loop

Protobuf is imported only by ``metrics()``.
"""
from .cgroup import Cgroup, CgroupError, FreezeState
from .mounts import CgroupMounts
from .oom import OomWatcher
from .stats_v1 import V1Stats
from .stats_v2 import V2Stats

__all__ = ["Cgroup", "CgroupError", "CgroupMounts", "FreezeState", "OomWatcher", "V1Stats", "V2Stats"]

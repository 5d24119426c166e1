"""The node broker: idle release, wake on demand and making room for GPU containers (issue 17).

One broker per node (`kybernate broker serve`, run by the installer's DaemonSet or systemd) knows
every container that containerd runs with the kybernate runtime, which GPUs its processes hold and
how much VRAM (`broker.readings`, from NVML), whether it is resident or parked (paused through the
shim, its VRAM moved to host RAM), and when its GPUs last did work. It never reaches into a shim:
pause and resume go through containerd's Tasks API, so containerd's own state stays true.

Rooms (docs/design.md):
- `settings`  a container's annotations (untrusted) -> its policy, or a refusal naming the key
- `core`      sans-IO decisions: who is due for idle release, which idle containers make room for a
              wake (priority, then least recently used), or why there is no room
- `readings`  GPU readings: NVML through nvidia-ml-py, or a file-driven stand-in for tests
- `containerd` containerd's gRPC API (containers, tasks, pause/resume, events)
- `records`   what the broker parked, on disk, so that a restarted broker finishes what it began
- `front`     wake on connect: the parked container's listening socket, answered by the broker
- `control`   the broker's unix socket (`kybernate wake`, `kybernate ps`)
- `service`   the broker itself: the loop, the locks, the moves
- `notify`    events (containerd, Kubernetes) and Prometheus metrics
"""
IDLE_RELEASE_AFTER = "kybernate.io/idle-release-after"
WAKE_PORT = "kybernate.io/wake-port"
GPU_PRIORITY = "kybernate.io/gpu-priority"
RUNTIME_TYPE = "io.containerd.kybernate.v1"

DEFAULT_SOCKET = "/run/kybernate/broker.sock"
DEFAULT_STATE_DIR = "/run/kybernate/broker"


class BrokerError(Exception):
    """A request the broker refuses or cannot carry out, in one sentence for the caller.

    ``code``: a short word for machines (``not-found``, ``invalid``, ``no-room``, ``failed``,
    ``unavailable``), carried over the control socket."""

    def __init__(self, message: str, code: str = "failed"):
        self.code = code
        super().__init__(message)

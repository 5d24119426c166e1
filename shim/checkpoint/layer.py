"""The lifecycle seam: what a layer adds around the OCI runtime's checkpoint, restore, pause and resume.

Why a seam: CRIU alone cannot dump a process that holds GPU memory, and a frozen cgroup keeps its
VRAM; the GPU layer (`shim.gpu.lifecycle.GpuLayer`) puts CUDA work before and after each runtime
step. The container (`shim.task.container`) chooses its layer stack once, at Create, and calls the
seam (`shim.checkpoint.seam`) which calls the layer; a layer never calls back into the container. It
gets what it needs in a `TaskHandle`: the container's identity, spec, runtime and a way to read its
init's pid, nothing else.

Call order (each `after_*` runs on success and on failure; on failure it gets the error and rolls
back what its `before_*` did, then the caller re-raises):

    checkpoint:  before_checkpoint -> runtime checkpoint (CRIU dump) -> after_checkpoint(failure)
    restore:     before_restore    -> runtime restore (CRIU)         -> IO attached -> after_restore
                 (a failing after_restore leaves the caller to undo the whole restore)
    pause:       before_pause      -> runtime pause (freeze)         -> after_pause(failure)
    resume:      runtime resume (thaw)                               -> after_resume
    create:      prepare (a head start only: never fails the Create)

`PlainLayer` is the plain CRIU path: it adds nothing. A layer stacked on it calls its inner layer's
hooks first on the way in (before_*) and last on the way out (after_*).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol


@dataclass(frozen=True)
class TaskHandle:
    """What a layer may use of a container: given to it, never reached for.

    runtime: the container's OCI runtime CLI (`shim.runtime.runc.Runc`: pause, resume, kill, state);
    init_pid: the init process's pid now (0 before it exists; after a restore, the restored one)."""

    id: str
    namespace: str
    bundle: str
    spec: Mapping
    runtime: Any
    init_pid: Callable[[], int]

    @property
    def subject(self) -> str:
        return f"container {self.id}"


class LifecycleLayer(Protocol):
    """The hooks of one layer. See the module docstring for the call order."""

    name: str

    def prepare(self, task: TaskHandle) -> None: ...

    async def before_checkpoint(self, task: TaskHandle, image_dir: str, keeps_running: bool,
                                was_paused: bool) -> None: ...

    async def after_checkpoint(self, task: TaskHandle, image_dir: str, keeps_running: bool, was_paused: bool,
                               failure: Optional[BaseException]) -> None: ...

    async def before_restore(self, task: TaskHandle, image_dir: str) -> None: ...

    async def after_restore(self, task: TaskHandle, image_dir: str) -> None: ...

    async def before_pause(self, task: TaskHandle) -> None: ...

    async def after_pause(self, task: TaskHandle, failure: Optional[BaseException]) -> None: ...

    async def after_resume(self, task: TaskHandle) -> None: ...


class PlainLayer:
    """The plain CRIU path: the runtime's own checkpoint, restore, pause and resume, nothing around."""

    name = "criu"

    def prepare(self, task: TaskHandle) -> None:
        return None

    async def before_checkpoint(self, task: TaskHandle, image_dir: str, keeps_running: bool,
                                was_paused: bool) -> None:
        return None

    async def after_checkpoint(self, task: TaskHandle, image_dir: str, keeps_running: bool, was_paused: bool,
                               failure: Optional[BaseException]) -> None:
        return None

    async def before_restore(self, task: TaskHandle, image_dir: str) -> None:
        return None

    async def after_restore(self, task: TaskHandle, image_dir: str) -> None:
        return None

    async def before_pause(self, task: TaskHandle) -> None:
        return None

    async def after_pause(self, task: TaskHandle, failure: Optional[BaseException]) -> None:
        return None

    async def after_resume(self, task: TaskHandle) -> None:
        return None


def describe_layers(layer: LifecycleLayer) -> str:
    """'gpu on criu': the stack from the top, for the log."""
    names = []
    while layer is not None:
        names.append(layer.name)
        layer = getattr(layer, "inner", None)
    return " on ".join(names)

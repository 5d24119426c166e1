"""shim.checkpoint.seam's CPU checkpoint/restore logic with a fake OCI runtime: which runc arguments, what is
marked complete, what a failure leaves (image dir, frozen task, runc state), the TaskCheckpointed
payload. The real thing (runc, CRIU, containerd 1.6/1.7/2.1) is in tests/integration/test_checkpoint*.py
and test_restore.py."""
from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path

import pytest

from criu.images import IMG_COMMON_MAGIC, INVENTORY_MAGIC, PSTREE_MAGIC, is_complete, mark_complete
from shim.checkpoint.layer import PlainLayer
from shim.gpu import lifecycle as gpu
from shim.checkpoint.settings import NOTE_NAME, CheckpointSettings
from shim.policy.node import NodeConfig
from shim.policy.untrusted import checkpoint_settings
from shim.task.container import Container
from shim.task.io import StdioPaths
from shim.runtime.options import RuntimeOptions
from shim.task.process import Created, CreatedFromCheckpoint, InitProcess, Paused, Running, State
from shim.runtime.runc import RuntimeCommandError
from ttrpc.codes import Code
from ttrpc.errors import TTRPCError


def write_image(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "inventory.img").write_bytes(struct.pack("<I", INVENTORY_MAGIC) + b"\0" * 12)
    (d / "pstree.img").write_bytes(struct.pack("<II", IMG_COMMON_MAGIC, PSTREE_MAGIC) + b"\0" * 8)


class FakeRuntime:
    """runc as lifecycle uses it: records argv, 'dumps' an image, fails on demand."""

    binary = "/usr/sbin/runc"

    def __init__(self, fail: str = "", status: str = "running"):
        self.root = "/nonexistent/kybernate-test-runc-root"  # runc's state root (nothing there)
        self.fail = fail
        self.status = status
        self.calls: list[tuple] = []

    def _arg(self, args, flag):
        return args[args.index(flag) + 1]

    async def run_args(self, op, args, stdio=None, capture=True):
        args = list(args)
        self.calls.append((op, args))
        work = self._arg(args, "--work-path")
        image = self._arg(args, "--image-path")
        if op == "checkpoint":
            write_image(Path(image))
            if self.fail:
                (Path(image) / "pstree.img").unlink()  # half an image
                Path(work, "dump.log").write_text(f"(00.1) Error (criu/x.c:1): {self.fail}\n(00.2) Dumping FAILED.\n")
                raise RuntimeCommandError("runc checkpoint", 1, "criu failed: type NOTIFY errno 0")
        if op == "restore":
            if self.fail:
                Path(work, "restore.log").write_text(f"(00.1) Error (criu/y.c:2): {self.fail}\n")
                raise RuntimeCommandError("runc restore", 1, "criu failed: type NOTIFY errno 0")
            Path(self._arg(args, "--pid-file")).write_text(str(os.getpid()))

    async def state(self, cid):
        self.calls.append(("state", cid))
        return {"status": self.status}

    async def resume(self, cid):
        self.calls.append(("resume", cid))
        self.status = "running"

    async def delete(self, cid, force=False):
        self.calls.append(("delete", cid, force))


def make(tmp_path: Path, runtime: FakeRuntime, annotations=None, state=State.RUNNING, options=None,
         image: str = "") -> Container:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    spec = {"ociVersion": "1.0.2", "annotations": dict(annotations or {})}
    opts = options or RuntimeOptions()
    c = Container("c1", str(bundle), "ns", runtime, None, spec, "", opts, None)
    c.checkpoint_settings = CheckpointSettings.from_pod(checkpoint_settings(spec, NodeConfig(), "c1", "ns"), opts)
    init = InitProcess("c1", "c1", StdioPaths())
    if state is State.CREATED_CHECKPOINT:
        init.current = CreatedFromCheckpoint(init, image)
    else:
        init.current = {State.CREATED: Created, State.RUNNING: Running, State.PAUSED: Paused}[state](init)
    init.pid = os.getpid()
    c.init = init
    c.layer = gpu.GpuLayer(PlainLayer(), c.id, c.spec, gpu=gpu.ContainerGpu("c1", spec, lambda: [], driver_loader=lambda hint_pids=(): None))
    return c


def request(path: Path | None, **opts):
    from proto.anyutil import pack
    from proto.containerd.runc.v1 import options_pb2
    from proto.containerd.task.v2 import shim_pb2

    req = shim_pb2.CheckpointTaskRequest(id="c1", path=str(path) if path else "")
    if opts:
        req.options.CopyFrom(pack(options_pb2.CheckpointOptions(**opts)))
    return req


def run(coro):
    return asyncio.run(coro)


def test_success_marks_complete_and_leaves_a_note(tmp_path):
    rt = FakeRuntime()
    scratch = tmp_path / "containerd-dir"
    image = tmp_path / "image"

    async def go():
        c = make(tmp_path, rt, {"kybernate.io/checkpoint-tcp-established": "true"})
        return await c.checkpoint(request(scratch, image_path=str(image), file_locks=True))

    assert run(go()) == str(image)
    op, args = rt.calls[0]
    assert op == "checkpoint" and args[-1] == "c1"
    assert {"--leave-running", "--tcp-established", "--file-locks"} <= set(args)
    assert is_complete(image)
    meta = json.loads((image / "kybernate-complete.json").read_text())["meta"]
    assert meta["options"]["open_tcp"] and meta["options"]["file_locks"] and meta["container_id"] == "c1"
    note = json.loads((scratch / NOTE_NAME).read_text())
    assert note["image_path"] == str(image) and note["container_id"] == "c1"
    assert not (tmp_path / "bundle" / "criu-work").exists(), "the scratch work dir is removed"


def test_runtime_option_image_root_and_exit_annotation(tmp_path):
    rt = FakeRuntime()

    async def go():
        c = make(tmp_path, rt, {"kybernate.io/checkpoint-exit": "true"},
                 options=RuntimeOptions(criu_image_path=str(tmp_path / "root")))
        return await c.checkpoint(request(tmp_path / "containerd-dir"))

    image = Path(run(go()))
    assert image.parent == tmp_path / "root" / "ns" / "_" / "c1" and is_complete(image)
    assert "--leave-running" not in rt.calls[0][1]


def test_failure_thaws_quotes_criu_and_removes_the_image_it_made(tmp_path):
    rt = FakeRuntime(fail="inet: Connected TCP socket, consider using --tcp-established option.",
                     status="paused")
    image = tmp_path / "image"

    async def go():
        c = make(tmp_path, rt)
        await c.checkpoint(request(None, image_path=str(image)))

    with pytest.raises(TTRPCError) as e:
        run(go())
    assert e.value.code == Code.UNKNOWN
    assert e.value.message.startswith("checkpoint container c1: criu failed")
    assert "CRIU dump failed: Error (criu/x.c:1): inet: Connected TCP socket" in e.value.message
    assert ("resume", "c1") in rt.calls, "a task left frozen is thawed"
    assert not image.exists()
    assert "Connected TCP socket" in (tmp_path / "bundle" / "criu-dump.log").read_text()


def test_failure_of_a_paused_task_leaves_it_paused_and_an_empty_dir_of_the_caller_unmarked(tmp_path):
    rt = FakeRuntime(fail="boom", status="paused")
    image = tmp_path / "image"
    image.mkdir()

    async def go():
        c = make(tmp_path, rt, state=State.PAUSED)
        await c.checkpoint(request(None, image_path=str(image)))

    with pytest.raises(TTRPCError):
        run(go())
    assert ("resume", "c1") not in rt.calls
    assert image.is_dir() and not is_complete(image), "a failed dump is not marked complete"


@pytest.mark.parametrize("where", ["relative", "etc-like", "bundle", "rootfs", "file", "complete-image"])
def test_image_and_work_paths_are_refused_unless_absolute_outside_and_new_or_empty(tmp_path, where):
    """CheckpointOptions come from a trusted client but are bound by sanity: a relative path (runc
    would resolve it in the bundle), a directory that holds files (even an earlier image: nothing
    the shim did not make is overwritten or removed), the bundle or the rootfs. Refused before runc
    runs; nothing is written or removed."""
    rt = FakeRuntime()
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0\n")
    (tmp_path / "bundle" / "rootfs").mkdir(parents=True)
    (tmp_path / "afile").write_text("x")
    complete = tmp_path / "old-image"
    write_image(complete)
    mark_complete(complete, {"old": True})
    value = {"relative": "ckpt", "etc-like": str(etc), "bundle": str(tmp_path / "bundle" / "ckpt"),
             "rootfs": str(tmp_path / "bundle" / "rootfs" / "tmp" / "ckpt"), "file": str(tmp_path / "afile"),
             "complete-image": str(complete)}[where]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for key in ("image_path", "work_path"):
        fields = {key: value} if key == "image_path" else {"image_path": str(tmp_path / "new"), key: value}

        async def go():
            await make(tmp_path, rt).checkpoint(request(None, **fields))

        with pytest.raises(TTRPCError) as e:
            run(go())
        assert e.value.code == Code.INVALID_ARGUMENT, e.value
        assert e.value.message.startswith(f"checkpoint container c1: CheckpointOptions.{key}={value!r}: "), e.value
    assert rt.calls == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, "something was written or removed"
    assert is_complete(complete) and (etc / "passwd").read_text() == "root:x:0:0\n"


@pytest.mark.parametrize("opts,words", [({"cgroups_mode": "sideways"}, "sideways"),
                                        ({"empty_namespaces": ["-x"]}, "--empty-ns")])
def test_bad_options_are_invalid_argument_before_runc(tmp_path, opts, words):
    rt = FakeRuntime()

    async def go():
        await make(tmp_path, rt).checkpoint(request(None, image_path=str(tmp_path / "i"), **opts))

    with pytest.raises(TTRPCError) as e:
        run(go())
    assert e.value.code == Code.INVALID_ARGUMENT and "c1" in e.value.message and words in e.value.message
    assert rt.calls == [] and not (tmp_path / "i").exists()


def test_restore_uses_the_recorded_options_and_the_annotations(tmp_path):
    rt = FakeRuntime()
    image = tmp_path / "image"
    write_image(image)
    mark_complete(image, {"options": {"open_tcp": True, "file_locks": False}})

    async def go():
        c = make(tmp_path, rt, {"kybernate.io/checkpoint-file-locks": "true"}, state=State.CREATED_CHECKPOINT, image=str(image))
        await c.start("")
        return c

    c = run(go())
    op, args = rt.calls[0]
    assert op == "restore" and {"--tcp-established", "--file-locks", "--detach"} <= set(args)
    assert "--ext-unix-sk" not in args and c.init.pid == os.getpid()


def test_failed_restore_leaves_a_stopped_task_and_no_runc_state(tmp_path):
    rt = FakeRuntime(fail="Can't read pages")
    image = tmp_path / "image"
    write_image(image)

    async def go():
        c = make(tmp_path, rt, state=State.CREATED_CHECKPOINT, image=str(image))
        try:
            await c.start("")
        finally:
            return c

    async def fails():
        c = make(tmp_path, rt, state=State.CREATED_CHECKPOINT, image=str(image))
        await c.start("")

    with pytest.raises(TTRPCError) as e:
        run(fails())
    assert e.value.message.startswith("restore container c1: ") and "Can't read pages" in e.value.message
    assert ("delete", "c1", True) in rt.calls
    c = run(go())
    assert c.init.state is State.STOPPED and c.init.exit_status == 255
    assert (tmp_path / "bundle" / "criu-restore.log").is_file()

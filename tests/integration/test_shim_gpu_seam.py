"""shim.gpu.lifecycle inside the real shim, under containerd, without a GPU.

- A CPU-only container (busybox) is checkpointed, paused and resumed through ctr: the shim takes the
  CPU path and never loads the driver (no cffi, no libcuda in the shim's memory map).
- A container whose process maps a stand-in libcuda (tests/unit/cuda/fakecuda.c, bind-mounted): the
  shim finds it in the container's cgroup, loads the stand-in through KYBERNATE_LIBCUDA and drives its
  checkpoint state around ctr's pause, resume and checkpoint, and reports a scripted CUDA failure.
  The stand-in proves the wiring through containerd, ctr and CRIU only; tests/gpu proves the driver.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .harness import KYBERNATE_RUNTIME, REPO, SHIM_BINARY, Containerd, unavailable_reason

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_fakecuda_support", REPO / "tests/unit/cuda/conftest.py")
support = sys.modules.setdefault("_fakecuda_support", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(support)

MAPPER_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>
/* maps argv[1] (a file named libcuda.so.1) as a CUDA process maps the driver, then waits */
int main(int argc, char **argv) {
  int fd = open(argv[1], O_RDONLY);
  if (fd < 0 || mmap(0, 4096, PROT_READ, MAP_PRIVATE, fd, 0) == MAP_FAILED) { perror(argv[1]); return 1; }
  close(fd);
  for (;;) pause();
}
"""


def _need(version: str = "1.6") -> None:
    reason = unavailable_reason(version)
    if reason:
        pytest.skip(reason)
    if not os.access(SHIM_BINARY, os.X_OK):
        pytest.skip(f"{SHIM_BINARY} is not installed (scripts/setup.sh)")


def _task(cd: Containerd, cid: str) -> tuple[int, str]:
    for line in cd.ctr("tasks", "ls").stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[0] == cid:
            return int(parts[1]), parts[2]
    return 0, "NONE"


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def test_cpu_container_never_loads_the_driver(containerd, container_id):
    _need(containerd.version)
    cd = containerd
    cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, "docker.io/kybernate/busybox:test", container_id,
           "sleep", "600")
    checkpoint = cd.ctr("tasks", "checkpoint", container_id, timeout=120).stdout.strip()
    cd.ctr("tasks", "pause", container_id)
    assert _task(cd, container_id)[1] == "PAUSED"
    cd.ctr("tasks", "resume", container_id)
    assert _task(cd, container_id)[1] == "RUNNING"
    for pid in cd.shim_pids():
        maps = _maps(pid)
        assert maps, f"shim {pid} unreadable"
        assert "_cffi_backend" not in maps and "libcuda" not in maps, f"shim {pid} loaded the CUDA binding"
    log = cd.log_text()
    # a CPU node, a CPU container: the plain CRIU layer alone, chosen at Create
    assert f"container {container_id}: lifecycle layers: criu" in log
    if checkpoint:
        cd.ctr("images", "rm", checkpoint, check=False)


@pytest.fixture
def fake_cd(tmp_path):
    """containerd 1.6 whose shims load the stand-in libcuda, with a busybox image holding `mapper`."""
    _need("1.6")
    libdir = tmp_path / "fakelib"
    lib = support._compile(libdir / "libcuda.so.1")
    state = tmp_path / "fakecuda"
    state.mkdir()
    mapper = tmp_path / "mapper"
    src = tmp_path / "mapper.c"
    src.write_text(MAPPER_C)
    subprocess.run(["gcc", "-static", "-O1", "-o", str(mapper), str(src)], check=True)
    cd = Containerd("1.6", tmp_path / "cd")
    cd.env.update(KYBERNATE_LIBCUDA=str(lib), FAKECUDA_DIR=str(state))
    cd.start()
    try:
        ref = cd.import_image("docker.io/kybernate/mapper:test",
                              extra_files={"/usr/local/bin/mapper": (mapper.read_bytes(), 0o755)})
        fake = support.FakeCuda(state, support.FakeLibs(full=lib, old=lib))
        yield cd, ref, fake, libdir
    finally:
        cd.stop()


def _run_mapper(cd: Containerd, ref: str, libdir: Path, cid: str) -> int:
    cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME,
           "--mount", f"type=bind,src={libdir},dst={libdir},options=rbind:ro",
           ref, cid, "/usr/local/bin/mapper", str(libdir / "libcuda.so.1"))
    deadline = time.monotonic() + 10
    while True:
        pid = _task(cd, cid)[0]
        if pid and str(libdir / "libcuda.so.1") in _maps(pid):
            return pid
        assert time.monotonic() < deadline, "mapper did not map the stand-in"
        time.sleep(0.05)


def test_stand_in_cuda_process_around_pause_resume_and_checkpoint(fake_cd):
    cd, ref, fake, libdir = fake_cd
    cid = "fakegpu"
    pid = _run_mapper(cd, ref, libdir, cid)
    fake.set_states({pid: 0})

    cd.ctr("tasks", "pause", cid, timeout=60)
    assert _task(cd, cid)[1] == "PAUSED"
    assert fake.states() == {pid: 2}  # VRAM "released" while paused
    cd.ctr("tasks", "resume", cid, timeout=60)
    assert fake.states() == {pid: 0}
    assert fake.calls(pid) == ["lock", "checkpoint", "restore", "unlock"]

    fake.clear_log()
    image = cd.ctr("tasks", "checkpoint", cid, timeout=120).stdout.strip()  # ctr: pause, checkpoint, resume
    assert _task(cd, cid) == (pid, "RUNNING")
    assert fake.states() == {pid: 0}
    assert fake.calls(pid) == ["lock", "checkpoint", "restore", "unlock"]
    log = cd.log_text()
    assert f"container {cid}: lifecycle layers: gpu on criu" in log
    assert f"container {cid}: pause: suspended 1 CUDA process(es) [{pid}]" in log
    cd.ctr("images", "rm", image, check=False)

    # a CUDA failure is reported with the pid and the driver's error name; nothing stays locked
    fake.script(f"fail checkpoint {pid} 999")
    r = cd.ctr("tasks", "pause", cid, check=False, timeout=60)
    assert r.returncode != 0
    assert f"pid {pid}" in r.stderr and "CUDA_ERROR_UNKNOWN" in r.stderr, r.stderr
    assert _task(cd, cid)[1] == "RUNNING"
    assert fake.states() == {pid: 0}
    fake.script()

    # containerd's restore flow: the restored process is unknown to the stand-in (a new host pid),
    # so the shim asks the driver, hears "not a CUDA process" and lets the task run
    cd.ctr("containers", "checkpoint", "--task", "--rw", cid, "kyb/fake-ckpt:1", timeout=120)
    cd.ctr("tasks", "kill", "-s", "SIGKILL", cid)
    deadline = time.monotonic() + 10
    while _task(cd, cid)[1] != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.05)
    cd.ctr("tasks", "delete", cid)
    cd.ctr("containers", "delete", cid)
    cd.ctr("containers", "restore", "--live", "--rw", cid, "kyb/fake-ckpt:1", timeout=120)
    new_pid, status = _task(cd, cid)
    assert status == "RUNNING" and new_pid != pid
    assert str(libdir / "libcuda.so.1") in _maps(new_pid)
    assert [l.call for l in fake.log() if l.pid == new_pid] == ["state"]

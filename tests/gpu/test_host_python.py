"""tests/gpu/host_python.py's plan, without a GPU: on a made-up Ubuntu-like host (merged /usr, the venv's
python3 a link to /usr/bin, the loader a relative link, the driver's directory its own mount), and on
this machine's own python3 (every library it loaded is where the binds show it; run in the workload
image's layout under containerd and the kybernate runtime, checkpointed and restored)."""
from __future__ import annotations

import os
import posixpath
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.gpu import host_python

SCRIPT = Path(__file__).resolve().parent / "torch_train.py"


class MadeUpHost:
    """realpath/islink/readlink/isdir/exists over a table of directories, files and symbolic links."""

    def __init__(self, dirs, files, links):
        self.dirs = set(dirs) | {"/"}
        self.files = set(files)
        self.links = dict(links)  # link path (its parent resolved) -> target

    def realpath(self, path: str, depth: int = 0) -> str:
        assert depth < 40, path
        current = "/"
        for part in [p for p in posixpath.normpath(path).split("/") if p]:
            step = posixpath.join(current, part)
            if step in self.links:
                target = self.links[step]
                step = self.realpath(target if target.startswith("/") else posixpath.join(current, target), depth + 1)
            current = posixpath.normpath(step)
        return current

    def _located(self, path: str) -> str:
        path = posixpath.normpath(path)
        return posixpath.join(self.realpath(posixpath.dirname(path)), posixpath.basename(path))

    def islink(self, path: str) -> bool:
        return self._located(path) in self.links

    def readlink(self, path: str) -> str:
        return self.links[self._located(path)]

    def isdir(self, path: str) -> bool:
        return self.realpath(path) in self.dirs

    def exists(self, path: str) -> bool:
        located = self._located(path)
        return located in self.links or self.realpath(path) in self.dirs | self.files

    def fs(self) -> dict:
        return {"realpath": self.realpath, "islink": self.islink, "readlink": self.readlink, "isdir": self.isdir,
                "exists": self.exists}


VENV = "/opt/torch/.venv"
SITE = f"{VENV}/lib/python3.12/site-packages"
UBUNTU = MadeUpHost(
    dirs=["/etc", "/usr", "/usr/bin", "/usr/lib", "/usr/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib/python3.12",
          "/usr/lib/python3.12/lib-dynload", "/usr/local", "/usr/local/nvidia", "/usr/local/nvidia/lib64", "/opt",
          "/opt/torch", VENV, f"{VENV}/bin", f"{VENV}/lib", f"{VENV}/lib/python3.12", SITE, f"{SITE}/torch",
          f"{SITE}/torch/lib", f"{SITE}/nvidia", f"{SITE}/nvidia/cublas", f"{SITE}/nvidia/cublas/lib"],
    files=["/etc/ld.so.cache", "/usr/bin/python3.12", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
           "/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libz.so.1.3",
           "/usr/lib/python3.12/os.py", f"{VENV}/pyvenv.cfg", f"{SITE}/torch/lib/libtorch_cuda.so",
           f"{SITE}/nvidia/cublas/lib/libcublas.so.13", "/usr/local/nvidia/lib64/libcuda.so.580.159.04"],
    links={"/lib": "usr/lib", "/lib64": "usr/lib64", "/bin": "usr/bin",
           "/usr/lib64/ld-linux-x86-64.so.2": "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
           f"{VENV}/bin/python3": "/usr/bin/python3", "/usr/bin/python3": "python3.12",
           "/usr/local/nvidia/lib64/libcuda.so.1": "libcuda.so.580.159.04"})
UBUNTU_FACTS = {
    "executable": f"{VENV}/bin/python3", "real_executable": "/usr/bin/python3.12",
    "interpreter": "/lib64/ld-linux-x86-64.so.2", "prefix": VENV, "base_prefix": "/usr", "venv_home": "/usr/bin",
    "path": ["/usr/lib/python3.12", "/usr/lib/python3.12/lib-dynload", SITE],
    "ld_library_path": "",
    "ld_cache": "/etc/ld.so.cache", "ld_cache_dirs": ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu/libfakeroot"],
    "mount_points": ["/", "/proc", "/usr/local/nvidia", "/dev/shm"],
    "libraries": ["/usr/bin/python3.12", "/usr/lib/x86_64-linux-gnu/libz.so.1.3", "/usr/lib/x86_64-linux-gnu/libc.so.6",
                  f"{SITE}/torch/lib/libtorch_cuda.so", f"{SITE}/nvidia/cublas/lib/libcublas.so.13",
                  "/usr/local/nvidia/lib64/libcuda.so.580.159.04", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"],
}


def test_ubuntu_like_host_gets_its_loader_and_glibc_over_the_images():
    p = host_python.plan(UBUNTU_FACTS, extra_library_dirs=["/usr/local/nvidia/lib64"], **UBUNTU.fs())
    binds = {b.destination: b.source for b in p.binds}
    assert binds == {
        "/etc/ld.so.cache": "/etc/ld.so.cache",                        # the host loader's cache (a file)
        VENV: VENV,                                                    # pyvenv.cfg, bin/, site-packages
        "/usr/bin": "/usr/bin",                                        # python3 -> python3.12
        "/lib64": "/usr/lib64",                                        # the ELF loader as python3.12 names it
        "/lib/x86_64-linux-gnu": "/usr/lib/x86_64-linux-gnu",          # ... where its relative link leads
        "/usr/lib/x86_64-linux-gnu": "/usr/lib/x86_64-linux-gnu",      # glibc as the maps name it
        "/usr/lib/python3.12": "/usr/lib/python3.12",                  # the stdlib (lib-dynload below it)
        "/usr/local/nvidia/lib64": "/usr/local/nvidia/lib64",          # libcuda
    }
    destinations = [b.destination for b in p.binds if b.destination != "/etc/ld.so.cache"]
    assert destinations == sorted(destinations, key=lambda d: (d.count("/"), d))  # parents first
    # The host's search path (none here) and libcuda's directory: never the loaded libraries' directories,
    # which would outrank the RUNPATHs that found them on the host.
    assert p.ld_library_path == ["/usr/local/nvidia/lib64"]
    assert p.executable == f"{VENV}/bin/python3"
    args = p.ctr_args()
    assert "--mount" in args and f"type=bind,src=/usr/lib64,dst=/lib64,options=bind:ro" in args
    assert args[-2:] == ["--env", "LD_LIBRARY_PATH=" + ":".join(p.ld_library_path)]


def test_a_mount_point_between_a_bind_and_one_below_it_gets_its_own_bind():
    """A bind of /usr (here a sys.path entry) is not recursive: the driver's own mount below it would
    show empty, and runc could not create lib64 in the read-only bind; /usr/local/nvidia is bound too."""
    facts = dict(UBUNTU_FACTS, path=UBUNTU_FACTS["path"] + ["/usr"])
    binds = {b.destination: b.source for b in host_python.plan(facts, **UBUNTU.fs()).binds}
    assert binds["/usr"] == "/usr" and binds["/usr/local/nvidia"] == "/usr/local/nvidia"
    assert "/usr/local/nvidia/lib64" not in binds and "/usr/bin" not in binds and "/usr/lib/python3.12" not in binds
    assert binds["/lib64"] == "/usr/lib64"  # elsewhere in the container's tree: still its own


def test_never_binds_over_the_containers_own_tmp_or_root():
    facts = dict(UBUNTU_FACTS, path=UBUNTU_FACTS["path"] + ["/tmp", "/"])
    host = MadeUpHost(UBUNTU.dirs | {"/tmp"}, UBUNTU.files, UBUNTU.links)
    destinations = {b.destination for b in host_python.plan(facts, **host.fs()).binds}
    assert not destinations & set(host_python.NEVER_BOUND)


def _host_file_in_container(binds, path: str):
    """Where a container path's directory comes from on the host, by the deepest bind above it."""
    directory = posixpath.dirname(path)
    best = max((b for b in binds if directory == b.destination or directory.startswith(b.destination + "/")),
               key=lambda b: len(b.destination), default=None)
    if best is None:
        return None
    return posixpath.join(best.source + directory[len(best.destination):], posixpath.basename(path))


def test_this_machines_python_finds_every_library_where_the_host_loaded_it():
    """The probe of this machine's python3 (no torch here), planned: each library it mapped, its
    interpreter and its loader are shown by a bind at the path it was loaded from."""
    python = shutil.which("python3") or sys.executable
    facts = host_python.probe(python, str(SCRIPT))
    assert facts["libraries"] and facts["interpreter"], facts
    p = host_python.plan(facts)
    for path in facts["libraries"] + [facts["real_executable"], facts["interpreter"]]:
        shown = _host_file_in_container(p.binds, path)
        assert shown is not None and os.path.realpath(shown) == os.path.realpath(path), (path, shown, p.binds)
    assert p.ld_library_path == [d for d in facts["ld_library_path"].split(":") if d]
    if os.path.isfile("/etc/ld.so.cache"):
        assert host_python.Bind(os.path.realpath("/etc/ld.so.cache"), "/etc/ld.so.cache") in p.binds


@pytest.mark.parametrize("gib, layers", [(2, 8), (8, 32), (0.001, 1)])
def test_the_training_scripts_size_is_its_state_in_gib(gib, layers):
    sys.path.insert(0, str(SCRIPT.parent))
    had = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        import torch_train  # sets CUBLAS_WORKSPACE_CONFIG where unset: not this process's business
    finally:
        sys.path.remove(str(SCRIPT.parent))
        if had is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    assert torch_train.layers_for(gib) == layers


# ---- the plan at work, without a GPU: this machine's python3 in the busybox rootfs, checkpointed and restored --------
COUNTER = '''
import hashlib, os, sys, time
digest = hashlib.sha256(b"seed").digest()
for step in range(int(sys.argv[1])):
    digest = hashlib.sha256(digest).digest()  # each value depends on all before it
    fd = os.open("/tmp/losses", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"{step} {int.from_bytes(digest[:8], 'big') / 2**64!r}\\n".encode())
    os.close(fd)
    time.sleep(0.1)
open("/tmp/losses.done", "w").write(sys.version + "\\n")
while True:
    time.sleep(3600)
'''
STEPS = 30


def _expected_counter() -> list:
    import hashlib
    digest, out = hashlib.sha256(b"seed").digest(), []
    for step in range(STEPS):
        digest = hashlib.sha256(digest).digest()
        out.append(f"{step} {int.from_bytes(digest[:8], 'big') / 2**64!r}")
    return out


def test_this_machines_python_in_the_busybox_rootfs_checkpointed_and_restored(tmp_path):
    """What test_gpu_pytorch.py does with the GPU machine's PyTorch, here with this machine's python3 and a
    counter: run with the planned binds in the CUDA workload image's layout (its own glibc in /lib), under the
    kybernate runtime; checkpoint with exit (image_path); restore through kybernate.io/restore-from into a
    fresh rootfs: the restored process's file starts where the original's ended, and it is the host's
    interpreter that ran (its sys.version)."""
    from tests.gpu.test_gpu_containers import CONTAINERD_VERSION
    from tests.gpu.workload_image import build
    from tests.integration.harness import KYBERNATE_RUNTIME, SHIM_BINARY, Containerd, unavailable_reason

    reason = unavailable_reason(CONTAINERD_VERSION, runc_shim=False)
    if reason or not os.access(SHIM_BINARY, os.X_OK):
        pytest.skip(reason or f"{SHIM_BINARY} missing")
    python = shutil.which("python3") or sys.executable
    facts = host_python.probe(python, str(SCRIPT))
    p = host_python.plan(facts)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "counter.py").write_text(COUNTER)
    image = build(Path("/bin/true"), tmp_path / "image.tar")  # the workload image's layout, bookworm's glibc in it
    images = tmp_path / "checkpoint"
    cd = Containerd(CONTAINERD_VERSION, tmp_path / "cd", restore_roots=[str(tmp_path)])
    cd.start()
    try:
        cd.ctr("images", "import", str(image.path), timeout=120)

        def run(cid: str, *annotations: str) -> None:
            args = ["run", "-d", "--runtime", KYBERNATE_RUNTIME, "--log-uri", f"file://{tmp_path}/{cid}.log"]
            args += p.ctr_args() + ["--mount", host_python.Bind(str(scripts), "/kyb-tests").ctr_mount()]
            for a in annotations:
                args += ["--annotation", a]
            cd.ctr(*args, image.ref, cid, p.executable, "-I", "/kyb-tests/counter.py", str(STEPS), timeout=120)

        def pid_of(cid: str) -> int:
            for line in cd.ctr("tasks", "ls").stdout.splitlines()[1:]:
                parts = line.split()
                if parts and parts[0] == cid:
                    return int(parts[1])
            return 0

        def lines_of(pid: int, name: str = "losses") -> list:
            try:
                return Path(f"/proc/{pid}/root/tmp/{name}").read_text().splitlines()
            except OSError:
                return []

        def wait(what: str, predicate, timeout: float = 60.0):
            deadline = time.monotonic() + timeout
            while not (value := predicate()):
                assert time.monotonic() < deadline, f"{what}; logs: {[f.read_text()[-800:] for f in tmp_path.glob('*.log')]}"
                time.sleep(0.05)
            return value

        run("counter")
        pid = pid_of("counter")
        root_fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY)
        try:
            wait("5 steps of the counter", lambda: len(lines_of(pid)) >= 5)
            _checkpoint_with_exit(cd, "counter", images)
            fd = os.open("tmp/losses", os.O_RDONLY, dir_fd=root_fd)
            with os.fdopen(fd) as f:
                before = f.read().splitlines()
        finally:
            os.close(root_fd)
        assert 5 <= len(before) < STEPS, before
        cd.ctr("tasks", "delete", "counter", check=False)
        cd.ctr("containers", "delete", "counter", check=False)
        run("restored", f"kybernate.io/restore-from={images}")
        rpid = pid_of("restored")
        version = wait("the restored counter's last step", lambda: lines_of(rpid, "losses.done"))
        after = lines_of(rpid)
        assert after[0].split()[0] == str(len(before)), f"restored from {before[-1]!r}, first step {after[0]!r}"
        assert before + after == _expected_counter()
        assert version == sys_version_of(python).splitlines(), "another interpreter ran in the container"
    finally:
        cd.stop()


def sys_version_of(python: str) -> str:
    import subprocess
    return subprocess.run([python, "-I", "-c", "import sys; print(sys.version)"], capture_output=True, text=True,
                          check=True).stdout


def _checkpoint_with_exit(cd, cid: str, images: Path) -> None:
    """Tasks.Checkpoint with exit and image_path, as `kybernate checkpoint --exit --image-path` sends it."""
    import grpc
    from kybernate.checkpoint import _duplicate_scratch_blob
    from kybernate.containerd_api import Containerd as Api
    from proto.anyutil import pack
    from proto.containerd.runc.v1 import options_pb2

    images.mkdir()
    with Api(cd.address) as api:
        try:
            api.checkpoint(cd.namespace, cid, pack(options_pb2.CheckpointOptions(exit=True, image_path=str(images))),
                           timeout=120)
        except grpc.RpcError as exc:
            if not _duplicate_scratch_blob(exc, images):
                raise

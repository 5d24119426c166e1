"""The host's Python (the GPU machine's PyTorch venv) inside a container whose rootfs is our busybox
workload image: which host paths to bind-mount read-only where, and the loader's search path, worked out
from what that interpreter reports about itself (`torch_train.py --probe`, run once on the host).

The image has its own glibc (bookworm's, at /lib/x86_64-linux-gnu and /lib64) and the host's Python is
built against the host's (Ubuntu 24.04's 2.39 on the GPU machine): the interpreter must start with the
host's loader and find the host's libc before the image's. So every path the interpreter reaches on
the host is made to resolve to the same file in the container:

- each needed file's directory, and each needed directory, is bound at the path the program names it
  by, from its real path on the host (so /lib/x86_64-linux-gnu in the container is the host's
  /usr/lib/x86_64-linux-gnu where the host has merged /usr, covering the image's own libraries);
- a needed file that is a symbolic link is followed as the container would follow it (a relative
  target from the directory as bound), and what it leads to is needed too: the venv's bin/python3,
  the interpreter's ELF loader (/lib64/ld-linux-x86-64.so.2) and their chains;
- a bind covered by another (its path below the other's, its source the same path below the other's
  source) is dropped, unless a host mount point lies between: binds are not recursive, because a
  submount that rbind brings along is a mount runc never declared to CRIU and the checkpoint fails
  (gpu-facts.md: the driver's /usr/local/nvidia is its own mount on the GPU machine).

Needed: sys.executable, its real path and ELF loader, the venv's pyvenv.cfg and its home, the existing
sys.path entries, every file mapped into the probe after two training steps on the GPU (the CUDA
driver's libcuda and everything torch loaded), the host's LD_LIBRARY_PATH entries, and each directory
the host's loader cache (/etc/ld.so.cache, bound as a file) names that holds a loaded library. So the
host's loader looks a library up in the container as on the host, in the same order: LD_LIBRARY_PATH
(the host's, then libcuda's directory, as nvidia-container-runtime appends it), the objects' RUNPATHs
(the same paths), the cache, the default directories (on a merged-/usr host the host's glibc directory
at /lib/x86_64-linux-gnu too). A search path of every loaded library's directory would be wrong: it
outranks RUNPATH, and an interpreter whose RUNPATH names its own libpython would load the system's.
"""
from __future__ import annotations

import json
import os
import posixpath
import subprocess
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

# Container paths never bound over: the runtime's own mounts and the container's own /tmp (writable).
NEVER_BOUND = ("/", "/proc", "/sys", "/dev", "/tmp", "/run")
# The loader's default directories on x86-64 (the image has its own glibc in the first).
DEFAULT_LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64")


@dataclass(frozen=True)
class Bind:
    """A read-only bind mount: `source` (a host path without symbolic links) at `destination`."""
    source: str
    destination: str

    def ctr_mount(self) -> str:
        """ctr run's --mount value: a non-recursive read-only bind (see the module docstring)."""
        return f"type=bind,src={self.source},dst={self.destination},options=bind:ro"


@dataclass
class Plan:
    binds: list
    ld_library_path: list
    executable: str                        # what the container runs: sys.executable as named on the host
    facts: dict = field(default_factory=dict)

    def ctr_args(self) -> list:
        args = []
        for b in self.binds:
            args += ["--mount", b.ctr_mount()]
        if self.ld_library_path:
            args += ["--env", "LD_LIBRARY_PATH=" + ":".join(self.ld_library_path)]
        return args


def probe(python: str, script: str, env: Optional[dict] = None, timeout: float = 300.0) -> dict:
    """Run `python -I script --probe` on the host: the facts. The environment is this process's (or
    `env`): the loader's LD_LIBRARY_PATH may be how the host finds libcuda; -I keeps PYTHONPATH and
    the user's site out (the device's set-up puts /tmp/site on PYTHONPATH)."""
    out = subprocess.run([python, "-I", script, "--probe"], capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ) if env is None else env)
    if out.returncode != 0:
        raise RuntimeError(f"{python} {script} --probe exited {out.returncode}: {out.stderr.strip()[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _under(path: str, top: str) -> bool:
    return top == "/" or path == top or path.startswith(top.rstrip("/") + "/")


class _Planner:
    def __init__(self, mount_points: Iterable[str], realpath=os.path.realpath, islink=os.path.islink,
                 readlink=os.readlink, isdir=os.path.isdir, exists=os.path.lexists):
        self.mount_points = sorted({posixpath.normpath(m) for m in mount_points})
        self.realpath, self.islink, self.readlink, self.isdir, self.exists = realpath, islink, readlink, isdir, exists
        self.binds: dict = {}  # destination -> source

    def bind_dir(self, path: str) -> None:
        path = posixpath.normpath(path)
        if any(path == n for n in NEVER_BOUND) or not self.exists(path):
            return
        source = self.realpath(path)
        if not self.isdir(source):
            raise ValueError(f"{path} resolves to {source}, not a directory")
        known = self.binds.get(path)
        if known is not None and known != source:
            raise ValueError(f"{path} would be bound from both {known} and {source}")
        self.binds[path] = source

    def need(self, path: str, depth: int = 0) -> None:
        """Make `path` (as a program names it) resolve in the container to the host's file or dir."""
        if not path or not path.startswith("/") or depth > 40:
            return
        path = posixpath.normpath(path)
        if not self.exists(path):
            return
        if self.isdir(path):  # bound as named, from where it leads on the host
            self.bind_dir(path)
            return
        parent = posixpath.dirname(path)
        self.bind_dir(parent)
        if self.islink(path):  # followed from the directory as bound, as the container's kernel will
            target = self.readlink(path)
            self.need(target if target.startswith("/") else posixpath.join(parent, target), depth + 1)

    def reduced(self) -> list:
        """The binds, parents before children, without those another bind already shows. Where a host
        mount point lies between a bind and one below it, the outermost such mount point gets a bind of
        its own (its directory exists in the outer bind's content, so runc need not create it in a
        read-only bind) and covers what lies below it in turn."""
        binds = dict(self.binds)
        while True:
            kept: list = []
            added: dict = {}
            for destination in sorted(binds, key=lambda d: (d.count("/"), d)):
                source = binds[destination]
                covered = False
                for outer in kept:
                    if destination == outer.destination or not _under(destination, outer.destination):
                        continue
                    rest = destination[len(outer.destination.rstrip("/")):]
                    if outer.source.rstrip("/") + rest != source:
                        continue
                    between = sorted((m for m in self.mount_points if m != outer.source and _under(m, outer.source)
                                      and _under(source, m)), key=len)
                    if not between:
                        covered = True
                        break
                    mount = between[0]
                    mount_destination = outer.destination.rstrip("/") + mount[len(outer.source.rstrip("/")):]
                    if mount_destination not in binds:
                        added[mount_destination] = mount
                if not covered:
                    kept.append(Bind(source, destination))
            if not added:
                return kept
            binds.update(added)


def plan(facts: dict, extra_library_dirs: Sequence[str] = (), **fs) -> Plan:
    """The binds and LD_LIBRARY_PATH that run facts["executable"] in the busybox rootfs (module docstring).
    `fs` replaces the file-system look-ups (realpath, islink, readlink, isdir, exists) for tests."""
    planner = _Planner(facts.get("mount_points") or [], **fs)
    planner.need(facts["executable"])
    planner.need(facts["real_executable"])
    if facts.get("interpreter"):
        planner.need(facts["interpreter"])
    # The venv's pyvenv.cfg and the directory its `home` names (where the interpreter finds its stdlib);
    # never sys.base_prefix itself: that is /usr, and the stdlib's own directories are on sys.path.
    planner.need(posixpath.join(facts["prefix"], "pyvenv.cfg"))
    if facts.get("venv_home"):
        planner.need(facts["venv_home"])
    for entry in facts.get("path") or []:
        planner.need(entry)
    host_ld = [d for d in (facts.get("ld_library_path") or "").split(":") if d]
    search = list(dict.fromkeys(host_ld + list(extra_library_dirs)))
    for d in search:
        planner.need(d)
    libraries = facts.get("libraries") or []
    for lib in libraries:
        planner.need(lib)
    loaded_dirs = {planner.realpath(posixpath.dirname(lib)) for lib in libraries}
    # Where the cache, or the loader's defaults, send it for what was loaded.
    for d in list(facts.get("ld_cache_dirs") or []) + list(DEFAULT_LIBRARY_DIRS):
        if planner.exists(d) and planner.realpath(d) in loaded_dirs:
            planner.need(d)
    binds = planner.reduced()
    cache = facts.get("ld_cache")
    if cache and planner.exists(cache):
        binds.append(Bind(planner.realpath(cache), "/etc/ld.so.cache"))
    return Plan(binds=binds, ld_library_path=search, executable=facts["executable"], facts=facts)

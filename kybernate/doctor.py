"""`kybernate doctor`: can this node checkpoint containers, and GPU containers?

Every check prints pass/fail (or warn/info) with what it found and, when it fails, the fix. Three summary
lines follow: "CPU checkpoint: ready | not ready (reason)", "GPU checkpoint: ready | not available
(reason)" and whether containerd is set up to run the kybernate runtime. The exit status is 1 when
CPU checkpointing is not ready (the minimum Kybernate needs), else 0.

What counts for what:
  CPU checkpoint: an OCI runtime (runc), CRIU >= 4 that passes `criu check`, a freezer (containerd
                  pauses a task around a checkpoint).
  GPU checkpoint: CPU ready, plus libcuda with the driver checkpoint API (cuCheckpointProcess*, driver
                  API 12.8+). The shim checkpoints CUDA state itself before CRIU runs, so CRIU's
                  cuda_plugin.so is reported but not required. nvidia-container-runtime is needed only
                  where the node config names it ([gpu] nvidia_runtime: the device plugin's env mode, CDI
                  annotations containerd does not apply): its absence is a warning. A container whose
                  spec already carries its /dev/nvidia* devices (CDI) runs with plain runc.
  containerd:     containerd found, our runtime declared in its config.toml (for Kubernetes), the shim
                  binary on containerd's PATH. Not needed for a checkpoint as such, so not in the exit code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Callable, Optional, Sequence

from . import DEFAULT_ADDRESS, DEFAULT_CONFIG, RUNTIME_HANDLER, RUNTIME_TYPE, SHIM_BINARY

PASS, FAIL, WARN, INFO = "pass", "fail", "warn", "info"
CPU, GPU, CONTAINERD = "cpu", "gpu", "containerd"
# Where containerd is usually started from, and where installers put binaries: containerd's own PATH
# (systemd's default) may differ from the shell's.
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
CRIU_PLUGIN_DIRS = ("/usr/local/lib/criu", "/usr/lib/criu", "/usr/lib64/criu")
CGROUP2_MAGIC_NAME = "cgroup2fs"


@dataclasses.dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""
    affects: tuple[str, ...] = ()
    short: str = ""          # the reason in a few words, for the summary lines

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DoctorEnv:
    """What the checks look at; tests replace parts of it."""

    config: str = DEFAULT_CONFIG
    address: str = DEFAULT_ADDRESS
    containerd: str = "containerd"
    criu: Optional[str] = None
    path: str = dataclasses.field(default_factory=lambda: os.environ.get("PATH", ""))
    cgroup_root: str = "/sys/fs/cgroup"
    criu_plugin_dirs: Sequence[str] = CRIU_PLUGIN_DIRS
    euid: int = dataclasses.field(default_factory=os.geteuid)
    cuda_driver: Optional[Callable[[], object]] = None   # default: cuda_bindings.CudaDriver
    check_daemon: bool = True

    def search_path(self, extra: Sequence[str] = ()) -> str:
        dirs = [d for d in self.path.split(os.pathsep) if d] + list(extra) + list(SYSTEM_DIRS)
        return os.pathsep.join(dict.fromkeys(dirs))

    def which(self, name: str, extra: Sequence[str] = ()) -> Optional[str]:
        return shutil.which(name, path=self.search_path(extra))


def _run(argv: Sequence[str], timeout: float = 30) -> tuple[int, str]:
    try:
        p = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           errors="replace", timeout=timeout)
        return p.returncode, p.stdout.strip()
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f}s"
    except OSError as exc:
        return -1, exc.strerror or str(exc)


# ---- containerd ---------------------------------------------------------------------------------
def parse_containerd_version(text: str) -> Optional[tuple[int, int, int]]:
    for token in text.split()[1:]:
        m = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", token)
        if m:
            return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    return None


def check_containerd(env: DoctorEnv) -> tuple[Check, Optional[tuple[int, int, int]], Optional[str]]:
    path = env.which(env.containerd) if "/" not in env.containerd else (
        env.containerd if os.access(env.containerd, os.X_OK) else None)
    if not path:
        return Check("containerd", FAIL, f"{env.containerd} not found on PATH",
                     "install containerd 1.6 or newer (Debian: apt-get install containerd)", (CONTAINERD,),
                     "containerd not found"), None, None
    rc, out = _run([path, "--version"])
    version = parse_containerd_version(out) if rc == 0 else None
    if version is None:
        return Check("containerd", FAIL, f"{path} --version: {out or rc}", "reinstall containerd",
                     (CONTAINERD,)), None, path
    v = ".".join(map(str, version))
    if version < (1, 6, 0):
        return Check("containerd", FAIL, f"{v} at {path}", "Kybernate needs containerd 1.6 or newer",
                     (CONTAINERD,)), version, path
    return Check("containerd", PASS, f"{v} at {path}"), version, path


def check_daemon(env: DoctorEnv) -> Check:
    address = env.address.removeprefix("unix://")
    if not os.path.exists(address):
        return Check("containerd daemon", WARN, f"no socket at {address}: containerd is not running there",
                     "start containerd (systemctl start containerd), or pass --address", ())
    try:
        from .containerd_api import Containerd
        with Containerd(address, timeout=5) as client:
            version, revision = client.version()
    except Exception as exc:  # grpc errors and the like: report, do not crash the doctor
        return Check("containerd daemon", WARN, f"{address}: {_short(exc)}",
                     "check that containerd is running and this user may open its socket (root)", ())
    return Check("containerd daemon", PASS, f"serving {address} (version {version})")


def _short(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        try:
            return str(details())
        except Exception:
            pass
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def check_config(env: DoctorEnv, version: Optional[tuple[int, int, int]]) -> list[Check]:
    from .containerd_config import CRI_PLUGIN, ConfigUnreadable, inspect

    name = "runtime in containerd config"
    snippet = "packaging/containerd/config-v3.toml" if version and version[0] >= 2 else \
        "packaging/containerd/config-v2.toml"
    install_fix = (f"run packaging/install.sh (merges the runtime into {env.config}), or add the tables of "
                   f"{snippet} and restart containerd")
    try:
        report = inspect(env.config)
    except ConfigUnreadable as exc:
        return [Check(name, FAIL, str(exc), "fix the file at that line (the installer keeps a backup as "
                      "config.toml.kybernate-backup), then restart containerd", (CONTAINERD,),
                      f"{env.config} is not valid TOML" + (f" (line {exc.line})" if exc.line else ""))]
    if not report.exists:
        return [Check(name, FAIL, f"{env.config} does not exist (containerd runs on its defaults: no "
                      "kybernate runtime for Kubernetes; ctr --runtime still works)", install_fix, (CONTAINERD,),
                      f"{env.config} does not exist")]
    checks = []
    if report.schema == 3 and version and version[0] < 2:
        checks.append(Check("containerd config version", FAIL, f"{env.config} is version 3 but containerd is "
                            f"{'.'.join(map(str, version))}", "use a version 2 config with containerd 1.x",
                            (CONTAINERD,)))
    if report.cri_disabled:
        checks.append(Check("CRI plugin", WARN, f"disabled in {env.config} (disabled_plugins)",
                            "remove the CRI plugin from disabled_plugins for Kubernetes", ()))
    for m in report.misplaced:
        checks.append(Check("misplaced runtime entry", WARN, m, "move it to the table of the file's version", ()))
    if not report.entries:
        checks.append(Check(name, FAIL, f"{env.config} (config version {report.schema}) declares no runtime "
                            f"with runtime_type {RUNTIME_TYPE} under plugins.\"{CRI_PLUGIN[report.schema]}\"",
                            install_fix, (CONTAINERD,), f"no kybernate runtime in {env.config}"))
        return checks
    for e in report.entries:
        rt = e.table.get("runtime_type")
        if rt != RUNTIME_TYPE:
            checks.append(Check(name, FAIL, f"{e.file}: runtime {e.handler!r} has runtime_type {rt!r}",
                                f"set runtime_type = \"{RUNTIME_TYPE}\"", (CONTAINERD,)))
            continue
        detail = f"handler {e.handler!r} in {e.file} (config version {e.schema}, plugins.\"{e.plugin}\")"
        checks.append(Check(name, PASS, detail))
        if not e.annotations_pass:
            checks.append(Check("annotations passed to the shim", WARN,
                                f"runtime {e.handler!r} has no pod_annotations/container_annotations for "
                                "kybernate.io/*: pod annotations such as kybernate.io/restore-from will not "
                                "reach the shim", 'add pod_annotations = ["kybernate.io/*"] and '
                                'container_annotations = ["kybernate.io/*"]', ()))
        if e.handler != RUNTIME_HANDLER:
            checks.append(Check("RuntimeClass handler", INFO, f"the handler is {e.handler!r}: RuntimeClass "
                                f"objects must name handler: {e.handler}"))
    return checks


def check_shim(env: DoctorEnv, containerd_path: Optional[str]) -> Check:
    extra = [os.path.dirname(containerd_path)] if containerd_path else []
    path = env.which(SHIM_BINARY, extra)
    if not path:
        return Check("shim binary", FAIL, f"{SHIM_BINARY} not found on PATH nor in {', '.join(SYSTEM_DIRS)}",
                     "run packaging/install.sh (links it into /usr/local/bin)", (CONTAINERD,),
                     f"{SHIM_BINARY} not on PATH")
    rc, out = _run([path, "-v"], timeout=30)
    if rc != 0:
        return Check("shim binary", FAIL, f"{path} -v exited {rc}: {out[-300:]}",
                     "reinstall with packaging/install.sh --force-reinstall", (CONTAINERD,))
    m = re.search(r"Version:\s*(\S+)", out)
    return Check("shim binary", PASS, f"{path} (version {m.group(1) if m else '?'})")


# ---- OCI runtimes ---------------------------------------------------------------------------------
def check_runc(env: DoctorEnv) -> Check:
    path = env.which("runc")
    if not path:
        return Check("runc", FAIL, "runc not found on PATH", "install runc (Debian: apt-get install runc)", (CPU,),
                     "runc not found")
    rc, out = _run([path, "--version"])
    first = out.splitlines()[0] if out else ""
    if rc != 0:
        return Check("runc", FAIL, f"{path} --version exited {rc}: {out[-200:]}", "reinstall runc", (CPU,))
    return Check("runc", PASS, f"{first} at {path}")


def check_nvidia_runtime(env: DoctorEnv) -> Check:
    path = env.which("nvidia-container-runtime")
    if not path:
        return Check("nvidia-container-runtime", WARN,
                     "not installed: GPU containers need their devices in the spec already (CDI), which "
                     "plain runc runs; the device plugin's env mode ([gpu] nvidia_runtime) needs it",
                     "use CDI, or install the NVIDIA Container Toolkit (docs/operators.md section 6)")
    return Check("nvidia-container-runtime", PASS, path)


# ---- CRIU -----------------------------------------------------------------------------------------
def check_criu(env: DoctorEnv) -> tuple[list[Check], Optional[str]]:
    from criu import CriuError, criu_check, criu_version, find_criu
    from criu.binary import BUILD_HINT, format_version

    try:
        path = str(find_criu(env.criu, path_env=env.path))
    except CriuError as exc:
        return [Check("CRIU", FAIL, str(exc).split(";")[0], BUILD_HINT, (CPU,), "CRIU not found")], None
    try:
        version = criu_version(path)
    except CriuError as exc:
        return [Check("CRIU", FAIL, str(exc), BUILD_HINT, (CPU,), f"{path} does not run")], path
    checks = []
    v = format_version(version)
    if version[0] < 4:
        checks.append(Check("CRIU", FAIL, f"{v} at {path} is too old (Kybernate needs CRIU 4.x)", BUILD_HINT, (CPU,),
                            f"CRIU {v} at {path} is older than 4"))
    else:
        checks.append(Check("CRIU", PASS, f"{v} at {path}"))
    if env.euid != 0:
        checks.append(Check("criu check", WARN, "not run: `criu check` needs root",
                            "run `sudo kybernate doctor`", ()))
        return checks, path
    ok, text = criu_check(path)
    if ok:
        checks.append(Check("criu check", PASS, text.splitlines()[-1] if text else "passed"))
    else:
        errors = [line for line in text.splitlines() if "Error" in line or "error" in line] or text.splitlines()
        checks.append(Check("criu check", FAIL, f"{path} check failed: " + " | ".join(errors[:3])[:500],
                            "use a kernel with checkpoint/restore support (CONFIG_CHECKPOINT_RESTORE) and "
                            "CRIU 4 built for it; " + BUILD_HINT, (CPU,), f"`{path} check` fails"))
    return checks, path


def criu_default_plugin_dir(criu_path: Optional[str]) -> Optional[str]:
    """The plugin directory compiled into CRIU (`criu --help` says "by default /usr/lib/criu/")."""
    if os.environ.get("CRIU_LIBS_DIR"):
        return os.environ["CRIU_LIBS_DIR"]
    if not criu_path:
        return None
    _, out = _run([criu_path, "--help"], timeout=10)
    m = re.search(r"--libdir\s+.*?\(by default ([^)\s]+)\)", out)
    return m.group(1).rstrip("/") if m else None


def check_criu_plugins(env: DoctorEnv, criu_path: Optional[str]) -> Check:
    default = criu_default_plugin_dir(criu_path)
    dirs = list(dict.fromkeys([d for d in [default, *env.criu_plugin_dirs] if d]))
    found = [d for d in dirs if os.path.isfile(os.path.join(d, "cuda_plugin.so"))]
    where = f"CRIU's default plugin dir {default}" if default else "CRIU's default plugin dir unknown"
    if not found:
        return Check("CRIU CUDA plugin", INFO, f"cuda_plugin.so not in {', '.join(dirs)} ({where}); not "
                     "needed: the shim checkpoints CUDA state before CRIU runs",
                     "optional: scripts/build-criu.sh installs /usr/local/lib/criu/cuda_plugin.so")
    note = "" if default and found[0] == default else \
        f"; not in {where}: CRIU loads it only if the node config names that dir ([criu] plugin_dir = " \
        f"\"{found[0]}\" in /etc/kybernate/config.toml); not needed, the shim checkpoints CUDA state itself"
    return Check("CRIU CUDA plugin", PASS, f"{found[0]}/cuda_plugin.so{note}")


# ---- cgroups --------------------------------------------------------------------------------------
def cgroup_layout(root: str) -> tuple[str, str]:
    """('v2'|'v1'|'hybrid', description)."""
    try:
        fstype = _fstype(root)
    except OSError as exc:
        return "unknown", f"{root}: {exc.strerror}"
    if fstype == "cgroup2":
        return "v2", f"cgroup v2 (unified) at {root}"
    unified = os.path.join(root, "unified")
    if os.path.ismount(unified) and _fstype(unified) == "cgroup2":
        return "hybrid", f"cgroup v1 at {root} (hybrid: cgroup v2 also at {unified})"
    return "v1", f"cgroup v1 at {root}"


def _fstype(path: str) -> str:
    best, fstype = "", ""
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 3:
                continue
            mnt = fields[1].replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, fields[2]
    if not best:
        raise OSError(2, "not mounted")
    return fstype


def check_cgroup(env: DoctorEnv) -> Check:
    layout, desc = cgroup_layout(env.cgroup_root)
    if layout == "unknown":
        return Check("cgroups", FAIL, desc, "mount cgroups (systemd does this at boot)", (CPU,), "no cgroups")
    if layout == "v2":
        freezer = os.path.exists(os.path.join(env.cgroup_root, "cgroup.subtree_control"))
        has = "cgroup.freeze per cgroup"
    else:
        freezer = os.path.isdir(os.path.join(env.cgroup_root, "freezer"))
        has = "freezer controller"
    if not freezer:
        return Check("cgroups", FAIL, f"{desc}; no freezer", "enable the cgroup freezer (containerd pauses "
                     "tasks around a checkpoint)", (CPU,), "no cgroup freezer")
    return Check("cgroups", PASS, f"{desc}; {has}")


# ---- CUDA -----------------------------------------------------------------------------------------
def check_cuda(env: DoctorEnv) -> list[Check]:
    try:
        from cuda_bindings import CudaBindingsError, CudaDriver, CudaError, DriverMissing, DriverTooOld
        from cuda_bindings.errors import format_version
    except Exception as exc:  # cffi missing, say
        return [Check("CUDA driver", FAIL, f"cannot load cuda_bindings: {exc}", "reinstall kybernate", (GPU,))]
    factory = env.cuda_driver or CudaDriver
    try:
        driver = factory()
    except DriverMissing as exc:
        return [Check("CUDA driver", FAIL, f"no NVIDIA driver: {exc.path} cannot be loaded ({_first(exc.reason)})",
                      "install the NVIDIA driver (r570 or newer for the checkpoint API), or point "
                      "KYBERNATE_LIBCUDA at libcuda.so.1", (GPU,),
                      f"no NVIDIA driver: {exc.path} cannot be loaded")]
    except CudaError as exc:
        return [Check("CUDA driver", FAIL, f"the driver loads but cuInit fails: {exc}",
                      "check that a GPU is present and visible (nvidia-smi)", (GPU,),
                      f"the CUDA driver does not initialise ({getattr(exc, 'name', exc)})")]
    except CudaBindingsError as exc:
        return [Check("CUDA driver", FAIL, str(exc), "", (GPU,))]
    version = driver.driver_version()
    checks = [Check("CUDA driver", PASS, f"{getattr(driver, 'path', 'libcuda')} (driver API {format_version(version)})")]
    try:
        driver.require_checkpoint_api()
    except DriverTooOld as exc:
        checks.append(Check("CUDA checkpoint API", FAIL, str(exc),
                            "upgrade the NVIDIA driver to r570 (CUDA 12.8) or newer", (GPU,),
                            f"driver API {format_version(version)} lacks the checkpoint API (needs 12.8)"))
        return checks
    try:
        count = driver.device_count()
        devices = f"{count} GPU(s)"
    except Exception as exc:
        devices = f"devices unknown: {exc}"
    checks.append(Check("CUDA checkpoint API", PASS, f"cuCheckpointProcess* present; {devices}"))
    return checks


def _first(text: str) -> str:
    return text.split(".  ")[0].strip()


# ---- all together ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    checks: list[Check]
    cpu_ready: bool
    cpu_reason: str
    gpu_ready: bool
    gpu_reason: str
    containerd_ready: bool
    containerd_reason: str

    @property
    def exit_code(self) -> int:
        return 0 if self.cpu_ready else 1

    def summary_lines(self) -> list[str]:
        return [
            "CPU checkpoint: " + ("ready" if self.cpu_ready else f"not ready ({self.cpu_reason})"),
            "GPU checkpoint: " + ("ready" if self.gpu_ready else f"not available ({self.gpu_reason})"),
            "containerd runtime: " + ("configured" if self.containerd_ready
                                      else f"not configured ({self.containerd_reason})"),
        ]

    def to_dict(self) -> dict:
        return {"checks": [c.to_dict() for c in self.checks],
                "cpu": {"ready": self.cpu_ready, "reason": self.cpu_reason},
                "gpu": {"ready": self.gpu_ready, "reason": self.gpu_reason},
                "containerd": {"ready": self.containerd_ready, "reason": self.containerd_reason}}


def _reason(checks: list[Check], group: str) -> str:
    failed = [c for c in checks if c.failed and group in c.affects]
    return "; ".join(c.short or f"{c.name}: {c.detail}" for c in failed)


def check_store() -> Check:
    """The node's checkpoint store: what it holds, and the checkpoints that cannot be restored (a half
    image left by a shim killed mid-checkpoint is "abandoned")."""
    from kybernate.checkpoints import human, list_store
    from shim.policy.node import NodeConfig, NodeConfigError

    try:
        store = NodeConfig.load().checkpoint_store
    except NodeConfigError as exc:
        return Check("checkpoint store", FAIL, str(exc), "fix the node config file", (CPU,), "node config refused")
    try:
        rows = list_store(store)
    except OSError as exc:
        return Check("checkpoint store", WARN, f"{store}: {exc.strerror or exc}", "", ())
    bad = [r for r in rows if r.status in ("abandoned", "incomplete")]
    total = sum(r.size_bytes for r in rows)
    detail = f"{store}: {len(rows)} checkpoint(s), {human(total)}"
    if bad:
        listed = "; ".join(f"{r.path} {r.status} ({r.why})" for r in bad[:5])
        return Check("checkpoint store", WARN, f"{detail}; {len(bad)} cannot be restored: {listed}",
                     "`kybernate checkpoints prune` removes the abandoned ones", (), f"{len(bad)} half image(s)")
    return Check("checkpoint store", PASS, detail)


def _fs_type(path: str) -> str:
    """The filesystem type of the mount holding ``path`` (longest mount point prefix in /proc/self/mounts)."""
    best, kind = "", ""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mnt = fields[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, fields[2]
    except OSError:
        return ""
    return kind


def check_tiers() -> list[Check]:
    """The node's checkpoint tiers ([store]): each directory root's alone, tier 1 in RAM, the state
    dir, the registry reachable with the node's credentials, a worker serving the queue."""
    import fcntl

    from kybernate.checkpoints import human
    from shim.policy.node import NodeConfig, NodeConfigError
    from shim.policy.store import StoreError, check_store_root

    try:
        node = NodeConfig.load()
    except NodeConfigError as exc:
        return [Check("checkpoint tiers", FAIL, str(exc), "fix the node config file", (CPU,), "node config refused")]
    if not node.tiers:
        return [Check("checkpoint tiers", INFO, "off (node config [store] ram_dir and registry unset): checkpoints "
                                                "stay where they are written", "", ())]
    from tiers.store import TierStore

    store = TierStore(node)
    checks = []
    for tier in ("ram", "disk"):
        root = store.roots[tier]
        if not root:
            continue
        name = f"tier {1 if tier == 'ram' else 2} ({tier})"
        try:
            check_store_root(root)
        except StoreError as exc:
            checks.append(Check(name, FAIL, exc.reason, f"mkdir -m 0700 {root} (owned by root)", (CPU,),
                                f"{tier} tier unusable"))
            continue
        fs = _fs_type(root)
        cap = store.caps[tier]
        used = store.used_bytes(tier)
        detail = f"{root} ({fs or '?'}), {human(used)} used" + (f" of {human(cap)}" if cap else ", no cap")
        if tier == "ram" and fs not in ("tmpfs", "ramfs"):
            checks.append(Check(name, WARN, detail + ": not a tmpfs, tier 1 is no faster than disk",
                                f"mount -t tmpfs -o size=...,mode=0700 tmpfs {root}", ()))
        else:
            checks.append(Check(name, PASS, detail))
    try:
        store.catalog.ensure()
        lock = os.open(os.path.join(node.store_state_dir, "worker.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        checks.append(Check("tier state", FAIL, f"{node.store_state_dir}: {exc.strerror or exc}", "", (CPU,)))
        return checks
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        serving = False
    except OSError:
        serving = True
    finally:
        os.close(lock)
    jobs = store.catalog.jobs()
    failing = [j for j in jobs if j.last_error]
    detail = f"{node.store_state_dir}: {len(store.catalog.records())} checkpoint(s), {len(jobs)} copy job(s) pending"
    if failing:
        detail += f", {len(failing)} failing (last: {failing[0].id}: {failing[0].last_error[:120]})"
    if not serving and jobs:
        checks.append(Check("tier worker", WARN, detail + "; no worker serves them",
                            "run `kybernate store serve` (systemd unit or the installer's DaemonSet)", ()))
    else:
        checks.append(Check("tier worker", WARN if failing else PASS,
                            detail + ("; a worker serves them" if serving else ""), "", ()))
    if node.store_registry:
        from tiers import TierError

        try:
            reg = store.registry()
            reg.timeout = 5.0
            reg.ping()
            checks.append(Check("tier 3 (registry)", PASS, f"{reg} answers, credentials accepted"))
        except TierError as exc:
            checks.append(Check("tier 3 (registry)", FAIL, exc.why, "check [store] registry, registry_plain_http "
                                "and credentials_file", (), "registry unusable"))
    return checks


def run_checks(env: DoctorEnv) -> Result:
    checks: list[Check] = []
    c, version, containerd_path = check_containerd(env)
    checks.append(c)
    if env.check_daemon:
        checks.append(check_daemon(env))
    checks += check_config(env, version)
    checks.append(check_shim(env, containerd_path))
    checks.append(check_runc(env))
    checks.append(check_store())
    checks += check_tiers()
    criu_checks, criu_path = check_criu(env)
    checks += criu_checks
    checks.append(check_cgroup(env))
    checks += check_cuda(env)
    checks.append(check_criu_plugins(env, criu_path))
    checks.append(check_nvidia_runtime(env))
    cpu_reason = _reason(checks, CPU)
    gpu_reason = _reason(checks, GPU)
    if cpu_reason and not gpu_reason:
        gpu_reason = "CPU checkpoint not ready"
    containerd_reason = _reason(checks, CONTAINERD)
    return Result(checks, not cpu_reason, cpu_reason, not cpu_reason and not gpu_reason, gpu_reason,
                  not containerd_reason, containerd_reason)


_TAGS = {PASS: "[ ok ]", FAIL: "[FAIL]", WARN: "[warn]", INFO: "[info]"}


def render(result: Result) -> str:
    lines = []
    for c in result.checks:
        lines.append(f"{_TAGS[c.status]} {c.name}: {c.detail}")
        if c.fix and c.status in (FAIL, WARN):
            lines.append(f"       fix: {c.fix}")
    lines.append("")
    lines += result.summary_lines()
    return "\n".join(lines)


def main(args) -> int:
    env = DoctorEnv(config=args.config, address=args.address, containerd=args.containerd, criu=args.criu)
    result = run_checks(env)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(render(result))
    sys.stdout.flush()
    return result.exit_code

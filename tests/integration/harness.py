"""Private containerd instances for integration tests (and the demo).

    cd = Containerd("1.7", tmp_path)          # "1.6" | "1.7" | "2.1"
    cd.start()
    cd.import_busybox()                       # docker.io/kybernate/busybox:test
    cd.ctr("run", "--rm", BUSYBOX_REF, "c1", "echo", "hi").stdout
    cd.stop()                                 # tasks, shims, mounts, cgroups, dirs: all gone

Each instance has its own root (workdir/root), state and sockets (a short directory under /run, since
unix socket paths are limited to 108 bytes), its own containerd namespace for ctr (unique, so runc's
state under /run/containerd/runc/<ns> and cgroups /<ns>/<id> never collide with another instance), a
config.toml (version 2 for 1.6/1.7, version 3 for 2.1) declaring the runtimes io.containerd.runc.v2
(CRI name "runc", the default) and io.containerd.kybernate.v1 (CRI name "kybernate"), and a PATH in
which containerd finds the matching containerd-shim-runc-v2, our shim (REPO/.venv/bin), CRIU 4
(/usr/local/sbin) and the matching runc (bookworm's 1.1 for 1.6/1.7, runc 1.3 for 2.1).
The debug log of containerd (and of the shims, which log through it) is workdir/containerd.log.

Each instance also has its own kybernate node config (workdir/kybernate.toml, named to containerd and
so to the shims by KYBERNATE_CONFIG; `kybernate` run with ``cd.env`` reads it too): the checkpoint
store is workdir/checkpoints, and checkpoint.restore_roots is the workdir's parent (pytest's tmp
dirs, where tests put their images) unless ``restore_roots`` says otherwise. Checkpoints are sealed
with the instance's own seal key (workdir/seal.key, 0600) and a restore needs a seal it verifies
(checkpoint.require_seal, the default). `node_config()` changes the config for a while (the shim
reads it at every Create and Checkpoint).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from .images import BUSYBOX_REF, PAUSE_REF, ExtraFile, build_image

REPO = Path(__file__).resolve().parents[2]
DEPS = Path(os.environ.get("KYB_DEPS", "/opt/kybernate-deps"))
VENV_BIN = REPO / ".venv" / "bin"
SHIM_BINARY = VENV_BIN / "containerd-shim-kybernate-v1"
VERSIONS = ("1.6", "1.7", "2.1")
RUNC_RUNTIME = "io.containerd.runc.v2"
KYBERNATE_RUNTIME = "io.containerd.kybernate.v1"
RUNTIMES = (RUNC_RUNTIME, KYBERNATE_RUNTIME)
# runc's default --root as containerd-shim-runc-v2 uses it (plus /<namespace>) when no options are given.
RUNC_DEFAULT_ROOT = Path("/run/containerd/runc")
# Where shims of every containerd version put their sockets: sha256(<grpc address>/<ns>/<id>).
SHIM_SOCKET_DIR = Path("/run/containerd/s")
SYSTEM_PATH = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]


@dataclass(frozen=True)
class Installation:
    """Where one containerd version's binaries are, and which runc it runs containers with."""
    version: str
    bin_dir: Path          # containerd, ctr, containerd-shim-runc-v2
    runc: Path

    @property
    def containerd(self) -> Path:
        return self.bin_dir / "containerd"

    @property
    def ctr(self) -> Path:
        return self.bin_dir / "ctr"

    @property
    def path_dirs(self) -> list[str]:
        """containerd's PATH (inherited by shims, and by runc/criu through them): the matching runc and
        shim first, then our shim (.venv/bin), then the system with /usr/local/sbin (CRIU 4) first."""
        own = [str(d) for d in (self.runc.parent, self.bin_dir) if str(d) not in SYSTEM_PATH]
        return list(dict.fromkeys(own + [str(VENV_BIN)] + SYSTEM_PATH))


def installation(version: str) -> Installation:
    if version == "1.6":
        return Installation("1.6", Path("/usr/bin"), Path("/usr/sbin/runc"))
    if version == "1.7":
        return Installation("1.7", DEPS / "containerd-1.7/usr/bin", Path("/usr/sbin/runc"))
    if version == "2.1":
        return Installation("2.1", DEPS / "containerd-2.1/usr/bin", DEPS / "runc-1.3/usr/sbin/runc")
    raise ValueError(f"unknown containerd version {version!r}; expected one of {VERSIONS}")


def unavailable_reason(version: str, runc_shim: bool = True) -> str | None:
    """Why a Containerd(version) cannot run here (None when it can): for pytest.skip.
    runc_shim=False: tests that run only the kybernate runtime (tests/gpu; the GPU machine's bundle
    carries no containerd-shim-runc-v2) need no runc-v2 shim."""
    if os.geteuid() != 0:
        return "integration tests need root (containerd, runc, mounts, cgroups)"
    inst = installation(version)
    needed = [inst.containerd, inst.ctr, inst.runc] + ([inst.bin_dir / "containerd-shim-runc-v2"] if runc_shim else [])
    for binary in needed:
        if not os.access(binary, os.X_OK):
            return f"containerd {version}: {binary} is missing; run scripts/setup.sh"
    return None


class CtrError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return (f"{' '.join(map(str, self.cmd))} exited {self.returncode}\n"
                f"stdout: {self.stdout!r}\nstderr: {self.stderr!r}")


def shim_socket_path(grpc_address: str, namespace: str, container_id: str, debug: bool = False) -> Path:
    """The socket a runc v2 shim listens on (containerd's shim.SocketAddress, same in 1.6 to 2.1);
    debug=True: the extra debug socket 2.x shims open when containerd runs them with -debug."""
    key = f"{grpc_address}/{namespace}/{container_id}" + ("/debug" if debug else "")
    return SHIM_SOCKET_DIR / hashlib.sha256(key.encode()).hexdigest()


def _toml_str(value: str | Path) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


_libc = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH = 2


def _umount(path: str) -> None:
    if _libc.umount2(path.encode(), 0) == 0:
        return
    if _libc.umount2(path.encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {path}: {os.strerror(err)}")


def mounts_under(*prefixes: Path) -> list[str]:
    """Mount points at or below any of the prefixes, deepest first (from /proc/self/mountinfo)."""
    roots = [str(p).rstrip("/") for p in prefixes]
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mount_point = line.split()[4].encode().decode("unicode_escape")  # \040 etc.
            if any(mount_point == r or mount_point.startswith(r + "/") for r in roots):
                found.append(mount_point)
    return sorted(set(found), key=lambda m: m.count("/"), reverse=True)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in _all_pids():
        pp = _ppid(p)
        if pp is not None:
            children.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill(pids: Sequence[int], sig: int = signal.SIGKILL) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if process_alive(p)]
        if alive:
            time.sleep(0.05)
    return alive


def process_alive(pid: int) -> bool:
    """True for a live process; False for a gone one or a zombie (an exited shim whose reaper is init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def listening_unix_sockets(pids: Sequence[int]) -> set[Path]:
    """Paths of the unix sockets the processes listen on (their fds matched against /proc/net/unix)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[len("socket:["):-1])
    found = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 = listening
            if (len(fields) >= 8 and fields[6] in inodes and int(fields[3], 16) & 0x10000
                    and fields[7].startswith("/")):
                found.add(Path(fields[7]))
    return found


def _cgroup_mounts() -> list[Path]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[2] in ("cgroup", "cgroup2"):
                out.append(Path(fields[1]))
    return out


class Containerd:
    """A private containerd of one version. See the module docstring."""

    def __init__(self, version: str, workdir: Path | str, namespace: str | None = None,
                 extra_config: str = "", keep_log: bool = True, restore_roots: Sequence[str] | None = None,
                 netns: str | None = None):
        """extra_config: TOML appended to the generated config (must not repeat its tables).
        keep_log: leave workdir/containerd.log after stop() (the only thing left).
        restore_roots: the node config's checkpoint.restore_roots (default: the workdir's parent).
        netns: a named network namespace (/var/run/netns/NAME) containerd, and so its shims, run in
        (entered with nsenter --net only: the mount namespace stays the host's, so its mounts are
        seen here as with any other instance); None: the host's."""
        self.netns = netns
        self.version = version
        self.install = installation(version)
        self.workdir = Path(workdir).resolve()
        token = secrets.token_hex(3)
        self.namespace = namespace or f"kybtest-{token}"
        self.extra_config = extra_config
        self.keep_log = keep_log
        # Short, unique: /run/kyb-2.1-a1b2c3/containerd.sock.ttrpc is 44 bytes.
        self.run_dir = Path("/run") / f"kyb-{version}-{token}"
        self.root = self.workdir / "root"
        self.state = self.run_dir / "state"
        self.address = str(self.run_dir / "containerd.sock")
        self.ttrpc_address = self.address + ".ttrpc"
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self.opt_dir = self.workdir / "opt"
        self.cni_dir = self.workdir / "cni"
        self.runc_root = RUNC_DEFAULT_ROOT / self.namespace   # where ctr-started runc containers live
        self.cri_runc_root = self.state / "runc"               # CRI runtime "runc" (Root option)
        self.node_config_path = self.workdir / "kybernate.toml"
        self.seal_key_path = self.workdir / "seal.key"
        self.checkpoint_store = self.workdir / "checkpoints"
        self.restore_roots = [str(self.workdir.parent)] if restore_roots is None else [str(r) for r in restore_roots]
        self.node_sections: dict[str, Mapping[str, object]] = {}   # standing node config over the defaults
        self.env = self._environment()
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._image_cache: dict[tuple, str] = {}

    # ---- properties --------------------------------------------------------------------------
    @property
    def runc_path(self) -> Path:
        return self.install.runc

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k in ("HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME", "TERM")}
        env["PATH"] = os.pathsep.join(self.install.path_dirs)
        env["KYBERNATE_CONFIG"] = str(self.node_config_path)
        return env

    # ---- kybernate's node config -------------------------------------------------------------
    def node_config_toml(self, **sections: Mapping[str, object]) -> str:
        """The node config: the instance's store, restore roots and seal key, seals required, with
        ``sections`` over them (``criu={"plugin_dir": ...}``, ``checkpoint={"require_seal": False}``)."""
        tables: dict[str, dict] = {"checkpoint": {"store": str(self.checkpoint_store),
                                                  "restore_roots": list(self.restore_roots),
                                                  "seal_key_file": str(self.seal_key_path), "require_seal": True}}
        for name, values in sections.items():
            tables.setdefault(name, {}).update(values)
        lines = []
        for name, values in tables.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]   # JSON scalars/lists are TOML
        return "\n".join(lines) + "\n"

    def write_node_config(self, **sections: Mapping[str, object]) -> None:
        """Make ``sections`` the instance's standing node config (over the defaults) and write it,
        before start() too: start() and the end of every node_config() write it again."""
        self.node_sections = dict(sections)
        self._write_node_config(self.node_sections)

    def _write_node_config(self, sections: Mapping[str, Mapping[str, object]]) -> None:
        """The node config file, and the seal key the first time (kept for the instance's life)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.seal_key_path.exists():
            fd = os.open(self.seal_key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, secrets.token_hex(32).encode() + b"\n")
            os.close(fd)
        tmp = self.node_config_path.with_suffix(".tmp")
        tmp.write_text(self.node_config_toml(**sections))
        tmp.chmod(0o644)   # the shim refuses a node config that others may write
        tmp.replace(self.node_config_path)

    @contextlib.contextmanager
    def node_config(self, **sections: Mapping[str, object]):
        """The node config with ``sections`` over the standing one for the duration (containers created
        meanwhile get it); then the standing one again."""
        merged = {name: dict(values) for name, values in self.node_sections.items()}
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        self._write_node_config(merged)
        try:
            yield self.node_config_path
        finally:
            self._write_node_config(self.node_sections)

    @property
    def seal_key(self) -> bytes:
        """The key this instance's shims seal with (as shim.checkpoint.seal.load_key reads it)."""
        return self.seal_key_path.read_bytes().strip()

    def which(self, name: str) -> str | None:
        """What containerd (and its shims) find under `name` on their PATH."""
        return shutil.which(name, path=self.env["PATH"])

    # ---- config ------------------------------------------------------------------------------
    def config_toml(self) -> str:
        if self.version == "2.1":
            cri_runtime = '"io.containerd.cri.v1.runtime"'
            head = [
                "version = 3",
                f"root = {_toml_str(self.root)}",
                f"state = {_toml_str(self.state)}",
                # NRI's default socket (/var/run/nri/nri.sock) would be shared between instances.
                'disabled_plugins = ["io.containerd.nri.v1.nri"]',
            ]
            images = [
                '[plugins."io.containerd.cri.v1.images".pinned_images]',
                f"  sandbox = {_toml_str(PAUSE_REF)}",
            ]
        else:
            cri_runtime = '"io.containerd.grpc.v1.cri"'
            head = [
                "version = 2",
                f"root = {_toml_str(self.root)}",
                f"state = {_toml_str(self.state)}",
            ]
            images = [
                '[plugins."io.containerd.grpc.v1.cri"]',
                f"  sandbox_image = {_toml_str(PAUSE_REF)}",
            ]
        rt = f"plugins.{cri_runtime}.containerd"
        lines = head + [
            "",
            "[grpc]",
            f"  address = {_toml_str(self.address)}",
            "[ttrpc]",
            f"  address = {_toml_str(self.ttrpc_address)}",
            "[debug]",
            '  level = "debug"',
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml_str(self.opt_dir)}",
            "",
            *images,
            "",
            f"[plugins.{cri_runtime}.cni]",
            (f"  bin_dirs = [{_toml_str(self.cni_dir / 'bin')}]" if self.version == "2.1"
             else f"  bin_dir = {_toml_str(self.cni_dir / 'bin')}"),
            f"  conf_dir = {_toml_str(self.cni_dir / 'net.d')}",
            f"[{rt}]",
            '  default_runtime_name = "runc"',
            f"[{rt}.runtimes.runc]",
            f'  runtime_type = "{RUNC_RUNTIME}"',
            f"[{rt}.runtimes.runc.options]",
            f"  BinaryName = {_toml_str(self.install.runc)}",
            f"  Root = {_toml_str(self.cri_runc_root)}",
            f"[{rt}.runtimes.kybernate]",
            f'  runtime_type = "{KYBERNATE_RUNTIME}"',
            "",
            self.extra_config,
        ]
        return "\n".join(lines) + "\n"

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "Containerd":
        if self.pid:
            raise RuntimeError(f"containerd {self.version} already running (pid {self.pid})")
        for d in (self.workdir, self.root, self.run_dir, self.state, self.opt_dir, self.cni_dir / "net.d"):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_toml())
        self._write_node_config(self.node_sections)
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"==== harness: starting containerd {self.version} ====\n".encode())
        self._log_file.flush()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)
        enter = ["nsenter", f"--net=/var/run/netns/{self.netns}"] if self.netns else []
        self.proc = subprocess.Popen(
            [*enter, str(self.install.containerd), "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            env=self.env, start_new_session=True, cwd=str(self.workdir))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd {self.version} exited {self.proc.returncode} at start:\n"
                                   + self.log_tail())
            if os.path.exists(self.address):
                r = self._run_ctr(["version"], timeout=5)
                if r.returncode == 0:
                    return self
            if time.monotonic() > deadline:
                self._terminate()
                raise TimeoutError(f"containerd {self.version} did not serve {self.address} in "
                                   f"{timeout}s:\n" + self.log_tail())
            time.sleep(0.1)

    def restart(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> "Containerd":
        """Stop containerd alone (shims and containers keep running, state stays) and start it again."""
        self._terminate(sig)
        return self.start(timeout)

    def stop(self) -> None:
        """Remove everything this instance made: tasks and containers (through containerd when it is
        up), then containerd, leftover shims and their processes, runc state, cgroups, mounts, dirs.
        Every step runs even when an earlier one failed; the first failure is raised at the end."""
        shim_sockets = self._shim_sockets()
        errors: list[BaseException] = []

        def attempt(fn, *args) -> None:
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - keep cleaning, report afterwards
                errors.append(e)

        if self.pid:
            attempt(self._delete_all_through_containerd)
        attempt(self._terminate)
        for _ in range(2):              # again, for anything a dying shim started meanwhile
            shim_sockets |= self._kill_shims()
            attempt(self._delete_runc_state)
            attempt(self._remove_cgroups)
            for m in mounts_under(self.workdir, self.run_dir):
                attempt(_umount, m)
            for sock in shim_sockets:   # a shim that was killed leaves its socket file
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()
            for p in (self.run_dir, self.root, self.opt_dir, self.cni_dir, self.workdir / "images",
                      self.checkpoint_store):
                shutil.rmtree(p, ignore_errors=True)
            if not self.shim_pids():
                break
        for path in (self.config_path, self.node_config_path, self.seal_key_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if not self.keep_log:
            with contextlib.suppress(FileNotFoundError):
                self.log_path.unlink()
            with contextlib.suppress(OSError):
                self.workdir.rmdir()    # only when empty: it may hold the caller's files
        if errors:
            raise errors[0]

    def __enter__(self) -> "Containerd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _terminate(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _namespaces(self) -> list[str]:
        r = self._run_ctr(["namespaces", "ls", "-q"], timeout=10)
        return r.stdout.split() if r.returncode == 0 else [self.namespace]

    def _delete_all_through_containerd(self) -> None:
        for ns in self._namespaces():
            tasks = self.ctr("tasks", "ls", "-q", namespace=ns, check=False, timeout=15).stdout.split()
            for t in tasks:
                self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", t, namespace=ns, check=False, timeout=15)
            for t in tasks:
                self.ctr("tasks", "delete", "-f", t, namespace=ns, check=False, timeout=30)
            for c in self.ctr("containers", "ls", "-q", namespace=ns, check=False, timeout=15).stdout.split():
                self.ctr("containers", "delete", c, namespace=ns, check=False, timeout=30)

    def _shim_sockets(self) -> set[Path]:
        """Socket files of this instance's shims: what each bundle's `address` file names (any shim),
        and runc v2's computed main and debug sockets for every task bundle."""
        found: set[Path] = set()
        for bundle in self.state.glob("io.containerd.runtime.v2.task/*/*"):
            with contextlib.suppress(OSError):
                address = (bundle / "address").read_text().strip()
                if address.startswith("unix://"):
                    found.add(Path(address[len("unix://"):]))
            for debug in (False, True):
                found.add(shim_socket_path(self.address, bundle.parent.name, bundle.name, debug))
        return found

    # ---- processes ---------------------------------------------------------------------------
    def shim_pids(self) -> list[int]:
        """Shims started by this containerd: every v2 shim carries `-address <our grpc address>`."""
        pids = []
        for p in _all_pids():
            args = _cmdline(p)
            for i, a in enumerate(args[:-1]):
                if a in ("-address", "--address") and args[i + 1] == self.address and process_alive(p):
                    pids.append(p)
                    break
        return pids

    def _kill_shims(self) -> set[Path]:
        """Kill what is left of this instance's shims: their container processes first (reparented
        to the shim, a subreaper), then the shims (SIGTERM, then SIGKILL). Returns the unix sockets
        they listened on, whose files a killed shim leaves behind."""
        sockets: set[Path] = set()
        for _ in range(3):
            shims = self.shim_pids()
            if not shims:
                break
            victims = [d for s in shims for d in descendants(s) if d not in shims]
            _kill(victims)
            _wait_gone(victims, 5)
            sockets |= listening_unix_sockets(shims)
            _kill(shims, signal.SIGTERM)
            _kill(_wait_gone(shims, 2))
            _wait_gone(shims, 5)
        return sockets

    def _delete_runc_state(self) -> None:
        for root in (self.runc_root, self.cri_runc_root):
            if not root.is_dir():
                continue
            for cdir in root.iterdir():
                subprocess.run([str(self.install.runc), "--root", str(root), "delete", "--force", cdir.name],
                               capture_output=True, timeout=30, env=self.env)
            shutil.rmtree(root, ignore_errors=True)

    def _remove_cgroups(self) -> None:
        """ctr's containers live in cgroup /<namespace>/<id> in every hierarchy: kill, then rmdir."""
        for mnt in _cgroup_mounts():
            top = mnt / self.namespace
            if not top.is_dir():
                continue
            dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                          reverse=True) + [top]
            for d in dirs:
                with contextlib.suppress(OSError):
                    pids = [int(x) for x in (d / "cgroup.procs").read_text().split()]
                    _kill(pids)
                    _wait_gone(pids, 5)
            for d in dirs:
                with contextlib.suppress(OSError):
                    d.rmdir()

    def leftovers(self) -> list[str]:
        """What stop() should have removed and is still there (empty after a clean stop)."""
        found = []
        if self.pid:
            found.append(f"containerd pid {self.pid}")
        found += [f"shim pid {p}: {' '.join(_cmdline(p))}" for p in self.shim_pids()]
        found += [f"mount {m}" for m in mounts_under(self.workdir, self.run_dir)]
        for p in (self.run_dir, self.root, self.opt_dir, self.cni_dir, self.runc_root, self.cri_runc_root,
                  self.checkpoint_store, self.node_config_path):
            if p.exists():
                found.append(f"path {p}")
        for mnt in _cgroup_mounts():
            if (mnt / self.namespace).exists():
                found.append(f"cgroup {mnt / self.namespace}")
        return found

    # ---- ctr ---------------------------------------------------------------------------------
    def _with_fifo_dir(self, args: list[str]) -> list[str]:
        """ctr keeps the IO fifos of detached tasks in /run/containerd/fifo/<n> forever; give the
        commands that make fifos our own directory instead, which stop() removes."""
        for words in (("run",), ("task", "start"), ("tasks", "start"), ("t", "start"),
                      ("task", "exec"), ("tasks", "exec"), ("t", "exec")):
            n = len(words)
            if tuple(args[:n]) == words:
                if any(a.split("=")[0] in ("--fifo-dir", "--log-uri", "--null-io") for a in args):
                    return args
                return [*words, "--fifo-dir", str(self.run_dir / "fifo"), *args[n:]]
        return args

    def _run_ctr(self, args: Sequence[str], namespace: str | None = None, timeout: float = 60,
                 input: str | None = None) -> subprocess.CompletedProcess:
        cmd = [str(self.install.ctr), "--address", self.address, "--namespace", namespace or self.namespace,
               *self._with_fifo_dir([str(a) for a in args])]
        return subprocess.run(cmd, input=input, stdin=None if input is not None else subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, env=self.env)

    def ctr(self, *args, check: bool = True, timeout: float = 60, input: str | None = None,
            namespace: str | None = None) -> subprocess.CompletedProcess:
        """Run this version's ctr against this containerd (stdin /dev/null unless `input`)."""
        r = self._run_ctr(args, namespace=namespace, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise CtrError(r.returncode, r.args, r.stdout, r.stderr)
        return r

    def import_image(self, ref: str = BUSYBOX_REF, extra_files: Mapping[str, ExtraFile] | None = None,
                     cmd: Sequence[str] | None = ("sh",), entrypoint: Sequence[str] | None = None,
                     namespace: str | None = None) -> str:
        """Build a busybox OCI archive (see images.py), import and unpack it; returns the ref."""
        key = (ref, namespace or self.namespace)
        if key in self._image_cache and not extra_files:
            return ref
        archive = build_image(self.workdir / "images" / f"{secrets.token_hex(4)}.tar", ref=ref,
                              extra_files=extra_files, cmd=cmd, entrypoint=entrypoint)
        try:
            self.ctr("images", "import", str(archive.path), namespace=namespace, timeout=120)
        finally:
            archive.path.unlink()
        listed = self.ctr("images", "ls", "-q", namespace=namespace).stdout.split()
        if ref not in listed:
            raise RuntimeError(f"{ref} not in `ctr images ls` after import: {listed}")
        if not extra_files:
            self._image_cache[key] = ref
        return ref

    def import_busybox(self, ref: str = BUSYBOX_REF, extra_files: Mapping[str, ExtraFile] | None = None,
                       namespace: str | None = None) -> str:
        return self.import_image(ref, extra_files=extra_files, namespace=namespace)

    def import_pause(self, namespace: str = "k8s.io") -> str:
        """The CRI sandbox image named in the config (busybox sleeping), into CRI's namespace."""
        return self.import_image(PAUSE_REF, cmd=None, entrypoint=("sleep", "2147483647"), namespace=namespace)

    # ---- logs --------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __repr__(self) -> str:
        return f"Containerd({self.version!r}, {str(self.workdir)!r}, namespace={self.namespace!r})"
